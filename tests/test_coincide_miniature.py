"""COINCIDE miniature: its pool, packing count, oracle and diagnostics by hand, then the whole pipeline in a few
steps on a tiny base (every stage, the report, and a rerun that trains nothing)."""

import json

import numpy as np
import pytest

from vlmjax.recipes.coincide import miniature as M


def _record(n, pairs, describe=True):
    turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A red circle."}]
    turns = turns if describe else []
    for q, a in pairs:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": f"train_{n}", "image": f"train/{n}.png", "conversations": turns}


def test_pool_is_single_turn_questions_with_kind_and_template():
    records = {r["id"]: r for r in [
        _record(0, [("What color is the circle?", "Red"), ("Is there not a red shape?", "No"),
                    ("What shape is in the image?", "Circle")]),
        _record(1, [("Does the image contain a triangle?", "Yes")], describe=False),
        _record(2, [("Is a blue shape present?", "No")])]}
    pool = M.single_turn(records, (0, 2))
    assert [r["id"] for r in pool] == ["train_0_q0", "train_0_q1", "train_0_q2", "train_1_q0"]
    assert [r["kind"] for r in pool] == ["color", "yes/no", "shape", "yes/no"]
    assert [r["template"] for r in pool] == ["What color is the {shape}?", "Is there not a {color} shape?",
                                             "What shape is in the image?", "Does the image contain a {shape}?"]
    assert pool[1]["conversations"] == [{"from": "human", "value": "<image>\nIs there not a red shape?"},
                                        {"from": "gpt", "value": "No"}]
    assert all(r["image"] == "train/0.png" for r in pool[:3])
    with pytest.raises(KeyError, match="no record train_4"):
        M.single_turn(records, (4, 6))
    bad = {"train_0": _record(0, [("What is it?", "A red circle")])}
    with pytest.raises(ValueError, match="train_0.*multi-word"):
        M.single_turn(bad, (0, 1))


def test_packed_steps_counts_first_fit_batches():
    # rows of 10 tokens, 2 rows a batch: 5+5 | 5+5 per batch -> 4 samples a batch; 9 samples -> 3 batches
    assert M.packed_steps([5] * 9, rows=2, seq_len=10, max_images=99, seed=0) == 3
    # image slots bind first: 2 samples a batch
    assert M.packed_steps([5] * 9, rows=2, seq_len=10, max_images=2, seed=0) == 5
    # 7-token samples never share a row of 10: 2 a batch
    assert M.packed_steps([7] * 4, rows=2, seq_len=10, max_images=99, seed=3) == 2
    with pytest.raises(ValueError, match="11 tokens"):
        M.packed_steps([11], rows=2, seq_len=10, max_images=9, seed=0)


def test_balanced_oracle_gives_each_kind_an_equal_share_and_passes_on_what_a_kind_lacks():
    kinds = ["yes/no"] * 80 + ["color"] * 15 + ["shape"] * 5
    picked, budgets = M.balanced(kinds, 30, seed=0)
    assert budgets == {"color": 10, "shape": 5, "yes/no": 15}  # visited in name order; shape's shortfall goes on
    assert sum(budgets.values()) == 30 and len(set(picked)) == 30
    got = M.composition([kinds[i] for i in picked])
    assert got["shape"] == 5 / 30 and abs(got["color"] - budgets["color"] / 30) < 1e-12
    assert M.balanced(kinds, 30, seed=0) == (picked, budgets)


