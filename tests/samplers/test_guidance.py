"""Guidance against exact conditionals of a Gaussian mixture (class = component)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import convert, guidance, samplers
from diffax.samplers.exact import GaussianMixture


@pytest.fixture(scope="module")
def conditional_model(vp, mixture):
    """model(x, t, k): the exact eps of component k, or of the whole mixture where k = -1 (null)."""
    components = [
        GaussianMixture(np.ones(1), mixture.means[k : k + 1], mixture.covs[k : k + 1]).model_fn(vp)
        for k in range(len(mixture.weights))
    ]
    unconditional = mixture.model_fn(vp)
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        outs = jnp.stack([c(x, t) for c in components] + [unconditional(x, t)])  # (K + 1, B, D)
        index = jnp.where(cond < 0, len(components), cond)
        return jnp.take_along_axis(outs, index[None, :, None], axis=0)[0]

    return model, calls


@pytest.fixture(scope="module")
def batch(vp):
    x = jax.random.normal(jax.random.key(0), (32, 2))
    t = jnp.full((32,), 0.4)
    cond = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    return x, t, cond


def test_classifier_free_scale_one_is_conditional_and_zero_unconditional(conditional_model, batch):
    model, calls = conditional_model
    x, t, cond = batch
    null = jnp.full_like(cond, -1)
    guided_fn = jax.jit(
        lambda scale, x, t, c: guidance.classifier_free(model, scale, null_cond=null[0])(x, t, c)
    )
    calls.clear()
    for scale, reference_cond in [(1.0, cond), (0.0, null)]:
        guided = guided_fn(scale, x, t, cond)
        np.testing.assert_allclose(guided, jax.jit(model)(x, t, reference_cond), rtol=1e-6, atol=1e-6)
    assert calls[0] == 64 and calls.count(64) == 1  # both branches in one call, one trace for both scales
    guided = guided_fn(3.0, x, t, cond)
    model = jax.jit(model)
    expected = model(x, t, null) + 3.0 * (model(x, t, cond) - model(x, t, null))
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)


def test_guidance_rescale_matches_the_conditional_std(conditional_model, batch):
    model, _ = conditional_model
    _, t, cond = batch
    # 8-dimensional examples (four 2-D points each), so that each has a standard deviation
    model8 = jax.jit(lambda x, t, c: model(x.reshape(-1, 2), t.repeat(4), c.repeat(4)).reshape(x.shape))
    x8 = jax.random.normal(jax.random.key(3), (32, 8))
    null = jnp.int32(-1)
    guided = lambda phi: jax.jit(guidance.classifier_free(model8, 4.0, null_cond=null, rescale=phi))(
        x8, t, cond
    )
    plain, full, half = guided(0.0), guided(1.0), guided(0.5)
    np.testing.assert_allclose(np.std(full, axis=1), np.std(model8(x8, t, cond), axis=1), rtol=1e-5)
    np.testing.assert_allclose(half, 0.5 * (plain + full), rtol=1e-5, atol=1e-6)
    assert np.abs(plain - full).max() > 0.1
    with pytest.raises(ValueError, match="rescale"):
        guidance.classifier_free(model8, 4.0, null_cond=null, rescale=2.0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional(
    vp, mixture, conditional_model, batch, prediction
):
    """Bayes: grad log p(x_t | k) = grad log p(x_t) + grad log p(k | x_t)."""
    model, _ = conditional_model
    x, t, cond = batch

    def log_prob(x, t, k):
        logits = mixture.component_log_posterior(x, vp.alpha(t), vp.sigma(t))
        return jnp.take_along_axis(logits, k[:, None], axis=1)[:, 0]

    to_prediction = lambda eps: convert(vp, eps, x, t, source="eps", target=prediction)
    unconditional = lambda x, t: to_prediction(model(x, t, jnp.full_like(cond, -1)))
    for scale, reference in [(1.0, cond), (0.0, jnp.full_like(cond, -1))]:
        guided = guidance.classifier_guidance(
            unconditional, log_prob, scale, schedule=vp, prediction=prediction
        )
        expected = to_prediction(jax.jit(model)(x, t, reference))
        np.testing.assert_allclose(jax.jit(guided)(x, t, cond), expected, rtol=2e-4, atol=2e-5)


def test_guided_sampling_through_a_bound_condition(vp, conditional_model):
    """A ``Partial`` binding the condition is a ``model_fn(x, t)``; CFG at scale 1 samples the
    conditional model."""
    model, _ = conditional_model
    cond = jnp.arange(16) % 3
    x_T = jax.random.normal(jax.random.key(2), (16, 2))
    ts = samplers.timesteps(vp, num_steps=10)
    guided = jax.tree_util.Partial(guidance.classifier_free(model, 1.0, null_cond=jnp.int32(-1)), cond=cond)
    direct = jax.tree_util.Partial(model, cond=cond)
    run = lambda model_fn: samplers.sample(model_fn, vp, x_T, sampler="dpm_solver++_2m", timesteps=ts)
    np.testing.assert_allclose(run(guided), run(direct), atol=1e-5)


def test_guidance_interval_and_adaptive_guidance_reduce_to_their_limits(conditional_model, batch):
    """The interval: CFG inside, the conditional model (one branch, B examples) outside. Adaptive
    guidance: the conditional model at scale 1 or where the branches agree (threshold -2), CFG where
    they never agree (threshold 2)."""
    model, calls = conditional_model
    x, t, cond = batch
    null = jnp.int32(-1)
    jit_model = jax.jit(model)
    cfg = jax.jit(guidance.classifier_free(model, 3.0, null_cond=null))(x, t, cond)
    inside = guidance.classifier_free(model, 3.0, null_cond=null, interval=(0.3, 0.5))
    np.testing.assert_allclose(jax.jit(inside)(x, t, cond), cfg, rtol=1e-6, atol=1e-6)
    calls.clear()
    outside = jax.jit(guidance.classifier_free(model, 3.0, null_cond=null, interval=(0.5, 0.9)))(x, t, cond)
    np.testing.assert_allclose(outside, jit_model(x, t, cond), rtol=1e-6, atol=1e-6)
    assert sorted(calls) == [32, 64]  # the conditional-only branch and the guided one, both traced
    for scale, threshold, expected in [
        (1.0, 0.99, jit_model(x, t, cond)),
        (3.0, 2.0, cfg),
        (3.0, -2.0, None),
    ]:
        out = jax.jit(guidance.adaptive(model, scale, null_cond=null, threshold=threshold))(x, t, cond)
        expected = jit_model(x, t, cond) if expected is None else expected
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_perturbed_attention_guidance():
    """No perturbed layers: the model itself. The identity map makes a self-attention layer return its
    value projection; perturbing one layer changes the output. The U-Net's (and DiT's) self-attention
    layers are the same module, found by tracing."""
    import flax.linen as nn

    from diffax import models
    from diffax.models.layers import Attention

    unet = models.get(
        "unet_ddpm_cifar10",
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=2,
        norm_groups=4,
        dropout=0.0,
    )
    x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,))
    unet_fn = lambda x, t, c: unet.apply(unet.init(jax.random.key(0), x, t), x, t, c)
    unet_layers = guidance.attention_layers(unet_fn, x, t, None)
    assert len(unet_layers) == 4 and all(p.endswith("/self_attn") for p in unet_layers)  # down, mid, 2 up

    class Tiny(nn.Module):  # two self-attention layers between projections
        @nn.compact
        def __call__(self, x, t, cond):
            h = nn.Dense(8)(x) + t[:, None, None]
            for name in ("first", "second"):
                h = h + Attention(num_heads=2, head_dim=4, name=name)(h)
            return nn.Dense(x.shape[-1])(h)

    module = Tiny()
    x, t = jax.random.normal(jax.random.key(0), (2, 5, 3)), jnp.array([0.3, 0.7])
    params = module.init(jax.random.key(1), x, t, None)
    model_fn = lambda x, t, c: module.apply(params, x, t, c)
    paths = guidance.attention_layers(model_fn, x, t, None)
    assert paths == ["first", "second"]

    @jax.jit  # one program for the three calls
    def outputs(x, t):
        none = guidance.perturbed_attention(model_fn, 2.0, layers=())(x, t, None)
        one = guidance.perturbed_attention(model_fn, 2.0, layers=paths[1:])(x, t, None)
        return model_fn(x, t, None), none, one

    plain, none, guided = outputs(x, t)
    np.testing.assert_allclose(none, plain, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(guided - plain))) > 1e-3
    # the perturbation itself: out(v) for one Attention layer
    attn = Attention(num_heads=2, head_dim=4)
    y = jax.random.normal(jax.random.key(3), (2, 5, 6))
    p = nn.unbox(attn.init(jax.random.key(4), y))["params"]
    v = (y @ p["qkv"]["kernel"] + p["qkv"]["bias"][None, None])[..., 16:]
    expected = v @ p["out"]["kernel"] + p["out"]["bias"][None, None]
    np.testing.assert_allclose(
        attn.apply({"params": p}, y, identity_map=True), expected, rtol=1e-5, atol=1e-6
    )
