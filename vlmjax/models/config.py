"""Model configs: plain frozen dataclasses, serialisable to JSON, derived from HF configs by `vlmjax.convert`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Llama family: Llama-2/3, Mistral, Qwen2 (attention_bias), SmolLM2."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v biases
    o_proj_bias: bool = False  # HF Llama's attention_bias=True biases o_proj too (Qwen2 does not)
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral; recorded for export, not applied (see README limits)
    family: str = "llama"  # llama | mistral | qwen2: the HF architecture to export to
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Execution knobs (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP (class token, pre-LN, quick_gelu) or SigLIP (no class token, gelu_tanh, post-LN) ViT."""

    kind: str = "clip"  # clip | siglip
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    projection_dim: int | None = None  # CLIP checkpoints carry it; unused by LLaVA, kept for export
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"
    # "linear": the ViT patchify (HF CLIP/SigLIP). "conv": log2(patch_size) 3x3 stride-2 convolutions (Xiao et al.
    # 2021, "Early convolutions help transformers see better"): a tower trained from scratch on little data learns
    # shapes from it where a linear patchify does not (README "A mini base that sees"). Native folders only.
    patch_stem: str = "linear"

    def __post_init__(self):
        if self.patch_stem not in ("linear", "conv"):
            raise ValueError(f"vision.patch_stem must be 'linear' or 'conv', got {self.patch_stem!r}")
        p = self.patch_size
        if self.patch_stem == "conv" and (p < 2 or p & (p - 1)):
            raise ValueError(f"vision.patch_stem='conv' needs a power-of-two patch_size >= 2, got {p}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu | downsample2x2_mlp | pixel_shuffle_mlp
    projector_act: str = "gelu"
    vision_feature_layer: int = -2  # index into [embeddings, layer_1, ..., layer_L] as in HF hidden_states
    vision_feature_select: str = "default"  # default: drop the first (class) token; full: keep all
    image_token_id: int = 32000
    # How tile features become image tokens: "tiles" (each tile's features in order) or "llava_next" (HF LLaVA-1.6:
    # anyres tiles over `image_grid_pinpoints` (width, height), the grid cropped to the image's aspect ratio, a
    # learned `image_newline` per row; the data pipeline sends the layout as `image_pos`).
    image_layout: str = "tiles"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # Image preprocessing the model was trained with (normalisation: vision.image_mean / image_std). Every consumer
    # (trainer data, generation / eval / scoring Encoder) builds its `data.image.ImageSpec` from these, so a model is
    # never evaluated on images prepared differently from its training. None = what `image_layout` implies
    # (LLaVA-1.5: one tile padded to a square with the mean colour; LLaVA-1.6: anyres tiles, stretched global view).
    image_tiling: str | None = None  # none | anyres (over image_grid_pinpoints) | catty (POINTS)
    image_resize_mode: str | None = None  # pad_to_square_mean | resize | crop
    image_max_tiles: int = 6  # catty
    image_min_tiles: int = 1  # catty
    image_thumbnail: bool = True  # catty: a whole-image tile after the grid
    image_resample: str = "bicubic"  # bicubic | bilinear | lanczos
    image_catty_rule: str = "internvl"  # catty grid choice: internvl | points (data/tiling.py)
    image_catty_squash_extreme: bool = False  # catty "points": squash aspect > max_tiles:1 instead of refusing
    # Execution knobs.
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def tokens_per_image(self) -> int:
        """Feature tokens per image. As in HF LLaVA, 'default' drops the first token whatever the tower, so a
        SigLIP tower (no class token) wants 'full'."""
        v = self.vision
        n = v.num_patches + (1 if v.has_cls else 0) - (1 if self.vision_feature_select == "default" else 0)
        if self.projector in ("downsample2x2_mlp", "pixel_shuffle_mlp"):
            if n != v.num_patches:
                raise ValueError(
                    f"{self.projector} needs the square patch grid: use vision_feature_select="
                    f"{'default' if v.has_cls else 'full'} for a {v.kind} tower"
                )
            g = (v.grid + 1) // 2
            return g * g
        return n

    @property
    def vision_layers_used(self) -> int:
        """Layers of the tower that LLaVA actually runs (layers after the feature layer are skipped)."""
        n, fl = self.vision.num_layers, self.vision_feature_layer
        used = n + 1 + fl if fl < 0 else fl
        if not 0 <= used <= n:
            raise ValueError(f"vision_feature_layer={fl} out of range for a {n}-layer tower")
        return used

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        d = dict(d)
        llm = LLMConfig(**d.pop("llm"))
        vision = dict(d.pop("vision"))
        for k in ("image_mean", "image_std"):
            vision[k] = tuple(vision[k])
        if "image_grid_pinpoints" in d:
            d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        return cls(llm=llm, vision=VisionConfig(**vision), **d)

    def __post_init__(self):
        if self.image_layout not in ("tiles", "llava_next"):
            raise ValueError(f"image_layout must be 'tiles' or 'llava_next', got {self.image_layout!r}")
        if self.image_layout == "llava_next" and not self.image_grid_pinpoints:
            raise ValueError("image_layout='llava_next' needs image_grid_pinpoints")
        implied = layout_preprocessing(self.image_layout)
        for name, value in implied.items():  # frozen: fill the layout's defaults once, so JSON holds real values
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        choices = dict(image_tiling=("none", "anyres", "catty"),
                       image_resize_mode=("pad_to_square_mean", "resize", "crop"),
                       image_resample=("bicubic", "bilinear", "lanczos"), image_catty_rule=("internvl", "points"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {allowed}")
        if self.image_layout == "llava_next" and self.image_tiling != "anyres":
            raise ValueError(f"image_layout='llava_next' needs image_tiling='anyres', got {self.image_tiling!r}")

    @property
    def feature_grid(self) -> int:
        """Side of one tile's square feature map (LLaVA-1.6 stitches tiles by it)."""
        g = int(round(self.tokens_per_image ** 0.5))
        if g * g != self.tokens_per_image:
            raise ValueError(f"{self.tokens_per_image} tokens per image is not a square feature map")
        return g


def layout_preprocessing(image_layout: str) -> dict:
    """The preprocessing an image layout implies (what HF import gives a LLaVA / LLaVA-NeXT checkpoint)."""
    if image_layout == "llava_next":
        return dict(image_tiling="anyres", image_resize_mode="resize")
    return dict(image_tiling="none", image_resize_mode="pad_to_square_mean")


def with_dtypes(cfg: VLMConfig, dtype: str, param_dtype: str = "float32") -> VLMConfig:
    """Same model, other compute/param dtypes (propagated to the tower and the LLM)."""
    llm = dataclasses.replace(cfg.llm, dtype=dtype, param_dtype=param_dtype)
    vision = dataclasses.replace(cfg.vision, dtype=dtype, param_dtype=param_dtype)
    return dataclasses.replace(cfg, llm=llm, vision=vision, dtype=dtype, param_dtype=param_dtype)
