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
    # text spans, masks built independently in numpy: after the first image's last token; a given reply mask
    after = np.zeros_like(real)
    for r in range(len(ids)):
        im = np.flatnonzero(img[r])
        start = 0 if not len(im) else im[0] + np.argmax(~img[r, im[0]:])  # first non-image token after image 1
        after[r, start:] = True
    reply = np.zeros_like(real)
    for r, n in enumerate(real.sum(1)):
        reply[r, n - 3 - r: n] = True
    for span, mask, text in (("after_image", None, real & ~img & after), ("assistant", reply, real & ~img & reply)):
        got = features(model, ids, real.sum(1), pixels.transpose(0, 2, 3, 1), rows, layers=(1, 0),
                       parts=("attn", "mlp"), span=span, text_mask=mask)
        for li, layer in enumerate((1, 0)):
            np.testing.assert_allclose(got[:, 0, li, 1], mean(caught[("attn", layer)], text), atol=1e-5)
            np.testing.assert_allclose(got[:, 1, li, 1], mean(caught[("mlp", layer)], text), atol=1e-5)
            np.testing.assert_allclose(got[:, :, li, 0], feats[:, :2, li, 0], atol=1e-6)  # image group unchanged
    assert text.sum() < (real & ~img).sum() and (real & ~img & after).sum() < (real & ~img).sum()


def _scan_lengths(jaxpr) -> list[int]:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _scan_lengths(getattr(inner, "jaxpr", inner))
    return out


def test_capture_stops_the_layer_scan_after_the_deepest_layer(llava):
    """Layer 0 only: the traced program scans 1 of the 2 layers, with the values of the full scan."""
    from flax import nnx

    from vlmjax.scoring import capture

    _, model, cfg = llava
    ids, mask, _, pixels, rows = _batch(cfg.tokens_per_image)
    px = pixels.transpose(0, 2, 3, 1)
    lengths = mask.sum(1).astype(np.int32)
    full = features(model, ids, lengths, px, rows, layers=(0, 1), parts=("attn", "resid"))
    early = features(model, ids, lengths, px, rows, layers=(0,), parts=("attn", "resid"))
    np.testing.assert_array_equal(early[:, :, 0], full[:, :, 0])
    graphdef, state = nnx.split(model)
    args = (graphdef, state, ids.astype(np.int32), lengths, np.zeros(ids.shape, bool), px, rows, None)
    scans = {layers: sorted(_scan_lengths(capture._features.trace(*args, layers=layers, parts=("attn",),
                                                                  span="all").jaxpr.jaxpr))
             for layers in ((0,), (1, 0))}
    assert cfg.llm.num_layers == 2
    deep = list(scans[(1, 0)])
    deep.remove(2)  # the decoder's scan over its 2 layers ...
    assert scans[(0,)] == sorted(deep + [1]), scans  # ... runs 1 layer; every other scan (vision tower) unchanged


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


def test_capture_hosts_merge_dtypes_spans_errors_and_memmap_reader(tmp_path):
    """Two hosts' folders merge (coverage checked) to the single-host rows; bf16 rows are the fp32 rows rounded;
    a broken sample is an error record, counted and not retried unless asked; the reader maps shards lazily."""
    import ml_dtypes

    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.generate import Request, sample_keys
    from vlmjax.generate.shards import IncompleteShards
    from vlmjax.scoring import host_dir, merge_feature_shards, open_shards

    tok, model = smollm2_tokenizer(), smol_vlm()
    reqs = _captions(tmp_path, n=5)
    reqs.insert(2, Request("bad", reqs[0].messages, [str(tmp_path / "imgs" / "gone.png")]))
    kw = dict(layers=(1,), parts=("attn", "resid"), span="assistant", batch_size=2, shard_size=2, progress=False)
    st = capture_dataset(model, tok, reqs, tmp_path / "one", shard_index=0, shard_count=1, **kw)
    assert (st["requests"], st["written"], st["failed"]) == (6, 5, 1)
    one = open_shards(tmp_path / "one")
    assert "image file not found" in one.errors["bad"] and one.index["meta"]["span"] == "assistant"
    st = capture_dataset(model, tok, reqs, tmp_path / "one", shard_index=0, shard_count=1, **kw)
    assert (st["written"], st["failed"], st["previous_errors"], st["skipped_done"]) == (0, 0, 1, 5)
    st = capture_dataset(model, tok, reqs, tmp_path / "one", shard_index=0, shard_count=1, retry_errors=True, **kw)
    assert (st["written"], st["failed"], st["previous_errors"]) == (0, 1, 0)
    assert len((tmp_path / "one" / "errors.jsonl").read_text().splitlines()) == 1
    # memory-mapped reader: per-shard maps, rows read on access, by position or by id
    good = [r.id for r in reqs if r.id != "bad"]
    assert one.ids == good and one.shape == (5, 2, 1, 2, 32)
    assert [ids for ids, _ in one.iter_shards()] == [good[:2], good[2:]]
    assert all(isinstance(rows, np.memmap) for _, rows in one.iter_shards())
    dense = np.asarray(one)
    np.testing.assert_array_equal(one[[4, 0, 2]], dense[[4, 0, 2]])
    np.testing.assert_array_equal(one[1:4, 1, 0], dense[1:4, 1, 0])
    np.testing.assert_array_equal(one.take(["c4", "c0"]), dense[[4, 0]])
    with pytest.raises(KeyError, match="'bad'"):
        one.take(["bad"])
    # two hosts (separate jobs), then the merge
    out = tmp_path / "two"
    for i in (1, 0):
        st = capture_dataset(model, tok, reqs, out, shard_index=i, shard_count=2, **kw)
        assert st["out"] == host_dir(out, i, 2) and st["merged"] is None
    with pytest.raises(IncompleteShards, match="'c1'"):
        merge_feature_shards([host_dir(out, 0, 2)], out, ids=sample_keys(reqs))
    assert merge_feature_shards([host_dir(out, i, 2) for i in range(2)], out, ids=sample_keys(reqs)) == \
        {"rows": 5, "errors": 1, "out": str(out)}
    two = open_shards(out)
    np.testing.assert_allclose(two.take(good), dense, atol=1e-6)
    assert two.errors == one.errors
    # bf16 / fp16 storage: the fp32 rows rounded once; the "all" span differs from "assistant" in the text group only
    for dtype, np_dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        capture_dataset(model, tok, reqs, tmp_path / dtype, dtype=dtype, **{**kw, "span": "all"}, shard_index=0,
                        shard_count=1)
        view = open_shards(tmp_path / dtype)
        assert view.dtype == np.dtype(np_dtype) and view[0].dtype == np.dtype(np_dtype)
        assert np.load(tmp_path / dtype / "shard_00000.npy").nbytes == 2 * 2 * 2 * 32 * 2  # 2 rows, 2 bytes each
        if dtype == "bfloat16":
            np.testing.assert_array_equal(np.asarray(view)[:, :, :, 0], dense[:, :, :, 0].astype(np_dtype))
            assert np.abs(np.asarray(view, np.float32)[:, :, :, 1] - dense[:, :, :, 1]).max() > 1e-3
