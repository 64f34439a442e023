"""Evaluation metrics against hand-computed values, task-file loaders, and the easy-vqa benchmark end to end."""

import base64
import io
import json
import math

import numpy as np
import pytest

from vlmjax.eval import tasks
from vlmjax.eval.answers import (exact_match, extract_choice, extract_yes_no, first_vocab_answer, normalize_answer,
                                 vqa_accuracy, yes_no_metrics)
from vlmjax.eval.caption import bleu, cider_d
from vlmjax.eval.runner import format_table, score


def test_vqa_normalisation():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("  A man's hat.\n") == "man's hat"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("1,000") == "1000"  # comma inside a number: removed, not spaced
    assert normalize_answer("red,blue") == "red blue"  # otherwise punctuation becomes a space
    assert normalize_answer("3.5 feet.") == "3.5 feet"  # a period before a digit stays
    assert normalize_answer("None") == "0"
    assert exact_match("Two.", ["2"]) == 1.0 and exact_match("three", ["2", "4"]) == 0.0


def test_vqa_soft_accuracy():
    gold = ["2"] * 3 + ["3"] * 7
    # leave-one-out: 3 subsets drop a "2" (2 left -> 2/3), 7 keep all three (-> 1): (3*2/3 + 7) / 10
    assert vqa_accuracy("two", gold) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("two", gold, leave_one_out=False) == 1.0
    assert vqa_accuracy("3", gold) == 1.0
    # one human: min(1, 1/3) leaving none out; LOO: 9 subsets keep it (1/3), 1 drops it (0) -> 0.3
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one, leave_one_out=False) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("bird", one) == 0.0


def test_choice_extraction():
    ch = ["red circle", "blue square", "green triangle"]
    cases = {"B": 1, "(C)": 2, "C. green triangle": 2, "A": 0, "The answer is C.": 2, "Answer: (b)": 1,
             "I think B is right": 1, "blue square": 1, "It is a green triangle.": 2, "A red circle.": 0,
             "none of them": None, "D": None}
    for text, want in cases.items():
        assert extract_choice(text, ch) == want, text
    assert extract_choice("E", ch + ["x", "y"]) == 4
    assert extract_choice("square", ["square", "blue square"]) == 0  # exact word match only for the shorter
    assert extract_choice("a blue square", ["square", "blue square"]) == 1  # longest option text wins


def test_yes_no_extraction_and_metrics():
    assert [extract_yes_no(t) for t in ["Yes, there is.", "No.", "There is not a dog.", "I see a dog", "no yes"]] \
        == ["yes", "no", "no", "yes", "no"]
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    gold = ["yes", "no", "no", "yes", "yes", "no"]
    m = yes_no_metrics(preds, gold)  # TP=2 FP=1 TN=2 FN=1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.5)


def test_bleu_hand_computed():
    # p1 = 5/6 (one "the" clipped), p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths -> BP = 1
    assert bleu(["The cat sat on the mat."], [["the cat sat on a mat"]]) == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
    # brevity penalty: c = 2 < r = 3 -> exp(1 - 3/2); p1 = p2 = 1
    assert bleu(["the cat"], [["the cat sat"]], max_n=2) == pytest.approx(math.exp(-0.5), rel=1e-6)
    # closest reference length, ties -> the shorter: c = 3, refs 2 and 4 -> r = 2, no penalty
    assert bleu(["a b c"], [["a b", "a b c d"]], max_n=1) == pytest.approx(1.0)
    # corpus level: counts pooled over sentences (p1 = (2 + 0) / (2 + 2)), c = r = 4
    assert bleu(["a b", "c d"], [["a b"], ["e f"]], max_n=1) == pytest.approx(0.5)
    assert bleu(["x y z w"], [["a b c d"]]) < 1e-6


def test_cider_d_hand_computed():
    # N = 2 images; "a" is in both (idf 0), "cat"/"a cat" in one (idf log 2): identical vectors in n = 1, 2, empty
    # for n = 3, 4 -> per-image score 10 * (1 + 1 + 0 + 0) / 4 = 5
    score_, per = cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert per == pytest.approx([5.0, 5.0]) and score_ == pytest.approx(5.0)
    # "a cat cat" vs "a cat": n=1 weights (cat: 2 log2 vs log2) clipped -> log2*log2 / (2log2 * log2) = 1/2;
    # n=2 {"a cat", "cat cat"} (both idf log2) vs {"a cat"} -> 1/sqrt(2); bigram counts 2 vs 1 -> exp(-1/72)
    _, per = cider_d(["a cat cat", "a dog"], [["a cat"], ["a dog"]])
    assert per[0] == pytest.approx(10 * (0.5 + 2 ** -0.5) / 4 * math.exp(-1 / 72))
    # two references: the score averages over them
    _, per = cider_d(["a cat", "a dog"], [["a cat", "x y"], ["a dog"]])
    assert per[0] == pytest.approx(5.0 / 2)


