"""Per-sample hidden-state features (COINCIDE): mean of chosen module outputs over image and over text positions.

Features come out of the layer scan itself (`LLM.hidden_states_reduced`): each layer emits a (B, groups, D)
weighted sum, never an (L, B, S, D) activation stack, so a 30-layer model costs no more memory than a forward.

parts: "attn" = attention block output after o_proj (HF forward hook on `self_attn.o_proj`), "mlp" = MLP output,
"resid" = residual stream after the layer (HF `output_hidden_states[i + 1]`, except that HF applies the final
norm to its last entry). layers: 0-based decoder layer indices (negative counts from the end).
Groups: 0 = image positions (image_token_id), 1 = text positions (every other real token); a row without images
gets zeros for group 0.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.generate.engine import embed_inputs, llm_of

PARTS = ("attn", "mlp", "resid")
GROUPS = ("image", "text")


def group_weights(ids_bs, lengths_b, image_token_id: int | None):
    """(B, S, 2) fp32: 1/count over image positions and over text positions of each row's real tokens."""
    s = ids_bs.shape[1]
    real = jnp.arange(s)[None, :] < lengths_b[:, None]
    img = (ids_bs == image_token_id) & real if image_token_id is not None else jnp.zeros_like(real)
    masks = jnp.stack([img, real & ~img], axis=-1).astype(jnp.float32)
    return masks / jnp.maximum(masks.sum(1, keepdims=True), 1.0)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layers", "parts"))
def _features(graphdef, state, ids_bs, lengths_b, pixel_values, image_rows, image_pos, *, layers, parts):
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    x_bsd = embed_inputs(model, ids_bs, pixel_values, image_rows, image_pos)
    image_token_id = model.cfg.image_token_id if hasattr(model, "llm") else None
    w = group_weights(ids_bs, lengths_b, image_token_id)
    _, stats = llm.hidden_states_reduced(x_bsd, w, parts=parts)
    idx = jnp.asarray(layers)
    out = jnp.stack([stats[p][idx] for p in parts])  # (P, L, B, G, D)
    return out.transpose(2, 0, 1, 3, 4)


def features(model, ids_bs, lengths_b, pixel_values=None, image_rows=None, *,
             layers: Sequence[int], parts: Sequence[str] = ("attn", "resid"), image_pos=None) -> np.ndarray:
    """(B, len(parts), len(layers), 2, D) fp32 means over image / text positions (rows right-padded)."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown parts {bad}; known: {PARTS}")
    n_layers = llm_of(model).cfg.num_layers
    norm = tuple(int(i) % n_layers for i in layers)
    if any(not -n_layers <= int(i) < n_layers for i in layers):
        raise ValueError(f"layers {list(layers)} out of range for {n_layers} layers")
    ids_bs = np.asarray(ids_bs, np.int32)
    if pixel_values is not None:
        from vlmjax.models.vlm import host_image_inputs

        image_rows, image_pos = host_image_inputs(model.cfg, ids_bs, pixel_values, image_rows, image_pos)
    graphdef, state = nnx.split(model)
    out = _features(graphdef, state, ids_bs, np.asarray(lengths_b, np.int32), pixel_values, image_rows, image_pos,
                    layers=norm, parts=tuple(parts))
    return np.asarray(out)
