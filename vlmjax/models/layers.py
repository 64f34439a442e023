"""Building blocks shared by the vision tower, projector and LLM.

Every parameter is created through `param`, which records its logical axis names (e.g. ('embed', 'mlp')) as
`out_sharding` metadata; `vlmjax.sharding` maps those names onto mesh axes by config rules. Params are stored in
`param_dtype` and cast to the compute `dtype` at use, so fp32 master weights with bf16 compute need no copies.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax import sharding
from vlmjax.models import lora


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], names: Sequence[str | None], dtype) -> nnx.Param:
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


def normal_init(std: float) -> Callable:
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def zeros_init(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
    return jnp.ones(shape, dtype)


class Linear(nnx.Module, lora.Adaptable):
    """y = einsum(x, W) + b with a multi-axis kernel, e.g. (embed) -> (heads, head_dim).

    One class for every projection so LoRA and quantisation have a single place to hook into.
    `in_shape`/`out_shape` may be multi-dimensional; the einsum contracts the trailing len(in_shape) axes of x.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        names: Sequence[str | None],
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = dtype
        self.kernel = param(rngs, normal_init(std), self.in_shape + self.out_shape, names, param_dtype)
        self.bias = (
            param(rngs, zeros_init, self.out_shape, names[len(self.in_shape) :], param_dtype) if use_bias else None
        )
        # LoRA adapter slots, filled by vlmjax.models.lora.add_lora
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        ins, outs = "abcdefgh"[:n_in], "pqrstuvw"[:n_out]
        lead = x.shape[: x.ndim - n_in]
        x2 = x.reshape((-1,) + self.in_shape).astype(self.dtype)
        y = jnp.einsum(f"z{ins},{ins}{outs}->z{outs}", x2, self.kernel[...].astype(self.dtype))
        delta = lora.lora_delta(self, x2)
        if delta is not None:
            y = y + delta
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(lead + self.out_shape)


class RMSNorm(nnx.Module):
    """Llama RMSNorm; normalises in fp32 like HF, then multiplies by the weight in the compute dtype."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones_init, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> jnp.ndarray:
    """Inverse frequencies, with HF's `default`, `linear` and `llama3` rope types."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF rotate-half layout: the first and second halves of head_dim form the rotated pairs."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.concatenate([cos, cos], -1).astype(x_bthd.dtype)
    sin = jnp.concatenate([sin, sin], -1).astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], -1)
    return x_bthd * cos + rotated * sin


def remat_policy(name: str):
    """Names from config -> jax checkpoint policies. 'none' disables remat."""
    policies = {
        "full": None,  # save nothing, recompute everything
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "everything": jax.checkpoint_policies.everything_saveable,
    }
    if name not in policies and name != "none":
        raise ValueError(f"unknown remat policy {name!r}; known: none, {', '.join(policies)}")
    return policies.get(name)


def scan_layers(layers: nnx.Module, x, body: Callable, remat: str = "none", num: int | None = None):
    """Run stacked layers (params with a leading 'layers' axis) with lax.scan: compile time independent of depth.

    `body(layer, x) -> x` is called with one un-stacked layer. `num` runs only the first `num` layers (a LLaVA
    tower stops at its feature layer) by indexing the stacked params, without slicing a copy of them.
    """
    graphdef, state = nnx.split(layers)
    total = jax.tree.leaves(state)[0].shape[0]
    num = total if num is None else num

    def step(carry, xs):
        i, layer_state = xs
        if layer_state is None:
            layer_state = jax.tree.map(lambda a: a[i], state)
        with lora.layer_index(i):
            return body(nnx.merge(graphdef, layer_state), carry), None

    if remat != "none":
        step = jax.checkpoint(step, policy=remat_policy(remat), prevent_cse=False)
    if num == 0:
        return x
    x, _ = jax.lax.scan(step, x, (jnp.arange(num), state if num == total else None))
    return x


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """Create n layers with stacked params; the leading axis gets the logical name 'layers'."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def _make(r):
        return make(r)

    return _make(rngs)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names (no-op outside `sharding.use_mesh`)."""
    return sharding.constrain(x, names)
