"""Image decoding, RGB conversion, resize modes, normalisation, tiling geometry and image stores."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import tiling
from vlmjax.data.errors import CORRUPT_IMAGE, MISSING_IMAGE, BadSample
from vlmjax.data.image import (ImageSpec, decode_image, image_tiles, normalize, pad_to_square, process_image,
                               resize_to_tile, to_rgb)
from vlmjax.data.image_store import FolderStore, TarStore, open_image_store, resolve_image

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def solid(size, color, mode="RGB"):
    return Image.new(mode, size, color)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    img.putpixel((1, 0), (0, 0, 255, 128))  # half blue over white: r,g = 255 * 127/255 = 127, b = 255
    out = np.asarray(to_rgb(img))
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_allclose(out[0, 1], [127, 127, 255], atol=1)
    la = Image.new("LA", (1, 1), (0, 0))  # transparent black grey+alpha -> white
    np.testing.assert_array_equal(np.asarray(to_rgb(la))[0, 0], [255, 255, 255])
    pal = Image.new("P", (1, 1), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(to_rgb(pal))[0, 0], [255, 255, 255])
    assert to_rgb(solid((3, 3), 7, "L")).getpixel((1, 1)) == (7, 7, 7)


def test_pad_to_square_with_mean_colour_then_normalise():
    spec = ImageSpec(image_size=4, tokens_per_image=1)
    img = solid((4, 2), RED)  # wide: padded above and below by (4-2)//2 = 1 row
    square = np.asarray(resize_to_tile(img, spec))
    mean_rgb = [122, 116, 104]  # int(255 * CLIP mean)
    assert square.shape == (4, 4, 3)
    for row in (0, 3):
        assert (square[row] == mean_rgb).all()
    for row in (1, 2):
        assert (square[row] == RED).all()
    norm = normalize([Image.fromarray(square)], spec)
    assert norm.dtype == np.float32 and norm.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(norm[0, 1, 0], [1.9303363, -1.7520971, -1.4802198], rtol=1e-5)
    np.testing.assert_allclose(norm[0, 0, 0], [-0.0112545, -0.0111960, -0.0013329], atol=1e-5)
    tall = np.asarray(pad_to_square(solid((1, 3), BLUE), (0, 0, 0)))
    assert (tall[:, 1] == BLUE).all() and (tall[:, 0] == 0).all() and (tall[:, 2] == 0).all()


def test_crop_and_resize_modes():
    img = Image.new("RGB", (8, 4))
    img.paste(solid((4, 4), RED), (0, 0))
    img.paste(solid((4, 4), BLUE), (4, 0))
    crop = np.asarray(resize_to_tile(img, ImageSpec(image_size=4, resize_mode="crop")))
    assert crop.shape == (4, 4, 3)  # centre crop of columns 2..5
    assert (crop[:, :2] == RED).all() and (crop[:, 2:] == BLUE).all()
    stretched = resize_to_tile(solid((8, 4), GREEN), ImageSpec(image_size=4, resize_mode="resize"))
    assert stretched.size == (4, 4) and (np.asarray(stretched) == GREEN).all()


def test_siglip_normalisation():
    spec = ImageSpec(image_size=2, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="resize")
    out = process_image(png_bytes(solid((2, 2), (255, 0, 51))), spec)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, -1.0, -0.6], atol=1e-6)


def test_anyres_best_resolution():
    pins = tiling.LLAVA_NEXT_PINPOINTS
    # 1000x500 fits (672,336) at scale .672 keeping 672*336 px with no waste.
    assert tiling.select_best_resolution((1000, 500), pins) == (672, 336)
    # 1000x400: (1008,336) keeps 840*336 px, more than any other.
    assert tiling.select_best_resolution((1000, 400), pins) == (1008, 336)
    # Small images keep all their pixels everywhere: least waste wins, first on ties.
    assert tiling.select_best_resolution((200, 100), pins) == (336, 672)
    assert tiling.letterbox_size((1000, 400), (1008, 336)) == (840, 336)
    assert tiling.letterbox_size((336, 112), (672, 336)) == (672, 224)
    # LLaVA-1.6 ceils a float product: 100 * (672/300) = 224.00000000000003 -> 225, kept for parity.
    assert tiling.letterbox_size((300, 100), (672, 336)) == (672, 225)


def test_anyres_tiles_letterbox_black_and_global_first():
    spec = ImageSpec(tiling="anyres")
    img = solid((1000, 400), GREEN)
    tiles = [np.asarray(t) for t in image_tiles(img, spec)]
    assert len(tiles) == 4 and spec.max_tiles_per_image == 5  # global + 3x1 grid; max is the 2x2 grid + 1
    np.testing.assert_array_equal(tiles[0], np.asarray(resize_to_tile(img, spec)))
    # Canvas 1008x336, image resized to 840x336 pasted at x=84: tile 1 cols 0..83 black, tile 3 cols 252.. black.
    assert (tiles[1][:, :84] == 0).all() and (tiles[1][:, 84:] == GREEN).all()
    assert (tiles[2] == GREEN).all()
    assert (tiles[3][:, :252] == GREEN).all() and (tiles[3][:, 252:] == 0).all()


def test_catty_grid_choice():
    assert tiling.catty_grid((1000, 500), 336, 6) == (2, 1)
    assert tiling.catty_grid((1000, 500), 336, 9) == (4, 2)  # 2:1 tie, image > half of 8 tiles -> larger
    assert tiling.catty_grid((1000, 400), 336, 6) == (3, 1)  # 2.5:1 ties 2:1 and 3:1; large image -> 3:1
    assert tiling.catty_grid((100, 40), 336, 6) == (2, 1)  # same tie, small image -> smaller grid
    assert tiling.catty_grid((400, 1000), 336, 6) == (1, 3)
    assert tiling.catty_grid((64, 64), 336, 1) == (1, 1)


def test_catty_overlapping_crops():
    # 1000x400 on a 3x1 grid: scale min(1008/1000, 336/400) = .84 -> 840x336; crops at round(i*(840-336)/2).
    size, boxes = tiling.catty_layout((1000, 400), 336, (3, 1))
    assert size == (840, 336)
    assert boxes == [(0, 0, 336, 336), (252, 0, 588, 336), (504, 0, 840, 336)]
    # 1000x500 on 2x2 (forced): scale min(.672, 1.344) = .672 -> 672x336 keeps the aspect; rows overlap fully.
    size, boxes = tiling.catty_layout((1000, 500), 336, (2, 2))
    assert size == (672, 336) and boxes == [(0, 0, 336, 336), (336, 0, 672, 336)] * 2


def test_catty_tiles_content_and_thumbnail():
    spec = ImageSpec(image_size=4, tiling="catty", max_tiles=6, resize_mode="resize")
    img = Image.new("RGB", (10, 4))  # 2.5:1, 40 px > .5*16*3 -> 3x1 grid; scale min(12/10, 4/4)=1 -> 10x4
    img.paste(solid((5, 4), RED), (0, 0))
    img.paste(solid((5, 4), BLUE), (5, 0))
    tiles = image_tiles(img, spec)
    assert len(tiles) == 4 and spec.max_tiles_per_image == 7
    arrays = [np.asarray(t) for t in tiles[:3]]  # crops at x = 0, 3, 6
    assert (arrays[0] == RED).all() and (arrays[2] == BLUE).all()
    assert (arrays[1][:, :2] == RED).all() and (arrays[1][:, 2:] == BLUE).all()
    assert tiles[3].size == (4, 4)  # the thumbnail comes last
    one = image_tiles(solid((4, 4), RED), ImageSpec(image_size=4, tiling="catty", max_tiles=1))
    assert len(one) == 1  # a 1x1 grid gets no thumbnail


def test_process_image_shapes():
    out = process_image(png_bytes(solid((64, 32), RED)), ImageSpec(image_size=16, tiling="catty", max_tiles=4))
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32  # 2x1 grid + thumbnail


def test_decode_errors():
    with pytest.raises(BadSample) as e:
        decode_image(b"not an image at all", "x.png")
    assert e.value.reason == CORRUPT_IMAGE and "x.png" in str(e.value)
    truncated = png_bytes(Image.effect_noise((64, 64), 50))[:200]
    with pytest.raises(BadSample, match="corrupt_image"):
        decode_image(truncated)
    with pytest.raises(BadSample, match="missing_image"):
        decode_image("/nonexistent/file.png")


def test_folder_and_tar_stores(tmp_path):
    (tmp_path / "imgs").mkdir()
    solid((3, 2), RED).save(tmp_path / "imgs" / "a.png")
    store = open_image_store(tmp_path / "imgs")
    assert isinstance(store, FolderStore)
    assert decode_image(resolve_image("a.png", store)).size == (3, 2)
    with pytest.raises(BadSample) as e:
        resolve_image("b.png", store)
    assert e.value.reason == MISSING_IMAGE and "b.png" in str(e.value)

    for shard, names in (("s0.tar", ["x/1.png", "x/2.png"]), ("s1.tar", ["y/3.png"])):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for k, name in enumerate(names):
                data = png_bytes(solid((k + 1, 1), BLUE))
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tar_store = open_image_store(str(tmp_path / "s*.tar"))
    assert isinstance(tar_store, TarStore) and len(tar_store.shards) == 2
    assert decode_image(resolve_image("x/2.png", tar_store)).size == (2, 1)
    assert np.asarray(decode_image(resolve_image("y/3.png", tar_store)))[0, 0].tolist() == list(BLUE)
    restored = pickle.loads(pickle.dumps(tar_store))  # what a grain worker receives
    assert decode_image(restored.read("x/1.png")).size == (1, 1)
    with pytest.raises(BadSample, match="missing_image"):
        tar_store.read("x/9.png")
    # Inline forms: bytes, HF {"bytes"} dicts, arrays.
    raw = png_bytes(solid((2, 2), GREEN))
    assert decode_image(resolve_image({"bytes": raw, "path": None}, store)).size == (2, 2)
    assert decode_image(resolve_image(np.zeros((5, 4, 3), np.uint8), store)).size == (4, 5)
    with pytest.raises(BadSample, match="bad_record"):
        resolve_image(17, store)


# catty_rule="points" (WePOINTS split_image_with_catty), tile 336, max 8 tiles. Grid ratios with <= 8 tiles:
# 1 (1x1, 2x2), 3:2, 2 (2x1, 4x2), 3..8 (nx1) and their inverses. in_tiles = w*h / 336^2.
POINTS_TABLE = [
    ((336, 336), (1, 1)),    # aspect 1: all ratios; 1:1 grids 1x1 / 2x2, in_tiles 1 -> 1x1
    ((1000, 1000), (2, 2)),  # in_tiles 8.86: |4-8.86| < |1-8.86|
    ((1000, 500), (2, 1)),   # ratio 2: 2x1 or 4x2, in_tiles 4.43 -> 2x1 (internvl: 4x2)
    ((1400, 700), (4, 2)),   # in_tiles 8.68 -> 4x2
    ((1000, 600), (4, 2)),   # 1.67: only ratios >= 1.67 -> 2; in_tiles 5.31 -> 4x2 (internvl: 3x2, closer 1.5)
    ((1200, 1000), (3, 2)),  # 1.2: ratios >= 1.2 -> 3:2 (internvl: 2x2, closer 1:1)
    ((100, 40), (3, 1)),     # 2.5: ratios >= 2.5 -> 3 (internvl, small image: 2x1)
    ((700, 500), (3, 2)),    # 1.4 -> 3:2
    ((500, 1000), (1, 2)),   # portrait 0.5: ratios <= 0.5 -> 1:2 (1x2 or 2x4), in_tiles 4.43 -> 1x2
    ((336, 672), (1, 2)),    # exactly 1:2 stays eligible (the far side includes equality)
    ((400, 1000), (1, 3)),   # 0.4: ratios <= 0.4 -> 1:3
    ((2688, 336), (8, 1)),   # aspect exactly 8 is allowed
]


@pytest.mark.parametrize("size,grid", POINTS_TABLE, ids=[f"{w}x{h}" for (w, h), _ in POINTS_TABLE])
def test_catty_points_rule_hand_table(size, grid):
    assert tiling.catty_grid(size, 336, 8, rule="points") == grid


def test_catty_points_thumbnail_always_and_extreme_aspect():
    spec = ImageSpec(tiling="catty", max_tiles=8, catty_rule="points")
    assert spec.max_tiles_per_image == 9
    tiles = image_tiles(solid((336, 336), GREEN), spec)
    assert len(tiles) == 2  # 1x1 grid + thumbnail (the internvl rule gives 1 tile)
    assert len(image_tiles(solid((336, 336), GREEN), ImageSpec(tiling="catty", max_tiles=8))) == 1
    assert len(image_tiles(solid((1000, 600), GREEN), spec)) == 9  # 4x2 + thumbnail
    with pytest.raises(ValueError, match=r"2700x336: aspect ratio 8.04 is outside"):
        image_tiles(solid((2700, 336), GREEN), spec)
    squash = ImageSpec(tiling="catty", max_tiles=8, catty_rule="points", catty_squash_extreme=True)
    assert len(image_tiles(solid((2700, 336), GREEN), squash)) == 9  # squashed to 2688x336 -> 8x1 + thumbnail
    with pytest.raises(ValueError, match="catty_rule"):
        ImageSpec(tiling="catty", catty_rule="nope")
