"""Inference weight formats for the decoder layers the engine holds per layer: float32, bfloat16, int8.

Weight-only: activations, norms, the KV cache and every matmul's accumulation stay in the model's compute dtype;
only the projection kernels (q/k/v/o, gate/up/down, and their fused concatenations) are stored narrower and
widened right before use, inside the jitted step (`dequantized`), so on a GPU the widening fuses into the matmul's
operand read and the weight stream shrinks 2x (bf16) or 4x (int8). The embedding / LM head stays as loaded.

int8 is symmetric per output channel: scale[o] = max_i |W[i, o]| / 127 over the kernel's input axes,
q = round(W / scale) clipped to [-127, 127], W ~= q * scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMATS = ("float32", "bfloat16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Kernel:
    """int8 values with float32 scales broadcastable against them (size 1 on the input axes)."""

    q: jax.Array
    scale: jax.Array

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize_int8(w, n_in: int) -> Int8Kernel:
    """Per-output-channel symmetric int8 of a kernel whose first `n_in` axes are its inputs."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Kernel(q, scale)


def _is_q(x) -> bool:
    return isinstance(x, Int8Kernel)


def kernel_inputs(layers_module) -> dict[tuple, int]:
    """{path of each projection in a decoder layer: number of input axes of its kernel} (o_proj has two)."""
    from vlmjax.models.layers import Linear

    return {tuple(p): len(m.in_shape) for p, m in nnx.iter_graph(layers_module) if isinstance(m, Linear)}


def convert_layer_states(layer_states: tuple, fmt: str, n_in: dict[tuple, int]) -> tuple:
    """`LLM.split_layers` output -> the same pairs with their projection kernels in `fmt` (new arrays)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    if fmt == "float32":
        return layer_states

    def conv(w, inputs: int):
        if w.size == 0:  # emptied by fusion
            return w
        return quantize_int8(w, inputs) if fmt == "int8" else w.astype(jnp.bfloat16)

    def layer(state):
        def leaf(path, x):
            keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            keys = keys[:-1] if keys[-1] == "value" else keys  # the Variable's own attribute
            if keys[-1] == "kernel" and keys[:-1] in n_in:
                return conv(x, n_in[keys[:-1]])
            return x

        return jax.tree_util.tree_map_with_path(leaf, state)

    out = []
    for state, fused in layer_states:
        fused = None if fused is None else {k: (conv(v, 1) if not k.endswith("_bias") else v) for k, v in fused.items()}
        out.append((layer(state), fused))
    return tuple(out)


def dequantize(tree, dtype=jnp.float32):
    """Int8 kernels -> q * scale in `dtype`; everything else unchanged (bf16 kernels widen where they are used)."""
    return jax.tree.map(lambda x: (x.q.astype(dtype) * x.scale.astype(dtype)) if _is_q(x) else x, tree, is_leaf=_is_q)


class Dequantized:
    """Per-layer (state, fused) pairs read lazily: indexing dequantises one layer, inside the traced step, so the
    widened weights are temporaries of that step instead of a second resident copy."""

    def __init__(self, layer_states, dtype=jnp.float32):
        self.layer_states, self.dtype = layer_states, dtype

    def __len__(self):
        return len(self.layer_states)

    def __getitem__(self, i):
        return dequantize(self.layer_states[i], self.dtype)


def dequantized(layer_states, dtype=jnp.float32):
    """A lazy view when any kernel is int8, else the pairs as they are (None stays None)."""
    if layer_states is None or not any(_is_q(x) for x in jax.tree.leaves(layer_states, is_leaf=_is_q)):
        return layer_states
    return Dequantized(layer_states, dtype)


def weight_bytes(layer_states) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(layer_states, is_leaf=_is_q)))


def int8_reference(w: np.ndarray, n_in: int) -> np.ndarray:
    """numpy reference of quantise-then-dequantise (tests)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w).max(axis=tuple(range(n_in)), keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.rint(w / scale), -127, 127) * scale


def split_in_place(llm, fuse: bool, fmt: str) -> tuple:
    """`convert_layer_states(llm.split_layers(fuse), fmt, ...)` built one stacked weight (or fused group) at a time,
    each stacked array emptied in the model as soon as its per-layer pieces exist: the peak is the weights plus the
    largest group (gate|up), not twice the weights. The model keeps only empty layer arrays afterwards."""
    from vlmjax.models.llm import _FUSED

    n, n_in = llm.cfg.num_layers, kernel_inputs(llm.layers)
    variables = {tuple(str(k) for k in p): v for p, v in nnx.iter_graph(llm.layers) if isinstance(v, nnx.Variable)}
    if fuse and any(variables.get((a, b, "lora_a")) is not None for paths in _FUSED.values() for a, b in paths):
        fuse = False
    pieces: dict[tuple, list] = {}
    fused: list[dict] = [{} for _ in range(n)]

    def conv(w, inputs):
        return w if fmt == "float32" else quantize_int8(w, inputs) if fmt == "int8" else w.astype(jnp.bfloat16)

    def release(path):
        var = variables[path]
        pieces.setdefault(path, [jnp.zeros((0,), var.value.dtype)] * n)
        var.value = jnp.zeros((0,), var.value.dtype)

    if fuse:
        for name, paths in _FUSED.items():
            kernels = [variables[(a, b, "kernel")] for a, b in paths]
            d = kernels[0].value.shape[1]
            for i in range(n):
                fused[i][name] = conv(jnp.concatenate([k.value[i].reshape(d, -1) for k in kernels], axis=-1), 1)
            biases = [variables.get((a, b, "bias")) for a, b in paths]
            if biases[0] is not None and biases[0].value is not None:
                for i in range(n):
                    fused[i][name + "_bias"] = jnp.concatenate([b.value[i].reshape(-1) for b in biases])
            for a, b in paths:
                for key in ("kernel", "bias"):
                    if (a, b, key) in variables and variables[(a, b, key)].value is not None:
                        release((a, b, key))
    for path, var in variables.items():
        if path in pieces or var.value is None:
            continue
        inputs = n_in.get(path[:-1]) if path[-1] == "kernel" else None
        pieces[path] = [conv(var.value[i], inputs) if inputs else var.value[i] for i in range(n)]
        var.value = jnp.zeros((0,), var.value.dtype)
    state = nnx.state(llm.layers)

    def layer(i):
        def leaf(p, x):
            keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
            return pieces[keys[:-1] if keys[-1] == "value" else keys][i]

        return jax.tree_util.tree_map_with_path(leaf, state)

    return tuple((layer(i), fused[i] if fuse else None) for i in range(n))
