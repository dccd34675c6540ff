"""The experiment config: every field with its default, and validation of a whole config before compiling.

An experiment file's ``get_config(arg=None)`` starts from :func:`base_config` and overrides fields.
Sections mirror the code:

- ``process``: ``name`` of a schedule plus its keyword arguments (``diffax.schedules.get``).
- ``model``: ``name`` of a preset plus field overrides (``diffax.models.from_config``).
- ``loss``: ``name`` (``loss=`` of ``diffax.losses.make_loss``) plus its other keyword arguments.
- ``sampler``: ``name``, ``steps``, timestep ``spacing``/``t_start``/``t_end``, ``guidance_scale``,
  and any further keyword arguments of ``diffax.sample``.
- ``input``, ``optim``, ``ema``, ``mesh``, ``ckpt``, ``log``, ``evals``: fixed fields, listed in
  :func:`base_config`.
- ``evals``: the evaluation of ``diffax.evaluate`` (every ``log.eval_every_steps`` and on the
  command line): sample count and batch, and for non-digits runs the local InceptionV3 file, the
  number of reference images and the held-out split that gives the floor.

:func:`validate` raises :class:`ConfigError`, a one-line ``ValueError`` that names the field.
"""

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from diffax import posthoc_ema, sharding
from diffax.data import BUILTIN_DATASETS
from diffax.data import digits as digits_lib
from diffax.data.text import TEXT_DATASETS, TOPICS_SHA256
from diffax.train_state import registry_kwargs

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_DECAYS = ("constant", "cosine", "linear")
# Keyword arguments of diffax.sample itself (the other extra sampler fields are the sampler's options).
_SAMPLE_OPTIONS = ("denoise_final", "thresholding", "clip_denoised")
# Sections whose extra keys are keyword arguments of a registry (checked by building it).
FREE_FORM = ("process", "model", "loss", "sampler", "trainer")


class ConfigError(ValueError):
    """A config field is invalid; the message is one line that starts with the field's name."""


def base_config() -> ml_collections.ConfigDict:
    """Returns the full config schema with defaults; experiment files override fields of it."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 10_000

    c.process = ml_collections.ConfigDict(dict(name="linear"))
    c.model = ml_collections.ConfigDict(dict(name="unet_ddpm_cifar10"))
    c.loss = ml_collections.ConfigDict(
        dict(name="simple", prediction="eps", weighting="uniform", min_snr_gamma=5.0, learned_variance=False)
    )
    c.sampler = ml_collections.ConfigDict(
        dict(
            name="ddim",
            steps=50,
            spacing="uniform_t",
            t_start=config_dict.placeholder(float),  # None: the schedule's largest time
            t_end=config_dict.placeholder(float),  # None: the schedule's smallest time
            guidance_scale=config_dict.placeholder(float),  # classifier-free guidance for labelled runs
        )
    )

    # The objective: "diffusion" (config.loss) or a few-step trainer of diffax.fewstep with its options.
    c.trainer = ml_collections.ConfigDict(dict(name="diffusion"))
    c.teacher = ml_collections.ConfigDict(dict(workdir=""))  # a finished run that distillation reads
    c.input = ml_collections.ConfigDict(
        dict(
            dataset="digits",  # "digits", "mixture", or a tfds dataset name
            split="train",
            data_dir=config_dict.placeholder(str),  # tfds data_dir; None: the tfds default
            batch_size=128,  # global, over all devices and processes
            image_size=16,
            channels=1,
            upsample=2,  # digits only: 8x8 -> 8*upsample
            labels=False,  # feed "label" to the model (class-conditional)
            num_classes=0,  # label count of a labelled dataset (the null label is num_classes)
            random_flip=False,
            shuffle_buffer=10_000,  # tfds only
            prefetch=2,  # tfds only
            mixture_components=4,  # mixture only
            mixture_std=0.1,
            mixture_seed=0,
            # token runs ("text": the pinned pydoc topics corpus, "markov": an order-k source)
            seq_len=128,
            corpus_path="",  # "" = the running Python's pydoc_data/topics.py
            corpus_sha256=TOPICS_SHA256,
            markov_vocab=8,
            markov_order=2,
            markov_seed=0,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=2e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0,
            decay="constant",  # or "cosine" / "linear" down to lr * min_lr_ratio at total_steps
            min_lr_ratio=0.0,
            grad_clip=1.0,  # global-norm clipping; 0 turns it off
            accum_steps=1,  # gradient accumulation: microbatches per step
            skip_nonfinite=False,  # skip (and count) updates with a non-finite loss/gradient, not stop
        )
    )
    # std_rels: power-function EMAs (Karras et al. 2024) after the decays, snapshotted with every
    # checkpoint into DIR/ema_snapshots/ for post-hoc reconstruction (diffax.posthoc_ema).
    # Latent runs (input.dataset="latents", input.data_dir=the cache): the frozen VAE (exactly one of
    # workdir, a diffax autoencoder run, and pretrained, a diffusers AutoencoderKL folder), the images
    # the cache job encodes (source: an input section) and the latent scale (0: 1/std from the cache).
    c.vae = ml_collections.ConfigDict(
        dict(
            workdir="",
            pretrained="",
            scale=0.0,
            cache_shard_size=512,
            source=ml_collections.ConfigDict(
                dict(dataset="digits", split="train", upsample=4, data_dir="", image_size=32)
            ),
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decays=(0.9999,), warmup=False, std_rels=()))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1))
    c.ckpt = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    # CPU speed settings that `python -m diffax.main` applies before JAX starts (diffax.perf.configure_cpu):
    # convolutions through Eigen, and glibc malloc keeping freed buffers (no per-step page faults).
    c.cpu = ml_collections.ConfigDict(dict(eigen_conv=False, retain_host_memory=False))
    c.log = ml_collections.ConfigDict(
        dict(every_steps=100, sample_every_steps=0, num_samples=64, eval_every_steps=0)
    )
    c.evals = ml_collections.ConfigDict(
        dict(
            num_samples=500,
            batch_size=250,
            inception_weights="",  # non-digits runs: a local .npz (evaluation.save_inception_variables)
            inception_size=299,  # images are resized to this side; 299 is FID's
            num_reference=10000,  # real images of the run's input giving the reference statistics
            heldout_split="",  # e.g. "test": as many images as samples give the FID floor
        )
    )
    return c


def _check(field: str, build: Callable[[], Any]) -> Any:
    """Runs ``build``; a ValueError/TypeError from it becomes a ConfigError naming ``field``."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(message if message.startswith("config.") else f"{field}: {message}") from None


