"""Image corruptions for STIC's dispreferred side, applied for real (the public reference code records a
corruption and then feeds the clean image).

lowres: the shorter side down to 20 px; the preprocessing then resizes it back up to the tower's input size.
color_jitter: brightness x U(1 - b, 1 + b) and hue shifted by U(-h, h) of the colour circle (torchvision's
ColorJitter(brightness=0.5, hue=0.3) semantics), drawn from a per-pair seed so a rerun corrupts identically.
Those two are the paper's. A kind may carry a parameter after a colon, for images where the paper's corruptions
destroy nothing (a 64 px clip-art shape survives a 20 px downscale): "lowres:8" (shorter side 8 px), "blur:R"
(Gaussian blur, radius R px), "shuffle:G" (the image cut into a G x G grid whose cells are permuted by the pair's
seed, so outlines break while colours stay).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

KINDS = ("lowres", "color_jitter")  # the paper's
PARAMETRISED = ("lowres", "blur", "shuffle")


def lowres(img: Image.Image, short_side: int = 20) -> Image.Image:
    w, h = img.size
    scale = short_side / min(w, h)
    if scale >= 1:
        return img.copy()
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def _rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float RGB in [0, 1] (..., 3) -> h in [0, 1), s, v (colorsys' formulas, vectorised)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = x.max(-1), x.min(-1)
    c = v - mn
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0.0)
    cz = np.where(c > 0, c, 1)
    h = np.where(v == r, (g - b) / cz, np.where(v == g, 2.0 + (b - r) / cz, 4.0 + (r - g) / cz))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int32) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.select([i == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)], -1)


def shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (-0.5..0.5), keeping saturation and value (float HSV, one 8-bit rounding)."""
    if shift == 0:
        return img.convert("RGB")
    h, s, v = _rgb_to_hsv(np.asarray(img.convert("RGB"), np.float64) / 255.0)
    rgb = _hsv_to_rgb((h + shift) % 1.0, s, v)
    return Image.fromarray(np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8))


def color_jitter(img: Image.Image, brightness: float, hue: float) -> Image.Image:
    """Brightness x `brightness`, then hue rotated by `hue` turns."""
    return shift_hue(ImageEnhance.Brightness(img.convert("RGB")).enhance(brightness), hue)


def jitter_factors(seed: int, brightness: float = 0.5, hue: float = 0.3) -> dict:
    """The pair's jitter: brightness factor ~ U(1 - b, 1 + b), hue shift ~ U(-h, h) (recorded with the pair)."""
    rng = np.random.default_rng(seed)
    return {"brightness": float(rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
            "hue": float(rng.uniform(-hue, hue))}


def shuffle_cells(img: Image.Image, grid: int, seed: int) -> Image.Image:
    """Cut into grid x grid equal cells and permute them (a random permutation drawn from `seed`); a remainder
    strip at the right / bottom edge, when the size does not divide, stays in place."""
    a = np.asarray(img.convert("RGB"))
    h, w = a.shape[0] // grid * grid, a.shape[1] // grid * grid
    ch, cw = h // grid, w // grid
    cells = a[:h, :w].reshape(grid, ch, grid, cw, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, ch, cw, 3)
    cells = cells[np.random.default_rng(seed).permutation(grid * grid)]
    out = a.copy()
    out[:h, :w] = cells.reshape(grid, grid, ch, cw, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)
    return Image.fromarray(out)


def parse_kind(kind: str) -> tuple[str, float | None]:
    """'lowres:8' -> ('lowres', 8.0); 'color_jitter' -> ('color_jitter', None). Errors name the kind."""
    name, _, arg = kind.partition(":")
    if name not in KINDS + PARAMETRISED:
        raise ValueError(f"unknown corruption {kind!r}; use one of {KINDS} or lowres:PX, blur:RADIUS, shuffle:GRID")
    if not arg:
        if name in ("blur", "shuffle"):
            raise ValueError(f"corruption {kind!r} needs its parameter ({name}:N)")
        return name, None
    if name not in PARAMETRISED:
        raise ValueError(f"corruption {name!r} takes no parameter, got {kind!r}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"corruption {kind!r}: the parameter must be a number") from None
    if value <= 0 or (name in ("lowres", "shuffle") and value != int(value)) or (name == "shuffle" and value < 2):
        raise ValueError(f"corruption {kind!r}: lowres takes whole pixels >= 1, shuffle a grid >= 2, blur a radius > 0")
    return name, value


def corrupt(img: Image.Image, kind: str, seed: int) -> Image.Image:
    """Apply corruption `kind`; jitter factors and shuffles are a function of the pair's `seed` alone."""
    img = img.convert("RGB")
    name, arg = parse_kind(kind)
    if name == "lowres":
        return lowres(img) if arg is None else lowres(img, int(arg))
    if name == "color_jitter":
        return color_jitter(img, **jitter_factors(seed))
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(arg))
    return shuffle_cells(img, int(arg), seed)
