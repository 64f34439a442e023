"""Image preprocessing for the vision tower: decode, RGB, resize/pad, optional tiling, normalise.

Must match what the tower saw in pre-training (mean/std, resize) or features drift; `ImageSpec` carries those
settings so the model config can build it. Output is float32 NHWC tiles, one image -> `num_tiles` tiles, each
becoming `tokens_per_image` feature tokens in the sequence.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Literal

import numpy as np
from PIL import Image

from vlmjax.data import tiling as tiles_lib
from vlmjax.data.errors import CORRUPT_IMAGE, MISSING_IMAGE, BadSample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Tower-facing image settings.

    resize_mode: "pad_to_square_mean" (LLaVA-1.5: pad to a square with the mean colour, then resize, so nothing is
      cropped away), "resize" (stretch to a square), "crop" (CLIP: shortest side to size, centre crop).
    tiling: "none" (one tile per image), "anyres" (LLaVA-1.6; `grid_pinpoints` as (width, height)), or "catty"
      (POINTS; up to `max_tiles` tiles plus a thumbnail when `thumbnail`). The global view/thumbnail is the whole
      image processed with `resize_mode`.
    catty_rule: "internvl" (default; InternVL's grid choice and tie rule, no thumbnail for a 1x1 grid) or
      "points" (the WePOINTS reference: far-side ratios, tile count closest to the image's, thumbnail always;
      aspect beyond max_tiles:1 is an error unless `catty_squash_extreme`). See `vlmjax.data.tiling`.
    image_layout: how tile features become image tokens. "tiles": every tile's `tokens_per_image` features in
      order (LLaVA-1.5, POINTS, VILA). "llava_next": HF LLaVA-1.6 (global view, then the stitched grid cropped to
      the image's aspect ratio with a newline token per row; needs tiling="anyres" and `feature_grid`, the side of
      one tile's square feature map), so the token count depends on the image size; see `image_pos`.
    """

    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: Literal["pad_to_square_mean", "resize", "crop"] = "pad_to_square_mean"
    tokens_per_image: int = 576
    tiling: Literal["none", "anyres", "catty"] = "none"
    grid_pinpoints: tuple[tuple[int, int], ...] = tiles_lib.LLAVA_NEXT_PINPOINTS
    max_tiles: int = 6
    min_tiles: int = 1
    thumbnail: bool = True
    catty_rule: Literal["internvl", "points"] = "internvl"
    catty_squash_extreme: bool = False
    resample: Literal["bicubic", "bilinear", "lanczos"] = "bicubic"
    image_layout: Literal["tiles", "llava_next"] = "tiles"
    feature_grid: int = 0

    def __post_init__(self):
        if self.resize_mode not in ("pad_to_square_mean", "resize", "crop"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if self.tiling not in ("none", "anyres", "catty"):
            raise ValueError(f"unknown tiling {self.tiling!r}")
        if self.catty_rule not in tiles_lib.CATTY_RULES:
            raise ValueError(f"unknown catty_rule {self.catty_rule!r}; one of {tiles_lib.CATTY_RULES}")
        if self.tiling == "anyres" and any(w % self.image_size or h % self.image_size for w, h in self.grid_pinpoints):
            raise ValueError(f"grid_pinpoints {self.grid_pinpoints} must be multiples of image_size {self.image_size}")
        if self.image_layout not in ("tiles", "llava_next"):
            raise ValueError(f"unknown image_layout {self.image_layout!r}")
        if self.image_layout == "llava_next" and (
                self.tiling != "anyres" or self.feature_grid ** 2 != self.tokens_per_image):
            raise ValueError("image_layout='llava_next' needs tiling='anyres' and feature_grid**2 == tokens_per_image"
                             f" (got tiling={self.tiling!r}, feature_grid={self.feature_grid}, "
                             f"tokens_per_image={self.tokens_per_image})")

    @property
    def max_tiles_per_image(self) -> int:
        """Upper bound on tiles one image can produce; batches need at least this many image slots."""
        if self.tiling == "anyres":
            return 1 + max((w // self.image_size) * (h // self.image_size) for w, h in self.grid_pinpoints)
        if self.tiling == "catty":
            return self.max_tiles + (1 if self.thumbnail and (self.max_tiles > 1 or self.catty_rule == "points") else 0)
        return 1


def decode_image(data, name: str | None = None) -> Image.Image:
    """Open bytes, a path, an array (HWC uint8) or a PIL image, fully decoded so corruption surfaces here."""
    label = name or (data if isinstance(data, (str, os.PathLike)) else type(data).__name__)
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise BadSample(CORRUPT_IMAGE, f"image array must be uint8 HW or HWC, got {data.dtype} {data.shape}")
        img = Image.fromarray(data)
    else:
        if isinstance(data, (str, os.PathLike)):
            if not os.path.isfile(data):
                raise BadSample(MISSING_IMAGE, f"image file not found: {data}")
            with open(data, "rb") as f:
                data = f.read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadSample(CORRUPT_IMAGE, f"cannot read an image from {type(data).__name__}")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadSample(CORRUPT_IMAGE, f"cannot decode image {label}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise BadSample(CORRUPT_IMAGE, f"empty image {label}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (transparent clip art would otherwise turn black)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def pad_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA `expand2square`: centre the image on a square canvas of `color` (offset floors)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_color(spec: ImageSpec) -> tuple[int, int, int]:
    return tuple(int(m * 255) for m in spec.mean)  # LLaVA truncates, so the pad normalises to ~0


def resize_to_tile(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """One `image_size` square from the whole image, per `resize_mode`."""
    size, resample = spec.image_size, _RESAMPLE[spec.resample]
    if spec.resize_mode == "pad_to_square_mean":
        img = pad_to_square(img, mean_color(spec))
    elif spec.resize_mode == "crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    return img if img.size == (size, size) else img.resize((size, size), resample)


def image_tiles(img: Image.Image, spec: ImageSpec) -> list[Image.Image]:
    """RGB image -> the list of tower-sized tiles in model order (see `tiling`)."""
    view = resize_to_tile(img, spec)
    if spec.tiling == "none":
        return [view]
    resample = _RESAMPLE[spec.resample]
    if spec.tiling == "anyres":
        return tiles_lib.anyres_tiles(img, spec.image_size, spec.grid_pinpoints, view, resample)
    return tiles_lib.catty_tiles(img, spec.image_size, spec.max_tiles, spec.min_tiles,
                              view if spec.thumbnail else None, resample, spec.catty_rule, spec.catty_squash_extreme)


def normalize(tiles, spec: ImageSpec) -> np.ndarray:
    """uint8 tiles (PIL images or a (k, H, W, 3) array) -> float32 (k, H, W, 3) with (x/255 - mean)/std."""
    if isinstance(tiles, np.ndarray):
        arr = tiles.astype(np.float32)
    else:
        arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]).astype(np.float32)
    k, h, w, _ = arr.shape
    std, mean = np.asarray(spec.std, np.float64), np.asarray(spec.mean, np.float64)
    # Broadcasting over a trailing axis of 3 runs numpy's slow short inner loop; rows of w*3 are ~8x faster.
    flat = arr.reshape(k * h, w * 3)
    flat *= np.tile(1.0 / (255.0 * std), w).astype(np.float32)
    flat += np.tile(-mean / std, w).astype(np.float32)
    return arr


def image_pos(spec: ImageSpec, size: tuple[int, int]) -> np.ndarray | None:
    """For layouts whose token count depends on the image, which tile feature each image token takes (-1: the
    image newline), from the original (width, height); None for "tiles" (k tiles -> k * tokens_per_image)."""
    if spec.image_layout == "tiles":
        return None
    return tiles_lib.llava_next_positions(size, spec.image_size, spec.grid_pinpoints, spec.feature_grid)


def load_image(data, spec: ImageSpec, name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Anything `decode_image` accepts -> (uint8 tiles (k, H, W, 3), `image_pos` or None). The pipeline moves
    images between processes as uint8 (4x less than float32) and normalises them in the consumer."""
    img = to_rgb(decode_image(data, name))
    tiles = np.stack([np.asarray(t, dtype=np.uint8) for t in image_tiles(img, spec)])
    return tiles, image_pos(spec, img.size)


def process_image(data, spec: ImageSpec, name: str | None = None) -> np.ndarray:
    """Anything `decode_image` accepts -> normalised float32 tiles (k, H, W, 3)."""
    return normalize(load_image(data, spec, name)[0], spec)


# ImageSpec field -> where the model config records it (vision.* or VLMConfig.*); the other fields are derived.
MODEL_FIELDS = {"image_size": "vision.image_size", "mean": "vision.image_mean", "std": "vision.image_std",
                "resize_mode": "image_resize_mode", "tiling": "image_tiling", "max_tiles": "image_max_tiles",
                "min_tiles": "image_min_tiles", "thumbnail": "image_thumbnail", "resample": "image_resample",
                "grid_pinpoints": "image_grid_pinpoints", "catty_rule": "image_catty_rule",
                "catty_squash_extreme": "image_catty_squash_extreme"}


def _canon(v):
    """Lists from JSON / ml_collections compare equal to the config's tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(_canon(x) for x in v)
    return v


def model_image_spec(cfg, **over) -> ImageSpec:
    """The preprocessing a VLM config records: its tower's size and mean/std, its tokens per tile, its tiling and
    resize mode (`VLMConfig.image_*`); for LLaVA-1.6 the feature layout its checkpoint was trained with.

    `over` (a train config's `data.image`, a CLI flag) may only restate what the model records: a different value
    is an error naming both, because a model fed images prepared otherwise than in training degrades silently."""
    v = cfg.vision
    kw = dict(image_size=v.image_size, mean=tuple(v.image_mean), std=tuple(v.image_std),
              tokens_per_image=cfg.tokens_per_image, resize_mode=cfg.image_resize_mode, tiling=cfg.image_tiling,
              max_tiles=cfg.image_max_tiles, min_tiles=cfg.image_min_tiles, thumbnail=cfg.image_thumbnail,
              resample=cfg.image_resample, catty_rule=cfg.image_catty_rule,
              catty_squash_extreme=cfg.image_catty_squash_extreme)
    if cfg.image_grid_pinpoints:
        kw["grid_pinpoints"] = tuple(tuple(p) for p in cfg.image_grid_pinpoints)
    if cfg.image_layout == "llava_next":
        kw.update(image_layout="llava_next", feature_grid=cfg.feature_grid)
    spec = ImageSpec(**kw)
    for key, value in over.items():
        if not hasattr(spec, key):
            known = sorted(f.name for f in dataclasses.fields(ImageSpec))
            raise ValueError(f"data.image.{key}: no such image setting; known: {known}")
        if _canon(value) != _canon(getattr(spec, key)):
            where = MODEL_FIELDS.get(key, f"derived {key}")
            raise ValueError(f"image setting {key}={_canon(value)!r} disagrees with the model, whose config records "
                             f"{where}={_canon(getattr(spec, key))!r}; the model config carries its preprocessing: "
                             "drop the setting, or train a model that records it")
    return spec
