"""Differentiation forms shared by the kernels: a fused kernel's values with a reference's derivatives."""

from collections.abc import Callable

import jax


def differentiated_through(kernel: Callable, reference: Callable) -> Callable:
    """``kernel``'s values with the derivatives of ``reference`` (the same function of the same arrays,
    written in XLA), of every order and in every mode: a custom JVP. A fused kernel whose own backward
    pass is reverse mode only (or which has none) so stays differentiable wherever the reference is,
    forward mode included (the exact likelihood's JVPs)."""
    fn = jax.custom_jvp(kernel)
    fn.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
    return fn