def _unknown_fields(
    config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str
) -> None:
    for key in config.keys():
        field = f"{prefix}.{key}"
        if key not in schema:
            known = ", ".join(sorted(schema.keys()))
            raise ConfigError(f"{field}: no such field; known fields of {prefix}: {known}.")
        if isinstance(schema[key], ml_collections.ConfigDict) and key not in FREE_FORM:
            _unknown_fields(_section(config, key, field), schema[key], field)


def _section(config: ml_collections.ConfigDict, key: str, field: str) -> ml_collections.ConfigDict:
    """``config[key]``, which the schema makes a section; a ConfigError naming ``field`` if it is not one."""
    if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"{field}: must be a section (ConfigDict), got {config[key]!r}.")
    return config[key]


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _check_input(c: ml_collections.ConfigDict) -> None:
    _require(c.batch_size > 0, "config.input.batch_size", f"{c.batch_size} must be positive.")
    _require(c.image_size > 0, "config.input.image_size", f"{c.image_size} must be positive.")
    if c.dataset == "latents":  # checked with the VAE (diffax.latent.check)
        return
    if c.dataset == "digits":
        _require(
            c.split in digits_lib.SPLITS,
            "config.input.split",
            f"{c.split!r}; digits has {digits_lib.SPLITS}.",
        )
        _require(c.upsample >= 1, "config.input.upsample", f"{c.upsample} must be a positive integer.")
        _require(
            c.image_size == 8 * c.upsample,
            "config.input.image_size",
            f"{c.image_size} must equal 8 * upsample = {8 * c.upsample} for digits.",
        )
        _require(c.channels == 1, "config.input.channels", f"{c.channels}; digits images have 1 channel.")
        return
    if c.dataset in TEXT_DATASETS:  # checked with the rest of a token run (diffax.discrete.system.check)
        return
    if c.dataset == "mixture":
        _require(c.mixture_components >= 1, "config.input.mixture_components", "must be at least 1.")
        _require(c.mixture_std > 0, "config.input.mixture_std", "must be positive.")
        return
    try:
        import tensorflow_datasets as tfds  # only for tfds datasets: it loads TensorFlow
    except ImportError:
        raise ConfigError(
            f"config.input.dataset: {c.dataset!r} is a tfds dataset, and tensorflow-datasets is not"
            " installed: pip install 'diffax[tfds]'."
        ) from None
    try:
        builder = tfds.builder(c.dataset, data_dir=c.data_dir)
    except Exception as e:  # tfds raises several types for a name it cannot resolve
        raise ConfigError(
            f"config.input.dataset: unknown dataset {c.dataset!r} ({type(e).__name__}); use one of"
            f" {BUILTIN_DATASETS} or a tfds dataset prepared under config.input.data_dir."
        ) from None
    _require(
        builder.is_prepared(),
        "config.input.dataset",
        f"{c.dataset!r} is not prepared under data_dir={os.fspath(builder.data_dir_root)!r}; diffax never"
        " downloads at run time: run tfds.builder(name, data_dir=...).download_and_prepare() first.",
    )
    _require(
        c.split in builder.info.splits,
        "config.input.split",
        f"{c.split!r}; {c.dataset} has {sorted(builder.info.splits)}.",
    )


