"""LLaVA-1.6 (HF LlavaNextForConditionalGeneration): anyres tiling, unpadded feature layout with image_newline.

References: a tiny random LlavaNext model in transformers + torch (logits, greedy generation, export) and HF's
LlavaNextImageProcessorPil (tiles). Tolerances: fp32 logits max |diff| <= 1e-4 (as the LLaVA parity tests; measured
7.8e-7); normalised pixels <= 1e-5 (both resample with PIL bicubic; measured 0) with identical tile counts.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402
from PIL import Image  # noqa: E402

from vlmjax.convert import hf as hfconv  # noqa: E402
from vlmjax.data import tiling  # noqa: E402
from vlmjax.data.image import ImageSpec, load_image, normalize  # noqa: E402

TOL = 1e-4
VOCAB, IMG = 320, 310  # tiny text models for the tokenizer below (<= 300 ids): the image token lies past them


# jitted: eager (op-by-op) calls compile every op of the model on its own, several times slower on CPU
jit_call = nnx.jit(lambda m, *args, **kw: m(*args, **kw))


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """A byte-level BPE fitted to a few words (ChatML template): keeps the LM head small, so tests stay fast."""
    from vlmjax.data.tokenizer import train_tokenizer

    words = "what is this hi answer 0 1 2 3 It is red green blue yellow. What colour is this?"
    return train_tokenizer([words] * 4, tmp_path_factory.mktemp("tok"), vocab_size=300)
# (width, height): wide, tall (letterboxed left/right), near-square, and one that picks the 3x1 grid
SIZES = [(40, 20), (20, 50), (31, 29), (90, 25)]


def spec_for(cfg) -> ImageSpec:
    return ImageSpec(image_size=cfg.vision.image_size, mean=cfg.vision.image_mean, std=cfg.vision.image_std,
                     resize_mode="resize", tokens_per_image=cfg.tokens_per_image, tiling="anyres",
                     grid_pinpoints=cfg.image_grid_pinpoints, image_layout="llava_next",
                     feature_grid=cfg.feature_grid)


def test_llava_next_positions_hand_checked():
    # 40x20 image, 28 px tiles, pinpoints (w, h): best is 56x28 -> 2 cols x 1 row; 4x4 features per tile ->
    # an 8-wide, 4-high map; aspect 2.0 == 8/4, so nothing is cropped: 16 base + 4 rows x (8 + newline)
    pos = tiling.llava_next_positions((40, 20), 28, ((56, 28), (28, 56), (56, 56)), 4)
    assert len(pos) == 16 + 4 * 9
    np.testing.assert_array_equal(pos[:16], np.arange(16))
    first_row = pos[16:25]  # tile 1 row 0 (features 16..19), tile 2 row 0 (32..35), newline
    np.testing.assert_array_equal(first_row, [16, 17, 18, 19, 32, 33, 34, 35, -1])
    # 20x50 (tall): best 28x56 -> 1 col x 2 rows; 4 wide x 8 high map, image aspect 0.4 < 0.5 ->
    # new width round(20 * 8 / 50) = 3, padding (4 - 3) // 2 = 0 -> all 4 columns kept
    pos = tiling.llava_next_positions((20, 50), 28, ((56, 28), (28, 56), (56, 56)), 4)
    assert len(pos) == 16 + 8 * 5
    # 20x70: aspect 0.286 -> new width round(20 * 8 / 70) = 2, padding 1 -> columns 1..2 kept
    pos = tiling.llava_next_positions((20, 70), 28, ((56, 28), (28, 56), (56, 56)), 4)
    assert len(pos) == 16 + 8 * 3
    np.testing.assert_array_equal(pos[16:19], [17, 18, -1])


def _inputs(cfg, spec, rng):
    """Three rows: image + text; text only; two images interleaved. Images of different aspect ratios."""
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[:3]]
    loaded = [load_image(im, spec) for im in imgs]
    I, T = F.IMAGE_TOKEN, cfg.tokens_per_image
    n = [len(p) for _, p in loaded]
    rows = [[1, 5, 6] + [I] * n[0] + [7, 8], [1, 10, 11, 12, 13], [1, 20] + [I] * n[1] + [21] + [I] * n[2] + [22]]
    S = max(map(len, rows))
    ids, mask = np.zeros((3, S), np.int64), np.zeros((3, S), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    tiles = [normalize(t, spec) for t, _ in loaded]
    image_rows = np.concatenate([np.full(len(t), r, np.int32) for t, r in zip(tiles, (0, 2, 2))])
    image_pos = np.zeros((3, S), np.int32)
    image_pos[0, :n[0]] = loaded[0][1]
    off = len(tiles[1]) * T
    image_pos[2, :n[1] + n[2]] = np.concatenate([loaded[1][1], np.where(loaded[2][1] >= 0, loaded[2][1] + off, -1)])
    return imgs, tiles, ids, mask, image_rows, image_pos


def _hf_pixels(tiles):
    """HF layout: (images, max tiles, 3, H, W), zero-padded."""
    m = max(len(t) for t in tiles)
    out = np.zeros((len(tiles), m, 3) + tiles[0].shape[1:3], np.float32)
    for i, t in enumerate(tiles):
        out[i, :len(t)] = t.transpose(0, 3, 1, 2)
    return out


def test_logits_match_transformers(tmp_path):
    ref_model = F.make_llava_next(tmp_path)
    model, cfg = hfconv.load_vlm(tmp_path)
    assert cfg.image_layout == "llava_next" and cfg.image_grid_pinpoints[0] == (56, 28)
    imgs, tiles, ids, mask, image_rows, image_pos = _inputs(cfg, spec_for(cfg), np.random.default_rng(0))
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                        pixel_values=torch.tensor(_hf_pixels(tiles)),
                        image_sizes=torch.tensor([(im.height, im.width) for im in imgs])).logits.numpy()
    ours = np.asarray(jit_call(model, ids.astype(np.int32), np.concatenate(tiles), image_rows, pos.astype(np.int32),
                            mask.astype(np.int32), image_pos=image_pos))
    real = mask.astype(bool)
    err = np.abs(ref[real] - ours[real]).max()
    print(f"llava_next max |dlogit| {err:.2e}")
    assert err <= TOL, f"max |dlogit| = {err:.2e}"
    # a layout that drops the newline or the unpadding is caught: shuffle one row's positions
    bad = image_pos.copy()
    bad[0, 16:40] = bad[0, 16:40][::-1]
    shuffled = np.asarray(jit_call(model, ids.astype(np.int32), np.concatenate(tiles), image_rows, pos.astype(np.int32),
                                mask.astype(np.int32), image_pos=bad))
    assert np.abs(ref[0][real[0]] - shuffled[0][real[0]]).max() > 100 * TOL
    with pytest.raises(ValueError, match="needs image_pos"):
        model(ids.astype(np.int32), np.concatenate(tiles), image_rows)


def test_preprocessing_matches_hf_image_processor(tmp_path):
    F.make_llava_next(tmp_path)
    _, cfg = hfconv.load_vlm(tmp_path)
    spec = spec_for(cfg)
    s = cfg.vision.image_size
    proc = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=F.NEXT_PINPOINTS,
        image_mean=list(cfg.vision.image_mean), image_std=list(cfg.vision.image_std))
    rng = np.random.default_rng(1)
    for w, h in SIZES:
        # smooth content, so that resampler differences stay small
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 128)], -1)
        img = Image.fromarray((arr + rng.integers(0, 8, arr.shape)).clip(0, 255).astype(np.uint8))
        ours, positions = load_image(img, spec)
        hf = proc(images=[img], return_tensors="np")
        theirs = hf["pixel_values"][0]
        assert tuple(hf["image_sizes"][0]) == (h, w)
        n_tiles = 1 + np.prod(np.array(tiling.select_best_resolution((w, h), cfg.image_grid_pinpoints)) // s)
        assert len(ours) == n_tiles and (theirs.shape[0] == n_tiles or not theirs[n_tiles:].any())
        diff = np.abs(normalize(ours, spec).transpose(0, 3, 1, 2) - theirs[:n_tiles]).max()
        print(f"{w}x{h}: {n_tiles} tiles, {len(positions)} tokens, max |pixel diff| {diff:.4f}")
        assert diff <= 1e-5, f"{w}x{h}: max |pixel diff| {diff:.3f}"


def test_export_round_trip_and_hf_loads(tmp_path):
    F.make_llava_next(tmp_path / "src")
    model, cfg = hfconv.load_vlm(tmp_path / "src")
    hfconv.save_vlm(model, tmp_path / "out")
    back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlavaNextForConditionalGeneration"
    src = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "src").eval()
    a, b = src.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_greedy_generation_matches_transformers(tmp_path, tiny_tok):
    """Our engine (prompt built by the generation Encoder: tiles, positions, chat template) vs HF generate."""
    from vlmjax.generate import GenerationConfig, generate
    from vlmjax.generate.requests import Encoder, Request

    ref_model = F.make_llava_next(tmp_path, vocab=VOCAB, image_token=IMG)
    model, cfg = hfconv.load_vlm(tmp_path)
    enc_obj = Encoder(tiny_tok, cfg)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (25, 60, 3), dtype=np.uint8))
    enc = enc_obj.prompt(Request("r0", [{"role": "user", "content": "<image>\nhi"}], [img]))
    assert enc.image_pos is not None and len(enc.image_pos) == int((np.array(enc.ids) == IMG).sum())
    n_new = 8
    ours = generate(model, [enc.ids], GenerationConfig(max_new_tokens=n_new, eos_token_ids=()),
                    pixel_values=enc.pixels, image_rows=np.zeros(len(enc.pixels), np.int32), image_pos=[enc.image_pos])
    with torch.no_grad():
        out = ref_model.generate(input_ids=torch.tensor([enc.ids]), pixel_values=torch.tensor(_hf_pixels([enc.pixels])),
                                 image_sizes=torch.tensor([(img.height, img.width)]), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False)
    assert ours[0].tokens == out[0, len(enc.ids):].tolist()


def test_packed_pipeline_batch_matches_per_sample(tmp_path, tiny_tok):
    """Training batches (grain pipeline, first-fit packing, several images per row) carry `image_pos`, and the
    model on a packed batch gives each sample the logits it gets alone through the generation Encoder (whose
    layout is checked against transformers above)."""
    import json

    from vlmjax.data.pipeline import DataConfig, SourceSpec, batch_shapes, make_iterator
    from vlmjax.data.text import TextSpec
    from vlmjax.generate.requests import Encoder, Request, image_spec_for

    tok = tiny_tok
    F.make_llava_next(tmp_path / "m", vocab=VOCAB, image_token=IMG)
    model, cfg = hfconv.load_vlm(tmp_path / "m")
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    recs = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": f"answer {i}"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    dc = DataConfig(sources=(SourceSpec(path=str(tmp_path / "d.json"), image_root=str(tmp_path / "img")),),
                    batch_size=2, seq_len=256, max_images=16, image=image_spec_for(cfg),
                    text=TextSpec(image_token_id=cfg.image_token_id), shuffle=False, shard_index=0, shard_count=1)
    assert "image_pos" in batch_shapes(dc)
    with make_iterator(dc, tok) as it:
        batch, ids = next(it), list(it.last_ids)
    assert batch["image_pos"].shape == batch["input_ids"].shape and len(ids) == len(SIZES)
    assert (batch["segment_ids"].max(1) > 1).any(), "expected packed rows"
    logits = np.asarray(jit_call(model, batch["input_ids"], batch["pixel_values"], batch["image_rows"],
                             batch["positions"], batch["segment_ids"], image_pos=batch["image_pos"]))
    enc = Encoder(tok, cfg)
    by_id = {r["id"]: r for r in recs}
    seen = 0
    for r in range(batch["input_ids"].shape[0]):
        for seg in range(1, batch["segment_ids"][r].max() + 1):
            sel = batch["segment_ids"][r] == seg
            rec = by_id[ids[seen]]
            seen += 1
            req = Request(rec["id"], [{"role": "user", "content": "<image>\nwhat?"},
                                      {"role": "assistant", "content": rec["conversations"][1]["value"]}],
                          [str(tmp_path / "img" / rec["image"])])
            e = enc.full(req)
            assert e.ids == batch["input_ids"][r][sel].tolist()
            alone = np.asarray(jit_call(model, np.array([e.ids], np.int32), e.pixels, np.zeros(len(e.pixels), np.int32),
                                    image_pos=e.image_pos[None]))
            err = np.abs(alone[0] - logits[r][sel]).max()
            assert err <= TOL, f"{rec['id']}: max |dlogit| {err:.2e}"
    assert seen == len(SIZES)


def test_lora_dpo_on_imported_llava_next_and_export(tmp_path, tiny_tok):
    """STIC stage 1's path on a LLaVA-1.6 import: LoRA DPO (reference = adapter off) through the real pipeline
    (anyres tiles, image_pos), then the merged export loads in transformers as LlavaNext with our logits."""
    from train_utils import tiny_config, write_dataset

    from vlmjax.train.loop import train

    F.make_llava_next(tmp_path / "m", vocab=VOCAB, image_token=IMG)
    tiny_tok.save_pretrained(tmp_path / "m")
    data = write_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(data, "dpo", **{"train.steps": 3, "train.trainable": ["lora_", "^projector/"],
                                      "lora.rank": 4, "lora.alpha": 8.0, "dpo.loss": "stic", "train.save_every": 100,
                                      "export_dir": str(tmp_path / "hf"), "data.seq_len": 160,
                                      "data.max_images": 20, "data.text": dict(template="mistral_instruct")})
    cfg.model.init, cfg.model.path = "hf", str(tmp_path / "m")
    s = train(cfg, str(tmp_path / "run"))
    assert all(np.isfinite(h["loss"]) for h in s["history"])
    assert abs(s["history"][0]["rewards/margin"]) < 1e-5  # adapter starts at zero: policy == reference
    back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "LlavaNextForConditionalGeneration"
    model, cfg2 = hfconv.load_vlm(tmp_path / "hf")
    img = Image.open(data["images"] + "/0.png")
    tiles, positions = load_image(img, spec_for(cfg2))
    ids = np.array([[1, 5] + [cfg2.image_token_id] * len(positions) + [7, 8]])
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids), pixel_values=torch.tensor(_hf_pixels([normalize(tiles, spec_for(cfg2))])),
                   image_sizes=torch.tensor([(img.height, img.width)])).logits.numpy()
    ours = np.asarray(s["model"](ids.astype(np.int32), normalize(tiles, spec_for(cfg2)), np.zeros(len(tiles), np.int32),
                                 image_pos=positions[None]))
    assert np.abs(ref - ours).max() <= 1e-4
