"""Mixture-of-experts feed-forward layer of DiT-MoE: top-k routing, shared experts, balance loss.

Each token's feed-forward output is ``Σ_k g_k(x) e_{i_k}(x) + shared(x)``: a softmax router over
``num_experts`` SwiGLU experts keeps its ``top_k`` scores (not renormalised), and a shared SwiGLU
expert sees every token. The experts' weights are stacked on a leading logical axis ``"expert"``,
which ``LOGICAL_AXIS_RULES`` maps to the ``expert`` mesh axis, so each device holds a slice of the
experts; tokens reach them by a dispatch/combine product (GShard), which the compiler turns into the
exchanges between devices. With ``capacity_factor=0`` no token is ever dropped (each expert has a
slot for every token of its example), which is the reference's dropless routing.

The load-balancing loss only adds its gradient (the reference's ``AddAuxiliaryLoss``): the forward
value of the layer is unchanged, its backward pass adds ``∇ L_balance``, so any diffusion loss trains
the router without the training loop knowing about experts. The value is sown into the
``"intermediates"`` collection as ``balance_loss`` for whoever asks (``mutable=["intermediates"]``).

References:
  Fei et al., "Scaling Diffusion Transformers to 16 Billion Parameters", 2024 (arXiv 2407.11633),
  Sec. 2.2 (shared expert routing, eq. 5 expert-level balance loss), Table 1 (model sizes),
  Sec. 3.1 (n_s = 2 shared experts, α = 0.005); Lepikhin et al., "GShard", 2020, Sec. 2.2
  (dispatch and combine tensors, expert capacity); Shazeer et al. 2020, "GLU Variants" (SwiGLU).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Dtype = Any


def route(scores: ArrayLike, top_k: int) -> tuple[jax.Array, jax.Array]:
    """The ``top_k`` largest router probabilities of each token and their experts.

    Args:
      scores: (..., E) router probabilities (softmax of the router logits).
      top_k: experts per token.

    Returns:
      ``(weights, experts)``, each (..., top_k): the probabilities as they are (not renormalised to
      sum to 1, as in the reference) and the int32 expert indices, largest first.
    """
    weights, experts = jax.lax.top_k(jnp.asarray(scores), top_k)
    return weights, experts.astype(jnp.int32)


def balance_loss(scores: ArrayLike, experts: ArrayLike, *, num_experts: int) -> jax.Array:
    """Expert-level balance loss without its factor α: ``Σ_i f_i P_i`` (Fei et al. 2024, eq. 5).

    ``f_i = E / (K T) Σ_t 1[token t selects expert i]`` is the load of expert i relative to a uniform
    split, ``P_i = (1/T) Σ_t s_{t,i}`` its mean router probability, over the T tokens of all examples.
    A uniform router with a balanced load gives 1; every token sending all its probability to the same
    K experts gives ``E / K``. Only ``P`` carries a gradient (the selection is a count).

    Args:
      scores: (..., E) router probabilities.
      experts: (..., K) selected experts of the same tokens (from :func:`route`).
      num_experts: E.

    Returns:
      A float32 scalar.
    """
    scores = jnp.asarray(scores, jnp.float32).reshape(-1, num_experts)
    experts = jnp.asarray(experts)
    top_k = experts.shape[-1]
    counts = jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32).sum(axis=0)
    load = counts * num_experts / (scores.shape[0] * top_k)
    return jnp.sum(jax.lax.stop_gradient(load) * scores.mean(axis=0))


@jax.custom_vjp
def add_loss_gradient(x: jax.Array, loss: jax.Array) -> jax.Array:
    """Returns ``x``; in the backward pass ``loss`` receives cotangent 1, so its gradient joins the
    gradient of whatever objective consumes ``x`` (the reference's ``AddAuxiliaryLoss``)."""
    del loss
    return x


def _add_loss_gradient_fwd(x, loss):
    return x, jnp.zeros_like(loss)


def _add_loss_gradient_bwd(zero, g):
    return g, jnp.ones_like(zero)


add_loss_gradient.defvjp(_add_loss_gradient_fwd, _add_loss_gradient_bwd)


def expert_capacity(tokens: int, *, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert and example: ``ceil(capacity_factor · tokens · top_k / num_experts)`` at most
    ``tokens``; ``capacity_factor=0`` gives ``tokens`` (nothing can be dropped)."""
    if capacity_factor <= 0:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def dispatch_and_combine(
    weights: jax.Array, experts: jax.Array, *, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """GShard dispatch (0/1) and combine (router weight) tensors, (B, T, E, C), per example.

    A token's k-th choice takes the next free slot of its expert, in the order (token, k); a choice
    that finds its expert full is dropped (its weight is lost, the token keeps its other choices and
    the residual path).
    """
    b, t, k = experts.shape
    choice = jax.nn.one_hot(experts.reshape(b, t * k), num_experts, dtype=jnp.int32)  # (B, TK, E)
    slot = jnp.cumsum(choice, axis=1) * choice - 1  # position in its expert's queue, -1 elsewhere
    dispatch = jax.nn.one_hot(slot, capacity, dtype=weights.dtype).reshape(b, t, k, num_experts, capacity)
    combine = jnp.einsum("btkec,btk->btec", dispatch, weights)
    return dispatch.sum(axis=2), combine


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) ⊙ W_up x)`` without biases, ``num`` of them stacked when ``num`` is set.

    Stacked weights carry the logical axis ``"expert"`` first; the input is then (num, ..., D).
    """

    hidden: int
    num: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        lead = () if self.num is None else (self.num,)
        lead_axes = () if self.num is None else ("expert",)
        init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=tuple(range(len(lead))))

        def weight(name, shape, axes):
            boxed = nn.with_logical_partitioning(init, (*lead_axes, *axes))
            return self.param(name, boxed, (*lead, *shape), self.param_dtype).astype(self.dtype)

        w_gate = weight("gate", (d, self.hidden), ("embed", "mlp"))
        w_up = weight("up", (d, self.hidden), ("embed", "mlp"))
        w_down = weight("down", (self.hidden, d), ("mlp", "embed"))
        x = x.astype(self.dtype)
        if self.num is None:
            h = nn.silu(x @ w_gate) * (x @ w_up)
            return h @ w_down
        h = nn.silu(jnp.einsum("e...d,edf->e...f", x, w_gate)) * jnp.einsum("e...d,edf->e...f", x, w_up)
        return jnp.einsum("e...f,efd->e...d", h, w_down)


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a mixture-of-experts layer routes.

    Attributes:
      num_experts: routed experts E.
      top_k: routed experts per token K.
      num_shared_experts: n_s; the shared experts form one SwiGLU of width n_s · D (the reference's
        ``intermediate_size = embed_dim * n_shared_experts``, which gives Table 1's sizes); 0: none.
      balance_weight: α of eq. 5 (0.005 in the paper's Sec. 3.1); 0 turns the loss off.
      capacity_factor: expert slots per example relative to an even split; 0: dropless.
    """

    num_experts: int
    top_k: int = 2
    num_shared_experts: int = 2
    balance_weight: float = 0.005
    capacity_factor: float = 0.0


class MoEFeedForward(nn.Module):
    """DiT-MoE feed-forward layer on (B, T, D) tokens.

    Attributes:
      routing: the router's settings.
      expert_hidden: hidden width of each routed SwiGLU expert (the reference: mlp_ratio · D).
    """

    routing: Routing
    expert_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        r = self.routing
        e = r.num_experts
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The reference's gate: a bias-free (E, D) weight, kaiming_uniform(a=√5) = U(±1/√D).
        gate_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        gate = self.param(
            "router", nn.with_logical_partitioning(gate_init, ("embed", None)), (d, e), self.param_dtype
        )
        scores = jax.nn.softmax((x.astype(jnp.float32) @ gate.astype(jnp.float32)), axis=-1)  # (B, T, E)
        weights, experts = route(scores, r.top_k)
        capacity = expert_capacity(t, num_experts=e, top_k=r.top_k, capacity_factor=r.capacity_factor)
        dispatch, combine = dispatch_and_combine(
            weights.astype(self.dtype), experts, num_experts=e, capacity=capacity
        )
        expert_in = jnp.einsum("btec,btd->ebcd", dispatch, x.astype(self.dtype))
        expert_out = SwiGLU(self.expert_hidden, num=e, name="experts", **kw)(expert_in)
        y = jnp.einsum("btec,ebcd->btd", combine, expert_out)
        if r.num_shared_experts:
            y = y + SwiGLU(r.num_shared_experts * d, name="shared", **kw)(x)
        loss = r.balance_weight * balance_loss(scores, experts, num_experts=e)
        self.sow("intermediates", "balance_loss", loss)
        if train and r.balance_weight > 0:
            y = add_loss_gradient(y, loss.astype(y.dtype))
        return y
