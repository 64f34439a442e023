"""VILA miniature (issue 19), first slice: the data builders against hand-made examples, the unigram reference
against a hand computation, and one CI-sized run of text LM -> gate -> align -> arms on the suite's tiny base."""

import json
import math
import os

import numpy as np
import pytest

from vlmjax.recipes.vila import mini_data as M


def test_fact_qa_letters_and_splits():
    items = {f["id"]: f for f in M.facts()}
    tri = items["triangle_corners"]
    assert tri["statements"][0] == "A triangle has three corners."
    assert tri["choices"] == ["four", "no", "three"] and tri["question"] == "How many corners does a triangle have?"
    qa = {q["id"]: q for q in M.fact_qa(list(items.values()))}
    assert qa["triangle_corners"]["answer"] == "C"
    assert qa["circle_corners"]["answer"] == "B"  # "no" corners
    assert items["blue_thing"]["statements"][0] == "The sky is blue." and "blue" in items["blue_thing"]["choices"]
    for q in qa.values():
        assert q["choices"][ord(q["answer"]) - 65] == items[q["id"]]["answer"] and q["split"] in ("blend", "eval")
    assert 0 < sum(q["split"] == "eval" for q in qa.values()) < len(qa)  # both halves non-empty
    blend = {r["id"]: r["conversations"] for r in M.blend_records(list(qa.values()))}
    assert len(blend) == sum(q["split"] == "blend" for q in qa.values())
    assert qa["triangle_corners"]["split"] == "blend"  # the crc32 split is fixed
    assert blend["qa_triangle_corners"] == [{"from": "human", "value": "How many corners does a triangle have?"},
                                            {"from": "gpt", "value": "three"}]
    assert all(len(c) == 2 and "<image>" not in c[0]["value"] for c in blend.values())  # text-only
    with pytest.raises(ValueError, match="not among its choices"):
        M.fact_qa([{"id": "x", "question": "?", "answer": "five", "choices": ["one", "two"]}])


def test_clipart_sentences_and_split():
    assert M.clipart_sentences("Baby_Tux", "animals", ["penguin", "tux", "Baby_Tux", "animal", "linux", "x"]) == [
        "Baby Tux is a drawing in the animals collection.", "It is tagged penguin, tux, Baby_Tux and animal."]
    assert M.clipart_sentences("Frog", "animals", ["frog", "green"]) == [
        "Frog is a drawing in the animals collection.", "It is tagged green."]
    assert M.clipart_sentences("Box", "containers", []) == ["Box is a drawing in the containers collection."]
    clip = [{"id": f"c/{i}", "title": f"T{i}", "category": "c", "keywords": ["k"]} for i in range(400)]
    docs = M.corpus(clip, M.facts())
    assert docs[0]["text"] == "T0 is a drawing in the c collection. It is tagged k."
    train, held = M.split_corpus(docs)
    assert len(train) + len(held) == len(docs) and 0.05 < len(held) / 400 < 0.15
    assert all(not d["id"].startswith("fact:") for d in held)  # every fact is trained
    assert M.split_corpus(docs) == (train, held)  # deterministic
    dup = clip[:3] + [{**clip[0], "id": "d/0"}]  # the same drawing under another name: kept once
    assert [d["id"] for d in M.corpus(dup, [])] == ["clip:c/0", "clip:c/1", "clip:c/2"]
    assert M.spread(list(range(10)), 3) == [0, 3, 6] and M.spread([1, 2], 5) == [1, 2]
    assert M.verbatim_fraction(M.corpus(clip[:2], []), M.corpus(clip[2:4], [])) == 0.0
    assert M.verbatim_fraction([{"sentences": ["a.", "b."]}], [{"sentences": ["b."]}, {"sentences": ["c."]}]) == 0.5


