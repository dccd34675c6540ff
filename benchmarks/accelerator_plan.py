"""Memory, FLOPs and compile time of the DiT-XL/2 and ADM ImageNet-64 train steps on an 8-device mesh.

    nice -n 10 python benchmarks/accelerator_plan.py                      # the table in the README
    python benchmarks/accelerator_plan.py --models=dit_xl_2 --meshes=fsdp --remat=dots_saveable --scan

Each train step (``experiments/imagenet256_dit.py``: DiT-XL/2 on 32x32x4 latents; ``experiments/
imagenet64.py``: the ADM U-Net on 64x64x3 pixels; both bf16 compute with float32 state, AdamW, one EMA) is
compiled with ``jax.jit(...).lower(...).compile()`` for 8 fake CPU devices, on a ``data=8`` mesh (data
parallel: every device holds the whole state) or an ``fsdp=8`` mesh (state sharded, ZeRO-3 style), at two
per-device batches. From XLA it prints one device's argument, output, aliased (donated) and temporary
bytes (``compiled.memory_analysis()``), FLOPs per step (``compiled.cost_analysis()``) beside the analytic
count (3 x the forward's matmul/convolution FLOPs, 2 per multiply-add, counted from the jaxpr of the
unrolled network), and the compile time. XLA's cost analysis counts a loop's body once, so with ``--scan``
its FLOPs are one DiT block's plus the rest. Memory is affine in the batch, so the two batches give the
largest per-device batch whose ``arguments + outputs - aliased + temporaries`` fits a 95 GB TPU v5p and an
80 GB H100.

The layers use their ``"xla"`` formulations (no CPU kernels, no Pallas/cuDNN attention: what lowers
without a fused kernel). Buffer assignment is the CPU compiler's, so the bytes show what the program
needs, not a TPU/GPU allocation (which pads and fuses differently and, with flash attention, keeps no
attention matrix): a plan to be checked on the device.
"""

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        # LLVM code generation does not change buffer assignment; level 0 makes the compiles shorter.
        " --xla_backend_optimization_level=0"
    )

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.model_flops import matmul_macs
from diffax import data, models, sharding, train_state
from experiments import imagenet64, imagenet256_dit

EXPERIMENTS = {"dit_xl_2": imagenet256_dit, "adm_imagenet64": imagenet64}
MESHES = {"dp": dict(data=8, fsdp=1), "fsdp": dict(data=1, fsdp=8)}
CAPACITY_GB = {"TPU v5p (95 GB)": 95.0, "H100 (80 GB)": 80.0}
GB = 1e9


def plan_config(
    model: str, mesh: str, per_device_batch: int, *, remat: str | None, scan: bool, depth: int | None
) -> ml_collections.ConfigDict:
    """The experiment's config on the 8-device ``mesh`` at ``per_device_batch``, XLA formulations,
    with ``remat`` (``"none"``: off; ``"full"``: save nothing; else a ``jax.checkpoint_policies`` name)."""
    config = EXPERIMENTS[model].get_config()
    config.mesh.update(MESHES[mesh])
    config.input.batch_size = 8 * per_device_batch
    for field in config.model:
        if field.endswith("_impl"):
            config.model[field] = "xla"
    if remat != "none":
        config.model.remat = True
        config.model.remat_policy = None if remat == "full" else remat
    if scan:
        config.model.scan_blocks = True
    if depth is not None:
        config.model.depth = depth
    return config


