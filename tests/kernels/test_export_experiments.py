"""Every experiment's programs export for TPU and GPU from this CPU-only host (``jax.export``).

For each file in ``experiments/`` with a ``get_config`` (found at collection, so a new experiment is
covered without touching this file), the programs a run builds are exported for ``platforms=["tpu"]`` and
``["cuda"]``: the jitted train step on the run's mesh (diffusion, few-step, token and autoencoder trainers
alike), the configured sampler as ``diffax.generate`` builds it (through ``diffax.sample``; a latent run's
includes the VAE decoder, a token run's is the discrete sampler, an autoencoder run's the held-out
reconstruction), the adaptive ``ode`` sampler for continuous diffusion runs, and the evaluation program
(the digits classifier or InceptionV3 feature extractor; a token run's held-out bound; an autoencoder
run's reconstruction). ``jax.export`` refuses a custom call without a compatibility guarantee (diffax's
CPU kernels), so an export that succeeds carries none; the CPU kernels' targets are checked absent too.
The TPU program carries the Pallas flash kernel (``tpu_custom_call``) exactly when some attention's shapes
tile into its 128-blocks.

Export only traces and lowers (nothing compiles). Shapes are the experiments' own except the batch (one
example per device) and the depth (one resolution level of one block, with attention if the run has any;
one transformer block): neither changes which kernels lower, and tracing the layers is what takes the
time. A VAE checkpoint or teacher run is not needed: a latent run's VAE is a one-block ``AutoencoderKL``
with zero weights of the run's latent channels.
"""

import functools
import importlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from diffax import config as config_lib
from diffax import data, evaluation, generate, latent, models, sharding, train_state
from diffax.autoencoding import system as autoencoder_system
from diffax.discrete import system as token_system
from diffax.kernels.cpu import ffi
from diffax.kernels.tpu import attention as tpu_attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(
    path.stem for path in (ROOT / "experiments").glob("*.py") if "def get_config" in path.read_text()
)
PLATFORMS = ("tpu", "cuda")
Program = tuple[object, tuple]  # (jitted function, abstract arguments)


def _abstract(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _shallow(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """One example per device; one resolution level of one residual block (U-Net, autoencoder), one
    transformer block (DiT, token transformer). Tracing, not the shapes, is what costs here."""
    config.input.batch_size = mesh.size * config.optim.accum_steps
    for field in ("num_res_blocks", "depth"):
        if field in config.model:
            config.model[field] = 1
    if "channel_mult" in config.model:
        config.model.channel_mult = tuple(config.model.channel_mult)[:1]
    if config.model.get("attention_resolutions"):  # attention stays, at the one level left
        config.model.attention_resolutions = (config.input.image_size,)


def _abstract_state(config: ml_collections.ConfigDict) -> object:
    """The run's boxed initial state, shapes only: traced with the layers' ``"xla"`` formulations, which
    give the same parameters as ``"auto"`` and trace in a fraction of the time."""
    xla = config.copy_and_resolve_references()
    for field in xla.model:
        if field.endswith("_impl"):
            xla.model[field] = "xla"
    return jax.eval_shape(train_state.state_initializer(xla, train_state.build(xla)))


def _vae(latent_channels: int) -> tuple[nn.Module, dict]:
    """A one-block ``AutoencoderKL`` (kl-f4 layout, mid-block attention) with zero weights: what a latent
    run's sampler decodes through, built here instead of read from ``config.vae``."""
    module = models.get(
        "autoencoder_kl_f4",
        latent_channels=latent_channels,
        base_channels=32,
        num_res_blocks=1,
        norm_groups=8,
    )
    z = jnp.zeros((1, 8, 8, latent_channels))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), z, method="decode"))
    return module, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.meta.unbox(variables["params"]))


def _export(fn, args) -> dict[str, str]:
    """The module of ``fn`` exported for each platform; raises for any custom call without a
    compatibility guarantee. (One export for both platforms would lower the Pallas TPU kernel for GPU
    too, which Pallas refuses.)"""
    return {p: jax.export.export(fn, platforms=[p])(*args).mlir_module() for p in PLATFORMS}