def test_documents_place_each_image_before_its_caption():
    from vlmjax.data.formats import PLACEHOLDER, parse_interleaved

    ims = [{"id": f"i{k}", "image": f"{k}.png", "caption": f"Caption {k}."} for k in range(14)]
    sents = [f"Sentence {k}." for k in range(5)]
    docs = M.make_documents(ims, sents, np.random.default_rng(0))
    assert [im["image"] for d in docs for im in d["image_info"]] == [im["image"] for im in ims]  # each once, in order
    for d in docs:
        assert 3 <= len(d["image_info"]) <= 8  # 3-6, a short tail joins the previous document
        for im in d["image_info"]:
            k = int(im["image"].split(".")[0])
            assert d["text_list"][im["matched_text_index"]] == f"Caption {k}."
            assert d["text_list"][im["matched_text_index"] - 1] in sents  # a C sentence before each image
        assert d["text_list"][-1] in sents
        ex = parse_interleaved(d, max_images=8)
        text = ex.messages[0]["content"]
        assert text.count(PLACEHOLDER) == len(d["image_info"]) == len(ex.images)
        for im in d["image_info"]:
            assert PLACEHOLDER + d["text_list"][im["matched_text_index"]] in text
    pairs = M.pairs_of(docs)
    assert [(p["image"], p["caption"]) for p in pairs] == [(im["image"], im["caption"]) for im in ims]
    with pytest.raises(ValueError, match="no C sentences"):
        M.make_documents(ims, [], np.random.default_rng(0))


def test_unigram_perplexity_matches_hand_computation():
    train, test = [[1, 1, 2], [3]], [[0, 1, 3], [2]]
    # counts over V=4: [0, 2, 1, 1] + 1 -> [1, 3, 2, 2] / 8; predicted: 1 and 3 (first tokens and 1-token docs not)
    ref = math.exp(-(math.log(3 / 8) + math.log(2 / 8)) / 2)
    assert M.unigram_perplexity(train, test, 4) == pytest.approx(ref)
    with pytest.raises(ValueError, match="no test token"):
        M.unigram_perplexity(train, [[1]], 4)


def test_gate_and_forgetting_lines():
    from vlmjax.recipes.vila.miniature import forgetting_line, text_gate

    assert text_gate(10.0, 40.0)[0] and not text_gate(30.0, 40.0)[0]
    assert "FAIL" in text_gate(30.0, 40.0)[1]
    rows = {"text LM": {"perplexity": 10.0}, "(b) pairs": {"perplexity": 14.0}}
    assert forgetting_line(rows).startswith("forgetting present")
    rows["(b) pairs"]["perplexity"] = 10.2
    assert forgetting_line(rows).startswith("forgetting ABSENT")


