"""The published sampling protocols, step by step, against diffusers' ``DDPMScheduler``.

One fixed network, written in Flax and in torch, is sampled by ``pretrained.make_sample_fn`` (DDPM:
1000 ancestral steps, fixed-large variance, x_0 clipped; DiT: 250 respaced steps, learned-range
variance, guidance 1.5 on the first 3 of 4 channels) and by diffusers' scheduler loop fed the same
initial image and the same noise at every step, on multi-pixel, multi-channel images. The noise is
injected rather than regenerated: diffusers draws it in the model output's dtype, so a float64 output
gets other numbers than a float32 one (what made an earlier 2x2 scratch comparison disagree).
"""

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffax import pretrained
from tests.models import diffusers_reference as ref


class _LinearNet(nn.Module):
    """out = mix x + tanh of a width-shifted mix, plus a per-pixel bias that varies with the timestep and
    a class embedding. Its timestep is diffusers' integer i of diffax's t = (i + 1) / T."""

    out_channels: int
    num_classes: int
    num_train_steps: int = 1000

    @nn.compact
    def __call__(self, x, t, cond):
        zeros, (height, width, channels) = nn.initializers.zeros_init(), x.shape[1:]
        mix = self.param("mix", zeros, (channels, self.out_channels))
        shift_mix = self.param("shift_mix", zeros, (channels, self.out_channels))
        bias = self.param("bias", zeros, (height, width, self.out_channels))
        embed = self.param("embed", zeros, (self.num_classes + 1, self.out_channels))
        step = (t * self.num_train_steps - 1.0)[:, None, None, None]
        out = x @ mix + jnp.tanh(jnp.roll(x, 1, axis=2) @ shift_mix) + bias[None] * jnp.cos(step / 300.0)
        return out + (0.0 if cond is None else embed[cond][:, None, None, :])


def _torch_net(params, x, i, cond):
    """_LinearNet on NCHW torch tensors at integer timestep i."""
    p = {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}
    out = torch.einsum("bchw,cd->bdhw", x, p["mix"])
    out = out + torch.tanh(torch.einsum("bchw,cd->bdhw", torch.roll(x, 1, dims=3), p["shift_mix"]))
    out = out + p["bias"].permute(2, 0, 1) * np.cos(i / 300.0)
    return out if cond is None else out + p["embed"][cond][:, :, None, None]


def _params(channels, out_channels, shape, num_classes, seed):
    rng = np.random.default_rng(seed)
    mix = 0.8 * np.eye(channels, out_channels) + 0.1 * rng.standard_normal((channels, out_channels))
    return {
        "mix": mix.astype(np.float32),
        "shift_mix": (0.3 * rng.standard_normal((channels, out_channels))).astype(np.float32),
        "bias": (0.3 * rng.standard_normal((*shape[:2], out_channels))).astype(np.float32),
        "embed": (0.3 * rng.standard_normal((num_classes + 1, out_channels))).astype(np.float32),
    }


# The papers' settings, written out here rather than read from diffax's protocols:
# name: (protocol, image (H, W, C), network output channels, classes, steps, DDPMScheduler options, cfg scale)
CASES = {
    "ddpm": (
        pretrained.DDPM,
        (4, 3, 3),
        3,
        None,
        1000,
        dict(variance_type="fixed_large", clip_sample=True),
        None,
    ),
    "dit": (
        pretrained.DIT,
        (3, 4, 4),
        8,
        10,
        250,
        dict(variance_type="learned_range", clip_sample=False),
        1.5,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_protocol_trajectory_equals_diffusers_ddpm_scheduler(case, monkeypatch):
    protocol, shape, out_channels, num_classes, steps, options, scale = CASES[case]
    params = _params(shape[-1], out_channels, shape, num_classes or 0, seed=len(case))
    model = pretrained.Pretrained(
        _LinearNet(out_channels, num_classes or 0),
        jax.tree.map(jnp.asarray, params),
        protocol,
        shape,
        num_classes,
    )
    labels = np.array([3, 7], np.int32)
    key = jax.random.key(11)
    got = np.asarray(pretrained.make_sample_fn(model)(key, labels))

    # make_sample_fn draws x_T from split(key)[0] and step k's noise from fold_in(split(key)[1], k).
    noise_key, step_key = jax.random.split(key)
    x = ref.nchw(np.asarray(jax.random.normal(noise_key, (2, *shape), jnp.float32)))
    noises = iter(
        ref.nchw(np.asarray(jax.random.normal(jax.random.fold_in(step_key, k), (2, *shape), jnp.float32)))
        for k in range(steps)
    )
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises))
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, timestep_spacing="linspace", **options
    )
    scheduler.set_timesteps(steps)
    null = torch.full((2,), num_classes or 0)
    for i in scheduler.timesteps.tolist():
        if num_classes is None:
            out = _torch_net(params, x, i, None)
        else:  # DiT's forward_with_cfg: guide eps channels :3, keep the conditional rest
            cond, uncond = _torch_net(params, x, i, torch.from_numpy(labels)), _torch_net(params, x, i, null)
            guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
            out = torch.cat([guided, cond[:, 3:]], dim=1)
        x = scheduler.step(out, i, x).prev_sample
    # the last step (i = 0) adds no noise, so every noise but the last was used
    assert sum(1 for _ in noises) == 1
    expected = ref.nhwc(x).astype(np.float64)
    ref.assert_close_to_scale(got, expected, rtol=1e-4, what=f"{case} protocol vs DDPMScheduler")
    assert np.std(expected) > 0.1
