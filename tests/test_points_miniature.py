"""The POINTS miniature (vlmjax.recipes.points.miniature / .pool): the noisy pool's exact shares and noise forms, the
AUC against a brute-force count, kept fractions, equal presentations, the arms' selections, and (slow) the whole
--part filter --quick pipeline end to end on a tiny base."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vlmjax.recipes.points import pool as PP

SVG = """<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
 xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"><metadata><rdf:RDF><cc:Work>
<dc:title>{title}</dc:title><dc:subject><rdf:Bag><rdf:li>{title}</rdf:li><rdf:li>winter</rdf:li><rdf:li>vehicle</rdf:li>
<rdf:li>snow</rdf:li></rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata></svg>"""


def fake_openclipart(root: Path, n: int) -> Path:
    (root / "svg" / "transportation").mkdir(parents=True)
    for i in range(n):
        (root / "svg" / "transportation" / f"sledge_{i}.svg").write_text(SVG.format(title=f"Sledge number {i}"))
    return root


def fake_truth(path: Path, n: int) -> Path:
    from vlmjax.data.easy_vqa import COLORS, SHAPES

    rows = [{"id": f"train_{i}", "image": f"train/{i}.png", "color": COLORS[i % 8], "shape": SHAPES[i % 3]}
            for i in range(n)]
    rows[5]["shape"] = None  # an image whose shape the questions do not determine: left out of the pool
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_noise_counts_are_exact_largest_remainder():
    assert PP.noise_counts(9000) == {"clean": 2700, "mismatched": 2700, "obscure": 1800, "openclipart": 1350,
                                     "generic": 450}
    # 57 slots: raw 17.1 / 17.1 / 11.4 / 8.55 / 2.85 -> floors 17+17+11+8+2 = 55; the two largest remainders
    # (generic .85, openclipart .55) get one more each
    assert PP.noise_counts(57) == {"clean": 17, "mismatched": 17, "obscure": 11, "openclipart": 9, "generic": 3}
    for n in (1, 7, 100, 8941):
        assert sum(PP.noise_counts(n).values()) == n


def test_pool_has_each_kind_of_noise_as_specified(tmp_path):
    from vlmjax.data.easy_vqa import caption

    truth = fake_truth(tmp_path / "truth.jsonl", 40)
    info = PP.build_pool(truth, tmp_path / "pool.jsonl", images=(0, 40),
                         openclipart_root=fake_openclipart(tmp_path / "oc", 30))
    rows = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert info["images"] == 39 and info["skipped_images"] == 1 and len(rows) == 117 == info["pairs"]
    assert not any(r["image"] == "train/5.png" for r in rows)
    counts = {k: sum(r["noise"] == k for r in rows) for k in PP.KINDS}
    assert counts == PP.noise_counts(117) == info["counts"]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        j = int(r["id"].rsplit("_c", 1)[1])
        clean = caption(r, j)
        if r["noise"] == "clean":
            assert r["caption"] == clean
        elif r["noise"] == "mismatched":  # another image's caption that is really wrong for this image
            words = re.findall(r"[a-z]+", r["caption"].lower())
            assert not (r["color"] in words and r["shape"] in words)
        elif r["noise"] == "obscure":
            assert r["caption"].startswith(clean.rstrip(".") + ", ") and re.search(r"\d", r["caption"])
        elif r["noise"] == "openclipart":
            assert re.fullmatch(r"Clip art of Sledge number \d+, tagged winter, vehicle\.", r["caption"])
        else:
            assert r["caption"] in PP.GENERIC
    clip = [r["caption"] for r in rows if r["noise"] == "openclipart"]
    assert len(set(clip)) == len(clip)
    again = PP.build_pool(truth, tmp_path / "pool2.jsonl", images=(0, 40),
                          openclipart_root=tmp_path / "oc")  # the same seed: the same pool
    assert (tmp_path / "pool2.jsonl").read_text() == (tmp_path / "pool.jsonl").read_text() and again == info


def test_missing_openclipart_says_how_to_install(tmp_path):
    with pytest.raises(PP.MissingOpenclipart, match=re.escape(PP.INSTALL)):
        PP.openclipart_captions(3, root=tmp_path)


def test_obscure_tails_carry_serials():
    rng = np.random.default_rng(0)
    tails = [PP.obscure_tail(rng) for _ in range(30)]
    assert all(re.match(r"(SKU \d{4}-[A-Z] rev \d\.\d|part no\. \d\d-\d{4} v\d\.\d\.\d|model [A-Z]{2}-\d{3} "
                        r"build \d{4})$", t) for t in tails)
    assert PP.with_tail("A teal triangle.", "SKU 4471-B rev 2.3") == "A teal triangle, SKU 4471-B rev 2.3."


def test_auc_matches_a_brute_force_count_with_ties():
    rng = np.random.default_rng(1)
    hi, lo = rng.integers(0, 6, 17).astype(float), rng.integers(0, 4, 11).astype(float)
    brute = np.mean([(h > w) + 0.5 * (h == w) for h in hi for w in lo])
    assert PP.auc(hi, lo) == pytest.approx(brute)
    assert PP.auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and PP.auc([1.0], [2.0]) == 0.0 and PP.auc([2.0], [2.0]) == 0.5
    with pytest.raises(ValueError, match="both sides"):
        PP.auc([], [1.0])


def test_corpus_ppl_weighs_every_token_alike():
    scores = [{"sum_logprob": -2.0, "num_tokens": 2}, {"sum_logprob": -12.0, "num_tokens": 4}]
    assert PP.corpus_ppl(scores) == pytest.approx(np.exp(14.0 / 6))  # not the mean of e^1 and e^3
    with pytest.raises(ValueError, match="no scored tokens"):
        PP.corpus_ppl([])


def test_kept_by_noise_and_equal_presentations():
    pool = [{"id": f"p{i}", "noise": k} for i, k in enumerate(["clean"] * 4 + ["mismatched"] * 4 + ["generic"] * 2)]
    kept = PP.kept_by_noise(pool, ["p0", "p1", "p2", "p8"])
    assert kept["clean"] == {"kept": 0.75, "share": 0.75} and kept["generic"] == {"kept": 0.5, "share": 0.25}
    assert kept["mismatched"]["kept"] == 0.0 and kept["obscure"] == {"kept": 0.0, "share": 0.0}
    recs = list(range(7))
    shown = PP.presentations(recs, 25, seed=3)
    assert len(shown) == 25 and sorted(set(np.bincount(shown))) == [3, 4] and sum(np.bincount(shown) == 4) == 4
    assert shown == PP.presentations(recs, 25, seed=3) and shown != PP.presentations(recs, 25, seed=4)


def test_arms_select_by_ppl_at_random_and_by_truth():
    from vlmjax.recipes.points.miniature import arm_records, scorer_gate

    kinds = ["clean", "mismatched", "obscure", "openclipart", "generic"] * 4
    pool = [{"id": f"p{i:02d}", "noise": k} for i, k in enumerate(kinds)]
    ppl = {r["id"]: {"clean": 2.0, "generic": 3.0, "obscure": 9.0, "mismatched": 20.0, "openclipart": 50.0}[r["noise"]]
           + int(r["id"][1:]) / 100 for r in pool}
    low = arm_records("lowest-PPL 20%", pool, ppl, 0)
    assert [r["id"] for r in low] == ["p00", "p05", "p10", "p15"]  # floor(0.2 x 20) = 4 lowest
    assert {r["noise"] for r in arm_records("highest-PPL 20%", pool, ppl, 0)} == {"openclipart"}
    assert len(arm_records("random 20%", pool, ppl, 0)) == 4
    assert arm_records("random 20%", pool, ppl, 0) != arm_records("random 20%", pool, ppl, 1)
    assert {r["noise"] for r in arm_records("clean only (oracle)", pool, ppl, 0)} == {"clean"}
    assert arm_records("all pairs", pool, ppl, 0) == pool
    with pytest.raises(ValueError, match="unknown arm"):
        arm_records("nope", pool, ppl, 0)
    ok, lines, info = scorer_gate(pool, ppl)
    assert ok and info["auc_vs_clean"]["mismatched"] == 1.0 and "AUC 1.000 ok" in lines[0]
    ok, lines, _ = scorer_gate(pool, {k: 1.0 for k in ppl})
    assert not ok and "FAIL" in lines[0]


@pytest.fixture(scope="module")
def tiny_base(tiny_mini_base):
    """The suite's shared tiny mini base (conftest; its data folder holds every easy-vqa train image, its SFT'd model
    scores) and the stage overrides it was built with."""
    from train_utils import TINY_MINI

    return tiny_mini_base, TINY_MINI


@pytest.mark.slow
def test_quick_filter_pipeline_end_to_end(tiny_base, tmp_path):
    if not (Path(PP.OPENCLIPART_ROOT) / "svg").is_dir():
        pytest.skip(f"openclipart-svg is not installed ({PP.OPENCLIPART_ROOT}/svg): {PP.INSTALL} (as root)")
    from vlmjax.recipes.points.miniature import run_filter

    base, tiny = tiny_base
    arms = ("all pairs", "lowest-PPL 20%")
    out = run_filter(tmp_path / "w", base=base, stage_over=tiny, quick=True, seeds=(0,), arms=arms,
                     presentations=40, pool_images=(0, 60), figures=False)
    # the pool, every pair scored, the lowest 20% kept by points.filter.select
    assert out["pool"]["pairs"] == 3 * out["pool"]["images"] and out["pool"]["images"] >= 55
    rep = out["filter_report"]
    assert rep["scored"] == out["pool"]["pairs"] and rep["kept"] == int(0.2 * rep["scored"]) and rep["failed"] == {}
    kept = [json.loads(line) for line in (tmp_path / "w" / "filter" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == rep["kept"] and [r["ppl"] for r in kept] == sorted(r["ppl"] for r in kept)
    low = out["kept_by_noise"]["lowest-PPL 20%"]
    assert sum(v["share"] for v in low.values()) == pytest.approx(1.0)
    # the gates are recorded; each arm saw exactly the planned presentations and was evaluated
    assert "scorer gate" in out["scorer_gate"]["lines"][0] and "mismatched" in out["scorer_gate"]["auc_vs_clean"]
    assert "mini base gate" in out["gate"]["lines"][0]
    assert {s["presentations"] for s in out["stages"].values()} == {40}
    for arm in arms:
        (row,) = out["per_seed"][arm]
        assert 0 <= row["describe_both"] <= 1 and row["heldout_ppl"] > 1
    assert "| all pairs | 1 |" in out["table"]
    saved = json.loads((tmp_path / "w" / "results" / "filter.json").read_text())
    assert saved["meta"]["commit"] is not None and saved["config"]["presentations"] == 40