@pytest.mark.slow
def test_quick_run_text_lm_gate_align_arms_sft(tmp_path, tiny_mini_base):
    if not os.path.isdir(M.OPENCLIPART_SVG):
        pytest.skip(f"openclipart metadata missing: {M.INSTALL}")
    from train_utils import TINY_MINI

    from vlmjax.recipes.vila.miniature import METRICS, run, run_seeds

    small = {"data.batch_size": 2, "data.max_images": 8}
    over = {"text_lm": {**TINY_MINI, "data.max_images": 1}, "align": small, "pretrain_frozen": small,
            "pretrain_pairs": small, "pretrain_docs": small, "sft": {**small, "data.seq_len": 128}}
    kw = dict(quick=True, base=tiny_mini_base, over=over, arms=("a", "b", "d"),
              data_kw=dict(n_easy=10, n_clipart=30, n_clipart_images=2, scan_limit=60, n_sft=6))
    rep = run_seeds(tmp_path / "vila", seeds=(0,), figures=tmp_path / "figs", **kw)
    r = json.loads((tmp_path / "vila" / "seed0" / "results" / "miniature.json").read_text())
    rows = r["rows"]
    assert rep["per_seed"]["(b) pairs"][0]["perplexity"] == rows["(b) pairs"]["perplexity"]
    assert rep["gates_passed"] == [False] and "| (b) pairs | 1 |" in rep["table"]
    pre = ["text LM", "align (LLM frozen)", "(a) pairs, LLM frozen", "(b) pairs", "(d) interleaved documents"]
    sft = ["SFT after (a)", "LLM frozen throughout", "SFT after (b)", "SFT after (d)", "SFT after (d) + text blend"]
    assert list(rows) == pre + sft
    assert all(np.isfinite(v["perplexity"]) and v["perplexity"] > 1 for v in rows.values())
    # the LLM is frozen in align and in arm (a), and throughout: text perplexity and text-only fact QA are the text
    # LM's, exactly
    for k in ("align (LLM frozen)", "(a) pairs, LLM frozen"):
        assert rows[k]["perplexity"] == rows["text LM"]["perplexity"]
        assert rows[k]["fact_qa"] == rows["text LM"]["fact_qa"]
    assert rows["LLM frozen throughout"]["perplexity"] == rows["text LM"]["perplexity"]
    assert rows["(b) pairs"]["perplexity"] != rows["text LM"]["perplexity"]
    seed0 = tmp_path / "vila" / "seed0"
    blend = json.loads((seed0 / "sft_sft_after_d_text_blend" / "config.json").read_text())["data"]["sources"]
    assert [(os.path.basename(s["path"]), s["weight"]) for s in blend] == [("sft.json", 0.8), ("fact_blend.json", 0.2)]
    frozen = json.loads((seed0 / "sft_llm_frozen_throughout" / "config.json").read_text())["train"]["trainable"]
    assert frozen == ["^projector/"]
    for k in pre[1:]:
        assert {"caption_0shot", "caption_4shot"} <= set(rows[k]) and "caption_0shot" not in rows["text LM"]
    for k in sft:
        assert {"fact_qa", "accuracy", "shape", "color", "yes/no", "describe_both"} <= set(rows[k])
    assert all(0 <= v[m] <= 1 for v in rows.values() for m in METRICS[1:] if m in v)
    assert r["gate"]["passed"] is False and "FAIL" in r["gate"]["line"]  # a few steps learn no text
    data = tmp_path / "vila" / "seed0" / "data"
    assert r["data"]["images"] == 12 and r["data"]["pairs"] == 12 and r["data"]["sft"] == 6
    docs = [json.loads(line) for line in (data / "docs.jsonl").read_text().splitlines()]
    assert all((data / "images" / im["image"]).exists() for d in docs for im in d["image_info"])
    cap4 = json.loads((tmp_path / "vila" / "seed0" / "results" / "b_pairs" / "caption_4shot.json").read_text())
    assert cap4["shots"] == 4 and cap4["n"] == 16
    saved = json.loads((tmp_path / "vila" / "results" / "miniature.json").read_text())
    assert saved["rows"]["(b) pairs"]["perplexity"]["mean"] == rows["(b) pairs"]["perplexity"]
    assert "commit" in saved["meta"] and "commit" in r["meta"]
    assert "| SFT after (d) + text blend | 1 |" in saved["table_sft"]
    assert any(c["a"] == "(b) pairs caption_4shot" and "p" not in c for c in saved["comparisons"])
    assert {"perplexity", "fact_qa", "shots", "sft", "losses"} == set(saved["figures"])
    assert all((tmp_path / "figs" / f"{k}.png").stat().st_size > 1000 for k in saved["figures"])
    assert set(r["stages"]) == {"text_lm", "align", "arm_a", "arm_b", "arm_d", "sft_sft_after_a",
                                "sft_llm_frozen_throughout", "sft_sft_after_b", "sft_sft_after_d",
                                "sft_sft_after_d_text_blend"}
    assert run(tmp_path / "vila" / "seed0", **kw)["rows"] == rows  # a rerun finds every step done


