"""Packed scoring (`scoring.packed`, `score_dataset(pack=True)`): several requests per row with segment ids give
every request the score the padded path (tested against transformers in test_scoring.py) gives it alone."""

import json

import numpy as np
import pytest
from PIL import Image

from test_generate import tiny_vlm

from vlmjax.generate import Encoder, Request
from vlmjax.generate.requests import collate_images
from vlmjax.scoring import pad_rows, score_dataset, sequence_scores, token_logprobs
from vlmjax.scoring.packed import PackedScorer


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A byte-level BPE with a 300-id vocabulary (ChatML template): a small LM head keeps the tests fast."""
    from vlmjax.data.tokenizer import train_tokenizer

    words = "Caption it. A red circle. Say something. word"
    return train_tokenizer([words] * 4, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def model():
    return tiny_vlm(vocab=320, image_token_id=310)


def test_packed_logprobs_refuse_targets_across_segments(model):
    ids = np.array([[1, 5, 6, 1, 7, 8]])
    seg = np.array([[1, 1, 1, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 0, 1, 2]])
    tgt = np.zeros_like(ids, bool)
    tgt[0, 3] = True  # first token of segment 2: it has no prefix in its own sequence
    with pytest.raises(ValueError, match="row 0, token 3"):
        token_logprobs(model, ids, tgt, segment_ids=seg, positions=pos)
    with pytest.raises(ValueError, match="both"):
        token_logprobs(model, ids, tgt, segment_ids=seg)
    # independent check: segment 2 scored in a row of its own
    tgt[0, 3], tgt[0, 5] = False, True
    packed = token_logprobs(model, ids, tgt, segment_ids=seg, positions=pos)
    alone = token_logprobs(model, ids[:, 3:], tgt[:, 3:])
    np.testing.assert_allclose(packed[0, 5], alone[0, 2], atol=1e-6)


def _caption_requests(tmp_path, reps=(1, 2, 1, 20, 25, 1, 30)):
    rng = np.random.default_rng(1)
    reqs = []
    for i, rep in enumerate(reps):
        if i % 3 == 2:  # text only
            reqs.append(Request(f"t{i}", [{"role": "user", "content": "Say something."},
                                          {"role": "assistant", "content": "word " * rep}], meta={"n": i}))
            continue
        paths = [tmp_path / f"{i}_{j}.png" for j in range(2 if i == 1 else 1)]
        for p in paths:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        reqs.append(Request(f"c{i}", [{"role": "user", "content": "<image>\n" * len(paths) + "Caption it."},
                                      {"role": "assistant", "content": "A red circle " * rep}], list(map(str, paths)),
                            meta={"n": i}))
    reqs.append(Request("broken", [{"role": "user", "content": "<image>\nCaption it."},
                                   {"role": "assistant", "content": "x"}], [str(tmp_path / "missing.png")]))
    return reqs


def test_score_dataset_packed_equals_unpacked_and_resumes(tmp_path, small_tok, model):
    """Images (one or two per request) and text-only requests; c3 fills a row exactly, c4 and c6 are longer than
    a row (scored alone); a broken request is an error record; a crashed run resumes by id."""
    tok = small_tok
    reqs = _caption_requests(tmp_path)
    lengths = {r.id: len(Encoder(tok, model.cfg).scored(r).ids) for r in reqs if r.id != "broken"}
    row_len = lengths["c3"]  # c3 fills a row; c4 and c6 are longer
    assert lengths["c4"] > row_len and lengths["c0"] + lengths["t2"] <= row_len, lengths
    ref_path = tmp_path / "padded.jsonl"
    score_dataset(model, tok, reqs, ref_path, batch_size=8, pack=False, pad_to=128, progress=False)
    ref = {r["id"]: r for r in map(json.loads, ref_path.read_text().splitlines())}
    path, st = tmp_path / "packed.jsonl", {}
    got = score_dataset(model, tok, reqs, path, batch_size=2, pack=True, row_len=row_len, progress=False, stats=st)
    assert got["written"] == 7 and got["failed"] == 1 and st["long"] == 2 and st["row_len"] == row_len
    assert st["packed_batches"] < 5  # 5 requests fit a row, several share one
    lines = path.read_text().splitlines(keepends=True)
    recs = {r["id"]: r for r in map(json.loads, lines)}
    assert "missing" in recs["broken"]["error"] and recs["c0"]["n"] == 0  # error records and meta kept
    for k, r in ref.items():
        if "error" in r:
            continue
        assert recs[k]["num_tokens"] == r["num_tokens"]
        np.testing.assert_allclose(recs[k]["mean_logprob"], r["mean_logprob"], atol=1e-5, err_msg=k)
    # a crash mid-write: the rerun scores only what is missing, by id, and agrees
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:9])
    again = score_dataset(model, tok, reqs, part, batch_size=2, row_len=row_len, progress=False)
    assert again["written"] + again["failed"] == len(reqs) - 3
    final = {r["id"]: r for r in map(json.loads, part.read_text().splitlines())}
    assert sorted(final) == sorted(recs)
    for k in ref:
        if "error" not in ref[k]:
            np.testing.assert_allclose(final[k]["mean_logprob"], recs[k]["mean_logprob"], atol=1e-6)


def test_text_only_first_batch_does_not_leave_images_unpacked(tmp_path, small_tok, model):
    """Auto image slots come from the first batch; when that batch is text only, the first batch with images sizes
    them (else every image request would be scored alone, correctly but one per forward)."""
    reqs = [r for r in _caption_requests(tmp_path, reps=(1, 2, 1, 1, 2, 1)) if r.id != "broken"]
    reqs = sorted(reqs, key=lambda r: not r.id.startswith("t"))  # t2, t5 first: a text-only first batch of 2
    ref_path, path, st = tmp_path / "padded.jsonl", tmp_path / "packed.jsonl", {}
    score_dataset(model, small_tok, reqs, ref_path, batch_size=8, pack=False, progress=False)
    got = score_dataset(model, small_tok, reqs, path, batch_size=2, pack=True, row_len=64, progress=False, stats=st)
    assert got["written"] == len(reqs) and st["long"] == 0 and st["max_images"] > 0, st
    ref = {r["id"]: r for r in map(json.loads, ref_path.read_text().splitlines())}
    for r in map(json.loads, path.read_text().splitlines()):
        np.testing.assert_allclose(r["mean_logprob"], ref[r["id"]]["mean_logprob"], atol=1e-5, err_msg=r["id"])


def test_packed_llava_next_rows_with_several_images(small_tok):
    """LLaVA-1.6 layout: image tokens carry `image_pos` into their own tiles, which packing offsets by the tiles of
    the row's earlier requests; each request still gets its padded-path score."""
    import dataclasses

    from flax import nnx
    from test_generate import random_model

    from vlmjax.models.vlm import VLM

    base = tiny_vlm(vocab=320, image_token_id=310).cfg
    cfg = dataclasses.replace(base, image_layout="llava_next", image_tiling="anyres",
                              image_grid_pinpoints=((32, 16), (16, 32), (32, 32)))
    model = random_model(lambda: VLM(cfg, rngs=nnx.Rngs(0)), 1)
    encoder = Encoder(small_tok, cfg)
    rng = np.random.default_rng(3)
    reqs = [Request(f"r{i}", [{"role": "user", "content": "<image>\nCaption it."},
                              {"role": "assistant", "content": "A red circle " * (1 + i)}],
                    [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))])
            for i, (w, h) in enumerate([(40, 20), (20, 50), (31, 29)])]
    enc = [encoder.scored(r) for r in reqs]
    assert all(e.image_pos is not None and len(e.pixels) > 1 for e in enc)
    scorer = PackedScorer(model, rows=1, row_len=sum(len(e.ids) for e in enc), max_images=12,
                          image_size=encoder.image_spec.image_size, tokens_per_tile=cfg.tokens_per_image)
    got = dict(sum((scorer.add(i, e) for i, e in enumerate(enc)), []) + scorer.finish())
    assert scorer.stats["packed_batches"] == 1  # all three in one row
    ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc])
    px, rows = collate_images([e.pixels for e in enc])
    ref = sequence_scores(model, ids, tgt, px, rows, image_pos=[e.image_pos for e in enc])
    for i in range(3):
        np.testing.assert_allclose(got[i]["mean_logprob"], ref["mean_logprob"][i], atol=1e-5)
