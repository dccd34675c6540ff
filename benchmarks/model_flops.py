"""Forward FLOPs of every DiT preset, counted by XLA, next to the paper's Gflops.

Run: ``python benchmarks/model_flops.py`` (a few seconds on CPU; nothing is compiled or materialised:
parameters are ``jax.ShapeDtypeStruct``s and the FLOPs come from the lowered HLO's cost analysis).

One 32x32x4 latent (a 256x256 image through the SD VAE), one class label, as in Peebles & Xie 2023,
Table 4. The paper counts a multiply-add as one FLOP (fvcore-style, matmuls and convolutions only);
XLA counts a multiply-add as two FLOPs and adds element-wise work. The table shows both, the XLA /
paper ratio, and the multiply-adds of every ``dot_general`` / ``conv_general_dilated`` in the jaxpr,
which is the paper's convention.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax import models

# Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Table 4 (Gflops, 256x256).
PAPER_GFLOPS = {
    ("s", 2): 6.06, ("b", 2): 23.01, ("l", 2): 80.71, ("xl", 2): 118.64,
    ("s", 4): 1.41, ("b", 4): 5.56, ("l", 4): 19.70, ("xl", 4): 29.05,
    ("s", 8): 0.36, ("b", 8): 1.42, ("l", 8): 5.01, ("xl", 8): 7.39,
}  # fmt: skip
INPUT_SHAPE = (1, 32, 32, 4)


def _eqn_macs(eqn: jax.extend.core.JaxprEqn) -> int:
    """Multiply-adds of one matmul or convolution equation (0 for anything else)."""
    out = int(np.prod(eqn.outvars[0].aval.shape))
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return out * int(np.prod([lhs[d] for d in contract]))
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions
        per_output = int(np.prod([rhs[d] for d in spec[1:]]))
        return out * per_output
    return 0


def matmul_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Multiply-adds of every matmul/convolution in a jaxpr, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += matmul_macs(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += matmul_macs(sub)
    return total


def measure(name: str) -> tuple[int, float, float]:
    """(parameters, XLA forward GFLOPs, matmul/conv GMACs) of one preset at INPUT_SHAPE."""
    module = models.get(name)
    params = nn.meta.unbox(models.abstract_params(module, INPUT_SHAPE))
    args = (
        params,
        jax.ShapeDtypeStruct(INPUT_SHAPE, jnp.float32),
        jax.ShapeDtypeStruct(INPUT_SHAPE[:1], jnp.float32),
        jax.ShapeDtypeStruct(INPUT_SHAPE[:1], jnp.int32),
    )
    forward = lambda p, x, t, y: module.apply({"params": p}, x, t, y)
    xla_flops = jax.jit(forward).lower(*args).cost_analysis()["flops"]
    macs = matmul_macs(jax.make_jaxpr(forward)(*args).jaxpr)
    return models.count_params(params), xla_flops / 1e9, macs / 1e9


def main() -> None:
    print(f"jax {jax.__version__}, input {INPUT_SHAPE}, backend {jax.default_backend()}\n")
    print(
        "| model | params (M) | paper Gflops | XLA GFLOPs | XLA / paper | matmul+conv GMACs | GMACs / paper |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for patch in (2, 4, 8):
        for size in ("s", "b", "l", "xl"):
            name = f"dit_{size}_{patch}"
            n, xla, macs = measure(name)
            paper = PAPER_GFLOPS[(size, patch)]
            print(
                f"| {name} | {n / 1e6:.1f} | {paper:.2f} | {xla:.2f} | {xla / paper:.3f} | "
                f"{macs:.2f} | {macs / paper:.3f} |"
            )


if __name__ == "__main__":
    main()