@functools.cache
def _extractor(kind: str, size: int) -> dict[str, str]:
    """The exported evaluation feature extractor ``diffax.evaluate.reference`` picks (exported once for
    every run that uses it)."""
    images = _abstract((2, size, size, 1 if kind == "digits" else 3), jnp.float32)
    if kind == "digits":  # shapes only: digits_classifier_params would train it on a new machine
        variables = evaluation.digits_classifier_shapes()
        return _export(
            jax.jit(lambda v, x: evaluation.digits_features_and_logits(x, params=v)), (variables, images)
        )
    variables = jax.eval_shape(
        lambda: evaluation.InceptionV3().init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    )
    extract = jax.jit(lambda v, x: evaluation.inception_features_and_logits(x, variables=v, size=size))
    return _export(extract, (variables, images))


def _ode(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` sampling with the adaptive ``ode`` sampler instead (its own options dropped)."""
    ode_config = config.copy_and_resolve_references()
    with ode_config.unlocked():
        for field in config_lib.sampler_kwargs(ode_config.sampler):
            del ode_config.sampler[field]
        ode_config.sampler.name = "ode"
    return ode_config


def _programs(name: str, monkeypatch) -> tuple[dict[str, Program], jax.sharding.Mesh]:
    """The experiment's programs, each as (jitted function, arguments), built as ``diffax.train``,
    ``diffax.generate`` and ``diffax.evaluate`` build them; and the mesh."""
    config = importlib.import_module(f"experiments.{name}").get_config()
    mesh = sharding.make_mesh(config.mesh)
    with config.unlocked():
        _shallow(config, mesh)
    parts = train_state.build(config)
    abstract = _abstract_state(config)
    shardings = sharding.logical_shardings(abstract, mesh, models.LOGICAL_AXIS_RULES)
    state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.meta.unbox(abstract), shardings)
    n, rows = config.input.batch_size, sharding.batch_sharding(mesh)
    params = state.params
    key, labels = jax.random.key(0), jnp.zeros((2,), jnp.int32)
    tokens = token_system.is_token_run(config)
    autoencoder = autoencoder_system.is_autoencoder_run(config)

    if tokens:
        shape = token_system.init_state_kwargs(config)["image_shape"]
        batch = {"tokens": _abstract((n, *shape), jnp.int32, rows)}
        token_sampler = token_system.make_sampler_with_info(config, parts, mesh=mesh)
        sampler = (jax.jit(lambda p, k: token_sampler(p, k, 2)), (params, key))
        evaluate = (token_system.make_bound(config, parts), (params, _abstract((2, *shape), jnp.int32), key))
    else:
        shape = data.image_shape(config.input)
        batch = {"image": _abstract((n, *shape), jnp.float32, rows)}
        if config.input.labels:
            batch["label"] = _abstract((n,), jnp.int32, rows)
    if autoencoder:  # its "sampler" and its evaluation are the held-out reconstruction
        sampler = evaluate = (
            autoencoder_system.reconstruction(parts.module),
            (params, _abstract((2, *shape), jnp.float32)),
        )
    elif not tokens:
        if latent.is_latent_run(config):
            monkeypatch.setattr(latent, "load_vae", lambda vae_config: _vae(shape[-1]))
            config.vae.scale = 1.0
        sampler = (jax.jit(generate.make_sampler(config, parts, mesh=mesh)), (params, key, labels))
        digits = config_lib.digits_run(config)
        evaluate = (
            _extractor("digits", 32) if digits else _extractor("inception", config.evals.inception_size)
        )

    programs = {
        "train_step": (
            jax.jit(train_state.config_train_step(config, parts), donate_argnums=0),
            (state, batch),
        ),
        "sampler": sampler,
        "evaluation": evaluate,
    }
    if not tokens and not autoencoder and parts.trainer is None:  # a continuous diffusion run
        programs["ode"] = (
            jax.jit(generate.make_sampler(_ode(config), parts, mesh=mesh)),
            (params, key, labels),
        )
    return programs, mesh


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_programs_export_for_tpu_and_cuda(name, monkeypatch):
    flash = []  # whether each attention traced took the Pallas kernel on TPU
    applies = tpu_attention.applies
    monkeypatch.setattr(tpu_attention, "applies", lambda *a: flash.append(applies(*a)) or flash[-1])
    programs, mesh = _programs(name, monkeypatch)
    for program, exported in programs.items():
        flash.clear()
        if isinstance(exported, tuple):
            with jax.set_mesh(mesh):  # as diffax.train traces its step
                exported = _export(*exported)
        for platform, text in exported.items():
            assert not [t for t in ffi.TARGETS if t in text], (name, program, platform)
            assert ("tpu_custom_call" in text) == (platform == "tpu" and any(flash)), (
                name,
                program,
                platform,
            )
