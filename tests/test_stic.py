"""STIC recipe pieces: corruptions really change pixels (checked against colorsys), pair plans, the preference and
infused-SFT builders (placeholders kept, resumable, failures counted), DaR prompts, and adapter save/load."""

import colorsys
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vlmjax.recipes.stic import corrupt, prompts as P
from vlmjax.recipes.stic.make_infused_sft import infuse, make_infused_sft
from vlmjax.recipes.stic.make_preferences import CorruptingEncoder, make_preferences, plan
from vlmjax.generate.requests import Request

from test_generate import tiny_vlm


def _image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_lowres_shrinks_the_shorter_side_to_20px():
    small = corrupt.lowres(_image(40, 56))
    assert small.size == (28, 20)
    assert corrupt.corrupt(_image(40, 56), "lowres", 1).size == (28, 20)


def test_hue_shift_matches_colorsys():
    img = _image(6, 7, seed=3)
    out = np.asarray(corrupt.shift_hue(img, 0.25), np.float64) / 255
    assert np.array_equal(np.asarray(corrupt.shift_hue(img, 0.0)), np.asarray(img))
    for (r, g, b), o in zip(np.asarray(img).reshape(-1, 3) / 255, out.reshape(-1, 3)):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        ref = colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
        assert np.abs(np.array(ref) - o).max() <= 0.5 / 255 + 1e-9  # one rounding to 8 bits


def test_color_jitter_is_a_function_of_the_seed_and_really_applied():
    img = _image()
    f = corrupt.jitter_factors(7)
    assert 0.5 <= f["brightness"] <= 1.5 and -0.3 <= f["hue"] <= 0.3
    a, b = corrupt.corrupt(img, "color_jitter", 7), corrupt.corrupt(img, "color_jitter", 7)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a, np.int32) - np.asarray(img, np.int32)).mean() > 5
    assert np.array_equal(np.asarray(a), np.asarray(corrupt.color_jitter(img, f["brightness"], f["hue"])))
    bright = np.asarray(corrupt.color_jitter(img, f["brightness"], 0.0), np.float64)
    ref = np.clip(np.asarray(img, np.float64) * f["brightness"], 0, 255)
    assert np.abs(bright - ref).max() <= 1  # brightness = scaling, rounded to 8 bits
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt.corrupt(img, "pixelate", 0)


def test_parametrised_corruptions_destroy_what_they_name():
    img = _image(64, 64)
    assert corrupt.corrupt(img, "lowres:8", 0).size == (8, 8)
    # blur is PIL's Gaussian blur of that radius
    assert np.array_equal(np.asarray(corrupt.corrupt(img, "blur:3", 0)), np.asarray(img.filter(ImageFilter.GaussianBlur(3))))
    # shuffle: the same 16 cells (colours kept), in the seed's order; another seed, another order
    a, b = np.asarray(corrupt.corrupt(img, "shuffle:4", 1)), np.asarray(corrupt.corrupt(img, "shuffle:4", 2))
    cells = lambda x: x.reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)  # noqa: E731
    src = cells(np.asarray(img))
    perm = np.random.default_rng(1).permutation(16)
    assert np.array_equal(cells(a), src[perm]) and not np.array_equal(a, b)
    assert np.array_equal(np.asarray(corrupt.shuffle_cells(_image(30, 30), 4, 0))[28:], np.asarray(_image(30, 30))[28:])
    for bad, msg in (("blur", "needs its parameter"), ("color_jitter:2", "takes no parameter"),
                     ("shuffle:1", "grid >= 2"), ("lowres:x", "must be a number")):
        with pytest.raises(ValueError, match=msg):
            corrupt.parse_kind(bad)


def test_plans_draw_the_configured_corruptions():
    from vlmjax.recipes.stic.make_preferences import PromptSet

    mine = PromptSet(corruptions=("lowres:8", "shuffle:4", "blur:4"))
    plans = [plan(f"img{i}", prompts=mine) for i in range(300)]
    corr = {p["corruption"] for p in plans if p["rejected_kind"] == "corruption"}
    assert corr == set(mine.corruptions)


