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


# --- evaluation modes: k-shot, plain template, option log-likelihood, perplexity, per-kind breakdowns ---------------

def _render_ids(tok, text, image_id, tokens_per_image):
    """Independent tokenisation of a rendered prompt: text pieces between <image> placeholders, image ids spliced."""
    ids = []
    for j, part in enumerate(text.split("<image>")):
        ids += [image_id] * tokens_per_image if j else []
        ids += tok(part, add_special_tokens=False)["input_ids"] if part else []
    return ids


@pytest.fixture(scope="module")
def smol():
    from test_generate import smol_vlm

    from vlmjax.data.assets import smollm2_tokenizer

    return smollm2_tokenizer(), smol_vlm()


def test_kshot_prompts_chat_and_plain(smol):
    from vlmjax.eval.prompts import PromptEncoder, request_for
    from vlmjax.generate.requests import Encoder

    tok, model = smol
    cfg = model.cfg
    task = tasks.easy_vqa(n=4, shots=2, n_demos=50)
    assert task.name == "easy_vqa_test_2shot" and all(s.meta["kind"] in ("shape", "color", "yes_no")
                                                      for s in task.samples + task.demos)
    enc = PromptEncoder(Encoder(tok, cfg))
    q = task.samples[1]
    req = request_for(task, q)
    demos = [d for d in task.demos if d.image in req.images[:2]]
    assert len(req.images) == 3 and req.images[2] == q.image and q.image not in req.images[:2]
    assert request_for(task, q).images == req.images  # same draw for the same query id
    d1, d2 = (next(d for d in task.demos if d.image == img) for img in req.images[:2])
    messages = [{"role": "user", "content": "<image>\n" + d1.question}, {"role": "assistant", "content": d1.answers[0]},
                {"role": "user", "content": "<image>\n" + d2.question}, {"role": "assistant", "content": d2.answers[0]},
                {"role": "user", "content": "<image>\n" + q.question}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    e = enc.prompt(req)
    assert e.ids == _render_ids(tok, want, cfg.image_token_id, cfg.tokens_per_image) and len(e.pixels) == 3
    assert len(demos) == 2
    # plain template (pre-trained checkpoints): <image>Question: q Answer: a<eos> per demonstration, query prefilled
    plain = tasks.easy_vqa(n=4, shots=2, n_demos=50, template="plain")
    e = enc.prompt(request_for(plain, q))
    want = "".join(f"<image>Question: {d.question} Answer: {d.answers[0]}{tok.eos_token}" for d in (d1, d2))
    want += f"<image>Question: {q.question} Answer:"
    assert e.ids == _render_ids(tok, want, cfg.image_token_id, cfg.tokens_per_image)
    cap = tasks.Task("c", "caption", [tasks.EvalSample(str(i), "", [f"cap {i}"], q.image if i == 2 else d.image)
                                      for i, d in enumerate((d1, d2, q))], template="plain", shots=2)
    req = request_for(cap, cap.samples[2])
    order = [0 if img == d1.image else 1 for img in req.images[:2]]  # the draw's order
    assert sorted(order) == [0, 1]
    want = "".join(f"<image>cap {i}{tok.eos_token}" for i in order) + "<image>"
    assert enc.prompt(req).ids == _render_ids(tok, want, cfg.image_token_id, cfg.tokens_per_image)
    # zero-shot chat prompts are the single-turn prompt of the plain Encoder, as before
    zero = tasks.easy_vqa(n=4)
    from vlmjax.generate.requests import Request
    assert enc.prompt(request_for(zero, q)).ids == Encoder(tok, cfg).prompt(
        Request(q.id, [{"role": "user", "content": "<image>\n" + q.question}], [q.image])).ids
    with pytest.raises(ValueError, match="2 shots but only 1"):
        request_for(tasks.Task("t", "vqa", task.samples[:2], shots=2), q)


def test_kshot_evaluate_generates_from_the_kshot_prompt(smol, tmp_path):
    from vlmjax.eval import evaluate
    from vlmjax.eval.prompts import PromptEncoder, request_for
    from vlmjax.generate.engine import GenerationConfig, generate
    from vlmjax.generate.requests import Encoder, collate_images, default_eos_ids, image_slots

    tok, model = smol
    task = tasks.easy_vqa(n=1, shots=1, n_demos=20, template="plain")
    res = evaluate(model, tok, task, out_dir=tmp_path, batch_size=4, progress=False)
    assert res["shots"] == 1 and res["template"] == "plain" and set(res["by_kind"]) <= {"shape", "color", "yes_no"}
    preds = {json.loads(x)["id"]: json.loads(x)["output"]
             for x in (tmp_path / f"{task.name}_predictions.jsonl").read_text().splitlines()}
    enc = PromptEncoder(Encoder(tok, model.cfg))
    e = enc.prompt(request_for(task, task.samples[0]))
    cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=default_eos_ids(tok, model.cfg))
    px, rows = collate_images([e.pixels], slots=image_slots(4, [e]))  # the runner's batch shapes: no recompile
    g = generate(model, [e.ids], cfg, pixel_values=px, image_rows=rows, tokenizer=tok, batch_size=4)[0]
    assert preds[task.samples[0].id] == g.text


