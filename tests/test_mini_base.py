"""The miniature kit: the shared mini base (data split, augmented views, cache reuse), the easy-vqa evaluation by
answer kind / describe colour + shape, and the gate every miniature prints."""

import json
from pathlib import Path

import numpy as np
import pytest

from vlmjax.eval.easy_vqa import answer_kind, description_accuracy
from vlmjax.eval.tasks import EvalSample, Task
from vlmjax.recipes import mini_base


def test_dihedral_gives_the_eight_distinct_views_of_a_square():
    a = np.random.default_rng(0).integers(0, 255, (5, 5, 3), dtype=np.uint8)
    views = [mini_base.dihedral(a, k) for k in range(8)]
    assert np.array_equal(views[0], a)
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[1], np.rot90(a)) and np.array_equal(views[4], a[:, ::-1])


def test_sft_turns_balance_absent_yes_no_answers_and_add_an_imagine_turn():
    cases = {("Is there a red shape?", "No"): True, ("Is there not a red shape?", "Yes"): True,
             ("Is no green shape present?", "Yes"): True, ("Is a circle present?", "Yes"): False,
             ("Does the image not contain a rectangle?", "No"): False, ("What color is the shape?", "Red"): False}
    assert {k: mini_base.says_absent(*k) for k in cases} == cases
    turns = [{"value": "<image>\nDescribe the image briefly."}, {"value": "The image shows a red circle."}]
    for q, a in cases:
        turns += [{"value": q}, {"value": a}]
    rng = np.random.default_rng(0)
    out = mini_base.sft_turns(turns, rng, keep_absent=0.0, imagine=("Imagine it.", "The image shows a teal triangle."))
    pairs = {(out[i]["value"].replace("<image>\n", ""), out[i + 1]["value"]) for i in range(0, len(out), 2)}
    kept = {k for k, absent in cases.items() if not absent}
    assert {p for p in pairs if p in cases} == kept and ("Imagine it.", "The image shows a teal triangle.") in pairs
    assert out[0]["value"].startswith("<image>\n") and len(pairs) == len(kept) + 2  # + description + imagine
    full = mini_base.sft_turns(turns, np.random.default_rng(0))  # keep_absent=1: every pair, the order shuffled
    assert len(full) == len(turns)


def test_split_turns_asks_every_cut_with_the_image():
    conv = [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"},
            {"from": "human", "value": "Q3"}, {"from": "gpt", "value": "A3"}]
    assert mini_base.split_turns(conv, 0) == [conv]
    one = mini_base.split_turns(conv, 1)
    assert [[t["value"] for t in c] for c in one] == [["<image>\nQ1", "A1"], ["<image>\nQ2", "A2"],
                                                      ["<image>\nQ3", "A3"]]
    two = mini_base.split_turns(conv, 2)
    assert [[t["value"] for t in c] for c in two] == [["<image>\nQ1", "A1", "Q2", "A2"], ["<image>\nQ3", "A3"]]
    assert conv[2]["value"] == "Q2"  # the input is not edited


def test_answer_kind_and_description_accuracy():
    assert [answer_kind(g) for g in ("Circle", "teal", "Yes", "no")] == ["shape", "color", "yes/no", "yes/no"]
    task = Task("d", "caption", [EvalSample(str(i), "Describe the image.", ans, "x.png") for i, ans in
                                 enumerate([["red", "circle"], ["blue", "triangle"], ["gray", "rectangle"]])])
    preds = {"0": "A red circle.", "1": "The image shows a blue rectangle.", "2": ""}  # both / colour only / none
    assert description_accuracy(preds, task) == pytest.approx(
        {"describe_color": 2 / 3, "describe_shape": 1 / 3, "describe_both": 1 / 3})