def test_plans_are_deterministic_and_mix_both_negative_kinds():
    plans = [plan(f"img{i}") for i in range(400)]
    assert plans == [plan(f"img{i}") for i in range(400)]
    kinds = [p["rejected_kind"] for p in plans]
    assert 0.4 < kinds.count("hallucination_prompt") / len(kinds) < 0.6
    corr = [p["corruption"] for p in plans if p["rejected_kind"] == "corruption"]
    assert 0.35 < corr.count("lowres") / len(corr) < 0.65
    assert all("jitter" in p for p in plans if p.get("corruption") == "color_jitter")
    assert {plan(f"img{i}", negatives="plain")["rejected_kind"] for i in range(20)} == {"plain"}
    with pytest.raises(ValueError):
        plan("x", negatives="none")


def test_prompts_keep_the_image_placeholder():
    assert len(P.SIMPLE) == 8 and len(P.HALLUCINATION) == 8
    assert P.with_image("Describe.") == "<image>\nDescribe."
    assert P.infused("A red ball. ", "<image>\nWhat colour?") == "<image>\nImage description:\nA red ball.\n\nWhat colour?"
    rec = {"id": "s", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}
    out = infuse(rec, "desc")
    assert out["conversations"][0]["value"] == "<image>\nImage description:\ndesc\n\nQ?"
    assert out["conversations"][1] == rec["conversations"][1] and rec["conversations"][0]["value"] == "<image>\nQ?"


# --------------------------------------------------------------------------------- builders on a tiny model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from vlmjax.data.tokenizer import train_tokenizer

    texts = list(P.SIMPLE + P.HALLUCINATION + (P.DETAILED, P.DAR_DESCRIBE)) + ["A red square.", "user", "assistant"]
    return train_tokenizer(texts * 3, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    assert len(tok) <= 400 and tok.convert_tokens_to_ids("<image>") == 3
    m = tiny_vlm(vocab=400, image_token_id=3)
    return m


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        _image(32, 32, seed=i).save(root / f"{i}.png")
    return root, [(f"im{i}", f"{i}.png") for i in range(6)]


def test_corrupting_encoder_feeds_the_corrupted_pixels(tok, model, images):
    from vlmjax.data.image import process_image

    root, _ = images
    enc = CorruptingEncoder(tok, model.cfg)
    path = str(root / "0.png")
    clean = enc.pixels(Request("a", [], [path]))
    low = enc.pixels(Request("a", [], [path], {"corruption": "lowres", "seed": 5}))
    jit = enc.pixels(Request("a", [], [path], {"corruption": "color_jitter", "seed": 5}))
    ref = process_image(corrupt.lowres(Image.open(path).convert("RGB")), enc.image_spec)
    np.testing.assert_allclose(low, ref)
    assert np.abs(low - clean).mean() > 0.05 and np.abs(jit - clean).mean() > 0.05


def test_make_preferences_writes_pairs_and_resumes(tok, model, images, tmp_path, monkeypatch):
    import vlmjax.generate.dataset as ds

    root, imgs = images
    seen = []
    real = ds.generate

    def spy(m, ids, config, **kw):
        seen.append((len(ids), None if kw.get("pixel_values") is None else np.asarray(kw["pixel_values"]).copy()))
        return real(m, ids, config, **kw)

    monkeypatch.setattr(ds, "generate", spy)
    out = tmp_path / "pairs.jsonl"
    stats = make_preferences(model, tok, imgs, str(root), out, max_new_tokens=6, batch_size=4, progress=False,
                             shard_index=0, shard_count=1)
    assert len(seen) == 4  # chosen + rejected, 2 batches each
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["pairs"] == len(rows) and stats["pairs"] + stats["empty"] + stats["failed"] == 6
    for r in rows:
        assert r["prompt"] == "<image>\n" + P.SIMPLE[r["simple_prompt_id"]]
        assert r == {**r, **plan(r["id"])}  # how the rejected side was made is recorded
    chosen = [json.loads(line) for line in (tmp_path / "pairs.chosen.jsonl").read_text().splitlines()]
    assert all(c["prompt"] == "<image>\n" + P.DETAILED for c in chosen) and len(chosen) == 6
    rejected = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "pairs.rejected.jsonl").read_text().splitlines()}
    for image_id, _ in imgs:
        p = plan(image_id)
        want = P.HALLUCINATION[p["hallucination_prompt_id"]] if p["rejected_kind"] == "hallucination_prompt" \
            else P.SIMPLE[p["simple_prompt_id"]]
        assert rejected[image_id]["prompt"] == "<image>\n" + want
    # corrupted rows really got other pixels than the clean chosen pass
    chosen_px = np.concatenate([px for _, px in seen[:2]])
    rej_px = np.concatenate([px for _, px in seen[2:]])
    for i, (image_id, _) in enumerate(imgs):
        differs = np.abs(chosen_px[i] - rej_px[i]).mean() > 1e-3
        assert differs == (plan(image_id)["rejected_kind"] == "corruption"), image_id
    # rerun: nothing is generated again, the pairs file is identical
    seen.clear()
    before = out.read_text()
    make_preferences(model, tok, imgs, str(root), out, max_new_tokens=6, batch_size=4, progress=False,
                     shard_index=0, shard_count=1)
    assert seen == [] and out.read_text() == before