def _check_optim(c: ml_collections.ConfigDict) -> None:
    _require(c.name in OPTIMIZERS, "config.optim.name", f"unknown optimizer {c.name!r}; known: {OPTIMIZERS}.")
    _require(c.decay in LR_DECAYS, "config.optim.decay", f"unknown decay {c.decay!r}; known: {LR_DECAYS}.")
    _require(c.lr > 0, "config.optim.lr", f"{c.lr} must be positive.")
    _require(c.warmup_steps >= 0, "config.optim.warmup_steps", f"{c.warmup_steps} must be >= 0.")
    _require(
        c.grad_clip >= 0, "config.optim.grad_clip", f"{c.grad_clip} must be >= 0 (0 turns clipping off)."
    )
    _require(c.accum_steps >= 1, "config.optim.accum_steps", f"{c.accum_steps} must be >= 1.")
    _require(0 <= c.min_lr_ratio <= 1, "config.optim.min_lr_ratio", f"{c.min_lr_ratio} must be in [0, 1].")


def sampler_kwargs(sampler_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of ``config.sampler`` beyond the fixed ones: keyword arguments of ``diffax.sample``."""
    fixed = base_config().sampler
    return {k: v for k, v in sampler_config.to_dict().items() if k not in fixed}


def check_sampler(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.sampler`` (name, steps, options, guidance); raises :class:`ConfigError`."""
    import diffax.samplers as samplers  # the sampler registry

    if config.input.dataset in TEXT_DATASETS:
        from diffax.discrete import system

        _check("config.sampler", lambda: system.check_sampler(config))
        return
    s = config.sampler
    known = ", ".join(samplers.SAMPLERS)
    _require(
        s.name in samplers.SAMPLERS, "config.sampler.name", f"unknown sampler {s.name!r}; known: {known}."
    )
    _require(s.steps >= 1, "config.sampler.steps", f"{s.steps} must be >= 1.")
    options = {k: v for k, v in sampler_kwargs(s).items() if k not in _SAMPLE_OPTIONS}
    _check("config.sampler", lambda: samplers.get(s.name, **options))
    if s.guidance_scale is not None:
        _require(config.input.labels, "config.sampler.guidance_scale", "needs a labelled run (input.labels).")


def digits_run(config: ml_collections.ConfigDict) -> bool:
    """Whether the run generates digits (directly, or as latents of digits): digits metrics apply.
    An autoencoder run reconstructs instead (held-out PSNR, ``diffax.autoencoding``)."""
    from diffax.autoencoding import system as autoencoder_system

    source = config.vae.source.dataset if config.input.dataset == "latents" else config.input.dataset
    return source == "digits" and not autoencoder_system.is_autoencoder_run(config)


def check_evaluation(config: ml_collections.ConfigDict) -> None:
    """Checks that ``diffax.evaluate`` can measure this run; raises :class:`ConfigError`."""
    e = config.evals
    from diffax.autoencoding import system as autoencoder_system

    if digits_run(config) or config.input.dataset in TEXT_DATASETS:
        return
    if autoencoder_system.is_autoencoder_run(config):  # held-out PSNR needs no extra file
        return
    _require(
        bool(e.inception_weights),
        "config.evals.inception_weights",
        "empty; a non-digits run is evaluated with InceptionV3; convert the FID weights to a local file"
        " (diffax.evaluation.save_inception_variables) and name it here, or set log.eval_every_steps=0.",
    )
    _require(
        os.path.isfile(e.inception_weights),
        "config.evals.inception_weights",
        f"{e.inception_weights} is not a file; name a converted InceptionV3 .npz.",
    )


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``workdir/config.json`` (from process 0): everything the run needs is in it.

    The file is written beside and renamed into place, so a run killed meanwhile leaves the old one.
    """
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        with open(path + ".partial", "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(path + ".partial", path)


def load(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved with :func:`save` (JSON lists come back as tuples).

    Fields added to :func:`base_config` after the run was saved get their defaults.
    """
    with open(os.path.join(workdir, "config.json")) as f:
        raw = json.load(f)

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    config = base_config()
    config.update(tuples(raw))
    return config


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` if needed and checks that files can be written in it.

    Raises:
      ConfigError: naming ``--workdir``.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir}: not writable ({e.strerror or e}); pick a writable directory."
        ) from None


def cpu_settings(config: ml_collections.ConfigDict) -> dict[str, bool]:
    """The ``config.cpu`` section checked against the schema, as keywords for ``perf.configure_cpu``.

    Needs no JAX backend, so ``diffax.main`` can check it before applying it (XLA reads its flags
    once, when the first backend starts).

    Raises:
      ConfigError: one line naming an unknown field or a value that is not a bool.
    """
    schema = base_config().cpu
    section = _section(config, "cpu", "config.cpu") if "cpu" in config else ml_collections.ConfigDict()
    _unknown_fields(section, schema, "config.cpu")
    for key in section.keys():
        _require(
            isinstance(section[key], bool), f"config.cpu.{key}", f"{section[key]!r} must be True or False."
        )
    return {key: bool(section.get(key, default)) for key, default in schema.items()}


def validate(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | None = None,
    devices: Sequence[Any] | None = None,
) -> None:
    """Checks a whole config (and the workdir) before anything is compiled.

    Args:
      config: the experiment config.
      workdir: the run directory to create and write to; not checked when ``None``.
      devices: the devices of the mesh (default: all).

    Raises:
      ConfigError: one line naming the first invalid field.
    """
    _unknown_fields(config, base_config(), "config")
    cpu_settings(config)
    _require(config.total_steps > 0, "config.total_steps", f"{config.total_steps} must be positive.")
    _check_input(config.input)
    _check_optim(config.optim)
    for decay in config.ema.decays:
        _require(0.0 <= decay < 1.0, "config.ema.decays", f"{decay} must be in [0, 1).")
    for std_rel in config.ema.std_rels:
        _check("config.ema.std_rels", lambda s=std_rel: posthoc_ema.gamma_from_std_rel(s))
    e = config.evals
    _require(e.num_samples >= 2, "config.evals.num_samples", f"{e.num_samples} must be at least 2.")
    _require(e.batch_size >= 1, "config.evals.batch_size", f"{e.batch_size} must be positive.")
    _require(e.inception_size >= 75, "config.evals.inception_size", f"{e.inception_size} must be >= 75.")
    _require(e.num_reference >= 2, "config.evals.num_reference", f"{e.num_reference} must be at least 2.")
    from diffax.autoencoding import system as autoencoder_system

    autoencoder_run = autoencoder_system.is_autoencoder_run(config)
    if config.log.eval_every_steps and not autoencoder_run:  # autoencoders: held-out PSNR
        check_evaluation(config)
    for field in ("ckpt.every_steps", "ckpt.keep", "log.every_steps", "log.num_samples"):
        section, key = field.split(".")
        _require(config[section][key] > 0, f"config.{field}", f"{config[section][key]} must be positive.")

    if config.input.dataset in TEXT_DATASETS:
        from diffax.discrete import system

        _check("config", lambda: system.check(config))
    elif autoencoder_run:
        _check("config", lambda: autoencoder_system.check(config))
    else:
        if config.input.dataset == "latents":
            from diffax import latent

            _check("config", lambda: latent.check(config))
        _check_diffusion(config)

    devices = jax.devices() if devices is None else devices
    mesh = _check("config.mesh", lambda: sharding.make_mesh(config.mesh, devices=devices))
    _check(
        "config.input.batch_size",
        lambda: sharding.check_batch_size(
            config.input.batch_size,
            mesh,
            accum_steps=config.optim.accum_steps,
            process_count=jax.process_count(),
        ),
    )
    if workdir is not None:
        check_workdir(workdir)


def _check_diffusion(config: ml_collections.ConfigDict) -> None:
    """Checks the process, model, loss and sampler of a Gaussian diffusion run."""
    import diffax.fewstep.trainers as fewstep_trainers
    import diffax.losses as losses
    import diffax.models as models
    import diffax.schedules as schedules

    schedule = _check(
        "config.process", lambda: schedules.get(config.process.name, **registry_kwargs(config.process))
    )
    module = _check("config.model", lambda: models.from_config(config.model))
    if config.input.labels:
        classes = getattr(module, "num_classes", None)
        _require(
            config.input.num_classes > 0 and classes == config.input.num_classes,
            "config.input.num_classes",
            f"{config.input.num_classes} must be positive and equal the model's num_classes ({classes})"
            " for a labelled run.",
        )
    _check(
        "config.loss",
        lambda: losses.make_loss(
            schedule, lambda *a: a[1], loss=config.loss.name, **registry_kwargs(config.loss)
        ),
    )
    check_sampler(config)
    _check("config.trainer", lambda: fewstep_trainers.check(config))
