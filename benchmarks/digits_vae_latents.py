"""How well a digits VAE serves latent diffusion: its reconstructions and perturbed latents, judged.

    python benchmarks/digits_vae_latents.py --vae=runs/digits_vae --noise=0 --noise=0.1 --noise=0.2

Encodes the held-out digits (the ``test`` split, 297 images, at the VAE run's upsampling) and, per
noise level r, decodes ``mean + r · std(mean) · ε`` (ε standard normal; r = 0 is the plain
reconstruction): PSNR against the originals, the digits classifier's and the independent judge's
scores and targets (``diffax.evaluation.digits_metrics`` on those 297 decodings, against the real
held-out digits' floors). A latent model's samples can be no better than the r = 0 row; rows at r > 0
show how the decoder treats latents a little off the data (speckle lowers the near-zero fraction).
Also printed: the latents' std per channel and the posterior's median std relative to it (how much
noise the decoder saw in training; 0 for a VAE whose KL term is negligible).
"""

from __future__ import annotations

import json
import resource
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from diffax import config as config_lib
from diffax import evaluation, latent
from diffax.autoencoding import system

FLAGS = flags.FLAGS
flags.DEFINE_string("vae", None, "A diffax autoencoder run directory.", required=True)
flags.DEFINE_multi_float("noise", [0.0], "Relative latent noise levels r.")
flags.DEFINE_integer("seed", 0, "Noise seed.")

COLUMNS = (  # the numbers a decoder moves; targets met counts all seven
    ("psnr", "PSNR dB", "{:.2f}"),
    ("judge/fd_ratio", "judge FD / floor", "{:.2f}"),
    ("judge/near_zero_fraction", "near-zero pixels", "{:.1%}"),
    ("fd_ratio", "CNN FD / floor", "{:.2f}"),
)


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    run = config_lib.load(FLAGS.vae)
    module, params = latent.load_vae(ml_collections.ConfigDict(dict(workdir=FLAGS.vae, pretrained="")))
    images = system.heldout_images(run)
    mean, logvar = jax.device_get(latent.encoder(module)(params, images))
    decode = jax.jit(lambda z: module.apply({"params": params}, z, method="decode"))
    channel_std = mean.reshape(-1, mean.shape[-1]).std(axis=0)
    relative_posterior_std = np.median(np.exp(0.5 * logvar) / channel_std, axis=(0, 1, 2))
    print(f"VAE {FLAGS.vae}: latents {mean.shape[1:]}, std per channel {np.round(channel_std, 3).tolist()},")
    print(f"  median posterior std / latent std per channel {np.round(relative_posterior_std, 4).tolist()}")
    print("| r | " + " | ".join(title for _, title, _ in COLUMNS) + " | targets met |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    rows = {}
    for r in FLAGS.noise:
        eps = np.random.default_rng(FLAGS.seed).standard_normal(mean.shape).astype(np.float32)
        decoded = np.asarray(decode(mean + np.float32(r) * mean.std() * eps))
        metrics = dict(evaluation.digits_metrics(decoded), psnr=system.psnr(images, decoded))
        targets = evaluation.digits_targets(metrics)
        cells = [fmt.format(metrics[key]) for key, _, fmt in COLUMNS]
        print(f"| {r:g} | " + " | ".join(cells) + f" | {sum(targets.values())}/{len(targets)} |")
        rows[r] = {k: v for k, v in metrics.items() if isinstance(v, float)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{time.time() - start:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} CPU-s")
    print(json.dumps({str(k): {m: round(v, 4) for m, v in row.items()} for k, row in rows.items()}))


if __name__ == "__main__":
    app.run(main)
