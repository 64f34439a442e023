"""Vision -> LLM projectors.

linear            one Linear (VILA's best in the paper)
mlp2x_gelu        Linear -> GELU -> Linear (LLaVA-1.5; HF `LlavaMultiModalProjector` layout)
downsample2x2_mlp VILA-1.5: concat 2x2 neighbouring patches -> LayerNorm(4C) -> Linear -> GELU -> Linear.
                  Odd grids are zero-padded; tokens come out column-major, exactly as VILA's `flat_square`,
                  so VILA checkpoints load without re-learning the order.
pixel_shuffle_mlp POINTS/InternVL pixel shuffle at scale 0.5 (4x fewer tokens, same MLP), row-major output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax.models.config import VLMConfig, to_dtype
from vlmjax.models.layers import LayerNorm, Linear, activation

PROJECTORS = ("linear", "mlp2x_gelu", "downsample2x2_mlp", "pixel_shuffle_mlp")


def merge_2x2(x_bnc: jax.Array, *, row_major: bool) -> jax.Array:
    """(B, g*g, C) -> (B, ceil(g/2)^2, 4C): channels of each 2x2 block are [(0,0), (0,1), (1,0), (1,1)]."""
    b, n, c = x_bnc.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"2x2 merge needs a square patch grid, got {n} tokens")
    x = x_bnc.reshape(b, g, g, c)
    if g % 2:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        g += 1
    x = x.reshape(b, g // 2, 2, g // 2, 2, c)  # (b, row_blk, dr, col_blk, dc, c)
    order = (0, 1, 3, 2, 4, 5) if row_major else (0, 3, 1, 2, 4, 5)
    return x.transpose(order).reshape(b, (g // 2) ** 2, 4 * c)


class Projector(nnx.Module):
    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        if cfg.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {cfg.projector!r}; known: {PROJECTORS}")
        self.kind = cfg.projector
        cv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.act = activation(cfg.projector_act)
        merges = self.kind in ("downsample2x2_mlp", "pixel_shuffle_mlp")
        cv = 4 * cv if merges else cv
        self.norm = LayerNorm(cv, 1e-5, **kw) if merges else None
        self.linear_1 = Linear((cv,), (d,), ("embed", "mlp"), use_bias=True, **kw)
        self.linear_2 = None if self.kind == "linear" else Linear((d,), (d,), ("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, feats_bnc: jax.Array) -> jax.Array:
        if self.norm is not None:
            feats_bnc = self.norm(merge_2x2(feats_bnc, row_major=self.kind == "pixel_shuffle_mlp"))
        x = self.linear_1(feats_bnc)
        return x if self.linear_2 is None else self.linear_2(self.act(x))
