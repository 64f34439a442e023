"""Per-sample hidden-state features (COINCIDE): mean of chosen module outputs over image and over text positions.

Features come out of the layer scan itself (`LLM.hidden_states_reduced`): each layer emits a (B, groups, D)
weighted sum, never an (L, B, S, D) activation stack, so a 30-layer model costs no more memory than a forward.

parts: "attn" = attention block output after o_proj (HF forward hook on `self_attn.o_proj`), "mlp" = MLP output,
"resid" = residual stream after the layer (HF `output_hidden_states[i + 1]`, except that HF applies the final
norm to its last entry). layers: 0-based decoder layer indices (negative counts from the end).
Groups: 0 = image positions (image_token_id), 1 = text positions; a row without images gets zeros for group 0.
The text span: "all" = every real non-image token (system prompt and template included), "after_image" = the
non-image tokens after the first image's last token (COINCIDE's reference slices from the image's end to the end
of the sequence; a row without images uses all its text), "assistant" = the tokens the model is trained on (each
assistant reply plus its end-of-turn; `text_mask`). The layer scan stops after the deepest requested layer.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.models.vlm import embed_inputs, llm_of
from vlmjax.scoring.loglik import on_mesh

PARTS = ("attn", "mlp", "resid")
GROUPS = ("image", "text")
SPANS = ("all", "after_image", "assistant")


def group_weights(ids_bs, lengths_b, image_token_id: int | None, span: str = "all", text_mask_bs=None):
    """(B, S, 2) fp32: 1/count over image positions and over the text span's positions of each row's real
    tokens (module docstring)."""
    s = ids_bs.shape[1]
    pos = jnp.arange(s)[None, :]
    real = pos < lengths_b[:, None]
    img = (ids_bs == image_token_id) & real if image_token_id is not None else jnp.zeros_like(real)
    text = real & ~img
    if span == "after_image":
        first = jnp.argmax(img, axis=1)  # first image token (0 when none)
        after_first = (pos > first[:, None]) & ~img
        run_end = jnp.argmax(after_first, axis=1)  # first non-image token after it: end of the first image
        has = img.any(1) & after_first.any(1)
        start = jnp.where(img.any(1), jnp.where(has, run_end, s), 0)
        text = text & (pos >= start[:, None])
    elif span == "assistant":
        text = text & text_mask_bs
    elif span != "all":
        raise ValueError(f"span={span!r}: use one of {SPANS}")
    masks = jnp.stack([img, text], axis=-1).astype(jnp.float32)
    return masks / jnp.maximum(masks.sum(1, keepdims=True), 1.0)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layers", "parts", "span"))
def _features(graphdef, state, ids_bs, lengths_b, text_mask_bs, pixel_values, image_rows, image_pos, *, layers,
              parts, span):
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    x_bsd = embed_inputs(model, ids_bs, pixel_values, image_rows, image_pos)
    image_token_id = model.cfg.image_token_id if hasattr(model, "llm") else None
    w = group_weights(ids_bs, lengths_b, image_token_id, span, text_mask_bs)
    _, stats = llm.hidden_states_reduced(x_bsd, w, parts=parts, num_layers=max(layers) + 1)
    idx = jnp.asarray(layers)
    out = jnp.stack([stats[p][idx] for p in parts])  # (P, L, B, G, D)
    return out.transpose(2, 0, 1, 3, 4)


def features(model, ids_bs, lengths_b, pixel_values=None, image_rows=None, *,
             layers: Sequence[int], parts: Sequence[str] = ("attn", "resid"), image_pos=None, span: str = "all",
             text_mask=None, mesh=None) -> np.ndarray:
    """(B, len(parts), len(layers), 2, D) fp32 means over image / text positions (rows right-padded).
    text_mask (B, S) bool: the "assistant" span's tokens (`Encoder.scored(req, "all").target`). mesh: batch
    arrays are split over its data axes (run with a model placed by `sharding.shard_module`)."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown parts {bad}; known: {PARTS}")
    if span not in SPANS:
        raise ValueError(f"span={span!r}: use one of {SPANS}")
    if (span == "assistant") != (text_mask is not None):
        raise ValueError('text_mask is required with span="assistant" and only then')
    n_layers = llm_of(model).cfg.num_layers
    norm = tuple(int(i) % n_layers for i in layers)
    if any(not -n_layers <= int(i) < n_layers for i in layers):
        raise ValueError(f"layers {list(layers)} out of range for {n_layers} layers")
    ids_bs = np.asarray(ids_bs, np.int32)
    if pixel_values is not None:
        from vlmjax.models.vlm import host_image_inputs

        image_rows, image_pos = host_image_inputs(model.cfg, ids_bs, pixel_values, image_rows, image_pos)
    text_mask = np.zeros(ids_bs.shape, bool) if text_mask is None else np.asarray(text_mask, bool)
    graphdef, state = nnx.split(model)
    with on_mesh(mesh) as put:
        out = _features(graphdef, state, *put(ids_bs, np.asarray(lengths_b, np.int32), text_mask, pixel_values,
                                              image_rows, image_pos), layers=norm, parts=tuple(parts), span=span)
        return np.asarray(jax.device_get(out))
