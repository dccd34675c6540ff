"""Sampling from a run: the jitted sampler the training loop uses for its grids, and the CLI.

    python -m diffax.generate --workdir=DIR --num_samples=N [--sampler=NAME --steps=K --seed=S] --out=FILE

loads the newest checkpoint of ``DIR`` (EMA parameters unless ``--noema``) and writes ``FILE``: an
``.npz`` with ``images`` (uint8, NHWC) and, for class-conditional runs, ``labels``; or a ``.png`` grid.

    python -m diffax.generate --pretrained=FOLDER [--vae=FOLDER] --num_samples=N --out=FILE

samples a published checkpoint (a diffusers model or pipeline folder) by its paper's protocol
(``diffax.pretrained``: DDPM's 1000 ancestral steps, DiT's 250 steps with guidance 1.5 on 3 latent
channels, decoded by the SD VAE); ``--sampler``, ``--steps``, ``--guidance_scale`` and
``--guidance=standard`` change it. The ``.npz`` holds ``arr_0`` (uint8 NHWC, the layout of the ADM
evaluator's sample batches) and ``labels``.
"""

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from diffax import checkpoint, data, latent, sharding, train_state
from diffax import config as config_lib

SampleFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _prediction(config: ml_collections.ConfigDict) -> str:
    """What the sampler's ``model_fn`` returns for this run's loss (a few-step trainer's network: x_0)."""
    if config.trainer.name != "diffusion":
        return "x0"
    return {"flow_matching": "flow", "edm": "x0"}.get(config.loss.name, config.loss.prediction)


def make_sampler(
    config: ml_collections.ConfigDict,
    parts: train_state.Parts,
    *,
    mesh: Mesh,
    sampler: str | None = None,
    steps: int | None = None,
) -> SampleFn:
    """Builds ``sample_fn(params, key, labels) -> images`` for a run.

    The network, guidance and grid are fixed here; ``diffax.sample`` compiles the sampler once and
    takes the parameters as arguments, so later calls with new parameters do not recompile.

    Args:
      config: the run's config; ``config.sampler`` gives the defaults.
      parts: from ``train_state.build(config)``.
      mesh: the starting noise (and so the result) is replicated over this mesh.
      sampler: overrides ``config.sampler.name``.
      steps: overrides ``config.sampler.steps``.

    Returns:
      ``sample_fn(params, key, labels, x_T=None)``: float images ``(len(labels), H, W, C)`` in about
      [-1, 1]; ``labels`` (int32) condition labelled runs and only set the count otherwise; ``x_T``
      replaces the prior draw (the reflow pair job keeps its noise).
    """
    import diffax.guidance as guidance
    import diffax.parameterization as parameterization
    import diffax.samplers as samplers
    from diffax.discrete import system
    from diffax.process import broadcast_to_data

    if system.is_token_run(config):  # tokens (N, L) int32 instead of images
        return system.make_sampler(config, parts, mesh=mesh, sampler=sampler, steps=steps)
    from diffax.autoencoding import system as autoencoder_system

    if autoencoder_system.is_autoencoder_run(config):  # reconstructions of held-out images
        return autoencoder_system.make_reconstructor(config, parts, mesh=mesh)
    s = config.sampler
    name = s.name if sampler is None else sampler
    num_steps = s.steps if steps is None else steps
    extra = config_lib.sampler_kwargs(s)
    schedule, module = parts.schedule, parts.module
    shape = data.image_shape(config.input)
    prediction = _prediction(config)
    # A learned-variance head's second half reaches only samplers that use it (ddpm, variance="learned").
    keep_variance = extra.get("variance") == "learned"
    own = None if parts.trainer is None else parts.trainer.sampling_grid(name, num_steps)
    if own is None:
        ts = samplers.timesteps(
            schedule, num_steps=num_steps, spacing=s.spacing, t_start=s.t_start, t_end=s.t_end
        )
    else:  # a few-step trainer's own grid (and options) for its sampler
        ts, options = own
        extra = extra | options

    def network(params, x, t, cond):
        if config.loss.name == "edm":  # the net sees c_in x and c_noise (Karras et al. 2022, Table 1)
            c_skip, c_out, c_in, c_noise = parameterization.edm_preconditioning(
                t, sigma_data=schedule.sigma_data
            )
            out = module.apply({"params": params}, broadcast_to_data(c_in, x) * x, c_noise, cond, train=False)
            return broadcast_to_data(c_skip, x) * x + broadcast_to_data(c_out, x) * out
        out = module.apply({"params": params}, x, t, cond, train=False)
        return out if keep_variance else out[..., : shape[-1]]

    if parts.trainer is not None:  # the trainer's own network on its grid, e.g. a consistency function
        network = parts.trainer.grid_network(ts)

    @functools.partial(jax.jit, static_argnums=1, out_shardings=sharding.replicated(mesh))
    def prior(key, num):
        return schedule.prior_sample(key, (num, *shape))

    def sample_fn(params, key, labels, x_T=None):
        if not config.input.labels:
            model_fn = jax.tree_util.Partial(network, params, cond=None)
        elif s.guidance_scale is None:
            model_fn = jax.tree_util.Partial(network, params, cond=labels)
        else:  # classifier-free guidance; the null label is num_classes
            null = jnp.int32(config.input.num_classes)
            guided = guidance.classifier_free(
                jax.tree_util.Partial(network, params), s.guidance_scale, null_cond=null
            )
            model_fn = jax.tree_util.Partial(guided, cond=labels)
        noise_key, sample_key = jax.random.split(key)
        if x_T is None:
            x_T = prior(noise_key, len(labels))
        return samplers.sample(
            model_fn,
            schedule,
            x_T,
            sampler=name,
            timesteps=ts,
            prediction=prediction,
            key=sample_key,
            **extra,
        )

    if latent.is_latent_run(config):  # latent samples decoded through the frozen VAE
        decode = latent.decoder(config)
        return lambda params, key, labels: decode(sample_fn(params, key, labels))
    return sample_fn


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Maps [-1, 1] floats to uint8 0..255 (rounded, clipped; NaN becomes 0)."""
    scaled = np.nan_to_num((np.asarray(images, np.float32) + 1.0) * 127.5, nan=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on every process (gathered when it spans processes)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def sample_images(
    sample_fn: SampleFn,
    params: Any,
    *,
    config: ml_collections.ConfigDict,
    seed: int,
    num_samples: int | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draws ``num_samples`` images (default ``config.log.num_samples``) in batches of ``batch_size``.

    Labelled runs cycle through the classes (0, 1, ..., num_classes - 1, 0, ...).

    Returns:
      ``(images, labels)``: uint8 ``(N, H, W, C)`` and int32 ``(N,)``, or ``None`` for unlabelled runs.
    """
    num = config.log.num_samples if num_samples is None else num_samples
    batch = min(num, batch_size or num)
    classes = max(config.input.num_classes, 1)
    labels = (np.arange(math.ceil(num / batch) * batch) % classes).astype(np.int32)
    key = jax.random.key(seed)
    finish = np.asarray if config.input.dataset in data.text.TEXT_DATASETS else to_uint8  # tokens stay ints
    chunks = [
        finish(
            jax.device_get(sample_fn(params, jax.random.fold_in(key, i), labels[i * batch : (i + 1) * batch]))
        )
        for i in range(math.ceil(num / batch))
    ]
    return np.concatenate(chunks)[:num], (labels[:num] if config.input.labels else None)


