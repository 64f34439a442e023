"""Dynamic high-resolution tiling: which grid of tower-sized tiles an image becomes.

Two published schemes, both returning PIL tiles of `tile x tile` pixels in the order the model sees them:
  * LLaVA-1.6 "anyres": choose the resolution from a fixed list that keeps the most of the image's pixels
    (least upscaling waste on ties), letterbox the image into it, cut it into a grid; the whole image resized to one
    tile goes first as the global view.
  * POINTS "CATTY" (consistent aspect ratio dynamic high resolution): choose the grid of at most `max_tiles` tiles
    whose aspect ratio is closest to the image's, resize the image *proportionally* so it fits that grid, and cut
    `cols x rows` overlapping crops whose stride spreads them evenly over the image, so no tile is distorted or
    padded; a global thumbnail goes last. Two grid rules (`catty_grid(rule=...)`):
      - "internvl" (the default, kept for existing configs): closest aspect ratio among all grids, InternVL's tie
        rule, no thumbnail for a 1x1 grid.
      - "points" (WePOINTS `split_image_with_catty`): only grids on the image's far side of its aspect ratio
        (at least as wide as a landscape image, as tall as a portrait one), so the resized image fills the grid
        along one axis and overlaps along the other; among grids of that ratio, the tile count closest to the
        image's own size in tiles (ties: fewer tiles); the thumbnail always; aspect beyond `max_tiles`:1 is an
        error unless `squash_extreme` (the reference's do_resize: squash to exactly `max_tiles`:1).
    Both rules share `catty_layout`: the reference truncates the resized side (int) where this rounds, and steps
    crops by an integer stride (L - tile) // (n - 1) where this spreads them by round(i (L - tile) / (n - 1)), so
    crop offsets can differ by a pixel or two; the grid, tile count and order match.
The geometry is in pure functions of sizes so that tests can check it against hand-computed numbers.
`llava_next_positions` says how LLaVA-1.6 then arranges the tiles' features into image tokens.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# LLaVA-1.6 grid for a 336 px tower, as (width, height).
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(size: tuple[int, int], resolutions) -> tuple[int, int]:
    """LLaVA-1.6: the (width, height) that keeps the most original pixels after a fit-inside downscale; ties go to
    the one that wastes the least area."""
    width, height = size
    best, best_fit, min_waste = None, -1, math.inf
    for res_w, res_h in resolutions:
        scale = min(res_w / width, res_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = res_w * res_h - effective
        if effective > best_fit or (effective == best_fit and waste < min_waste):
            best, best_fit, min_waste = (res_w, res_h), effective, waste
    return best


def letterbox_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """LLaVA-1.6 `resize_and_pad_image`: the proportional size that fits `target` (ceil, capped)."""
    width, height = size
    tw, th = target
    sw, sh = tw / width, th / height
    if sw < sh:
        return tw, min(math.ceil(height * sw), th)
    return min(math.ceil(width * sh), tw), th


def anyres_tiles(img: Image.Image, tile: int, resolutions, global_view: Image.Image, resample) -> list[Image.Image]:
    """Global view first, then the grid tiles row by row (LLaVA-1.6 order). Padding is black, as in LLaVA-1.6."""
    target = select_best_resolution(img.size, resolutions)
    new_w, new_h = letterbox_size(img.size, target)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), resample), ((target[0] - new_w) // 2, (target[1] - new_h) // 2))
    tiles = [global_view]
    for top in range(0, target[1], tile):
        for left in range(0, target[0], tile):
            tiles.append(canvas.crop((left, top, left + tile, top + tile)))
    return tiles


CATTY_RULES = ("internvl", "points")


def catty_grid(size: tuple[int, int], tile: int, max_tiles: int, min_tiles: int = 1,
               rule: str = "internvl") -> tuple[int, int]:
    """(cols, rows) with min_tiles <= cols*rows <= max_tiles whose aspect ratio is closest to the image's.

    rule "internvl": ties (e.g. 2:1 and 3:1 for a 2.5:1 image) go to the larger grid when the image has more than
    half the pixels that grid's tiles hold, else to the smaller one. rule "points": see the module docstring; an
    image wider or taller than max_tiles:1 raises (squash it first: `squash_extreme_size`)."""
    if rule not in CATTY_RULES:
        raise ValueError(f"unknown catty_rule {rule!r}; one of {CATTY_RULES}")
    width, height = size
    aspect = width / height
    grids = sorted(
        {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
         if min_tiles <= c * r <= max_tiles},
        key=lambda g: (g[0] * g[1], g[0]),
    )
    if rule == "points":
        return _points_grid(size, tile, max_tiles, grids)
    best, best_diff = grids[0], math.inf
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff - 1e-12:
            best, best_diff = (c, r), diff
        elif abs(diff - best_diff) <= 1e-12 and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def _points_grid(size, tile: int, max_tiles: int, grids) -> tuple[int, int]:
    width, height = size
    aspect = width / height
    if aspect > max_tiles or aspect < 1 / max_tiles:
        raise ValueError(f"image {width}x{height}: aspect ratio {aspect:.3g} is outside [1/{max_tiles}, {max_tiles}]"
                         " that CATTY (points rule) tiles; set catty_squash_extreme=True to squash it")
    # exact rational comparison (c*height vs width*r): the far side of the image's ratio, as the reference filters
    far = [g for g in grids if width == height or (g[0] * height >= width * g[1] if width > height
                                                    else g[0] * height <= width * g[1])]
    if not far:
        raise ValueError(f"image {width}x{height}: no grid of {max_tiles} tiles is at least as elongated")
    best_ratio = min(far, key=lambda g: abs(g[0] / g[1] - aspect))
    same = [g for g in far if g[0] * best_ratio[1] == g[1] * best_ratio[0]]  # grids sorted by tile count
    in_tiles = width * height / (tile * tile)
    return min(same, key=lambda g: abs(g[0] * g[1] - in_tiles))


def squash_extreme_size(size: tuple[int, int], max_tiles: int) -> tuple[int, int]:
    """The reference's do_resize: an image beyond max_tiles:1 squashed along its long side to exactly that ratio."""
    width, height = size
    if width > max_tiles * height:
        return max_tiles * height, height
    if height > max_tiles * width:
        return width, max_tiles * width
    return size


