"""Scoring: target log-likelihood / perplexity and hidden-state features against transformers (torch CPU) on a
tiny random HF LLaVA, plus the resumable dataset runners and the shard writer."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402
from test_generate import SMOL_IMAGE_ID, smol_vlm  # noqa: E402

from vlmjax.convert import hf as hfconv  # noqa: E402
from vlmjax.scoring import (ShardWriter, capture_dataset, features, load_shards, score_dataset,  # noqa: E402
                            sequence_scores, token_logprobs)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    ref = F.make_llava(d, "smollm2", "clip")  # tied embeddings, GQA 3:1
    model, cfg = hfconv.load_vlm(d)
    return ref, model, cfg


def _batch(T):
    """Right-padded rows: image + text, text only, two images; targets = a few trailing real tokens."""
    I = F.IMAGE_TOKEN
    rows = [[1, 5, 6] + [I] * T + [7, 8, 9, 10, 11], [1, 10, 11, 12, 13, 14, 15, 16, 17],
            [1, 20] + [I] * T + [21, 22] + [I] * T + [23, 24, 25]]
    s = max(map(len, rows)) + 3
    ids = np.zeros((3, s), np.int64)
    mask = np.zeros((3, s), np.int64)
    target = np.zeros((3, s), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
        target[r, len(row) - (4 + r): len(row)] = True
    return ids, mask, target, F.pixels_nchw(3), np.array([0, 2, 2], np.int32)


def _hf(ref, ids, mask, pixels, **kw):
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                   pixel_values=torch.tensor(pixels), **kw)


def test_logprobs_and_perplexity_match_torch(llava):
    ref, model, cfg = llava
    ids, mask, target, pixels, rows = _batch(cfg.tokens_per_image)
    logits = _hf(ref, ids, mask, pixels).logits.float()
    lp_ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:])[..., None])[..., 0].numpy()
    lp_ref = np.where(target[:, 1:], lp_ref, 0.0)
    px = pixels.transpose(0, 2, 3, 1)
    ours = token_logprobs(model, ids, target, px, rows)
    np.testing.assert_allclose(ours[:, 1:], lp_ref, atol=1e-4)
    assert np.all(ours[:, 0] == 0)
    np.testing.assert_allclose(token_logprobs(model, ids, target, px, rows, chunk=5), ours, atol=1e-6)  # ragged chunks
    # numpy formula from the HF logits: PPL = exp(-(1/N) sum log softmax(logits)[label])
    lg = logits.numpy()[:, :-1].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    logsm = lg - (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))
    picked = np.take_along_axis(logsm, ids[:, 1:, None], -1)[..., 0]
    n = target.sum(1)
    ppl = np.exp(-(picked * target[:, 1:]).sum(1) / n)
    s = sequence_scores(model, ids, target, px, rows)
    np.testing.assert_array_equal(s["num_tokens"], n)
    np.testing.assert_allclose(s["perplexity"], ppl, rtol=1e-4)
    np.testing.assert_allclose(s["sum_logprob"], (picked * target[:, 1:]).sum(1), atol=1e-3)


def test_features_match_hf_hooks(llava):
    ref, model, cfg = llava
    ids, mask, _, pixels, rows = _batch(cfg.tokens_per_image)
    layers_mod = ref.model.language_model.layers
    caught = {}

    def hook(key):
        def fn(_m, _inp, out):
            caught[key] = (out[0] if isinstance(out, tuple) else out).detach().numpy()
        return fn

    handles = [layers_mod[i].self_attn.o_proj.register_forward_hook(hook(("attn", i))) for i in range(2)]
    handles += [layers_mod[i].mlp.register_forward_hook(hook(("mlp", i))) for i in range(2)]
    out = _hf(ref, ids, mask, pixels, output_hidden_states=True)
    for h in handles:
        h.remove()
    hidden = out.hidden_states  # [embeddings, layer 0 out, layer 1 out (final-normed by HF)]
    real = mask.astype(bool)
    img = (ids == F.IMAGE_TOKEN) & real
    groups = [img, real & ~img]

    def mean(x, g):
        w = g.astype(np.float64)
        return (x * w[..., None]).sum(1) / np.maximum(w.sum(1), 1)[:, None]

    feats = features(model, ids, real.sum(1), pixels.transpose(0, 2, 3, 1), rows, layers=(1, 0),
                     parts=("attn", "mlp", "resid"))
    assert feats.shape == (3, 3, 2, 2, cfg.llm.hidden_size)
    for li, layer in enumerate((1, 0)):
        for gi, g in enumerate(groups):
            np.testing.assert_allclose(feats[:, 0, li, gi], mean(caught[("attn", layer)], g), atol=1e-5)
            np.testing.assert_allclose(feats[:, 1, li, gi], mean(caught[("mlp", layer)], g), atol=1e-5)
    for gi, g in enumerate(groups):  # residual after layer 0 = HF hidden_states[1]
        np.testing.assert_allclose(feats[:, 2, 1, gi], mean(hidden[1].numpy(), g), atol=1e-5)
    assert np.all(feats[1, :, :, 0] == 0)  # text-only row: no image positions
    np.testing.assert_allclose(features(model, ids, real.sum(1), pixels.transpose(0, 2, 3, 1), rows, layers=(-1,),
                                        parts=("attn",))[:, 0, 0], feats[:, 0, 0], atol=1e-6)


def _captions(tmp_path, n=5):
    from PIL import Image

    os.makedirs(tmp_path / "imgs", exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A red circle {i}."}]})
    (tmp_path / "caps.json").write_text(json.dumps(recs))
    from vlmjax.generate import llava_requests

    return llava_requests(tmp_path / "caps.json", tmp_path / "imgs")


def test_score_dataset_scores_caption_plus_end_of_turn_and_resumes(tmp_path):
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.generate import Encoder

    tok, model = smollm2_tokenizer(), smol_vlm()
    reqs = _captions(tmp_path)
    enc = Encoder(tok, model.cfg).scored(reqs[2])
    tgt = np.asarray(enc.ids)[enc.target]
    assert tok.decode(tgt) == "A red circle 2.<|im_end|>"
    assert (np.asarray(enc.ids) == SMOL_IMAGE_ID).sum() == model.cfg.tokens_per_image
    full = tmp_path / "full.jsonl"
    assert score_dataset(model, tok, reqs, full, batch_size=2, progress=False)["written"] == 5
    ref = {json.loads(x)["id"]: json.loads(x) for x in full.read_text().splitlines()}
    assert ref["c2"]["num_tokens"] == len(tgt)
    assert np.isclose(ref["c2"]["perplexity"], np.exp(-ref["c2"]["sum_logprob"] / len(tgt)))
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:2]) + lines[2][:7])  # a crash mid-write
    assert score_dataset(model, tok, reqs, part, batch_size=2, progress=False)["written"] == 3
    got = [json.loads(x) for x in part.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == sorted(ref)
    for r in got:
        assert np.isclose(r["perplexity"], ref[r["id"]]["perplexity"], rtol=1e-5)


def test_capture_dataset_shards_resume(tmp_path):
    from vlmjax.data.assets import smollm2_tokenizer

    tok, model = smollm2_tokenizer(), smol_vlm()
    reqs = _captions(tmp_path, n=7)
    kw = dict(layers=(1, 0), parts=("attn", "resid"), batch_size=2, shard_size=3, progress=False)
    capture_dataset(model, tok, reqs, tmp_path / "full", **kw)
    ids, rows, index = load_shards(tmp_path / "full")
    assert ids == [r.id for r in reqs] and rows.shape == (7, 2, 2, 2, 32)
    assert [len(s["ids"]) for s in index["shards"]] == [4, 3]  # sealed once 3 are reached: batches of 2
    assert np.all(np.abs(rows[:, :, :, 0]).sum(-1) > 0)  # every sample has an image
    # crash after 2 batches: open shard with a torn row and a torn id line
    part = tmp_path / "part"
    w = ShardWriter(part, rows.shape[1:], shard_size=100, meta=index["meta"])
    w.add(ids[:2], rows[:2])
    w.add(ids[2:4], rows[2:4])
    w._bin.write(b"\0" * 10)
    w._ids.write('"c4')
    w._bin.close(), w._ids.close()
    capture_dataset(model, tok, reqs, part, **{**kw, "shard_size": 100})
    ids2, rows2, _ = load_shards(part)
    assert ids2 == ids and not os.path.exists(part / "open.bin")
    np.testing.assert_allclose(rows2, rows, atol=1e-6)


def test_shard_writer_detects_a_sealed_open_shard(tmp_path):
    w = ShardWriter(tmp_path, (2,), shard_size=2)
    w.add(["a", "b"], np.ones((2, 2)))  # sealed
    # simulate a crash after sealing but before the open files were removed
    with open(tmp_path / "open.ids", "w") as f:
        f.write('"a"\n"b"\n')
    (tmp_path / "open.bin").write_bytes(np.ones((2, 2), np.float32).tobytes())
    w2 = ShardWriter(tmp_path, (2,), shard_size=2)
    assert w2.done == {"a", "b"} and w2.open_ids == []
    w2.add(["c"], np.zeros((1, 2)))
    w2.close()
    ids, rows, _ = load_shards(tmp_path)
    assert ids == ["a", "b", "c"] and rows.shape == (3, 2)
    with pytest.raises(ValueError, match="holds rows"):
        ShardWriter(tmp_path, (3,))
