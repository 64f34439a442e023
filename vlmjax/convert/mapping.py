"""One declarative table between our parameter paths and HF tensor names, used by import AND export.

A `Rule` names our param (a path in the nnx state), the HF tensor name (with `{i}` for per-layer tensors, which
our model stacks on a leading 'layers' axis) and a `Layout` that converts one HF tensor to ours and back.
Keeping both directions in one object is what makes the round trip bit-exact by construction.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """`hf_shape(our_shape)` is the exact shape the HF tensor must have: import checks it before converting, because
    a reshape by element count would accept a transposed non-square weight and load garbage."""

    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda ours: ours


IDENTITY = Layout(lambda w: w, lambda w: w)


def linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layout:
    """HF nn.Linear weight (out, in) <-> our kernel (*in_shape, *out_shape)."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Layout(
        lambda w: w.T.reshape(in_shape + out_shape),
        lambda k: np.ascontiguousarray(k.reshape(n_in, n_out).T),
        lambda _: (n_out, n_in),
    )


def reshape(shape: tuple[int, ...]) -> Layout:
    n = int(np.prod(shape))
    return Layout(lambda w: w.reshape(shape), lambda w: w.reshape(-1), lambda _: (n,))


def patch_conv(p: int, c: int, d: int) -> Layout:
    """HF Conv2d weight (D, C, p, p) <-> our patch kernel (p*p*C, D) with rows ordered (row, col, channel)."""
    return Layout(
        lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(p * p * c, d)),
        lambda k: np.ascontiguousarray(k.reshape(p, p, c, d).transpose(3, 2, 0, 1)),
        lambda _: (d, c, p, p),
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # our nnx state path, ending in the Variable name
    hf: str  # HF tensor name; contains "{i}" iff the param is stacked over layers
    layout: Layout = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def llm_rules(cfg: LLMConfig, ours: tuple[str, ...], model_prefix: str, head_name: str) -> list[Rule]:
    d, f, h, k, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    L = ours + ("layers",)
    lay = f"{model_prefix}layers.{{i}}."
    rules = [
        Rule(ours + ("embed_tokens",), f"{model_prefix}embed_tokens.weight"),
        Rule(ours + ("norm", "scale"), f"{model_prefix}norm.weight"),
        Rule(L + ("input_layernorm", "scale"), lay + "input_layernorm.weight"),
        Rule(L + ("post_attention_layernorm", "scale"), lay + "post_attention_layernorm.weight"),
        Rule(L + ("self_attn", "q_proj", "kernel"), lay + "self_attn.q_proj.weight", linear((d,), (h, hd))),
        Rule(L + ("self_attn", "k_proj", "kernel"), lay + "self_attn.k_proj.weight", linear((d,), (k, hd))),
        Rule(L + ("self_attn", "v_proj", "kernel"), lay + "self_attn.v_proj.weight", linear((d,), (k, hd))),
        Rule(L + ("self_attn", "o_proj", "kernel"), lay + "self_attn.o_proj.weight", linear((h, hd), (d,))),
        Rule(L + ("mlp", "gate_proj", "kernel"), lay + "mlp.gate_proj.weight", linear((d,), (f,))),
        Rule(L + ("mlp", "up_proj", "kernel"), lay + "mlp.up_proj.weight", linear((d,), (f,))),
        Rule(L + ("mlp", "down_proj", "kernel"), lay + "mlp.down_proj.weight", linear((f,), (d,))),
    ]
    if cfg.attention_bias:
        for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
            rules.append(Rule(L + ("self_attn", name, "bias"), lay + f"self_attn.{name}.bias", reshape((heads, hd))))
    if cfg.o_proj_bias:
        rules.append(Rule(L + ("self_attn", "o_proj", "bias"), lay + "self_attn.o_proj.bias"))
    if not cfg.tie_word_embeddings:
        rules.append(Rule(ours + ("lm_head", "kernel"), head_name, linear((d,), (cfg.vocab_size,))))
    return rules


