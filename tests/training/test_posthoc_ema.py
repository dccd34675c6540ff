"""Post-hoc EMA (Karras et al. 2024): σ_rel ↔ γ, the per-update factor against the exact profile,
the closed-form inner products against quadrature, the reconstruction of an untracked σ_rel (its
response and a small model's weights), and the snapshots a training run writes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from diffax import data, generate, losses, posthoc_ema, schedules, train, train_state
from diffax.config import base_config


@pytest.mark.parametrize("std_rel, gamma", [(0.05, 16.97), (0.10, 6.94), (18.0**-0.5, 1.0)])
def test_gamma_and_std_rel_invert_each_other(std_rel, gamma):
    assert posthoc_ema.gamma_from_std_rel(std_rel) == pytest.approx(gamma, abs=0.01)
    g = posthoc_ema.gamma_from_std_rel(std_rel)
    assert posthoc_ema.std_rel_from_gamma(g) == pytest.approx(std_rel, rel=1e-10)
    # σ_rel is the profile's std over its length: check against a numerical second moment.
    tau = np.linspace(0.0, 1.0, 200_001)
    p = posthoc_ema.profile(g, 1.0, tau)
    mean = np.trapezoid(tau * p, tau)
    assert np.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau)) == pytest.approx(std_rel, rel=1e-5)


def test_out_of_range_std_rel_is_refused():
    with pytest.raises(ValueError, match="std_rel 0.3 must be in"):
        posthoc_ema.gamma_from_std_rel(0.3)


def test_update_weights_are_the_profile_integrated_over_each_update():
    """β = (1 - B/t)^(γ+1) in float32 gives update k the weight ((kB)^(γ+1) - ((k-1)B)^(γ+1)) / t^(γ+1)."""
    gamma, batch, steps = posthoc_ema.gamma_from_std_rel(0.05), 32, 200
    weights = jnp.zeros((steps,), jnp.float32)
    for k in range(1, steps + 1):
        beta = posthoc_ema.power_beta(gamma, jnp.float32(k * batch), batch)
        weights = beta * weights + (1.0 - beta) * jax.nn.one_hot(k - 1, steps)
    edges = np.arange(steps + 1, dtype=np.float64) * batch / (steps * batch)
    exact = np.diff(edges ** (gamma + 1.0))
    np.testing.assert_allclose(weights, exact, rtol=2e-4, atol=1e-9)


def test_closed_form_inner_products_match_quadrature():
    times, gammas = np.array([3.0, 7.0, 10.0]), np.array([16.97, 6.94, 2.5])
    quadrature = np.empty((3, 3))
    for i, j in np.ndindex(3, 3):  # both profiles are smooth on [0, min(t_i, t_j)] and one is 0 after
        tau = np.linspace(0.0, min(times[i], times[j]), 200_001)
        p_i, p_j = (posthoc_ema.profile(gammas[k], times[k], tau) for k in (i, j))
        quadrature[i, j] = np.trapezoid(p_i * p_j, tau)
    np.testing.assert_allclose(
        posthoc_ema.profile_inner_products(times, gammas, times, gammas), quadrature, rtol=1e-6
    )


def _snapshot_grid(num_snapshots, std_rels=(0.05, 0.10)):
    times = np.repeat(np.arange(1, num_snapshots + 1, dtype=np.float64) / num_snapshots, len(std_rels))
    gammas = np.tile([posthoc_ema.gamma_from_std_rel(s) for s in std_rels], num_snapshots)
    return times, gammas


def test_untracked_std_rel_response_matches_the_exact_profile():
    """σ_rel = 0.075 from two tracked profiles × 20 snapshots: relative L2 error 2.3e-3 (a tracked one: 0)."""
    times, gammas = _snapshot_grid(20)
    target = posthoc_ema.gamma_from_std_rel(0.075)
    x = posthoc_ema.reconstruction_coefficients(times, gammas, target_time=1.0, target_gamma=target)
    error = posthoc_ema.response_l2_error(x, times, gammas, target_time=1.0, target_gamma=target)
    # The same error by quadrature of the reconstructed response against the exact profile.
    tau = np.linspace(0.0, 1.0, 200_001)
    response = sum(w * posthoc_ema.profile(g, t, tau) for w, t, g in zip(x, times, gammas, strict=True))
    exact = posthoc_ema.profile(target, 1.0, tau)
    by_quadrature = np.sqrt(np.trapezoid((response - exact) ** 2, tau) / np.trapezoid(exact**2, tau))
    assert error == pytest.approx(by_quadrature, rel=1e-3)
    assert error < 3e-3
    assert np.sum(x) == pytest.approx(1.0)
    tracked = posthoc_ema.gamma_from_std_rel(0.10)
    x = posthoc_ema.reconstruction_coefficients(times, gammas, target_time=1.0, target_gamma=tracked)
    assert posthoc_ema.response_l2_error(x, times, gammas, target_time=1.0, target_gamma=tracked) < 1e-6


def test_reconstructed_weights_match_a_directly_tracked_ema(tiny_net):
    """A small network trained 400 steps tracks σ_rel 0.05, 0.10 and 0.075; 0.075 is rebuilt from the
    first two's snapshots (every 20 steps) to relative error < 1e-2 of its distance from the
    initialisation."""
    module, batch, steps, every = tiny_net, 16, 400, 20
    tx, lr = train_state.make_optimizer(base_config().optim.copy_and_resolve_references(), total_steps=steps)
    init = functools.partial(train_state.init_state, module, tx, seed=0, image_shape=(8, 8, 1), num_ema=3)
    state = nn.meta.unbox(init())
    initial = state.params

    def apply_fn(params, x, t, cond, key):
        return module.apply({"params": params}, x, t, cond, train=True, rngs={"dropout": key})

    loss_fn = losses.make_loss(schedules.get("vp_linear"), apply_fn, loss="simple", prediction="eps")
    step_fn = jax.jit(
        train_state.make_train_step(
            loss_fn, tx, lr, ema_decays=(), ema_std_rels=(0.05, 0.10, 0.075), batch_images=batch
        )
    )
    means = data.mixture_means(num_components=4, image_shape=(8, 8, 1), seed=0)
    pipe = data.MixturePipeline(
        means, std=0.1, labels=False, global_batch=batch, seed=0, process_index=0, process_count=1
    )
    snapshots = []
    for step in range(1, steps + 1):
        state, _ = step_fn(state, pipe.get(step))
        if step % every == 0:
            snapshots.extend(state.ema_params[:2])
    times, gammas = _snapshot_grid(steps // every)
    x = posthoc_ema.reconstruction_coefficients(
        times, gammas, target_time=1.0, target_gamma=posthoc_ema.gamma_from_std_rel(0.075)
    )
    rebuilt = posthoc_ema.accumulate(None, snapshots, x)
    tracked = state.ema_params[2]

    def norm(tree):
        return float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree))))

    error = norm(jax.tree.map(jnp.subtract, rebuilt, tracked))
    assert error / norm(jax.tree.map(jnp.subtract, tracked, initial)) < 1e-2
    assert error / norm(tracked) < 1e-3


def test_training_writes_snapshots_and_evaluation_reconstructs_them(mixture_config, tmp_path):
    """A run tracking σ_rel 0.05 and 0.10 writes both at each checkpoint; ``load_run(ema_std=0.10)``
    (``diffax.evaluate --ema_std``) returns the newest snapshot's 0.10 EMA, which is in the basis."""
    config = mixture_config
    config.ema.decays = (0.9,)
    config.ema.std_rels = (0.05, 0.10)
    config.total_steps = 2
    config.ckpt.every_steps = 1
    state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
    assert posthoc_ema.snapshot_steps(str(tmp_path)) == [1, 2]
    _, _, params, step = generate.load_run(str(tmp_path), ema_std=0.10)
    assert step == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, state.ema_params[2])
    with pytest.raises(app.UsageError, match="--ema_std=0.5: std_rel 0.5 must be in"):
        generate.load_run(str(tmp_path), ema_std=0.5)