def test_fact_task_reads_the_split_as_text_options(tmp_path):
    from vlmjax.recipes.vila import mini_eval

    qa = M.fact_qa(M.facts())
    path = tmp_path / "fact_qa.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qa))
    task = mini_eval.fact_task(path, template="plain")
    assert [s.id for s in task.samples] == [q["id"] for q in qa if q["split"] == "eval"]
    assert (task.method, task.option_format, task.normalize, task.template) == ("loglik", "text", "mean", "plain")
    s = task.samples[0]
    truth = {f["id"]: f["answer"] for f in M.facts()}
    assert s.image is None and s.choices[ord(s.answers[0]) - 65] == truth[s.id]
    assert len(mini_eval.fact_task(path, split="all").samples) == len(qa)
    path.write_text(json.dumps({**qa[0], "answer": "D", "split": "eval"}) + "\n")
    with pytest.raises(ValueError, match="not a letter of its 3 choices"):
        mini_eval.fact_task(path)
    with pytest.raises(ValueError, match="no fact QA items"):
        mini_eval.fact_task(path, split="blend")


def test_comparisons_match_a_hand_welch():
    from vlmjax.eval import report
    from vlmjax.recipes.vila import mini_report

    a, b = [20.0, 22.0, 24.0], [11.0, 11.5, 12.0]
    agg = report.aggregate({"(b) pairs": [{"perplexity": x, "caption_0shot": 0.5, "caption_4shot": y}
                                          for x, y in zip(a, (0.1, 0.2, 0.3))],
                            "text LM": [{"perplexity": x} for x in b]})
    comps = {c["a"]: c for c in mini_report.comparisons(agg)}
    c = comps["(b) pairs perplexity"]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3  # Welch by hand
    assert c["t"] == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(va + vb))
    assert c["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2))
    assert c["diff"] == pytest.approx(10.5) and c["exceeds_spread"] and c["p"] < 0.05
    shots = comps["(b) pairs caption_4shot"]  # 4-shot vs the same row's 0-shot
    assert shots["b"] == "(b) pairs caption_0shot" and shots["diff"] == pytest.approx(-0.3)
    assert len(comps) == 2  # comparisons whose rows are missing are left out
    assert "exceeds the spread" in mini_report.comparison_lines([c])[0]


def test_collection_facts_ask_what_the_training_text_states():
    clip = [{"id": f"{cat}/{t}", "title": t, "category": cat, "keywords": []} for cat, t in
            [("animals", "Baby_Tux"), ("buildings", "Old House"), ("food", "Red Apple"), ("tools", "Hammer"),
             ("animals", "Twin"), ("food", "Twin"), ("plants", "Held Fern")]]
    docs = M.corpus(clip, [])
    train = [d for d in docs if d["id"] != "clip:plants/Held Fern"]  # held out: never asked
    items = {f["id"]: f for f in M.collection_facts(clip, train, n=None)}
    # "Twin" is filed under two categories: ambiguous, left out; underscores read as spaces, as C's sentence does
    assert set(items) == {"collection:animals/Baby_Tux", "collection:buildings/Old House", "collection:food/Red Apple",
                          "collection:tools/Hammer"}
    tux = items["collection:animals/Baby_Tux"]
    assert tux["question"] == "Which collection is the drawing Baby Tux in?" and tux["answer"] == "animals"
    assert "Baby Tux is a drawing in the animals collection." in M.corpus(clip, [])[0]["sentences"]
    for f in items.values():
        assert len(f["choices"]) == 3 and f["answer"] in f["choices"] and f["choices"] == sorted(f["choices"])
    assert len(M.collection_facts(clip, train, n=2)) == 2
    qa = M.fact_qa(list(items.values()))
    assert all(q["choices"][ord(q["answer"]) - 65] == items[q["id"]]["answer"] for q in qa)


def test_a_limited_clipart_scan_spans_the_collections():
    if not os.path.isdir(M.OPENCLIPART_SVG):
        pytest.skip(f"openclipart metadata missing: {M.INSTALL}")
    rows = M.scan_clipart(limit=60)
    cats = {r["category"] for r in rows}
    assert len(rows) == 60 and len(cats) >= 3, cats
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
