"""The eval CLI's modes end to end: the README's commands verbatim (k-shot, plain template, multiple choice by option
log-likelihood, perplexity) on tiny random models against hand-built prompts + a plain forward pass in numpy; flags
refused in bad combinations, each error naming its flag; option scores on a 2-device mesh equal one device."""

import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmjax.eval import tasks

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "python -m vlmjax.eval --model STAGE2_DIR --out results/ --shots 4 --template plain easy_vqa --n 16",
    "python -m vlmjax.eval --model HF_LLAVA_DIR --out results/ --shots 1 pope --file pope.jsonl --images imgs/ "
    "--demos demos.jsonl",
    "python -m vlmjax.eval --model HF_LLAVA_DIR --out results/ --by loglik --options text --normalize mean scienceqa "
    "--file problems.json --images sqa/",
    "python -m vlmjax.eval --model LM_DIR --out results/ --shots 5 mmlu --file mmlu/data/test --demos mmlu/data/dev",
    "python -m vlmjax.eval --model LM_DIR --out results/ perplexity --file docs.jsonl --max-length 512",
]


def readme_commands():
    """The `python -m vlmjax.eval` lines of the README's evaluation-modes block (backslash continuations joined)."""
    text = (ROOT / "README.md").read_text().split("Evaluation modes (tests/test_eval.py")[1].split("\n- ")[0]
    return [" ".join(line.split()) for line in text.replace("\\\n", " ").splitlines()
            if line.strip().startswith("python -m vlmjax.eval")]