def test_score_breaks_down_by_kind():
    s = tasks.EvalSample
    t = tasks.Task("e", "vqa", [s("1", "q", ["red"], meta={"kind": "color"}),
                                s("2", "q", ["blue"], meta={"kind": "color"}),
                                s("3", "q", ["yes"], meta={"kind": "yes_no"})], vocab=["red", "blue", "yes", "no"])
    m, rows = score(t, {"1": "Red", "2": "red", "3": "Yes"})
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["by_kind"]["color"]["accuracy"] == 0.5 and m["by_kind"]["color"]["n"] == 2
    assert m["by_kind"]["yes_no"] == {"accuracy": 1.0, "exact_match": 1.0, "n": 1}
    assert [r["kind"] for r in rows] == ["color", "color", "yes_no"] and "color" in format_table([m])
    yn = tasks.Task("p", "yesno", [s("1", "q", ["yes"], meta={"kind": "a"}), s("2", "q", ["no"], meta={"kind": "b"})])
    m, _ = score(yn, {"1": "Yes", "2": "Yes"})
    assert m["by_kind"]["a"]["recall"] == 1.0 and m["by_kind"]["b"]["accuracy"] == 0.0
    assert "by_kind" not in score(tasks.Task("v", "vqa", [s("1", "q", ["x"])]), {})[0]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _ref_logp(model, ids, px=None, length=64):
    """numpy log-softmax of one plain forward pass over `ids` (right-padded to `length`: causal, so padding after the
    sequence changes nothing; one compiled shape for all calls)."""
    from flax import nnx

    global _FWD
    if "_FWD" not in globals():
        _FWD = nnx.jit(lambda m, x, p, r: m(x) if p is None else m(x, p, r))
    x = np.zeros((1, length), np.int32)
    x[0, : len(ids)] = ids
    rows = None if px is None else np.zeros(len(px), np.int32)
    return _log_softmax(np.asarray(_FWD(model, x, px, rows))[0, : len(ids)])


