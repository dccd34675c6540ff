"""Every experiment's programs export for TPU and GPU from this CPU-only host (``jax.export``).

For each image diffusion experiment in ``experiments/`` (found at collection, so new ones are covered;
token diffusion, few-step trainers and latent runs are not yet): the jitted
train step on the run's mesh, the configured sampler through ``diffax.sample``, the adaptive ``ode``
sampler and the evaluation feature extractor are exported for ``platforms=["tpu"]`` and ``["cuda"]``.
``jax.export`` refuses a custom call without a compatibility guarantee (diffax's CPU kernels), so an
export that succeeds carries none; the CPU kernels' targets are checked absent too. The TPU programs of
experiments with attention over 128 tokens or more carry the Pallas flash kernel (``tpu_custom_call``).
Export only traces and lowers (nothing compiles), at a batch of one example per device and one block
per resolution; neither changes which kernels lower.
"""

import importlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffax import config as config_lib
from diffax import data, evaluation, generate, models, sharding, train_state
from diffax.kernels.cpu import ffi
from diffax.kernels.tpu import attention as tpu_attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(
    path.stem for path in (ROOT / "experiments").glob("*.py") if "def get_config" in path.read_text()
)
TEXT_DATASETS = ("text", "markov")


def _image_diffusion(name: str) -> bool:
    """Whether the experiment trains a pixel-space U-Net or DiT with the diffusion trainer: the runs this
    test builds. Token diffusion, few-step trainers (a teacher checkpoint), latent runs (a VAE
    checkpoint) and the autoencoder are not covered yet."""
    config = importlib.import_module(f"experiments.{name}").get_config()
    latent = bool(config.vae.workdir or config.vae.pretrained)
    denoiser = models.PRESETS.get(config.model.get("name"), (None,))[0] in (models.UNet, models.DiT)
    return (
        config.trainer.name == "diffusion"
        and denoiser
        and config.input.dataset not in TEXT_DATASETS
        and not latent
    )


PLATFORMS = ("tpu", "cuda")


def _abstract(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _programs(name: str) -> tuple[dict, jax.sharding.Mesh]:
    """The experiment's train step, sampler, ``ode`` sampler and feature extractor, each as (jitted
    function, arguments), built as ``diffax.train`` and ``diffax.evaluate`` build them; and the mesh."""
    config = importlib.import_module(f"experiments.{name}").get_config()
    mesh = sharding.make_mesh(config.mesh)
    with config.unlocked():
        config.input.batch_size = mesh.size * config.optim.accum_steps
        # One block per resolution (U-Net) or one block (DiT): the same layers lower at any depth.
        for field in ("num_res_blocks", "depth"):
            if field in config.model:
                config.model[field] = 1
    parts = train_state.build(config)
    abstract = jax.eval_shape(train_state.state_initializer(config, parts))
    shardings = sharding.logical_shardings(abstract, mesh, models.LOGICAL_AXIS_RULES)
    state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.meta.unbox(abstract), shardings)
    shape, n = data.image_shape(config.input), config.input.batch_size
    batch = {"image": _abstract((n, *shape), jnp.float32, sharding.batch_sharding(mesh))}
    if config.input.labels:
        batch["label"] = _abstract((n,), jnp.int32, sharding.batch_sharding(mesh))
    step = train_state.config_train_step(config, parts)
    ode_config = config.copy_and_resolve_references()
    with ode_config.unlocked():
        for field in config_lib.sampler_kwargs(ode_config.sampler):
            del ode_config.sampler[field]
        ode_config.sampler.name = "ode"
    sample_args = (state.params, jax.random.key(0), jnp.zeros((2,), jnp.int32))
    images = _abstract((2, *shape), jnp.float32)
    if config.input.dataset == "digits":  # the extractor diffax.evaluate.reference picks
        variables = jax.eval_shape(evaluation.digits_classifier_params)
        extract = jax.jit(lambda v, x: evaluation.digits_features_and_logits(x, params=v))
    else:
        size = config.evals.inception_size
        variables = jax.eval_shape(
            lambda: evaluation.InceptionV3().init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
        )
        extract = jax.jit(lambda v, x: evaluation.inception_features_and_logits(x, variables=v, size=size))
    return {
        "train_step": (jax.jit(step, donate_argnums=0), (state, batch)),
        "sampler": (jax.jit(generate.make_sampler(config, parts, mesh=mesh)), sample_args),
        "ode": (jax.jit(generate.make_sampler(ode_config, parts, mesh=mesh)), sample_args),
        "extractor": (extract, (variables, images)),
    }, mesh


@pytest.mark.parametrize("name", [name for name in EXPERIMENTS if _image_diffusion(name)])
def test_experiment_programs_export_for_tpu_and_cuda(name, monkeypatch):
    flash = []  # whether each attention traced took the Pallas kernel on TPU
    applies = tpu_attention.applies
    monkeypatch.setattr(tpu_attention, "applies", lambda *a: flash.append(applies(*a)) or flash[-1])
    programs, mesh = _programs(name)
    for program, (fn, args) in programs.items():
        flash.clear()
        for platform in PLATFORMS:
            # Raises for any custom call without a compatibility guarantee.
            with jax.set_mesh(mesh):  # as diffax.train traces its step
                text = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
            assert not [t for t in ffi.TARGETS if t in text], (name, program, platform)
            assert ("tpu_custom_call" in text) == (platform == "tpu" and any(flash)), (
                name,
                program,
                platform,
            )