def image_grid(images: np.ndarray) -> np.ndarray:
    """Tiles uint8 NHWC images into one near-square image with 1-pixel gaps."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = image
    return grid


def save_png(path: str, images: np.ndarray, *, scale: int = 1) -> None:
    """Writes uint8 NHWC images as one PNG grid, each pixel enlarged ``scale`` times."""
    grid = image_grid(images)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def write_sample_grid(samples: tuple[np.ndarray, np.ndarray | None], workdir: str, step: int) -> str:
    """Saves a training-time grid as ``workdir/samples/step_<step>.png`` (process 0); returns the path.

    Token samples ``(N, L)`` are written as text, one sample a line, to ``step_<step>.txt``.
    """
    images = samples[0]
    path = os.path.join(workdir, "samples", f"step_{step:08d}" + (".txt" if images.ndim == 2 else ".png"))
    if jax.process_index() == 0 and images.ndim == 2:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, images)
    elif jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(path, images, scale=max(1, 64 // images.shape[1]))
        logging.info("wrote %s", path)
    return path


def write_text(path: str, tokens: np.ndarray) -> None:
    """Writes token samples ``(N, L)`` as text (``diffax.data.text.decode``), one sample a line."""
    with open(path, "w") as f:
        f.writelines(data.text.decode(row) + "\n" for row in tokens)
    logging.info("wrote %s", path)


def load_run(
    workdir: str,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    ema: bool = True,
    ema_std: float | None = None,
    check: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[ml_collections.ConfigDict, SampleFn, Any, int]:
    """A finished or running run's config, sampler and newest intact parameters, on this process's devices.

    Args:
      workdir: the run directory.
      sampler: overrides ``config.sampler.name``.
      steps: overrides ``config.sampler.steps``; a progressive-distillation run then restores the
        checkpoint of the stage whose student takes that many steps.
      ema: the EMA parameters (else the raw ones).
      ema_std: instead, the power-function EMA of this σ_rel reconstructed from the run's snapshots
        at the newest one (``diffax.posthoc_ema``).
      check: a further config check (raising ``ConfigError``) run before anything is built.

    Returns:
      ``(config, sample_fn, params, step)``.

    Raises:
      absl.app.UsageError: for a sampler or config that cannot be used, in one line.
    """
    checkpoint.quiet_orbax_logs()
    config = config_lib.load(workdir)
    config.sampler.name = config.sampler.name if sampler is None else sampler
    config.sampler.steps = config.sampler.steps if steps is None else steps
    try:
        config_lib.check_sampler(config)
        if check is not None:
            check(config)
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    parts = train_state.build(config)
    at_most = None  # a few-step run may keep one checkpoint per step count (progressive distillation)
    if parts.trainer is not None and steps is not None:
        try:
            at_most = parts.trainer.checkpoint_for(steps)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    state, step = checkpoint.restore_latest(workdir, config, parts, mesh=mesh, at_most=at_most)
    params = state.sampling_params() if ema else state.params
    if ema_std is not None:
        from diffax import posthoc_ema

        try:
            params, info = posthoc_ema.reconstruct_from_workdir(
                workdir, config, state.params, std_rel=ema_std
            )
        except (ValueError, FileNotFoundError) as e:
            raise app.UsageError(f"--ema_std={ema_std}: {e}") from None
        step = info["steps"][-1]
        logging.info(
            "post-hoc EMA sigma_rel=%g at step %d from %d snapshots (response L2 error %.2e)",
            ema_std,
            step,
            len(info["steps"]),
            info["response_l2_error"],
        )
    return config, make_sampler(config, parts, mesh=mesh), params, step


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by diffax.main.")
    flags.DEFINE_string("pretrained", None, "Instead of --workdir: a diffusers model or pipeline folder.")
    flags.DEFINE_string("vae", None, "With --pretrained: the AutoencoderKL folder of a latent model.")
    flags.DEFINE_float("guidance_scale", None, "With --pretrained: guidance scale (default: the paper's).")
    flags.DEFINE_enum(
        "guidance", "dit", ["dit", "standard"], "With --pretrained: DiT's 3-channel or all-channel."
    )
    flags.DEFINE_integer("num_samples", None, "Number of images.", required=True)
    flags.DEFINE_string(
        "out",
        None,
        "Output file: .npz (images, labels; tokens), .png (grid) or .txt (token runs).",
        required=True,
    )
    flags.DEFINE_string("sampler", None, "Sampler name (default: the run's config.sampler.name).")
    flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampler.steps).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 256, "Images per sampler call.")
    flags.DEFINE_bool("ema", True, "Sample with the EMA parameters (--noema: the raw parameters).")


def main(argv: list[str]) -> None:
    del argv
    ext = os.path.splitext(FLAGS.out)[1].lower()
    if ext not in (".npz", ".png", ".txt"):
        raise app.UsageError(f"--out={FLAGS.out}: use a .npz, .png or (token runs) .txt file name.")
    if FLAGS.num_samples < 1:
        raise app.UsageError(f"--num_samples={FLAGS.num_samples}: must be at least 1.")
    if (FLAGS.workdir is None) == (FLAGS.pretrained is None):
        raise app.UsageError("pass exactly one of --workdir=DIR (a diffax run) and --pretrained=FOLDER.")
    if FLAGS.pretrained is not None:
        return _generate_pretrained(ext)
    config, sample_fn, params, step = load_run(
        FLAGS.workdir, sampler=FLAGS.sampler, steps=FLAGS.steps, ema=FLAGS.ema
    )
    images, labels = sample_images(
        sample_fn,
        params,
        config=config,
        seed=FLAGS.seed,
        num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size,
    )
    if config.input.dataset in data.text.TEXT_DATASETS:
        if ext == ".png":
            raise app.UsageError(f"--out={FLAGS.out}: a token run writes .txt or .npz, not .png.")
        if ext == ".txt":
            write_text(FLAGS.out, images)
        else:
            np.savez(FLAGS.out, tokens=images)
    elif ext == ".npz":
        arrays = {"images": images} | ({"labels": labels} if labels is not None else {})
        np.savez(FLAGS.out, **arrays)
    else:
        save_png(FLAGS.out, images)
    logging.info("wrote %d samples of step %d to %s", len(images), step, FLAGS.out)


def _generate_pretrained(ext: str) -> None:
    """``--pretrained``: samples a published checkpoint by its paper's protocol."""
    from diffax import models, pretrained

    if ext == ".txt":
        raise app.UsageError(f"--out={FLAGS.out}: use .npz or .png.")
    try:
        model = pretrained.load(FLAGS.pretrained, vae=FLAGS.vae)
        sample_fn = pretrained.make_sample_fn(
            model,
            sampler=FLAGS.sampler,
            steps=FLAGS.steps,
            guidance_scale=FLAGS.guidance_scale,
            guidance=FLAGS.guidance,
        )
    except (models.ConversionError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    label_key, key = jax.random.split(jax.random.key(FLAGS.seed))
    labels = pretrained.sample_labels(label_key, FLAGS.num_samples, model.num_classes)
    batch = min(FLAGS.batch_size, FLAGS.num_samples)
    chunks = []
    for i, start in enumerate(range(0, FLAGS.num_samples, batch)):
        part = labels[start : start + batch]
        padded = np.pad(part, (0, batch - len(part)))  # one compiled batch shape
        chunks.append(to_uint8(jax.device_get(sample_fn(jax.random.fold_in(key, i), padded)))[: len(part)])
        logging.info("%d / %d samples", start + len(part), FLAGS.num_samples)
    images = np.concatenate(chunks)
    if ext == ".npz":
        np.savez(FLAGS.out, arr_0=images, labels=labels)
    else:
        save_png(FLAGS.out, images)
    logging.info("wrote %d samples of %s to %s", len(images), FLAGS.pretrained, FLAGS.out)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