def test_make_preferences_counts_a_missing_image(tok, model, images, tmp_path):
    root, imgs = images
    imgs = imgs[:2] + [("gone", "missing.png")]
    stats = make_preferences(model, tok, imgs, str(root), tmp_path / "p.jsonl", max_new_tokens=4, batch_size=4,
                             progress=False, shard_index=0, shard_count=1)
    assert stats["failed"] == 1 and "gone" not in (tmp_path / "p.jsonl").read_text()


def test_make_preferences_shards_merge_to_the_single_host_pairs(tok, model, images, tmp_path):
    """Two hosts as separate jobs: shard 0 waits for shard 1, then merges (coverage checked) and writes the same
    pairs file a single host writes."""
    root, imgs = images
    kw = dict(max_new_tokens=4, batch_size=4, progress=False)
    single = make_preferences(model, tok, imgs, str(root), tmp_path / "one" / "pairs.jsonl", shard_index=0,
                              shard_count=1, **kw)
    out = tmp_path / "two" / "pairs.jsonl"
    first = make_preferences(model, tok, imgs, str(root), out, shard_index=0, shard_count=2, **kw)
    assert first["pairs"] is None and "00001-of-00002.jsonl does not exist" in first["waiting"] and not out.exists()
    other = make_preferences(model, tok, imgs, str(root), out, shard_index=1, shard_count=2, **kw)
    assert other["pairs"] is None and other["generated"]["chosen"]["written"] == 3
    merged = make_preferences(model, tok, imgs, str(root), out, shard_index=0, shard_count=2, **kw)
    assert merged["generated"]["chosen"]["written"] == 0 and merged["pairs"] == single["pairs"]
    assert out.read_text() == (tmp_path / "one" / "pairs.jsonl").read_text()
    assert (tmp_path / "two" / "pairs.chosen-00001-of-00002.jsonl").exists()


