"""Train-step images/s and MFU, and sampler throughput, on the devices at hand (GPU or TPU).

    python benchmarks/accelerator.py                  # the device table (all local devices)
    python benchmarks/accelerator.py --tiny           # seconds on a CPU: tiny widths, same code paths

Rows: the train steps of DiT-B/2 and DiT-XL/2 (``experiments/imagenet256_dit.py``: 32x32x4 latents, bf16
compute, float32 state, AdamW, EMA, learned-variance hybrid loss), of the CIFAR-10 U-Net
(``experiments/cifar10.py``), and DPM-Solver++(2M) sampling in 20 steps with DiT-XL/2 and guidance 1.5
(latents out; no VAE decode). Each program runs as ``diffax.train`` runs it: state sharded on a
``data`` x ``fsdp`` mesh over all devices (``--fsdp``), donated, jitted with explicit shardings, the
layers' ``"auto"`` formulations (Pallas flash attention on TPU, cuDNN on GPU). Inputs are random (the
data pipeline is not measured). Each row compiles once, runs ``--warmup`` calls, then times ``--steps``
calls; images/s count the global batch. MFU is the step's FLOPs per device from XLA's cost analysis
(``diffax.mfu``) over the timed seconds and the device's bf16 peak (measured matmul rate on CPU).
"""

import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffax import data, generate, mfu, models, sharding, train_state
from experiments import cifar10, common, imagenet256_dit


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: ml_collections.ConfigDict
    per_device_batch: int
    sampler: bool = False  # time sampling instead of the train step


def rows(*, tiny: bool, fsdp: int) -> list[Row]:
    """The benchmark's programs (``tiny``: the same recipes at widths a CPU runs in seconds)."""

    def dit(preset: str) -> ml_collections.ConfigDict:
        config = imagenet256_dit.get_config()
        config.model = common.model(preset, dtype="bfloat16")
        # Random latents stand in for the cache, and sampling returns latents: nothing reads a VAE.
        config.input.dataset = "random_latents"
        config.vae.pretrained = ""
        if tiny:
            config.model.update(depth=1, hidden_size=64, num_heads=2)
        return config

    unet = cifar10.get_config()
    if tiny:
        unet.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    sampling = dit("dit_xl_2")
    sampling.sampler.update(name="dpm_solver++_2m", steps=2 if tiny else 20)
    del sampling.sampler["variance"]  # DPM-Solver++ uses the mean prediction only
    batches = (1, 1, 1, 1) if tiny else (64, 32, 128, 32)
    out = [
        Row("DiT-B/2 train (bf16, 32x32x4)", dit("dit_b_2"), batches[0]),
        Row("DiT-XL/2 train (bf16, 32x32x4)", dit("dit_xl_2"), batches[1]),
        Row("CIFAR-10 U-Net train (32x32x3)", unet, batches[2]),
        Row("DiT-XL/2 DPM-Solver++(2M) 20 steps, cfg 1.5", sampling, batches[3], sampler=True),
    ]
    for row in out:
        row.config.mesh.update(data=-1, fsdp=fsdp)
    return out


def _random_batch(config: ml_collections.ConfigDict, n: int, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    shape = data.image_shape(config.input)
    image_key, label_key = jax.random.split(jax.random.key(1))
    batch = {"image": jax.random.uniform(image_key, (n, *shape), jnp.float32, -1.0, 1.0)}
    if config.input.labels:
        batch["label"] = jax.random.randint(label_key, (n,), 0, config.input.num_classes)
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def measure(row: Row, *, steps: int, warmup: int) -> dict[str, float]:
    """Compiles and times one row; images/s over the global batch, TFLOP/s per device, MFU."""
    config = row.config
    mesh = sharding.make_mesh(config.mesh)
    n = row.per_device_batch * mesh.size
    config.input.batch_size = n
    parts = train_state.build(config)
    init = train_state.state_initializer(config, parts)
    shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, models.LOGICAL_AXIS_RULES)
    state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
    if row.sampler:
        sample = generate.make_sampler(config, parts, mesh=mesh)
        fn = jax.jit(lambda params, key: sample(params, key, jnp.arange(n, dtype=jnp.int32) % 1000))
        args, advance = (state.params, jax.random.key(0)), lambda out, args: args
    else:
        fn = jax.jit(
            train_state.config_train_step(config, parts),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        args, advance = (state, _random_batch(config, n, mesh)), lambda out, args: (out[0], args[1])
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = mfu.step_flops(compiled)
    for _ in range(warmup):
        args = advance(jax.block_until_ready(compiled(*args)), args)
    start = time.perf_counter()
    for _ in range(steps):
        args = advance(compiled(*args), args)
    jax.block_until_ready(args)
    seconds = time.perf_counter() - start
    scalars = mfu.utilization(flops, steps, seconds, mfu.peak_flops(jax.devices()[0]))
    return dict(
        images_per_sec=n * steps / seconds,
        compile_s=compile_s,
        batch=n,
        tflops_per_device=scalars["tflops_per_device"],
        mfu=scalars.get("mfu", float("nan")),
    )


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized widths (the test runs this)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls (default 20, tiny 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=1, help="fsdp axis size of the mesh (data: the rest)")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.tiny else 20)
    device = jax.devices()[0]
    peak = mfu.peak_flops(device)
    print(
        f"jax {jax.__version__}; {jax.device_count()} x {device.device_kind} ({device.platform}); peak "
        f"{'unknown' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'} per device; {steps} timed calls"
        f"{' (tiny widths)' if args.tiny else ''}\n"
    )
    print("| program | global batch | images/s | TFLOP/s/device | MFU | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for row in rows(tiny=args.tiny, fsdp=args.fsdp):
        r = measure(row, steps=steps, warmup=args.warmup)
        results.append(r)
        print(
            f"| {row.name} | {r['batch']} | {r['images_per_sec']:.1f} | {r['tflops_per_device']:.2f} | "
            f"{100 * r['mfu']:.1f}% | {r['compile_s']:.1f} |",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