def vision_rules(cfg: VisionConfig, ours: tuple[str, ...], prefix: str) -> list[Rule]:
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    hd = d // h
    L = ours + ("layers",)
    lay = f"{prefix}encoder.layers.{{i}}."
    rules = [
        Rule(ours + ("patch_embed", "kernel"), f"{prefix}embeddings.patch_embedding.weight",
             patch_conv(cfg.patch_size, cfg.num_channels, d)),
        Rule(ours + ("position_embedding",), f"{prefix}embeddings.position_embedding.weight"),
        Rule(ours + ("post_layernorm", "scale"), f"{prefix}post_layernorm.weight"),
        Rule(ours + ("post_layernorm", "bias"), f"{prefix}post_layernorm.bias"),
    ]
    if cfg.kind == "clip":
        rules += [
            Rule(ours + ("class_embedding",), f"{prefix}embeddings.class_embedding"),
            Rule(ours + ("pre_layernorm", "scale"), f"{prefix}pre_layrnorm.weight"),  # sic: HF's name
            Rule(ours + ("pre_layernorm", "bias"), f"{prefix}pre_layrnorm.bias"),
        ]
    else:
        rules.append(Rule(ours + ("patch_embed", "bias"), f"{prefix}embeddings.patch_embedding.bias"))
    for ln in ("layer_norm1", "layer_norm2"):
        rules += [Rule(L + (ln, "scale"), lay + f"{ln}.weight"), Rule(L + (ln, "bias"), lay + f"{ln}.bias")]
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += [
            Rule(L + (name, "kernel"), lay + f"self_attn.{name}.weight", linear((d,), (h, hd))),
            Rule(L + (name, "bias"), lay + f"self_attn.{name}.bias", reshape((h, hd))),
        ]
    rules += [
        Rule(L + ("out_proj", "kernel"), lay + "self_attn.out_proj.weight", linear((h, hd), (d,))),
        Rule(L + ("out_proj", "bias"), lay + "self_attn.out_proj.bias"),
        Rule(L + ("fc1", "kernel"), lay + "mlp.fc1.weight", linear((d,), (f,))),
        Rule(L + ("fc1", "bias"), lay + "mlp.fc1.bias"),
        Rule(L + ("fc2", "kernel"), lay + "mlp.fc2.weight", linear((f,), (d,))),
        Rule(L + ("fc2", "bias"), lay + "mlp.fc2.bias"),
    ]
    return rules


def projector_rules(cfg: VLMConfig, ours: tuple[str, ...], prefix: str) -> list[Rule]:
    cv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
    if cfg.projector in ("downsample2x2_mlp", "pixel_shuffle_mlp"):
        cv *= 4
    rules = [
        Rule(ours + ("linear_1", "kernel"), f"{prefix}linear_1.weight", linear((cv,), (d,))),
        Rule(ours + ("linear_1", "bias"), f"{prefix}linear_1.bias"),
    ]
    if cfg.projector != "linear":
        rules += [
            Rule(ours + ("linear_2", "kernel"), f"{prefix}linear_2.weight", linear((d,), (d,))),
            Rule(ours + ("linear_2", "bias"), f"{prefix}linear_2.bias"),
        ]
    if cfg.projector in ("downsample2x2_mlp", "pixel_shuffle_mlp"):
        rules += [Rule(ours + ("norm", "scale"), f"{prefix}norm.weight"), Rule(ours + ("norm", "bias"), f"{prefix}norm.bias")]
    return rules


# HF LlavaForConditionalGeneration tensor names as transformers 5 writes them (save_pretrained) ...
LLAVA_PREFIXES = {
    "vision": "vision_tower.",
    "projector": "multi_modal_projector.",
    "llm": "language_model.model.",
    "lm_head": "language_model.lm_head.weight",
}
# ... and the other layouts found in the wild (llava-hf hub checkpoints, transformers' in-memory names),
# normalised on import. Longest prefix first.
LEGACY_RENAMES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def vlm_rules(cfg: VLMConfig) -> list[Rule]:
    p = LLAVA_PREFIXES
    return (
        vision_rules(cfg.vision, ("vision",), p["vision"])
        + projector_rules(cfg, ("projector",), p["projector"])
        + llm_rules(cfg.llm, ("llm",), p["llm"], p["lm_head"])
        + ([Rule(("image_newline",), "image_newline")] if cfg.image_layout == "llava_next" else [])
    )


def causal_lm_rules(cfg: LLMConfig) -> list[Rule]:
    return llm_rules(cfg, (), "model.", "lm_head.weight")