def test_mc_by_option_loglik_matches_a_plain_forward(smol, tmp_path):
    from vlmjax.eval import evaluate

    tok, model = smol
    cfg = model.cfg
    img = tasks.easy_vqa(n=2).samples
    samples = [tasks.EvalSample("0", "What shape?\nA. circle\nB. square long name\nC. triangle", ["B"], img[0].image,
                                ["circle", "square long name", "triangle"], meta={"kind": "shape"}),
               tasks.EvalSample("1", "Pick one\nA. red\nB. blue", ["A"], None, ["red", "blue"], meta={"kind": "x"})]

    def reference(s, options):
        """sum and mean log p(option tokens) from one forward pass each, numpy log-softmax."""
        user = ("<image>\n" if s.image else "") + s.question
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
        p_ids = _render_ids(tok, prompt, cfg.image_token_id, cfg.tokens_per_image)
        px = None
        if s.image is not None:
            from vlmjax.generate.requests import Encoder, Request
            px = Encoder(tok, cfg).pixels(Request("r", [], [s.image]))
        out = []
        for o in options:
            o_ids = tok(o, add_special_tokens=False)["input_ids"]
            lp = _ref_logp(model, p_ids + o_ids, px)
            vals = [lp[len(p_ids) + t - 1, i] for t, i in enumerate(o_ids)]
            out.append((sum(vals), sum(vals) / len(vals)))
        return out

    for fmt, norm in (("letter", "sum"), ("text", "mean")):
        task = tasks.Task(f"mc_{fmt}", "mc", samples, instruction="", method="loglik", option_format=fmt,
                          normalize=norm)
        res = evaluate(model, tok, task, out_dir=tmp_path, batch_size=4, progress=False)
        rows = [json.loads(x) for x in (tmp_path / f"mc_{fmt}_scored.jsonl").read_text().splitlines()]
        correct = []
        for s, r in zip(samples, rows):
            opts = [chr(65 + j) for j in range(len(s.choices))] if fmt == "letter" else s.choices
            ref = [x[0 if norm == "sum" else 1] for x in reference(s, opts)]
            np.testing.assert_allclose(r["option_scores"], ref, rtol=1e-4, atol=1e-4)
            assert r["answer"] == chr(65 + int(np.argmax(ref)))
            correct.append(r["answer"] == s.answers[0])
        assert res["accuracy"] == pytest.approx(np.mean(correct)) and res["normalize"] == norm
        assert set(res["by_kind"]) == {"shape", "x"} and res["by_kind"]["x"]["accuracy"] == float(correct[1])