def analytic_flops(config: ml_collections.ConfigDict, parts: train_state.Parts, batch: int) -> float:
    """3 x the forward pass's matmul and convolution FLOPs (2 per multiply-add) at ``batch`` examples:
    the backward pass costs twice the forward (the model-FLOPs convention)."""
    shape = data.image_shape(config.input)
    module = parts.module  # unrolled: a scan's body would be counted once
    module = module.clone(scan_blocks=False) if getattr(module, "scan_blocks", False) else module
    params = nn.meta.unbox(models.abstract_params(module, (1, *shape)))
    args = (
        params,
        jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    jaxpr = jax.make_jaxpr(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(*args)
    return 3.0 * 2.0 * matmul_macs(jaxpr.jaxpr)


def measure(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Compiles the train step of ``config`` for its mesh; one device's bytes, FLOPs and compile time."""
    mesh = sharding.make_mesh(config.mesh)
    parts = train_state.build(config)
    abstract = jax.eval_shape(train_state.state_initializer(config, parts))
    shardings = sharding.logical_shardings(abstract, mesh, models.LOGICAL_AXIS_RULES)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(abstract), shardings
    )
    rows, n = sharding.batch_sharding(mesh), config.input.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((n, *data.image_shape(config.input)), jnp.float32, sharding=rows),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows),
    }
    step = jax.jit(
        train_state.config_train_step(config, parts),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return dict(
        params=models.count_params(state.params),
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        flops=float(cost["flops"]),
        analytic=analytic_flops(config, parts, n // mesh.size),
        trace_lower_s=lowered_at - start,
        compile_s=done - lowered_at,
    )


def peak_bytes(row: dict[str, float]) -> float:
    """One device's live bytes at the step's peak: state in, state out (less what the donation
    aliases), temporaries."""
    return row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]


def largest_batch(batches: tuple[int, int], peaks: tuple[float, float], capacity: float) -> int:
    """The largest per-device batch whose peak, affine through the two measured points, fits ``capacity``."""
    (b0, b1), (p0, p1) = batches, peaks
    per_example = (p1 - p0) / (b1 - b0)
    return max(0, int((capacity - (p0 - per_example * b0)) // per_example)) if per_example > 0 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dit_xl_2,adm_imagenet64")
    parser.add_argument("--meshes", default="dp,fsdp")
    parser.add_argument("--batches", default="4,8", help="two per-device batches")
    parser.add_argument("--remat", default="none", help="none, full, or a jax.checkpoint_policies name")
    parser.add_argument("--scan", action="store_true", help="DiT blocks as one nn.scan")
    parser.add_argument("--depth", type=int, default=None, help="override the DiT depth")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake {jax.default_backend()} devices; "
        f"remat={args.remat}, scan={args.scan}, depth={args.depth or 'preset'}\n"
    )
    header = (
        "| model | mesh | batch/device | params (M) | arguments GB | outputs GB | aliased GB | temp GB |"
        " peak GB | XLA TFLOP/step/device | analytic | XLA/analytic | trace+lower s | compile s |"
    )
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    fits = []
    for model in args.models.split(","):
        for mesh in args.meshes.split(","):
            peaks = []
            for b in batches:
                config = plan_config(model, mesh, b, remat=args.remat, scan=args.scan, depth=args.depth)
                if args.scan and config.model.name.startswith("unet"):
                    raise SystemExit("--scan: only the DiT's blocks scan; pass --models=dit_xl_2.")
                r = measure(config)
                peaks.append(peak_bytes(r))
                print(
                    f"| {model} | {mesh} | {b} | {r['params'] / 1e6:.1f} | {r['arguments'] / GB:.2f} | "
                    f"{r['outputs'] / GB:.2f} | {r['aliased'] / GB:.2f} | {r['temporaries'] / GB:.2f} | "
                    f"{peaks[-1] / GB:.2f} | {r['flops'] / 1e12:.3f} | {r['analytic'] / 1e12:.3f} | "
                    f"{r['flops'] / r['analytic']:.3f} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} |",
                    flush=True,
                )
            fits.append(
                (
                    model,
                    mesh,
                    {k: largest_batch(batches, tuple(peaks), c * GB) for k, c in CAPACITY_GB.items()},
                )
            )
    print("\nLargest per-device batch that fits (peak affine in the batch through the two rows above):\n")
    print("| model | mesh | " + " | ".join(CAPACITY_GB) + " |")
    print("|---|---|" + "---:|" * len(CAPACITY_GB))
    for model, mesh, fit in fits:
        print(f"| {model} | {mesh} | " + " | ".join(str(fit[k]) for k in CAPACITY_GB) + " |")


if __name__ == "__main__":
    main()
