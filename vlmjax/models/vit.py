"""Vision towers: CLIP ViT (class token, pre-LN, quick_gelu) and SigLIP ViT (no class token, gelu_tanh).

Pixels come in NHWC. The patch conv is a reshape + matmul (identical maths, no conv lowering). `features`
returns HF's `hidden_states[vision_feature_layer]` and runs only the layers up to it, as LLaVA needs; the
remaining layers and the post-layernorm are kept as parameters so an export is a complete HF tower.
SigLIP's attention-pool head is not used by LLaVA and is not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from vlmjax.models.config import VisionConfig, to_dtype
from vlmjax.models.layers import (LayerNorm, Linear, activation, constrain, normal_init, param, scan_layers, stacked,
                                  zeros_init)
from vlmjax.ops.attention import attention


class ViTLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
        hd = d // h
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.q_proj = Linear((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = Linear((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = Linear((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.out_proj = Linear((h, hd), (d,), ("heads", "head_dim", "embed"), use_bias=True, **kw)
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.fc1 = Linear((d,), (f,), ("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = Linear((f,), (d,), ("mlp", "embed"), use_bias=True, **kw)
        self.act = activation(cfg.hidden_act)
        self.impl = cfg.attention_impl

    def __call__(self, x_bnd):
        y = self.layer_norm1(x_bnd)
        o = attention(self.q_proj(y), self.k_proj(y), self.v_proj(y), causal=False, impl=self.impl)
        x_bnd = x_bnd + self.out_proj(o)
        x_bnd = x_bnd + self.fc2(self.act(self.fc1(self.layer_norm2(x_bnd))))
        return constrain(x_bnd, ("batch", "length", "act_embed"))


class ConvStem(nnx.Module):
    """patch_stem="conv": log2(p) 3x3 stride-2 convolutions (padding 1, as torch's Conv2d(3, stride=2, padding=1)),
    channels doubling up to hidden_size, GELU between them and none after the last, so the output is one token per
    p x p patch like the linear patchify's. Locality lets a tower trained from scratch see shapes."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        n, d = cfg.patch_size.bit_length() - 1, cfg.hidden_size
        pdtype = to_dtype(cfg.param_dtype)
        chans = [cfg.num_channels] + [max(d >> (n - 1 - i), 8) for i in range(n - 1)] + [d]
        self.kernels = nnx.List([param(rngs, normal_init((2.0 / (9 * ci)) ** 0.5), (3, 3, ci, co),
                                       (None, None, None, None), pdtype) for ci, co in zip(chans, chans[1:])])
        self.biases = nnx.List([param(rngs, zeros_init, (co,), (None,), pdtype) for co in chans[1:]])
        self.dtype = to_dtype(cfg.dtype)

    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        x = pixels_bhwc.astype(self.dtype)
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = jax.lax.conv_general_dilated(x, w[...].astype(self.dtype), (2, 2), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + b[...].astype(self.dtype)
        return rearrange(x, "b gh gw d -> b (gh gw) d")


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        # kernel rows ordered (patch_row, patch_col, channel) to match the NHWC patchify below
        if cfg.patch_stem == "conv":
            self.conv_stem = ConvStem(cfg, rngs=rngs)
        else:
            self.patch_embed = Linear((p * p * cfg.num_channels,), (d,), ("patch", "embed"),
                                      use_bias=cfg.kind == "siglip", **kw)
        n_pos = cfg.num_patches + (1 if cfg.has_cls else 0)
        self.position_embedding = param(rngs, normal_init(0.02), (n_pos, d), (None, "embed"), pdtype)
        self.class_embedding = param(rngs, normal_init(0.02), (d,), ("embed",), pdtype) if cfg.has_cls else None
        self.pre_layernorm = LayerNorm(d, cfg.layer_norm_eps, **kw) if cfg.kind == "clip" else None
        self.layers = stacked(cfg.num_layers, lambda r: ViTLayer(cfg, rngs=r), rngs)
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, **kw)

    def embeddings(self, pixels_bhwc: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixels_bhwc.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"vision tower expects NHWC pixels of shape (N, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}), got {pixels_bhwc.shape}"
            )
        if cfg.patch_stem == "conv":
            x_bnd = self.conv_stem(pixels_bhwc)
        else:
            # HF's stride-p patch convolution drops the pixels past the last whole patch (SigLIP-so400m-patch14-384:
            # 27 x 14 = 378 of 384 px)
            px = cfg.grid * cfg.patch_size
            patches = rearrange(pixels_bhwc[:, :px, :px], "b (gh p) (gw q) c -> b (gh gw) (p q c)",
                                p=cfg.patch_size, q=cfg.patch_size)
            x_bnd = self.patch_embed(patches)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x_bnd.dtype), (x_bnd.shape[0], 1, x_bnd.shape[-1]))
            x_bnd = jnp.concatenate([cls, x_bnd], axis=1)
        x_bnd = x_bnd + self.position_embedding[...].astype(x_bnd.dtype)
        if self.pre_layernorm is not None:
            x_bnd = self.pre_layernorm(x_bnd)
        return constrain(x_bnd, ("batch", "length", "act_embed"))

    def features(self, pixels_bhwc: jax.Array, num_layers: int) -> jax.Array:
        """HF `hidden_states[num_layers]`: the output after the first `num_layers` layers (0 = embeddings)."""
        x_bnd = self.embeddings(pixels_bhwc)
        return scan_layers(self.layers, x_bnd, lambda layer, x: layer(x), remat=self.cfg.remat, num=num_layers)

    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        """HF `last_hidden_state`: all layers; SigLIP applies its post-layernorm here, CLIP only to the pooled token."""
        x_bnd = self.features(pixels_bhwc, self.cfg.num_layers)
        return self.post_layernorm(x_bnd) if self.cfg.kind == "siglip" else x_bnd