def test_make_infused_sft_keeps_text_only_and_answers(tok, model, images, tmp_path):
    root, _ = images
    recs = [{"id": f"s{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"}]} for i in range(3)]
    recs.append({"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    out = tmp_path / "infused.json"
    stats = make_infused_sft(model, tok, recs, str(root), out, max_new_tokens=5, batch_size=2, progress=False)
    got = json.loads(out.read_text())
    assert stats["text_only"] == 1 and stats["infused"] + stats["empty"] == 3
    assert got[-1] == recs[-1]
    for g in got[:-1]:
        first = g["conversations"][0]["value"]
        assert first.startswith("<image>\nImage description:\n") and first.endswith("\n\nWhat colour?")
        assert g["conversations"][1]["value"] == "Red"


def test_make_infused_sft_describes_each_record_when_ids_repeat(tok, model, images, tmp_path):
    """LLaVA-665k-style repeated ids: each record gets the description of its own image (keyed row:index)."""
    root, _ = images
    recs = [{"id": "same", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"}]} for i in (0, 3)]
    out = tmp_path / "infused.json"
    stats = make_infused_sft(model, tok, recs, str(root), out, max_new_tokens=5, batch_size=2, progress=False)
    assert stats["failed"] == 0 and stats["infused"] + stats["empty"] == 2
    lines = (tmp_path / "infused.descriptions.jsonl").read_text().splitlines()
    desc = {json.loads(x)["id"]: json.loads(x) for x in lines}
    assert sorted(desc) == ["row:0", "row:1"] and {d["sample_id"] for d in desc.values()} == {"same"}
    got = json.loads(out.read_text())
    for g, key in zip(got, [k for k in ("row:0", "row:1") if desc[k]["output"].strip()]):
        assert g["conversations"][0]["value"] == P.infused(desc[key]["output"], "<image>\nWhat colour?")


def test_dar_prefixes_each_question_with_the_models_description(tok, model, images):
    from vlmjax.eval.tasks import EvalSample, Task
    from vlmjax.eval.dar import dar_task

    root, _ = images
    task = Task("t", "vqa", [EvalSample(str(i), "What colour?", ["red"], str(root / f"{i % 2}.png")) for i in range(4)],
                instruction="")
    t = dar_task(model, tok, task, max_new_tokens=4, batch_size=4)
    assert t.name == "t_dar" and len(t.samples) == 4
    for s in t.samples:
        assert s.question.startswith("Image description:\n") and s.question.endswith("\n\nWhat colour?")
    assert t.samples[0].question == t.samples[2].question  # one description per distinct image


def test_trainable_params_round_trip_through_safetensors(tmp_path):
    from flax import nnx

    from vlmjax.models.lora import add_lora
    from vlmjax.train.defaults import LLAMA_LINEAR
    from vlmjax.train.optim import split_trainable
    from vlmjax.train.params_io import load_params, save_params

    a, b = tiny_vlm(vocab=64, image_token_id=63, seed=0), tiny_vlm(vocab=64, image_token_id=63, seed=1)
    for m in (a, b):
        add_lora(m, rank=2, alpha=4.0, targets=LLAMA_LINEAR, seed=0)
    _, trainable, _ = split_trainable(a, ("lora_", "^projector/"))
    trainable = __import__("jax").tree.map(lambda x: x + 0.5, trainable)  # non-trivial values (lora B starts at 0)
    path = save_params(trainable, str(tmp_path / "t.safetensors"))
    n = load_params(b, path)
    _, got, _ = split_trainable(b, ("lora_", "^projector/"))
    flat_w = dict(nnx.to_flat_state(trainable))
    assert n == len(flat_w)
    for p, v in nnx.to_flat_state(got):
        np.testing.assert_array_equal(np.asarray(v.value), np.asarray(flat_w[p].value))
    c = tiny_vlm(vocab=64, image_token_id=63)  # no LoRA: the adapter tensors match nothing
    with pytest.raises(KeyError, match="lora"):
        load_params(c, path)


def test_pair_report_counts_real_negatives_by_hand(tmp_path):
    from vlmjax.recipes.stic.miniature import pair_report

    truth = [{"id": "a", "color": "red", "shape": "circle"}, {"id": "b", "color": "blue", "shape": "triangle"},
             {"id": "c", "color": "gray", "shape": "rectangle"}]
    pairs = [  # a: rejected wrong colour (real); b: both sides wrong shape, same colour (not real); c: identical
        {"id": "a", "chosen": "A red circle.", "rejected": "A green circle.", "rejected_kind": "hallucination_prompt"},
        {"id": "b", "chosen": "A blue circle.", "rejected": "The image shows a blue rectangle.",
         "rejected_kind": "corruption", "corruption": "lowres:8"},
        {"id": "c", "chosen": "A gray rectangle.", "rejected": "A gray rectangle.", "rejected_kind": "corruption",
         "corruption": "lowres:8"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    rep = pair_report(tmp_path / "p.jsonl", tmp_path / "t.jsonl")
    assert rep["all"] == {"n": 3, "identical": round(1 / 3, 3), "real_negative": round(1 / 3, 3), "chosen_color": 1.0,
                          "rejected_color": round(2 / 3, 3), "chosen_shape": round(2 / 3, 3),
                          "rejected_shape": round(2 / 3, 3)}
    assert rep["hallucination_prompt"]["real_negative"] == 1.0 and rep["corruption/lowres:8"]["real_negative"] == 0.0