def catty_layout(size: tuple[int, int], tile: int, grid: tuple[int, int]):
    """Proportional resize that fits the grid (one side exactly, the other no larger, never below one tile), and
    the crop boxes (left, top, right, bottom): `n` crops per axis at evenly spread offsets round(i*(L-tile)/(n-1)),
    which overlap whenever the image is narrower than the grid along that axis."""
    width, height = size
    cols, rows = grid
    scale = min(cols * tile / width, rows * tile / height)
    new_w = min(max(tile, round(width * scale)), cols * tile)
    new_h = min(max(tile, round(height * scale)), rows * tile)

    def offsets(length: int, n: int) -> list[int]:
        if n == 1:
            return [(length - tile) // 2]
        return [round(i * (length - tile) / (n - 1)) for i in range(n)]

    boxes = [(x, y, x + tile, y + tile) for y in offsets(new_h, rows) for x in offsets(new_w, cols)]
    return (new_w, new_h), boxes


def catty_tiles(img: Image.Image, tile: int, max_tiles: int, min_tiles: int, thumbnail: Image.Image | None,
                resample, rule: str = "internvl", squash_extreme: bool = False) -> list[Image.Image]:
    """Tiles row by row, then the thumbnail (when given and, under rule "internvl", the grid has more than one
    tile; under "points" always)."""
    if rule == "points" and squash_extreme and squash_extreme_size(img.size, max_tiles) != img.size:
        img = img.resize(squash_extreme_size(img.size, max_tiles), resample)
    grid = catty_grid(img.size, tile, max_tiles, min_tiles, rule)
    new_size, boxes = catty_layout(img.size, tile, grid)
    resized = img.resize(new_size, resample)
    tiles = [resized.crop(box) for box in boxes]
    if thumbnail is not None and (len(tiles) > 1 or rule == "points"):
        tiles.append(thumbnail)
    return tiles


def llava_next_positions(size: tuple[int, int], tile: int, resolutions, grid: int) -> np.ndarray:
    """Where each of an anyres image's feature tokens comes from, as HF `LlavaNextModel.pack_image_features` lays
    them out: indices into the image's tile features (tile-major, grid*grid per tile; tile 0 = the global view),
    -1 for the learned `image_newline`.

    Order: the global view's grid*grid features, then the grid tiles' features stitched into one
    (rows*grid, cols*grid) map, cropped back to the image's aspect ratio (the letterbox rows or columns removed,
    as HF `unpad_image`), read row by row with an `image_newline` closing each row. The token count therefore
    depends on the image's size, which is why the data pipeline, not the model, computes it."""
    width, height = size
    res_w, res_h = select_best_resolution(size, resolutions)
    cols, rows = res_w // tile, res_h // tile
    h_cur, w_cur = rows * grid, cols * grid
    ys, xs = np.arange(h_cur), np.arange(w_cur)
    if width / height > w_cur / h_cur:  # letterboxed top and bottom
        new_h = int(round(height * (w_cur / width), 7))
        pad = (h_cur - new_h) // 2
        ys = ys[pad:h_cur - pad]
    else:
        new_w = int(round(width * (h_cur / height), 7))
        pad = (w_cur - new_w) // 2
        xs = xs[pad:w_cur - pad]
    t = grid * grid
    tile_yx = 1 + (ys[:, None] // grid) * cols + xs[None, :] // grid
    feat_yx = tile_yx * t + (ys[:, None] % grid) * grid + xs[None, :] % grid
    with_newline = np.concatenate([feat_yx, np.full((len(ys), 1), -1)], axis=1)
    return np.concatenate([np.arange(t), with_newline.reshape(-1)]).astype(np.int32)
