"""End-to-end grain pipeline on a small easy-VQA build with the real SmolLM2 tokenizer: the batch contract,
determinism, sharding, exact resume (with and without worker processes), bad-sample policies, DPO, tiling."""

import json
import shutil

import numpy as np
import pytest

from vlmjax.data import easy_vqa
from vlmjax.data.assets import smollm2_tokenizer
from vlmjax.data.errors import BadSample, BadSamplePolicy, TooManySkipped
from vlmjax.data.image import ImageSpec, process_image
from vlmjax.data.pipeline import DataConfig, SourceSpec, batch_shapes, make_iterator
from vlmjax.data.text import TextSpec

N_IMAGES = 24
TPI = 8  # tokens per image


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def evqa(tmp_path_factory):
    out = tmp_path_factory.mktemp("evqa")
    easy_vqa.build(str(out), ["train"], limit=N_IMAGES)
    return out


def records(evqa, name="train.json"):
    path = evqa / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def config(evqa, **kw):
    base = dict(sources=(SourceSpec(path=str(evqa / "train.json"), image_root=str(evqa / "images")),),
                batch_size=2, seq_len=512, max_images=4, image=ImageSpec(image_size=32, tokens_per_image=TPI),
                shard_index=0, shard_count=1)
    base.update(kw)
    return DataConfig(**base)


def take(it, n):
    out = []
    for _ in range(n):
        out.append((next(it), list(it.last_ids)))
    return out


def all_ids(cfg, tok):
    with make_iterator(cfg, tok) as it:
        return [i for _, ids in take_all(it) for i in ids]


def take_all(it):
    out = []
    for batch in it:
        out.append((batch, list(it.last_ids)))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def replies(record):
    return "".join(t["value"] + "<|im_end|>" for t in record["conversations"] if t["from"] == "gpt")


def test_batch_contract(evqa, tok):
    cfg = config(evqa)
    by_id = {r["id"]: r for r in records(evqa)}
    with make_iterator(cfg, tok) as it:
        img = it.image_token_id
        for batch, ids in take(it, 3):
            assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_shapes(cfg)
            seg, ids_, tgt, mask, pos = (batch[k] for k in ("segment_ids", "input_ids", "targets", "loss_mask",
                                                            "positions"))
            same_next = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
            next_ids = np.where(ids_[:, 1:] == img, 0, ids_[:, 1:])  # image ids are never targets
            np.testing.assert_array_equal(tgt[:, :-1][same_next], next_ids[same_next])
            assert (tgt[:, :-1][~same_next] == 0).all() and (tgt[:, -1] == 0).all() and (tgt != img).all()
            assert not mask[seg == 0].any() and not mask[tgt == img].any() and not mask[:, :-1][~same_next].any()
            for r in range(seg.shape[0]):
                for s in range(1, seg[r].max() + 1):
                    where = np.flatnonzero(seg[r] == s)
                    assert (np.diff(where) == 1).all()  # contiguous
                    np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
                assert (ids_[r] == img).sum() == TPI * (batch["image_rows"] == r).sum()
            valid = batch["image_rows"] >= 0
            assert (np.diff(batch["image_rows"][valid]) >= 0).all() and not valid[valid.sum():].any()
            assert not batch["pixel_values"][~valid].any() and batch["pixel_values"][valid].std() > 0.1
            # The loss covers exactly the assistant replies of the first sample of row 0; slot 0 is its image.
            first = seg[0] == 1
            assert tok.decode(tgt[0][first & (mask[0] > 0)]) == replies(by_id[ids[0]])
            expected = process_image(str(evqa / "images" / by_id[ids[0]]["image"]), cfg.image)
            np.testing.assert_allclose(batch["pixel_values"][:1], expected, atol=1e-6)


def test_epoch_determinism_and_sharding(evqa, tok):
    ids = all_ids(config(evqa, num_epochs=1), tok)
    assert sorted(ids) == sorted(f"train_{i}" for i in range(N_IMAGES))  # every sample exactly once
    assert all_ids(config(evqa, num_epochs=1), tok) == ids  # same seed, same order
    assert all_ids(config(evqa, num_epochs=1, seed=1), tok) != ids
    shards = [all_ids(config(evqa, num_epochs=1, shard_index=i, shard_count=2), tok) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == N_IMAGES // 2
    assert sorted(shards[0] + shards[1]) == sorted(ids)


def test_repeat_and_resume_exactly(evqa, tok):
    cfg = config(evqa)  # repeats forever, reshuffling each epoch
    with make_iterator(cfg, tok) as it:
        before = take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 6)
        stats = it.stats.state()
    assert sum(len(ids) for _, ids in before + expected) > N_IMAGES  # the resumed part crosses an epoch
    with make_iterator(cfg, tok) as resumed:
        resumed.set_state(state)
        got = take(resumed, 6)
        assert resumed.stats.state() == stats
    for (a, ids_a), (b, ids_b) in zip(expected, got):
        assert ids_a == ids_b
        assert_same(a, b)


