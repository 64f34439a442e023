"""Image corruptions for STIC's dispreferred side, applied for real (the public reference code records a
corruption and then feeds the clean image).

lowres: the shorter side down to 20 px; the preprocessing then resizes it back up to the tower's input size.
color_jitter: brightness x U(1 - b, 1 + b) and hue shifted by U(-h, h) of the colour circle (torchvision's
ColorJitter(brightness=0.5, hue=0.3) semantics), drawn from a per-pair seed so a rerun corrupts identically.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

KINDS = ("lowres", "color_jitter")


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


def corrupt(img: Image.Image, kind: str, seed: int) -> Image.Image:
    """Apply corruption `kind`; jitter factors are a function of the pair's `seed` alone."""
    img = img.convert("RGB")
    if kind == "lowres":
        return lowres(img)
    if kind == "color_jitter":
        return color_jitter(img, **jitter_factors(seed))
    raise ValueError(f"unknown corruption {kind!r}; use one of {KINDS}")