def test_mc_loglik_plain_template_and_resume(tmp_path):
    from test_generate import tiny_llm

    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.eval import evaluate
    from vlmjax.eval.likelihood import option_scores

    tok, model = smollm2_tokenizer(), tiny_llm(vocab=49152)
    s = tasks.EvalSample("0", "2+2?\nA. 3\nB. 4", ["B"], None, ["3", "4"])
    task = tasks.Task("plain_mc", "mc", [s], method="loglik", template="plain")
    path = tmp_path / "opts.jsonl"
    got = option_scores(model, tok, task, out_path=path, batch_size=2)
    for j, letter in enumerate("AB"):  # "Question: 2+2?\nA. 3\nB. 4 Answer: B": the letter after the prefill
        p_ids = tok("Question: 2+2?\nA. 3\nB. 4 Answer:", add_special_tokens=False)["input_ids"]
        ids = tok(f"Question: 2+2?\nA. 3\nB. 4 Answer: {letter}", add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids and len(ids) == len(p_ids) + 1
        lp = _ref_logp(model, ids)
        assert got[f"0#{j}"]["sum_logprob"] == pytest.approx(lp[len(p_ids) - 1, ids[-1]], abs=1e-4)
        assert got[f"0#{j}"]["num_tokens"] == 1
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n")  # a crashed run wrote one option: the rerun scores only the other
    again = option_scores(model, tok, task, out_path=path, batch_size=2)
    assert len(path.read_text().splitlines()) == 2 and again["0#1"]["sum_logprob"] == pytest.approx(
        got["0#1"]["sum_logprob"], abs=1e-5)
    res = evaluate(model, tok, task, progress=False)
    assert res["accuracy"] == float(got["0#1"]["sum_logprob"] > got["0#0"]["sum_logprob"])


def test_text_perplexity_matches_a_plain_forward(tmp_path):
    from test_generate import tiny_llm

    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.eval.likelihood import text_perplexity

    tok, model = smollm2_tokenizer(), tiny_llm(vocab=49152)
    docs = [("a", "The cat sat on the mat and looked at the dog."), ("b", "Hello world")]

    def ref(max_length):
        tot, n, per = 0.0, 0, []
        for _, text in docs:
            ids = tok(text)["input_ids"]
            s = 0.0
            for start in range(0, len(ids) - 1, max_length - 1):  # windows overlapping by one token
                w = ids[start: start + max_length]
                lp = _ref_logp(model, w)
                s += sum(lp[t - 1, w[t]] for t in range(1, len(w)))
            tot, n = tot + s, n + len(ids) - 1
            per.append(math.exp(-s / (len(ids) - 1)))
        return math.exp(-tot / n), n, per

    for max_length in (32, 4):  # one window per document, then windows of 4 tokens
        m = text_perplexity(model, tok, docs, max_length=max_length, batch_size=2, out_dir=tmp_path)
        want, n, per = ref(max_length)
        assert m["perplexity"] == pytest.approx(want, rel=1e-4) and m["num_tokens"] == n
        rows = [json.loads(x) for x in (tmp_path / "perplexity_scored.jsonl").read_text().splitlines()]
        assert [r["perplexity"] for r in rows] == pytest.approx(per, rel=1e-4)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    m = text_perplexity(model, tok, tmp_path / "docs.jsonl", max_length=4, batch_size=2, out_dir=tmp_path)
    assert m["perplexity"] == pytest.approx(ref(4)[0], rel=1e-4) and m["task"] == "docs_perplexity_len4"
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: record 1 has no text field 'text'"):
        text_perplexity(model, tok, tmp_path / "bad.jsonl")


def test_mmlu_loader_and_cli(tmp_path):
    from test_generate import tiny_llm

    from vlmjax.convert import hf
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.eval.__main__ import main
    from vlmjax.eval.prompts import request_for

    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "algebra_test.csv").write_text('"2+2?",3,4,5,6,B\n"1+1?",2,3,4,5,A\n')
    (tmp_path / "test" / "biology_test.csv").write_text('"Cells?",yes,no,maybe,never,A\n')
    (tmp_path / "dev" / "algebra_dev.csv").write_text('"3+3?",6,7,8,9,A\n')
    (tmp_path / "dev" / "biology_dev.csv").write_text('"DNA?",acid,base,salt,sugar,A\n')
    t = tasks.mmlu(tmp_path / "test", shots=1, dev_path=tmp_path / "dev")
    assert [s.id for s in t.samples] == ["algebra_test_0", "algebra_test_1", "biology_test_0"] and t.method == "loglik"
    assert t.samples[0].question == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6" and t.samples[0].answers == ["B"]
    req = request_for(t, t.samples[2])  # the demonstration comes from the query's own subject
    assert req.messages[0]["content"] == "DNA?\nA. acid\nB. base\nC. salt\nD. sugar"
    assert req.messages[1]["content"] == "A"
    for bad in ('"q",1,2,3,4,E\n', '"q",1,2,3,4,AB\n', '"q",1,2,3,A\n'):
        (tmp_path / "bad.csv").write_text(bad)
        with pytest.raises(ValueError, match="bad.csv: row 0"):
            tasks.mmlu(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="shots need dev_path"):
        tasks.mmlu(tmp_path / "test", shots=1)
    tok, model = smollm2_tokenizer(), tiny_llm(vocab=49152)
    hf.save_causal_lm(model, tmp_path / "m", tokenizer=tok)
    out = tmp_path / "res"
    assert main(["--model", str(tmp_path / "m"), "--out", str(out), "mmlu", "--file", str(tmp_path / "test")]) == 0
    res = json.loads((out / "mmlu_results.json").read_text())
    assert res["n"] == 3 and set(res["by_kind"]) == {"algebra", "biology"}
    (tmp_path / "doc.txt").write_text("The cat sat on the mat.")
    assert main(["--model", str(tmp_path / "m"), "--out", str(out), "perplexity", "--file",
                 str(tmp_path / "doc.txt")]) == 0
    assert json.loads((out / "doc_perplexity_results.json").read_text())["num_tokens"] > 3