@pytest.mark.slow
def test_workers_resume_exactly_and_raise_bad_samples(evqa, dirty, tok):
    cfg = config(evqa, num_workers=2)
    with make_iterator(cfg, tok) as it:
        take(it, 2)
        state = it.get_state()
        expected = take(it, 3)
    with make_iterator(cfg, tok) as resumed:
        resumed.set_state(state)
        got = take(resumed, 3)
    for (a, ids_a), (b, ids_b) in zip(expected, got):
        assert ids_a == ids_b
        assert_same(a, b)
    bad = config(dirty, sources=(SourceSpec(path=str(dirty / "no_file.json"), image_root=str(dirty / "images")),),
                 num_workers=1)
    with pytest.raises(BadSample, match="missing_image.*'no_file'"), make_iterator(bad, tok) as it:
        next(it)


@pytest.fixture(scope="module")
def dirty(evqa, tmp_path_factory):
    """6 good records and one of each kind of bad input, as JSONL (one line is not even JSON)."""
    out = tmp_path_factory.mktemp("dirty")
    shutil.copytree(evqa / "images", out / "images")
    (out / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = records(evqa)[:6]
    conv = good[0]["conversations"]
    bad = [
        {"id": "no_file", "image": "train/missing.png", "conversations": conv},
        {"id": "corrupt", "image": "broken.png", "conversations": conv},
        {"id": "empty", "image": "train/0.png", "conversations": []},
        {"id": "role", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        {"id": "long", "image": "train/0.png", "conversations": [
            {"from": "human", "value": "word " * 600 + "<image>"}, {"from": "gpt", "value": "ok"}]},
    ]
    lines = [json.dumps(r) for r in good + bad] + ['{"id": "cut", "conversations": [']
    (out / "dirty.jsonl").write_text("\n".join(lines) + "\n")
    for r in bad:
        (out / f"{r['id']}.json").write_text(json.dumps([r]))
    return out


@pytest.mark.parametrize("bad_id, reason", [("no_file", "missing_image"), ("corrupt", "corrupt_image"),
                                            ("empty", "empty_conversation"), ("role", "unknown_role"),
                                            ("long", "too_long")])
def test_error_policy_names_file_and_sample(dirty, tok, bad_id, reason):
    path = str(dirty / f"{bad_id}.json")
    cfg = config(dirty, sources=(SourceSpec(path=path, image_root=str(dirty / "images")),))
    with pytest.raises(BadSample) as e, make_iterator(cfg, tok) as it:
        next(it)
    assert e.value.reason == reason and repr(bad_id) in str(e.value) and path in str(e.value)


def test_skip_policy_counts_every_reason(dirty, tok):
    source = SourceSpec(path=str(dirty / "dirty.jsonl"), image_root=str(dirty / "images"))
    policy = BadSamplePolicy("skip", max_skip_fraction=1.0)
    cfg = config(dirty, sources=(source,), num_epochs=1, bad_samples=policy)
    with make_iterator(cfg, tok) as it:
        seen = [i for _, ids in take_all(it) for i in ids]
        assert sorted(seen) == sorted(f"train_{i}" for i in range(6))
        assert it.stats.used == 6
        assert dict(it.stats.skipped) == {"missing_image": 1, "corrupt_image": 1, "empty_conversation": 1,
                                          "unknown_role": 1, "too_long": 1, "bad_record": 1}
    strict = config(dirty, sources=(source,), num_epochs=1,
                    bad_samples=BadSamplePolicy("skip", max_skip_fraction=0.2, min_samples=4))
    with pytest.raises(TooManySkipped, match="samples skipped"), make_iterator(strict, tok) as it:
        take_all(it)


def test_dpo_batches_pair_rows(evqa, tok):
    pairs = {r["id"]: r for r in records(evqa, "train_dpo.jsonl")}
    cfg = config(evqa, mode="dpo", sources=(SourceSpec(format="preference", path=str(evqa / "train_dpo.jsonl"),
                                                       image_root=str(evqa / "images")),), seq_len=256)
    with make_iterator(cfg, tok) as it:
        batch, ids = take(it, 1)[0]
    B = cfg.batch_size
    assert batch["input_ids"].shape == (2 * B, 256)
    seg, tgt, mask, rows = batch["segment_ids"], batch["targets"], batch["loss_mask"] > 0, batch["image_rows"]
    k = 0
    for r in range(B):
        assert seg[r].max() == seg[B + r].max()
        for s in range(1, seg[r].max() + 1):
            pair = pairs[ids[k]]
            k += 1
            assert tok.decode(tgt[r][(seg[r] == s) & mask[r]]) == pair["chosen"] + "<|im_end|>"
            assert tok.decode(tgt[B + r][(seg[B + r] == s) & mask[B + r]]) == pair["rejected"] + "<|im_end|>"
        np.testing.assert_array_equal(batch["pixel_values"][rows == r], batch["pixel_values"][rows == B + r])
        assert (rows == r).sum() == seg[r].max()  # one image per pair, duplicated into the rejected half
    assert k == len(ids)


def test_captions_from_tar_shards_and_mixing(evqa, tok, tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        tar.add(evqa / "images" / "train", arcname="train")
    captions = SourceSpec(format="caption", path=str(evqa / "train_captions.jsonl"),
                          image_root=str(tmp_path / "shard-*.tar"), name="captions")
    by_id = {r["id"]: r["caption"] for r in records(evqa, "train_captions.jsonl")}
    cfg = config(evqa, sources=(captions,), text=TextSpec(template="hf"))
    with make_iterator(cfg, tok) as it:
        batch, ids = take(it, 1)[0]
        img = it.image_token_id
    first = batch["segment_ids"][0] == 1
    caption_ids = tok(by_id[ids[0]] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    # "plain": <image> tokens, the caption, eos; the loss starts at the last image token (predicting word 1).
    assert batch["input_ids"][0][first].tolist() == [img] * TPI + caption_ids
    np.testing.assert_array_equal(batch["loss_mask"][0][first], [0] * (TPI - 1) + [1] * len(caption_ids) + [0])
    mixed = config(evqa, sources=(captions, config(evqa).sources[0]), num_epochs=1)
    ids = all_ids(mixed, tok)
    assert any(i in by_id for i in ids) and len(ids) > len(set(ids))  # both sources, same ids from each


def test_interleaved_documents(evqa, tok, tmp_path):
    docs = [{"id": f"doc{i}", "text_list": ["A shape.", f"Number {i}.", "The end."], "image_info": [
        {"image_name": f"train/{i}.png", "matched_text_index": 1},
        {"image_name": f"train/{i + 1}.png", "matched_text_index": 3}]} for i in range(4)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = config(evqa, sources=(SourceSpec(format="interleaved", path=str(path), image_root=str(evqa / "images")),),
                 num_epochs=1)
    with make_iterator(cfg, tok) as it:
        batch, ids = take(it, 1)[0]
        img = it.image_token_id
    first = batch["segment_ids"][0] == 1
    expected = (tok("A shape. ", add_special_tokens=False)["input_ids"] + [img] * TPI
                + tok(f"Number {ids[0][3:]}. The end.<|im_end|>", add_special_tokens=False)["input_ids"])
    assert batch["input_ids"][0][first].tolist() == expected  # trailing image dropped, the other before its sentence
    assert (batch["loss_mask"][0][first] > 0).sum() == len(expected) - TPI - 1  # all text targets


def test_catty_tiles_in_batches(evqa, tok):
    spec = ImageSpec(image_size=32, tokens_per_image=4, tiling="catty", max_tiles=4)
    cfg = config(evqa, image=spec, max_images=10)  # 64x64 -> 2x2 grid + thumbnail = 5 tiles per image
    with make_iterator(cfg, tok) as it:
        batch, ids = take(it, 1)[0]
        img = it.image_token_id
    for r in range(2):
        n_tiles = (batch["image_rows"] == r).sum()
        assert n_tiles % 5 == 0 and (batch["input_ids"][r] == img).sum() == 4 * n_tiles
    assert (batch["image_rows"] >= 0).sum() == 5 * len(ids)


def test_tfds_array_record_source(tok, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import io

    from PIL import Image

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8 + i, 6), (40 * i, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    class VlmjaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "image": tfds.features.Image(encoding_format="png"),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):  # PNG bytes, not arrays: encoding arrays would need TensorFlow
                yield i, {"id": f"t{i}", "image": png(i), "caption": f"Red square number {i}."}

    VlmjaxTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = SourceSpec(format="caption", tfds="vlmjax_tiny_captions", tfds_data_dir=str(tmp_path))
    cfg = DataConfig(sources=(source,), batch_size=2, seq_len=64, max_images=4, num_epochs=1, shard_index=0,
                     shard_count=1, image=ImageSpec(image_size=16, tokens_per_image=2))
    with make_iterator(cfg, tok) as it:
        out = take_all(it)
    assert sorted(i for _, ids in out for i in ids) == [f"t{i}" for i in range(5)]
    batch, ids = out[0]
    first = batch["segment_ids"][0] == 1
    assert tok.decode(batch["targets"][0][first & (batch["loss_mask"][0] > 0)]) == \
        f"Red square number {ids[0][1:]}.<|im_end|>"