def test_base_gate_names_each_failing_skill():
    good = {"n": 2000, "shape": 0.9, "color": 0.95, "yes/no": 0.93, "describe_both": 0.7}
    passed, lines = mini_base.base_gate(good)
    assert passed and "passed" in lines[0] and len(lines) == 5 and all(line.endswith("ok") for line in lines[1:])
    passed, lines = mini_base.base_gate({**good, "shape": 0.34, "describe_both": None})
    assert not passed and "FAILED" in lines[0] and "shape questions" in lines[0]
    assert "describes colour + shape" in lines[0] and "missing" in lines[4]
    assert sum(line.endswith("FAIL") for line in lines) == 2


@pytest.mark.slow
def test_tiny_base_is_built_on_its_own_pool_and_reused(tiny_mini_base, monkeypatch):
    """On the suite's shared tiny base (conftest: train_utils.TINY_BASE_KW, 2 views per image, 2 steps a stage)."""
    from train_utils import TINY_BASE_KW

    base = tiny_mini_base
    cache = Path(base["root"]).parent
    data = mini_base.data_dir(cache, 0, 2)
    assert Path(base["data"]) == data
    sft = json.loads((data / "base_sft.json").read_text())
    caps = [json.loads(line) for line in (data / "base_captions.jsonl").read_text().splitlines()]
    # images 3000-3999 only (the recipes' pools 0-2999 never seen), each in 2 views; the view is the turned image
    for rows in (sft, caps):
        numbers = {int(r["id"].split("_")[1]) for r in rows}
        assert min(numbers) == 3000 and max(numbers) == 3999
    assert len(sft) == 2000 and sum(r["id"].endswith("_aug1") for r in sft) == 1000
    from PIL import Image

    rec = next(r for r in sft if r["id"] == "train_3000_aug1")
    orig = np.asarray(Image.open(data / "images" / "train" / "3000.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(data / "images" / rec["image"])), mini_base.dihedral(orig, 1))
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in sft)
    # ~1 in 4 conversations also asks an "imagine" prompt, answered with another colour AND another shape
    truth = {c["id"]: c for c in caps}
    imagined = [(r["id"], t["value"], r["conversations"][i + 1]["value"]) for r in sft
                for i, t in enumerate(r["conversations"]) if t["value"] in mini_base.P.HALLUCINATION]
    assert 0.2 < len(imagined) / len(sft) < 0.3
    for sid, _prompt, answer in imagined:
        words = answer.rstrip(".").split()
        assert truth[sid]["color"] not in words and truth[sid]["shape"] not in words and words[:3] == ["The", "image", "shows"]
    assert base["stages"]["align"]["steps"] == 2 and base["stages"]["sft"]["steps"] == 2
    assert (data / "images" / "train" / "0.png").exists()  # the recipes' images come with the cache
    res = mini_base.evaluate_base(base, n=6)
    assert res["n"] == 6 and {"shape", "color", "yes/no", "describe_both"} <= set(res)
    # a second build finds everything done and trains nothing
    import vlmjax.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("the cached base was trained again"))
    again = mini_base.build_base(cache, **TINY_BASE_KW)
    assert again["model"] == base["model"] and mini_base.evaluate_base(again, n=6) == res


def test_sft_variant_retrains_sft_from_the_bases_align_export(tiny_mini_base, tmp_path):
    """A weaker base for a miniature (COINCIDE's --base-sft-steps): SFT rerun from the base's align export with other
    settings, the tower and align reused; its base.json names what it varies."""
    base = tiny_mini_base
    var = mini_base.sft_variant(base, tmp_path / "v", {"train.steps": 3, "data.batch_size": 2})
    stage = json.loads((tmp_path / "v" / "sft" / "stage.json").read_text())
    assert stage["steps"] == 3 and var["model"] != base["model"] and var["align"] == base["align"]
    assert Path(var["model"], "model.safetensors").exists() and var["variant_of"] == base["root"]
    assert json.loads((tmp_path / "v" / "base.json").read_text())["sft_over"] == {"train.steps": 3,
                                                                                   "data.batch_size": 2}
