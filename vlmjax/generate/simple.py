"""A plain greedy decoder without a KV cache: the ground truth the cached engine is tested against.

Each step recomputes the whole (fixed-size) buffer, so one compiled program serves every step; causal
attention makes the not-yet-written tail invisible to earlier positions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit(static_argnames=())
def _next_token(model, ids_bt, pixel_values, image_rows, cur):
    if pixel_values is None:
        logits = model(ids_bt)
    else:
        logits = model(ids_bt, pixel_values, image_rows)
    return jnp.argmax(logits[:, cur - 1], axis=-1).astype(jnp.int32)


def greedy_generate(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pixel_values=None,
) -> list[int]:
    """Greedy continuation of one prompt (list of ids); stops at any of `eos_token_ids` (not returned)."""
    p = len(prompt_ids)
    buf = np.zeros((1, p + max_new_tokens), np.int32)
    buf[0, :p] = prompt_ids
    rows = None if pixel_values is None else jnp.zeros((pixel_values.shape[0],), jnp.int32)
    if pixel_values is not None:
        from vlmjax.models.vlm import check_image_tokens

        check_image_tokens(buf, np.asarray(rows), model.cfg.image_token_id, model.cfg.tokens_per_image)
    out: list[int] = []
    for cur in range(p, p + max_new_tokens):
        tok = int(jax.device_get(_next_token(model, jnp.asarray(buf), pixel_values, rows, cur))[0])
        if tok in eos_token_ids:
            break
        buf[0, cur] = tok
        out.append(tok)
    return out
