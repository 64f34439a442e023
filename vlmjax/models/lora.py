"""LoRA on any `Linear` by path regex: y = x W + (alpha / r) * dropout(x) A B.

The adapter lives inside the Linear it adapts (one hook point), as `LoRAParam` variables that optimizer
rules can select by type or path. `lora_disabled()` switches every adapter off at trace time, so DPO's
reference model is the same weights with the adapter off: no second copy in memory. Dropout draws from a key
set by the train step (`lora_dropout_key`), folded with the adapter's id and the scanned layer index, so each
layer and projection gets its own mask; without a key (evaluation) there is no dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    pass


class Adaptable:
    """Mixin for the layers an adapter can attach to (`layers.Linear`): `add_lora` / `merge_lora` find them by this
    type, so this module never imports the layers that call `lora_delta` (imports run one way). Such a layer holds
    `lora_a` / `lora_b` slots (None until an adapter is attached), `in_shape`, `out_shape` and `kernel`."""


_DISABLED = contextvars.ContextVar("vlmjax_lora_disabled", default=False)
_DROPOUT_KEY = contextvars.ContextVar("vlmjax_lora_dropout_key", default=None)
_LAYER_INDEX = contextvars.ContextVar("vlmjax_layer_index", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def lora_disabled():
    """Trace-time switch: every adapter contributes nothing (DPO's reference forward)."""
    return _setting(_DISABLED, True)


def lora_dropout_key(key):
    """Trace-time dropout key for adapters (set by the train step; absent at evaluation)."""
    return _setting(_DROPOUT_KEY, key)


def layer_index(i):
    """Set by the layer scan while tracing each layer body (a tracer inside lax.scan)."""
    return _setting(_LAYER_INDEX, i)


def lora_delta(linear, x2: jax.Array) -> jax.Array | None:
    """The adapter's contribution for flattened input x2 (Z, *in_shape), or None when off/absent."""
    if linear.lora_a is None or _DISABLED.get():
        return None
    n_in, n_out = len(linear.in_shape), len(linear.out_shape)
    ins, outs = "abcdefgh"[:n_in], "pqrstuvw"[:n_out]
    key = _DROPOUT_KEY.get()
    if key is not None and linear.lora_dropout > 0:
        key = jax.random.fold_in(key, linear.lora_id)
        if _LAYER_INDEX.get() is not None:
            key = jax.random.fold_in(key, _LAYER_INDEX.get())
        keep = jax.random.bernoulli(key, 1.0 - linear.lora_dropout, x2.shape)
        x2 = jnp.where(keep, x2 / (1.0 - linear.lora_dropout), 0.0).astype(x2.dtype)
    a = linear.lora_a[...].astype(x2.dtype)
    b = linear.lora_b[...].astype(x2.dtype)
    h = jnp.einsum(f"z{ins},{ins}r->zr", x2, a)
    return linear.lora_scale * jnp.einsum(f"zr,r{outs}->z{outs}", h, b)


def add_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: str, seed: int = 0) -> list[str]:
    """Attach adapters to every Linear whose path ('/'-joined) matches `targets` (re.search). Returns the paths.

    A ~ N(0, 1/fan_in), B = 0, so the adapted model starts equal to the base model.
    """
    pattern = re.compile(targets)
    done = []
    key = jax.random.key(seed)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Adaptable):
            continue
        name = "/".join(map(str, path))
        if not pattern.search(name):
            continue
        if node.lora_a is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        kernel = node.kernel
        lead = kernel.shape[: kernel.ndim - len(node.in_shape) - len(node.out_shape)]
        names = kernel.get_metadata()["out_sharding"]
        lead_names, in_names = names[: len(lead)], names[len(lead) : len(lead) + len(node.in_shape)]
        out_names = names[len(lead) + len(node.in_shape) :]
        fan_in = math.prod(node.in_shape)  # a Python int: add_lora also runs under nnx.eval_shape / jit
        key, sub = jax.random.split(key)
        a = jax.random.normal(sub, lead + node.in_shape + (rank,), jnp.float32) / jnp.sqrt(fan_in)
        b = jnp.zeros(lead + (rank,) + node.out_shape, jnp.float32)
        node.lora_a = LoRAParam(a.astype(kernel.dtype), out_sharding=lead_names + in_names + ("lora_rank",), eager_sharding=False)
        node.lora_b = LoRAParam(b.astype(kernel.dtype), out_sharding=lead_names + ("lora_rank",) + out_names, eager_sharding=False)
        node.lora_scale = alpha / rank
        node.lora_dropout = dropout
        node.lora_id = zlib.crc32(name.encode()) & 0x7FFFFFFF
        done.append(name)
    if not done:
        raise ValueError(f"LoRA targets {targets!r} matched no Linear layer")
    return done


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its kernel (for export) and remove it. Returns how many were merged."""
    n = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Adaptable) and node.lora_a is not None:
            a, b = node.lora_a[...].astype(jnp.float32), node.lora_b[...].astype(jnp.float32)
            k = node.kernel[...]
            lead = k.ndim - len(node.in_shape) - len(node.out_shape)
            a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
            b2 = b.reshape(b.shape[: lead + 1] + (-1,))
            delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(k.shape)
            node.kernel.set_value((k.astype(jnp.float32) + node.lora_scale * delta).astype(k.dtype))
            node.lora_a = nnx.data(None)
            node.lora_b = nnx.data(None)
            n += 1
    return n


def lora_rank(model: nnx.Module) -> int | None:
    """The rank of the model's adapters, or None without any."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Adaptable) and node.lora_a is not None:
            return int(node.lora_a.shape[-1])
    return None