def test_purity_composition_gate_and_macro():
    pool = [{"kind": k, "template": t} for k, t in
            [("yes/no", "a"), ("yes/no", "a"), ("yes/no", "b"), ("color", "c"), ("color", "c"), ("shape", "d")]]
    assign = np.array([0, 0, 0, 1, 1, 1])
    # cluster 0: template a 2/3, kind 3/3; cluster 1: template c 2/3, kind color 2/3
    assert M.purity(assign, pool) == pytest.approx({"template": 4 / 6, "kind": 5 / 6})
    assert M.metrics({"accuracy": 0.8, "n": 10, "shape": 0.5, "color": 1.0, "yes/no": 0.9})["macro"] == pytest.approx(0.8)
    same = [{"composition": {"shape": 0.13, "color": 0.13, "yes/no": 0.74}}] * 2
    moved = [{"composition": {"shape": 0.30, "color": 0.30, "yes/no": 0.40}},
             {"composition": {"shape": 0.31, "color": 0.29, "yes/no": 0.40}}]
    pool_comp = {"shape": 0.13, "color": 0.13, "yes/no": 0.74}
    lines = M.composition_gate({"coincide 10%": moved, "random 10%": same}, (0.1,), pool_comp)
    assert "differs (shape, color, yes/no)" in lines[1]
    lines = M.composition_gate({"coincide 10%": same, "random 10%": same}, (0.1,), pool_comp)
    assert "does NOT differ" in lines[1]


@pytest.mark.slow
def test_quick_miniature_runs_every_arm_and_reruns_for_free(tmp_path, monkeypatch, tiny_mini_base):
    base = tiny_mini_base  # the suite's shared tiny base (conftest): 2 steps a stage of a tiny model
    # a 2-step tiny model's features differ only slightly (row cosines 0.9986-1), so k-means' centroids come out
    # within the collapse guard's 0.999 of each other; the guard is for identical centroids (a broken capture)
    from vlmjax.recipes.coincide import kmeans

    monkeypatch.setattr(kmeans, "COLLAPSE_COS", 1 - 1e-7)
    work = tmp_path / "co"
    kw = dict(seeds=(0,), budgets=(0.2,), quick=True, base=base)
    r = M.run(work, **kw)
    pool = json.loads((work / "data" / "pool.json").read_text())
    assert r["pool"]["n"] == len(pool) and {int(p["id"].split("_")[1]) for p in pool} == set(range(24))
    target = int(np.floor(0.2 * len(pool) + 0.5))
    for name in ("random 20%", "coincide 20%", "balanced 20%"):
        (sel,) = r["selections"][name]
        assert sel["target"] == target and abs(sum(sel["composition"].values()) - 1) < 1e-9
        (arm,) = r["arms"][name]
        assert arm["samples"] == target and arm["steps"] >= 1 and 0 <= arm["macro"] <= 1
    co = r["selections"]["coincide 20%"][0]
    assert sum(c["budget"] for c in co["clusters"]) == target and len(co["clusters"]) <= M.QUICK["k"]
    assert r["arms"]["full"][0]["samples"] == len(pool) and r["arms"]["full"][0]["select_s"] == 0.0
    assert r["arms"]["coincide 20%"][0]["select_s"] >= r["features"]["seconds"]
    meta = json.loads((work / "features" / "meta.json").read_text())
    assert meta["layers"] == [0] and meta["rows"] == len(pool)  # TINY: 1 decoder layer, every layer captured
    subset = json.loads((work / "select" / f"coincide_{target}" / "seed0" / "subset.json").read_text())
    assert len(subset) == target and set(subset[0]) == {"id", "image", "conversations"}
    assert r["gate"]["lines"][0].startswith("COINCIDE gate 1") and "gate 2 at 20%" in r["composition_gate"][1]
    rep = M.report_runs(work, r, **kw)
    assert "| coincide 20% | 1 |" in rep["tables"]["20%"] and "| pool | 1 |" in rep["composition_table"]
    from PIL import Image

    for path in rep["figures"].values():
        assert Image.open(path).size[0] > 0
    saved = json.loads((work / "results" / "miniature.json").read_text())
    assert saved["meta"]["commit"] and saved["arms"]["full"][0]["steps"] == r["arms"]["full"][0]["steps"]
    # a rerun finds every step done: nothing is trained or selected again
    import vlmjax.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("an arm was trained again"))
    monkeypatch.setattr(M.S, "select_clusters", lambda *a, **k: pytest.fail("selected again"))
    again = M.run(work, **kw)
    assert again["arms"] == r["arms"]
