"""What the dropout masks of a benchmark U-Net's train step cost: ``layers.dropout`` against
``jax.random.bernoulli`` (one Threefry word per element, as ``flax.linen.Dropout`` draws them).

    python benchmarks/dropout_masks.py --config small --batch 32

Records the shape of every dropout call in the network's training forward pass (``jax.eval_shape``),
then times one jitted program per method that applies all of them, alternating the two (order flipped
every round), medians in ms. Prints a markdown table.
"""

import argparse
import math
import statistics
import time
import unittest.mock

import bench
import jax
import jax.numpy as jnp

from diffax import models, perf
from diffax.models import layers


def dropout_shapes(config: str, batch: int) -> list[tuple[tuple[int, ...], float]]:
    """(shape, rate) of each ``layers.dropout`` call in the train-mode forward pass of ``config``."""
    net = models.get("unet_ddpm_cifar10", **bench.CONFIGS[config], **bench.PEER_LAYOUT)
    x, t = jnp.zeros((batch, 32, 32, 3)), jnp.full((batch,), 0.5)
    calls = []

    def record(x, rate, key):
        calls.append((x.shape, rate))
        return x

    def apply(key):
        params = net.init(key, x[:1], t[:1])["params"]
        return net.apply({"params": params}, x, t, train=True, rngs={"dropout": key})

    with unittest.mock.patch.object(layers, "dropout", record):
        jax.eval_shape(apply, jax.random.key(0))
    return calls


def masks_program(calls, method: str):
    def run(key):
        outs = []
        for i, (shape, rate) in enumerate(calls):
            x, k = jnp.ones(shape), jax.random.fold_in(key, i)
            if method == "bernoulli":
                outs.append(jnp.where(jax.random.bernoulli(k, 1 - rate, shape), x / (1 - rate), 0))
            else:
                outs.append(layers.dropout(x, rate, k))
        return outs

    return jax.jit(run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(bench.CONFIGS), default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    perf.configure_cpu(retain_host_memory=True)
    calls = dropout_shapes(args.config, args.batch)
    programs = {m: masks_program(calls, m) for m in ("bernoulli", "layers.dropout")}
    key = jax.random.key(0)
    for program in programs.values():
        jax.block_until_ready(program(key))
    times = {m: [] for m in programs}
    for r in range(args.rounds):
        for m in list(programs)[:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            jax.block_until_ready(programs[m](key))
            times[m].append((time.perf_counter() - start) * 1e3)
    ms = {m: statistics.median(t) for m, t in times.items()}
    elements = sum(math.prod(shape) for shape, _ in calls)
    print(f"{args.config}, batch {args.batch}: {len(calls)} dropout calls, {elements / 1e6:.1f}M elements")
    print("| method | ms per train step | speedup |\n|---|---|---|")
    for m in programs:
        print(f"| {m} | {ms[m]:.1f} | {ms['bernoulli'] / ms[m]:.2f} |")


if __name__ == "__main__":
    main()
