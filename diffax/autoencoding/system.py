"""Autoencoder runs in the one training loop: state pytree, pure train step, reconstructions, PSNR.

A run whose ``config.loss.name`` is ``"contperceptual"`` trains ``config.model`` (an
``AutoencoderKL`` preset) with the LDM recipe (``diffax.autoencoding.losses``): per step, one Adam
update of the autoencoder (and the learned log-variance) on the generator loss, then one update of
the PatchGAN discriminator on the hinge loss against reconstructions of the updated autoencoder (the
reference's alternating two-optimizer step). ``diffax.train`` runs it unchanged: this module supplies
what it builds (``Parts``), the state (:class:`AutoencoderState`), ``train_step``, the "sampler"
(reconstructions of held-out images, for the grids) and the evaluation (PSNR on the held-out split).

``config.loss`` fields: ``kl_weight`` (1e-6), ``disc_start`` (step), ``disc_weight`` (0.5),
``disc_factor`` (1.0), ``perceptual_weight`` (0: off; LPIPS needs VGG16 weights that do not ship
with diffax: a weight above 0 needs ``lpips_weights``, a local file, see ``diffax.autoencoding.lpips``),
``lpips_weights`` (""), ``learn_logvar`` (True), ``logvar_init`` (0.0), ``disc_layers`` (3),
``disc_channels`` (64).
"""

import copy
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffax.autoencoding import losses, lpips
from diffax.autoencoding.discriminator import PatchDiscriminator
from diffax.models.convert.table import ConversionError

LOSS_NAME = "contperceptual"
LOSS_DEFAULTS = dict(
    kl_weight=1e-6,
    disc_start=50_001,
    disc_weight=0.5,
    disc_factor=1.0,
    perceptual_weight=0.0,
    lpips_weights="",
    learn_logvar=True,
    logvar_init=0.0,
    disc_layers=3,
    disc_channels=64,
)