def png(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 18, 3), shade, np.uint8)).save(path)


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding every file the README's commands name, and the model they load: one tiny random VLM for
    every model name (text-only rows run through its language model; one model keeps compilations few)."""
    from test_generate import smol_vlm

    from vlmjax.data.assets import smollm2_tokenizer

    d = tmp_path_factory.mktemp("evalcli")
    for name in ("STAGE2_DIR", "HF_LLAVA_DIR", "LM_DIR"):
        (d / name).mkdir()
    for i in range(3):
        png(d / "imgs" / f"q{i}.png", 40 * i)
        png(d / "imgs" / f"d{i}.png", 200 - 40 * i)
    jsonl(d / "pope.jsonl", [{"question_id": f"q{i}", "image": f"q{i}.png", "text": f"Is there a cat {i}?",
                              "label": "yes" if i % 2 else "no"} for i in range(3)])
    jsonl(d / "demos.jsonl", [{"question_id": f"d{i}", "image": f"d{i}.png", "text": f"Is there a dog {i}?",
                               "label": ["no", "yes", "yes"][i]} for i in range(3)])
    problems = {"p1": {"question": "Which is hot?", "choices": ["ice", "fire pit", "snow"], "answer": 1,
                       "hint": "", "image": None, "split": "test"},
                "p2": {"question": "Which is a fruit?", "choices": ["apple", "stone"], "answer": 0, "hint": "Food.",
                       "image": None, "split": "test"}}
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "sqa").mkdir()
    (d / "mmlu" / "data" / "test").mkdir(parents=True)
    (d / "mmlu" / "data" / "dev").mkdir(parents=True)
    (d / "mmlu" / "data" / "test" / "algebra_test.csv").write_text('"2+2?",3,4,5,6,B\n"1+1?",2,3,4,5,A\n')
    # five identical demonstrations: the prompt does not depend on the order they are drawn in
    (d / "mmlu" / "data" / "dev" / "algebra_dev.csv").write_text('"3+3?",6,7,8,9,A\n' * 5)
    jsonl(d / "docs.jsonl", [{"text": "The cat sat on the mat."}, {"text": "Hello world, again and again."}])
    return d, smollm2_tokenizer(), smol_vlm()


@pytest.fixture
def run(work, monkeypatch, capsys):
    """run(i) -> (the parsed args, the results JSON) of README command i, from the work folder."""
    from vlmjax.eval import __main__ as cli
    from vlmjax.generate import loading

    d, tok, model = work
    monkeypatch.chdir(d)
    names = ("STAGE2_DIR", "HF_LLAVA_DIR", "LM_DIR")
    monkeypatch.setattr(loading, "load_model", lambda path, **kw: (model, model.cfg, tok) if path in names else 1 / 0)

    def run_command(i):
        argv = shlex.split(COMMANDS[i])[3:]
        assert cli.main(argv) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return cli.parser().parse_args(argv), printed

    return run_command


def test_readme_lists_these_commands():
    assert readme_commands() == COMMANDS


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _ref_logp(model, ids, px=None):
    """numpy log-softmax of one plain forward pass over `ids` (right-padded to 256: causal, so padding changes
    nothing and every call has one shape)."""
    from flax import nnx

    if not hasattr(_ref_logp, "fwd"):
        _ref_logp.fwd = nnx.jit(lambda m, x, p, r: m(x) if p is None else m(x, p, r))
    fwd = _ref_logp.fwd
    x = np.zeros((1, 256), np.int32)
    x[0, : len(ids)] = ids
    rows = None if px is None else np.zeros(len(px), np.int32)
    return _log_softmax(np.asarray(fwd(model, x, px, rows))[0, : len(ids)])


def test_kshot_plain_easy_vqa(run, work):
    from vlmjax.eval import __main__ as cli
    from vlmjax.eval.prompts import request_for

    a, res = run(0)
    d = work[0]
    want = tasks.easy_vqa("test", n=16, shots=4, template="plain")
    got = cli.build_task(cli.parser(), a)
    assert got.name == want.name == "easy_vqa_test_4shot_plain" and got.shots == 4 and got.template == "plain"
    for q in got.samples[:5]:  # four train-split demonstrations, never the query, then the query's own image
        req = request_for(got, q)
        assert len(req.images) == 5 and req.images[-1] == q.image and q.image not in req.images[:4]
        assert all("/train/" in str(img) for img in req.images[:4]) and len(set(req.images[:4])) == 4
        assert req.prefill == f"Question: {q.question} Answer:"
    saved = json.loads((d / "results" / "easy_vqa_test_4shot_plain_results.json").read_text())
    assert saved == res and (res["shots"], res["template"], res["by"], res["seed"], res["n"]) == (4, "plain",
                                                                                                   "generate", 0, 16)
    preds = (d / "results" / "easy_vqa_test_4shot_plain_predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in preds) == sorted(s.id for s in want.samples)
    rows = [json.loads(x) for x in (d / "results" / "easy_vqa_test_4shot_plain_scored.jsonl").read_text().splitlines()]
    assert res["accuracy"] == pytest.approx(np.mean([r["exact_match"] for r in rows]))
    assert set(res["by_kind"]) <= {"shape", "color", "yes_no"}


def test_kshot_chat_pope_demos_from_file(run, work):
    from vlmjax.eval import __main__ as cli
    from vlmjax.eval.prompts import request_for

    a, res = run(1)
    d = work[0]
    task = cli.build_task(cli.parser(), a)
    inst = "Answer the question using a single word or phrase."
    labels = {f"d{i}": ["no", "yes", "yes"][i] for i in range(3)}
    for q in task.samples:
        req = request_for(task, q)
        demo_ids = [Path(img).stem for img in req.images[:1]]
        assert demo_ids[0] in labels  # from demos.jsonl only
        want = []
        for x in demo_ids:
            want += [{"role": "user", "content": f"<image>\nIs there a dog {x[1]}?\n{inst}"},
                     {"role": "assistant", "content": labels[x]}]
        want.append({"role": "user", "content": f"<image>\n{q.question}\n{inst}"})
        assert req.messages == want and req.images[1] == os.path.join("imgs/", f"{q.id}.png")
        assert request_for(task, q).images == req.images  # the draw is a function of the query id
    assert task.name == "pope_1shot" and (res["shots"], res["template"], res["by"], res["n"]) == (1, "chat",
                                                                                                  "generate", 3)
    rows = [json.loads(x) for x in (d / "results" / "pope_1shot_scored.jsonl").read_text().splitlines()]
    assert res["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))


def test_mc_by_option_loglik_scienceqa(run, work):
    a, res = run(2)
    d, tok, vlm = work
    name = "scienceqa_test_loglik_text-options_mean"
    assert res["task"] == name and (res["by"], res["options"], res["normalize"], res["shots"]) == (
        "loglik", "text", "mean", 0)
    rows = [json.loads(x) for x in (d / "results" / f"{name}_scored.jsonl").read_text().splitlines()]
    inst = "Answer with the option's letter from the given choices directly."
    cases = [("Which is hot?\nA. ice\nB. fire pit\nC. snow", ["ice", "fire pit", "snow"], "B"),
             ("Context: Food.\nWhich is a fruit?\nA. apple\nB. stone", ["apple", "stone"], "A")]
    correct = []
    for (question, options, gold), row in zip(cases, rows):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"{question}\n{inst}"}],
                                         add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        means = []
        for o in options:  # mean log p of the option's text tokens as the reply
            o_ids = tok(o, add_special_tokens=False)["input_ids"]
            lp = _ref_logp(vlm, p_ids + o_ids)
            means.append(np.mean([lp[len(p_ids) + t - 1, i] for t, i in enumerate(o_ids)]))
        np.testing.assert_allclose(row["option_scores"], means, rtol=1e-4, atol=1e-4)
        assert row["answer"] == "ABC"[int(np.argmax(means))]
        correct.append(row["answer"] == gold)
    assert res["accuracy"] == pytest.approx(np.mean(correct))


def test_mmlu_five_shot(run, work):
    a, res = run(3)
    d, tok, llm = work
    assert res["task"] == "mmlu_5shot" and (res["shots"], res["by"], res["options"], res["normalize"]) == (
        5, "loglik", "letter", "sum")
    rows = [json.loads(x) for x in (d / "results" / "mmlu_5shot_scored.jsonl").read_text().splitlines()]
    demo = [{"role": "user", "content": "3+3?\nA. 6\nB. 7\nC. 8\nD. 9"}, {"role": "assistant", "content": "A"}]
    for q, row in zip(["2+2?\nA. 3\nB. 4\nC. 5\nD. 6", "1+1?\nA. 2\nB. 3\nC. 4\nD. 5"], rows):
        prompt = tok.apply_chat_template(demo * 5 + [{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        want = []
        for letter in "ABCD":
            (i,) = tok(letter, add_special_tokens=False)["input_ids"]
            want.append(_ref_logp(llm, p_ids + [i])[len(p_ids) - 1, i])
        np.testing.assert_allclose(row["option_scores"], want, rtol=1e-4, atol=1e-4)
        assert row["answer"] == "ABCD"[int(np.argmax(want))]
    assert res["by_kind"]["algebra"]["n"] == 2


def test_perplexity_max_length(run, work):
    a, res = run(4)
    d, tok, llm = work
    total, count = 0.0, 0
    for text in ("The cat sat on the mat.", "Hello world, again and again."):
        ids = tok(text)["input_ids"]  # one window each: shorter than --max-length
        lp = _ref_logp(llm, ids)
        total += sum(lp[t - 1, ids[t]] for t in range(1, len(ids)))
        count += len(ids) - 1
    assert res["task"] == "docs_perplexity_len512" and res["max_length"] == 512 and res["num_tokens"] == count
    assert res["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)
    assert json.loads((d / "results" / "docs_perplexity_len512_results.json").read_text()) == res


BAD = [
    ("--shots 2 vqav2 --questions q.json --annotations a.json --images imgs/", "--shots: vqav2 has no demonstration"),
    ("--shots 2 pope --file pope.jsonl --images imgs/", "--shots 2: pope needs --demos"),
    ("--demos demos.jsonl pope --file pope.jsonl --images imgs/", "--demos needs --shots"),
    ("--shots 1 --demos demos.jsonl easy_vqa --n 2", "--demos: easy_vqa draws its demonstrations from its train"),
    ("--shots 1 --split train easy_vqa --n 2", "--shots: the train split shares samples with the queries"),
    ("--shots 2 pope --file pope.jsonl --images imgs/ --demos pope.jsonl", "--shots: --demos shares samples"),
    ("--shots 4 pope --file pope.jsonl --images imgs/ --demos demos.jsonl", "--shots 4: task pope_4shot: 4 shots "
     "but only 3 demonstrations"),
    ("--by loglik pope --file pope.jsonl --images imgs/", "--by loglik needs a multiple-choice task"),
    ("--by loglik llava_jsonl --file pope.jsonl --kind mc", "--by loglik: llava_jsonl sample q0 has no choices"),
    ("--options text scienceqa --file problems.json --images sqa/", "--options applies to --by loglik only"),
    ("--normalize mean --by generate mmlu --file mmlu/data/test", "--normalize applies to --by loglik only"),
    ("--max-new-tokens 4 mmlu --file mmlu/data/test", "--max-new-tokens: --by loglik generates nothing"),
    ("--max-length 8 pope --file pope.jsonl --images imgs/", "--max-length applies to perplexity only"),
    ("--template plain perplexity --file docs.jsonl", "--template: perplexity scores the text as it is"),
    ("--shots 1 perplexity --file docs.jsonl", "--shots: perplexity"),
    ("--text-key body perplexity --file docs.jsonl", "docs.jsonl: record 1 has no text field 'body'"),
    ("--seed 3 easy_vqa --n 2", "--seed (demonstration draws) needs --shots"),
    ("--dar --shots 1 easy_vqa --n 2", "--dar with --shots"),
    ("--template plain --dar easy_vqa --n 2", "--dar with --template plain"),
    ("--shots 1 mmlu --file mmlu/data/test", "--shots 1: mmlu needs --demos"),
    ("--template fancy easy_vqa", "argument --template: invalid choice"),
    ("--mesh 3 mmlu --file mmlu/data/test", "--mesh 3,1,1:"),  # 3 data rows on this process's one device
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_combinations_name_the_flag(args, message, work, monkeypatch, capsys):
    from vlmjax.eval.__main__ import main
    from vlmjax.generate import loading

    monkeypatch.chdir(work[0])
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: pytest.fail("loaded a model"))
    (work[0] / "q.json").write_text("{}")
    (work[0] / "a.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["--model", "LM_DIR", "--out", "results/"] + shlex.split(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


def test_with_mode_names_each_mode():
    s = tasks.EvalSample
    t = tasks.Task("t", "mc", [s("1", "q", ["A"], choices=["x", "y"])])
    assert tasks.with_mode(t).name == "t" and tasks.with_mode(t, template="chat").name == "t"
    m = tasks.with_mode(t, shots=2, template="plain", method="loglik", option_format="text", normalize="mean", seed=1)
    assert m.name == "t_2shot_plain_loglik_text-options_mean_seed1" and (m.shots, m.template, m.seed) == (2, "plain", 1)
    assert tasks.with_mode(m, template="chat").name == m.name + "_chat" and t.name == "t"  # t itself unchanged
    with pytest.raises(ValueError, match="method 'loglik' needs kind 'mc'"):
        tasks.with_mode(tasks.Task("v", "vqa", []), method="loglik")
    with pytest.raises(ValueError, match="apply to method 'loglik' only"):
        tasks.with_mode(t, normalize="mean")
    with pytest.raises(ValueError, match="template must be 'chat' or 'plain'"):
        tasks.with_mode(t, template="fancy")


def test_llava_jsonl_reads_choices(tmp_path):
    jsonl(tmp_path / "mc.jsonl", [{"question_id": 7, "text": "Pick\nA. x\nB. y", "answer": "B", "choices": ["x", "y"]},
                                  {"question_id": 8, "text": "Say", "answer": "z"}])
    t = tasks.llava_jsonl(tmp_path / "mc.jsonl", "", "mc")
    assert [s.choices for s in t.samples] == [["x", "y"], None] and t.samples[0].answers == ["B"]
    jsonl(tmp_path / "bad.jsonl", [{"question_id": 9, "text": "q", "answer": "A", "choices": "x,y"}])
    with pytest.raises(ValueError, match="bad.jsonl: question 9: choices must be a list of strings"):
        tasks.llava_jsonl(tmp_path / "bad.jsonl", "", "mc")


MESH_SCRIPT = """
import json, sys
import jax
sys.path.insert(0, sys.argv[1])
from test_generate import smol_vlm
from vlmjax import sharding
from vlmjax.data.assets import smollm2_tokenizer
from vlmjax.eval import tasks
from vlmjax.eval.likelihood import option_scores