def test_score_per_kind():
    s = tasks.EvalSample
    vqa = tasks.Task("v", "vqa", [s("1", "q", ["two"] * 3 + ["2"] * 7), s("2", "q", ["red"] * 10)])
    m, rows = score(vqa, {"1": "2", "2": "Blue."})
    assert m["metric"] == "vqa_accuracy" and m["accuracy"] == pytest.approx(0.5) and len(rows) == 2
    ev = tasks.Task("e", "vqa", [s("1", "q", ["circle"]), s("2", "q", ["no"])], vocab=["circle", "no", "yes"])
    m, rows = score(ev, {"1": "It is a circle.", "2": "Yes"})
    assert m["metric"] == "exact_match" and m["accuracy"] == 0.5 and rows[0]["answer"] == "circle"
    mc = tasks.Task("m", "mc", [s("1", "q", ["B"], choices=["x", "y"]), s("2", "q", ["A"], choices=["x", "y"])])
    m, _ = score(mc, {"1": "B", "2": "hmm"})
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1
    yn = tasks.Task("p", "yesno", [s("1", "q", ["yes"]), s("2", "q", ["no"])])
    m, _ = score(yn, {"1": "Yes", "2": "Yes"})
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 1.0
    cap = tasks.Task("c", "caption", [s("1", "", ["a cat"]), s("2", "", ["a dog"])])
    m, _ = score(cap, {"1": "a cat", "2": "a dog"})
    assert m["cider_d"] == pytest.approx(5.0) and "bleu4" in m
    assert "v " in format_table([score(vqa, {})[0]]) and first_vocab_answer("Red, not blue", ["blue", "red"]) == "red"


def _png_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_loaders_read_the_usual_layouts(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"question_id": 7, "image_id": 42, "question": "How many?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 7, "answer_type": "number", "answers": [{"answer": "2"}] * 10}]}))
    t = tasks.vqav2(tmp_path / "q.json", tmp_path / "a.json", "/coco")
    assert t.samples[0].image == "/coco/COCO_val2014_000000000042.jpg" and t.samples[0].answers == ["2"] * 10
    assert t.prompt(t.samples[0]) == "<image>\nHow many?\n" + tasks.PROMPTS["vqa"]
    (tmp_path / "tv.json").write_text(json.dumps({"data": [{"question_id": 1, "question": "What brand?",
                                                            "image_id": "abc", "answers": ["nike"] * 10}]}))
    assert tasks.textvqa(tmp_path / "tv.json", "/tv").samples[0].image == "/tv/abc.jpg"
    (tmp_path / "problems.json").write_text(json.dumps({
        "11": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "", "image": None,
               "split": "test"},
        "12": {"question": "What colour?", "choices": ["red", "blue", "green"], "answer": 0, "hint": "Look.",
               "image": "image.png", "split": "test"},
        "13": {"question": "x", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "train"}}))
    t = tasks.scienceqa(tmp_path / "problems.json", "/sqa")
    assert [x.id for x in t.samples] == ["11", "12"] and t.samples[0].answers == ["B"] and t.samples[0].image is None
    assert t.samples[1].image == "/sqa/test/12/image.png"
    assert t.prompt(t.samples[1]).startswith("<image>\nContext: Look.\nWhat colour?\nA. red\nB. blue\nC. green\n")
    tsv = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    tsv += f"5\tWhat is it?\tnan\tcat\tdog\t\t\tB\tanimals\t{base64.b64encode(_png_bytes()).decode()}\n"
    (tmp_path / "mmb.tsv").write_text(tsv)
    t = tasks.mmbench(tmp_path / "mmb.tsv")
    assert t.samples[0].choices == ["cat", "dog"] and t.samples[0].answers == ["B"]
    assert t.samples[0].image == _png_bytes() and t.samples[0].question == "What is it?\nA. cat\nB. dog"
    (tmp_path / "pope.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "Is there a dog?", '
                                        '"label": "No"}\n')
    t = tasks.pope(tmp_path / "pope.json", "/coco")
    assert t.kind == "yesno" and t.samples[0].answers == ["no"] and t.samples[0].image == "/coco/x.jpg"
    (tmp_path / "caps.json").write_text(json.dumps({"images": [{"id": 3, "file_name": "3.jpg"}], "annotations": [
        {"image_id": 3, "caption": "A cat."}, {"image_id": 3, "caption": "A kitten."}]}))
    t = tasks.coco_captions(tmp_path / "caps.json", "/coco")
    assert t.samples[0].answers == ["A cat.", "A kitten."] and t.prompt(t.samples[0]) == \
        "<image>\n" + tasks.PROMPTS["caption"]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 9, "sentences": [{"raw": "A dog."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "cocoid": 8, "sentences": [{"raw": "x"}]}]}))
    t = tasks.coco_captions(tmp_path / "karpathy.json", "/coco")
    assert [(x.id, x.image, x.answers) for x in t.samples] == [("9", "/coco/val2014/a.jpg", ["A dog."])]
    t = tasks.easy_vqa(n=10)
    assert len(t.samples) == 10 and len({x.image for x in t.samples}) == 10 and "circle" in t.vocab
    assert t.prompt(t.samples[0]) == "<image>\n" + t.samples[0].question and t.samples[0].question[0].isupper()


def test_easy_vqa_benchmark_end_to_end(tmp_path):
    from test_generate import smol_vlm

    from vlmjax.convert import hf
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.eval import easy_vqa_accuracy
    from vlmjax.eval.__main__ import main

    tok, model = smollm2_tokenizer(), smol_vlm()
    res = easy_vqa_accuracy(model, tok, model.cfg, n=6, batch_size=4)
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0 and res["task"] == "easy_vqa_test"
    hf.save_vlm(model, tmp_path / "m", tokenizer=tok)
    out = tmp_path / "res"
    assert main(["--model", str(tmp_path / "m"), "--out", str(out), "--batch-size", "4", "easy_vqa", "--n", "6"]) == 0
    saved = json.loads((out / "easy_vqa_test_results.json").read_text())
    assert saved["accuracy"] == pytest.approx(res["accuracy"])  # same greedy answers from the exported model
    preds = [json.loads(x) for x in (out / "easy_vqa_test_predictions.jsonl").read_text().splitlines()]
    scored = [json.loads(x) for x in (out / "easy_vqa_test_scored.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and len(scored) == 6 and {"prediction", "answer", "gold"} <= set(scored[0])
    assert np.mean([r["exact_match"] for r in scored]) == pytest.approx(saved["accuracy"])