def is_autoencoder_run(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains an autoencoder (``config.loss.name == "contperceptual"``)."""
    return config.loss.name == LOSS_NAME


def loss_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``contperceptual`` fields of ``config.loss`` over their defaults (other fields ignored)."""
    given = config.loss.to_dict()
    return {k: given.get(k, default) for k, default in LOSS_DEFAULTS.items()}


@flax.struct.dataclass
class AutoencoderState:
    """What an autoencoder run carries from step to step; checkpointed whole.

    Attributes:
      step: int32 scalar, updates applied.
      params: ``{"autoencoder": ..., "logvar": scalar}``.
      disc_params: the discriminator's parameters.
      opt_state, disc_opt_state: the two Adam states.
      ema_params: always ``()`` (the LDM autoencoder keeps no average).
      rng: uint32 key data; step ``s`` uses ``fold_in(key, s)``.
    """

    step: jax.Array
    params: Any
    disc_params: Any
    opt_state: Any
    disc_opt_state: Any
    ema_params: tuple[Any, ...]
    rng: jax.Array

    def sampling_params(self) -> Any:
        return self.params


def build_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
    s = loss_settings(config)
    return PatchDiscriminator(channels=s["disc_channels"], n_layers=s["disc_layers"])


def check(config: ml_collections.ConfigDict) -> None:
    """Checks an autoencoder run's model and loss fields.

    Raises:
      ValueError: one line starting with the offending ``config.`` field.
    """
    import diffax.data as data
    import diffax.models as models

    unknown = sorted(set(config.loss.to_dict()) - set(LOSS_DEFAULTS) - set(base_loss_fields()) - {"name"})
    if unknown:
        raise ValueError(
            f"config.loss.{unknown[0]}: no such field of the {LOSS_NAME} loss;"
            f" known: {sorted(LOSS_DEFAULTS)}."
        )
    try:
        module = models.from_config(config.model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {' '.join(str(e).split())}") from None
    if not isinstance(module, models.AutoencoderKL):
        raise ValueError(
            f"config.model.name: {config.model.name!r} is not an autoencoder; a {LOSS_NAME} run trains an"
            " AutoencoderKL preset, e.g. autoencoder_kl_f4."
        )
    h, w, c = data.image_shape(config.input)
    if c != module.image_channels:
        raise ValueError(
            f"config.model.image_channels: {module.image_channels} but the input has {c} channels;"
            f" set it to {c}."
        )
    if h % module.downsampling_factor:
        raise ValueError(
            f"config.input.image_size: {h} is not divisible by the autoencoder's downsampling factor"
            f" {module.downsampling_factor}."
        )
    s = loss_settings(config)
    if s["perceptual_weight"] > 0:
        if not s["lpips_weights"]:
            raise ValueError(
                "config.loss.lpips_weights: perceptual_weight > 0 needs the LPIPS VGG16 weights, which do not"
                " ship with diffax: name a saved lpips.LPIPS(net='vgg').state_dict() (.safetensors or .pth;"
                " see diffax.autoencoding.lpips), or set perceptual_weight=0."
            )
        try:
            lpips.load(s["lpips_weights"])
        except ConversionError as e:
            raise ValueError(f"config.loss.lpips_weights: {e}") from None
    for field in ("kl_weight", "disc_weight", "disc_factor"):
        if s[field] < 0:
            raise ValueError(f"config.loss.{field}: {s[field]} must be >= 0.")
    if s["disc_layers"] < 1 or s["disc_channels"] < 1:
        raise ValueError("config.loss.disc_layers: disc_layers and disc_channels must be positive.")
    if config.ema.decays or config.ema.std_rels:
        raise ValueError("config.ema.decays: an autoencoder run keeps no EMA; set config.ema.decays=().")


def base_loss_fields() -> tuple[str, ...]:
    """The diffusion fields every config's loss section has (``diffax.config.base_config``)."""
    from diffax.config import base_config

    return tuple(base_config().loss.keys())


def build(config: ml_collections.ConfigDict):
    """The ``train_state.Parts`` of an autoencoder run (no schedule, no diffusion loss)."""
    import diffax.models as models
    from diffax import train_state

    module = models.from_config(config.model)
    tx, lr_schedule = train_state.make_optimizer(config.optim, total_steps=config.total_steps)
    return train_state.Parts(schedule=None, module=module, loss_fn=None, tx=tx, lr_schedule=lr_schedule)


def state_initializer(config: ml_collections.ConfigDict, parts) -> Callable[[], AutoencoderState]:
    """``init()`` of the (boxed) initial state: autoencoder, log-variance, discriminator, two Adams."""
    import diffax.data as data

    disc = build_discriminator(config)
    logvar_init = float(loss_settings(config)["logvar_init"])
    shape = data.image_shape(config.input)

    def init() -> AutoencoderState:
        ae_key, disc_key, run_key = jax.random.split(jax.random.key(config.seed), 3)
        x = jnp.zeros((1, *shape), jnp.float32)
        params = {
            "autoencoder": parts.module.init(ae_key, x)["params"],
            "logvar": jnp.full((), logvar_init, jnp.float32),
        }
        disc_params = disc.init(disc_key, x)["params"]
        return AutoencoderState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            disc_params=disc_params,
            opt_state=parts.tx.init(params),
            disc_opt_state=parts.tx.init(disc_params),
            ema_params=(),
            rng=jax.random.key_data(run_key),
        )

    return init


def _with_last_layer(params: Any, kernel: jax.Array) -> Any:
    """``params`` with the decoder's output convolution kernel replaced."""
    decoder = dict(params["decoder"], conv_out=dict(params["decoder"]["conv_out"], kernel=kernel))
    return dict(params, decoder=decoder)


def generator_objective(
    module: nn.Module,
    disc: nn.Module,
    settings: dict[str, Any],
    params: Any,
    disc_params: Any,
    x: jax.Array,
    key: jax.Array,
    factor: jax.Array,
    perceptual_params: Any = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The autoencoder's loss ``nll + kl_weight · KL + d_weight · factor · g_loss`` and its parts.

    The decoder runs once, under ``jax.vjp`` with respect to its output kernel, so the gradients of
    ``nll`` (with the LPIPS term, as in the reference) and ``g_loss`` at that layer (for the adaptive
    weight) are two cheap pullbacks.
    """
    ae = params["autoencoder"]
    mean, logvar_z = module.apply({"params": ae}, x, True, method="encode")
    z = _sample(mean, logvar_z, key)
    kernel = ae["decoder"]["conv_out"]["kernel"]

    def decode_with(w):
        return module.apply({"params": _with_last_layer(ae, w)}, z, True, method="decode")

    x_rec, pull = jax.vjp(decode_with, kernel)
    logvar = params["logvar"] if settings["learn_logvar"] else jax.lax.stop_gradient(params["logvar"])

    def nll_of(r):
        weight = settings["perceptual_weight"]
        perceptual = lpips.distance(perceptual_params, x, r) if weight > 0 else None
        return losses.reconstruction_nll(x, r, logvar, perceptual=perceptual, perceptual_weight=weight)

    nll, d_nll = jax.value_and_grad(nll_of)(x_rec)
    g_loss, d_g = jax.value_and_grad(lambda r: losses.generator_loss(disc.apply({"params": disc_params}, r)))(
        x_rec
    )
    d_weight = losses.adaptive_weight(pull(d_nll)[0], pull(d_g)[0], disc_weight=settings["disc_weight"])
    kl = jnp.mean(losses.kl_to_standard_normal(mean, logvar_z))
    loss = nll + settings["kl_weight"] * kl + d_weight * factor * g_loss
    rec_l1 = jnp.mean(jnp.abs(x - x_rec))
    return loss, dict(nll=nll, kl=kl, g_loss=g_loss, d_weight=d_weight, rec_l1=rec_l1)


def make_train_step(
    config: ml_collections.ConfigDict, parts
) -> Callable[[AutoencoderState, dict[str, jax.Array]], tuple[AutoencoderState, dict[str, jax.Array]]]:
    """The pure ``train_step(state, batch) -> (state, metrics)`` of the LDM autoencoder recipe.

    Metrics: ``loss`` (generator), ``grad_norm`` (of the autoencoder update), ``lr``, ``nll``, ``kl``,
    ``g_loss``, ``d_weight``, ``disc_factor``, ``disc_loss``, ``logvar``, ``rec_l1`` (mean |x − x̂|).
    """
    s = loss_settings(config)
    module, tx = parts.module, parts.tx
    disc = build_discriminator(config)
    generator_loss = functools.partial(generator_objective, module, disc, s)
    # The frozen LPIPS network: a constant of the step (JAX passes it as an argument), not run state.
    perceptual_params = lpips.load(s["lpips_weights"]) if s["perceptual_weight"] > 0 else ()

    def discriminator_loss(disc_params, x, x_rec, factor):
        real = disc.apply({"params": disc_params}, x)
        fake = disc.apply({"params": disc_params}, x_rec)
        return factor * losses.hinge_discriminator_loss(real, fake)

    def train_step(state: AutoencoderState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        gen_key, disc_key = jax.random.split(key)
        x = batch["image"]
        factor = losses.discriminator_factor(
            state.step, disc_start=int(s["disc_start"]), disc_factor=float(s["disc_factor"])
        )
        (loss, aux), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state.params, state.disc_params, x, gen_key, factor, perceptual_params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The discriminator sees reconstructions of the updated autoencoder (a fresh posterior draw).
        mean, logvar_z = module.apply({"params": params["autoencoder"]}, x, True, method="encode")
        x_rec = module.apply(
            {"params": params["autoencoder"]}, _sample(mean, logvar_z, disc_key), True, method="decode"
        )
        disc_loss, disc_grads = jax.value_and_grad(discriminator_loss)(
            state.disc_params, x, jax.lax.stop_gradient(x_rec), factor
        )
        disc_updates, disc_opt_state = tx.update(disc_grads, state.disc_opt_state, state.disc_params)
        metrics = dict(
            aux,
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            lr=parts.lr_schedule(state.step),
            disc_loss=disc_loss,
            disc_factor=factor,
            logvar=params["logvar"],
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            disc_params=optax.apply_updates(state.disc_params, disc_updates),
            opt_state=opt_state,
            disc_opt_state=disc_opt_state,
        )
        return new_state, metrics

    return train_step


def _sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    from diffax.models.autoencoder import sample_posterior

    return sample_posterior(mean, logvar, key)


def heldout_images(config: ml_collections.ConfigDict, count: int | None = None) -> np.ndarray:
    """The held-out split of the run's input (``config.evals.heldout_split``, default ``"test"``),
    unflipped, in [-1, 1]: the first ``count`` images (all of them by default)."""
    import diffax.data as data
    from diffax.data import digits as digits_lib

    cfg = copy.deepcopy(config.input)
    cfg.split = config.evals.heldout_split or "test"
    cfg.random_flip = False
    if cfg.dataset == "digits":
        images, _ = digits_lib.load_digits(split=cfg.split, upsample=cfg.upsample)
        images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return images if count is None else images[:count]
    cfg.batch_size = count or config.evals.num_samples
    return data.make_pipeline(cfg, seed=config.seed).get(0)["image"]


def reconstruction(module: nn.Module) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``reconstruct(params, images) -> (reconstructions, kl_per_dim)``, jitted: the decoded posterior
    means of an autoencoder run's state ``params`` and each image's KL to N(0, I) per latent dimension
    (the grids' and the held-out evaluation's program)."""

    @jax.jit
    def reconstruct(params, images):
        mean, logvar = module.apply({"params": params["autoencoder"]}, images, method="encode")
        kl = losses.kl_to_standard_normal(mean, logvar) / mean[0].size
        return module.apply({"params": params["autoencoder"]}, mean, method="decode"), kl

    return reconstruct


def make_reconstructor(config: ml_collections.ConfigDict, parts, *, mesh) -> Callable[..., jax.Array]:
    """``sample_fn(params, key, labels) -> images`` for the loop's grids: reconstructions (posterior
    means) of the first ``len(labels)`` held-out images, side by side with nothing else."""
    from diffax import sharding

    reconstruct = reconstruction(parts.module)

    def sample_fn(params, key, labels):
        del key
        images = heldout_images(config, len(labels))
        return jax.device_put(reconstruct(params, images)[0], sharding.replicated(mesh))

    return sample_fn


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of ``10 log10(2² / MSE)`` for images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean(
        np.square(np.asarray(images, np.float64) - np.asarray(reconstructions, np.float64)), axis=(1, 2, 3)
    )
    return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def make_evaluation(config: ml_collections.ConfigDict, *, num_samples: int | None = None):
    """``evaluate(params, *, step, seed=None) -> metrics``: PSNR, L1 and KL per latent dimension of
    posterior-mean reconstructions of the held-out split (``num_samples`` images, default all)."""
    from absl import logging

    import diffax.models as models

    module = models.from_config(config.model)
    images = heldout_images(config, num_samples)
    batch = config.evals.batch_size
    encode_decode = reconstruction(module)

    def evaluate(params: Any, *, step: int, seed: int | None = None) -> dict[str, float]:
        del seed
        recs, kls = zip(
            *(
                jax.device_get(encode_decode(params, images[i : i + batch]))
                for i in range(0, len(images), batch)
            ),
            strict=True,
        )
        rec = np.concatenate(recs)
        metrics = dict(
            psnr=psnr(images, rec),
            rec_l1=float(np.mean(np.abs(images - rec))),
            kl_per_dim=float(np.mean(np.concatenate(kls))),
            num_images=float(len(images)),
        )
        logging.info(
            "eval at step %d on %d held-out images: PSNR %.2f dB", step, len(images), metrics["psnr"]
        )
        return metrics

    return evaluate


__all__ = [
    "LOSS_DEFAULTS",
    "AutoencoderState",
    "build",
    "check",
    "heldout_images",
    "is_autoencoder_run",
    "make_evaluation",
    "make_reconstructor",
    "make_train_step",
    "psnr",
    "reconstruction",
    "state_initializer",
]