assert len(jax.devices()) == 2
S = tasks.EvalSample
samples = [S("a", "Which?\\nA. red\\nB. blue", ["A"], sys.argv[2], ["red", "blue"]),
           S("b", "Pick\\nA. one\\nB. two\\nC. three", ["C"], None, ["one", "two", "three"]),
           S("c", "Shape?\\nA. circle\\nB. square", ["B"], sys.argv[3], ["circle", "square"])]
task = tasks.Task("mc", "mc", samples, method="loglik", option_format="text")
tok, model = smollm2_tokenizer(), smol_vlm()
one = option_scores(model, tok, task, batch_size=8)
mesh = sharding.make_mesh(-1, 1, 1)
two = option_scores(sharding.shard_module(model, mesh), tok, task, batch_size=8, mesh=mesh)
assert len(model.llm.embed_tokens[...].sharding.device_set) == 2  # the model is on both devices
print(json.dumps({k: [one[k]["sum_logprob"], two[k]["sum_logprob"], one[k]["num_tokens"], two[k]["num_tokens"]]
                  for k in one}))
"""


def test_option_scores_on_two_devices_equal_one(tmp_path):
    """Rows and image slots split over a 2-device data axis (7 options in one batch of 8 rows): the
    same scores as one device."""
    png(tmp_path / "a.png", 30)
    png(tmp_path / "c.png", 220)
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"  # keeps conftest's flags
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(ROOT / "tests"), str(tmp_path / "a.png"),
                           str(tmp_path / "c.png")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == 7
    for key, (a, b, na, nb) in got.items():
        assert a == pytest.approx(b, abs=1e-5) and na == nb >= 1 and a < 0, key
