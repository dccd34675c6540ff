"""Timestep search on the exact-score mixture: searched grids beat uniform-log-SNR on held-out noise at
5 and 10 NFE, and a saved grid is read back by diffax.timesteps for any sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import samplers, schedule_search

T_END = 1e-3


def test_searched_grids_beat_uniform_log_snr_on_held_out_seeds(vp, mixture_model, tmp_path):
    def reference(x_T):  # the teacher: third-order UniPC at 200 NFE
        ts = samplers.timesteps(vp, num_steps=200, t_end=T_END)
        return samplers.sample(mixture_model, vp, x_T, sampler="unipc", timesteps=ts, order=3)

    train = jax.random.normal(jax.random.key(0), (128, 2))
    held_out = jax.random.normal(jax.random.key(1), (512, 2))
    train_ref, held_out_ref = reference(train), reference(held_out)
    for nfe in (5, 10):
        ts, info = schedule_search.search(
            mixture_model,
            vp,
            train,
            train_ref,
            sampler="dpm_solver++_2m",
            num_steps=nfe,
            key=jax.random.key(2),
            t_end=T_END,
            population=16,
            elite=4,
            rounds=5,
        )
        assert info["error"] < info["uniform_error"]
        schedule_search.save(str(tmp_path / "grid.npz"), ts)
        loaded = samplers.timesteps(vp, num_steps=nfe, spacing="file", path=str(tmp_path / "grid.npz"))
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(ts))

        def held_out_error(grid):
            x = samplers.sample(mixture_model, vp, held_out, sampler="dpm_solver++_2m", timesteps=grid)
            return float(jnp.sqrt(jnp.mean(jnp.square(x - held_out_ref))))

        uniform = samplers.timesteps(vp, num_steps=nfe, t_end=T_END)
        assert held_out_error(loaded) < 0.8 * held_out_error(uniform), nfe
    with pytest.raises(ValueError, match="num_steps=7"):
        samplers.timesteps(vp, num_steps=7, spacing="file", path=str(tmp_path / "grid.npz"))
