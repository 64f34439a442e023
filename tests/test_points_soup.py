"""POINTS model soup: uniform == a numpy mean of the tensors; greedy's accept/reject trace on a hand-built case (the
val a known function of one tensor); resume from soup.json; bad ingredients; the CLI with an easy-vqa val file."""

import json
import os

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("transformers")

from test_convert_native import tokenizer  # noqa: E402
from test_native import params, tiny_cfg  # noqa: E402
from vlmjax.convert.average import Mismatch  # noqa: E402
from vlmjax.convert.native import load_native, save_native  # noqa: E402
from vlmjax.models import VLM  # noqa: E402
from vlmjax.recipes.points import soup as S  # noqa: E402
from vlmjax.recipes.points.__main__ import main  # noqa: E402

KNOB = "projector/linear_2/bias"  # the tensor the hand-built val reads


def ingredient(folder, seed, knob=None, cfg=None):
    """A tiny native model (random weights per seed); `knob` sets every entry of KNOB."""
    model = VLM(cfg or tiny_cfg(), rngs=nnx.Rngs(seed))
    if knob is not None:
        b = model.projector.linear_2.bias
        b.set_value(np.full(b.shape, knob, np.float32))
    save_native(model, folder, tokenizer=tokenizer())
    return params(model)


def knob_val(target=2.0, calls=None, fail_after=None):
    """val = -|mean(KNOB) - target|, counting its calls (and raising after `fail_after`, a crash mid-run)."""
    def fn(model, tok):
        if calls is not None:
            if fail_after is not None and len(calls) >= fail_after:
                raise RuntimeError("simulated crash")
            calls.append(1)
        return -abs(float(np.mean(np.asarray(model.projector.linear_2.bias[...]), dtype=np.float64)) - target)

    return S.Val(f"knob:{target}", fn)


def numpy_mean(ps):
    return {k: np.mean([p[k].astype(np.float64) for p in ps], axis=0) for k in ps[0]}


def assert_soup_is(folder, ps):
    soup, _ = load_native(folder)
    ref = numpy_mean(ps)
    got = params(soup)
    assert sorted(got) == sorted(ref)
    for k, v in got.items():  # independent reference: float64 numpy mean; fp32 tolerance
        np.testing.assert_allclose(v, ref[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_uniform_soup_equals_numpy_mean(tmp_path):
    ps = [ingredient(tmp_path / f"r{i}", seed=i) for i in range(3)]
    rec = main(["soup", "uniform", *(str(tmp_path / f"r{i}") for i in range(3)), "--out", str(tmp_path / "u")])
    assert rec["members"] == [str(tmp_path / f"r{i}") for i in range(3)]
    assert json.loads((tmp_path / "u" / "soup.json").read_text())["method"] == "uniform"
    assert_soup_is(tmp_path / "u" / "model", ps)


# Hand-built greedy case, val = -|knob - 2| of the averaged knob (exact in fp32 where ties matter):
#   ingredient knob  2.5   0.5   9.0   3.0   4.0   -3.0
#   single val      -0.5  -1.5  -7    -1    -2    -5      -> order 2.5, 3.0, 0.5, 4.0, -3.0, 9.0
#   soup {2.5} = -0.5; +3.0: mean 2.75 -> -0.75 rejected; +0.5: mean 1.5 -> -0.5 accepted (tie: >=);
#   +4.0: mean 7/3 -> -1/3 accepted; +(-3.0): mean 1.0 -> -1 rejected; +9.0: mean 4.0 -> -2 rejected.
KNOBS = [2.5, 0.5, 9.0, 3.0, 4.0, -3.0]


def test_greedy_accepts_and_rejects_as_worked_by_hand(tmp_path):
    folders = [str(tmp_path / f"k{i}") for i in range(len(KNOBS))]
    ps = [ingredient(f, seed=i, knob=k) for i, (f, k) in enumerate(zip(folders, KNOBS))]
    calls = []
    rec = S.greedy(folders, tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert len(calls) == 6 + 5  # each ingredient once, then one trial per remaining ingredient
    singles = [t for t in rec["trials"] if t["stage"] == "ingredient"]
    np.testing.assert_allclose([t["val"] for t in singles], [-abs(k - 2) for k in KNOBS], atol=1e-6)
    assert rec["order"] == [folders[i] for i in (0, 3, 1, 4, 5, 2)]
    steps = [(t["ingredient"], t["accepted"]) for t in rec["trials"] if t["stage"] == "greedy"]
    assert steps == [(folders[0], True), (folders[3], False), (folders[1], True), (folders[4], True),
                     (folders[5], False), (folders[2], False)]
    greedy = [t for t in rec["trials"] if t["stage"] == "greedy"][1:]
    np.testing.assert_allclose([t["val"] for t in greedy], [-0.75, -0.5, -1 / 3, -1.0, -2.0], atol=1e-6)
    np.testing.assert_allclose([t["soup_val"] for t in greedy], [-0.5, -0.5, -0.5, -1 / 3, -1 / 3], atol=1e-6)
    assert greedy[3]["members"] == [folders[i] for i in (0, 1, 4, 5)]  # the soup so far + the candidate
    assert rec["members"] == [folders[i] for i in (0, 1, 4)] and rec["soup_val"] == pytest.approx(-1 / 3, abs=1e-6)
    assert_soup_is(tmp_path / "g" / "model", [ps[i] for i in (0, 1, 4)])
    on_disk = json.loads((tmp_path / "g" / "soup.json").read_text())
    assert on_disk["trials"] == rec["trials"] and len(on_disk["evaluated"]) == 11


def test_only_process_zero_writes_under_jax_distributed(tmp_path, monkeypatch):
    """Every process evaluates the same soups; a process other than 0 returns the record and writes nothing."""
    import jax

    folders = [str(tmp_path / f"k{i}") for i in range(3)]
    for i, f in enumerate(folders):
        ingredient(f, seed=i, knob=KNOBS[i])
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    rec = S.greedy(folders, tmp_path / "g", knob_val(), log=lambda m: None)
    assert rec["members"] == [folders[0], folders[1]] and not (tmp_path / "g").exists()
    S.uniform(folders, tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_greedy_resumes_from_soup_json(tmp_path):
    folders = [str(tmp_path / f"k{i}") for i in range(4)]
    for i, f in enumerate(folders):
        ingredient(f, seed=i, knob=KNOBS[i])
    calls = []
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies after 3 evaluations
        S.greedy(folders[:3], tmp_path / "g", knob_val(calls=calls, fail_after=3), log=lambda m: None)
    assert len(json.loads((tmp_path / "g" / "soup.json").read_text())["evaluated"]) == 3
    calls.clear()
    first = S.greedy(folders[:3], tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert len(calls) == 2  # only the two greedy trials were left
    calls.clear()
    again = S.greedy(folders[:3], tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert calls == [] and [t["val"] for t in again["trials"]] == [t["val"] for t in first["trials"]]
    assert all(t["cached"] for t in again["trials"])
    # one more ingredient: its single score + the trials whose sets are new
    S.greedy(folders, tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert len(calls) == 2  # the single score of k3 and the new {k0, k3}; the rest were cached
    # a re-exported ingredient is a new one (fingerprint): its sets are scored again
    calls.clear()
    ingredient(folders[0], seed=0, knob=KNOBS[0])
    os.utime(tmp_path / "k0" / "model.safetensors", ns=(1, 1))
    S.greedy(folders[:3], tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert len(calls) == 3  # k0 is in every set: its single score and both trials
    with pytest.raises(ValueError, match="scored with val 'knob:2.0', now 'knob:3.0'"):
        S.greedy(folders[:3], tmp_path / "g", knob_val(3.0), log=lambda m: None)


def test_bad_ingredients_are_errors_naming_what(tmp_path):
    from safetensors.numpy import load_file, save_file

    from vlmjax.models.lora import add_lora

    ingredient(tmp_path / "a", seed=0)
    ingredient(tmp_path / "b", seed=1)
    calls = []
    # a tensor with another shape (same config): named, before anything is evaluated
    f = tmp_path / "b" / "model.safetensors"
    t = load_file(f)
    t[KNOB] = np.zeros(33, np.float32)
    save_file(t, f)
    with pytest.raises(Mismatch, match=rf"tensor {KNOB}: .*a has float32\[32\], .*b has float32\[33\]"):
        S.greedy([tmp_path / "a", tmp_path / "b"], tmp_path / "g", knob_val(calls=calls), log=lambda m: None)
    assert calls == [] and not (tmp_path / "g" / "model").exists()
    with pytest.raises(Mismatch, match=rf"tensor {KNOB}"):
        main(["soup", "uniform", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "u")])
    # an unmerged LoRA export, and an adapter-only (PEFT-style) folder
    m = VLM(tiny_cfg(), rngs=nnx.Rngs(2))
    add_lora(m, rank=2, alpha=4.0, targets=r"llm/layers/self_attn/q_proj$")
    save_native(m, tmp_path / "lora", tokenizer=tokenizer(), lora="adapter")
    with pytest.raises(Mismatch, match=r"lora holds an unmerged LoRA adapter"):
        S.uniform([tmp_path / "a", tmp_path / "lora"], tmp_path / "u")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"peft is a LoRA adapter only"):
        S.greedy([tmp_path / "a", tmp_path / "peft"], tmp_path / "g", knob_val(), log=lambda m: None)
    from vlmjax.convert.average import average_into, open_sources

    with pytest.raises(Mismatch, match=r"tensor projector/linear_2/bias is in .*/a only \(0 model-only, 2 folder"):
        average_into(VLM(tiny_cfg("linear"), rngs=nnx.Rngs(0)), open_sources([tmp_path / "a"]))
    with pytest.raises(ValueError, match="is given twice"):
        S.uniform([tmp_path / "a", str(tmp_path / "a") + "/"], tmp_path / "u")
    with pytest.raises(ValueError, match="at least 2 ingredient folders, got 1"):
        S.uniform([tmp_path / "a"], tmp_path / "u")
    with pytest.raises(KeyError, match="metric 'f1' is not in the results .*numeric: \\['accuracy'"):
        S.metric_value({"task": "t", "accuracy": 0.5, "by_kind": {"shape": {"accuracy": 1.0}}}, "f1")
    assert S.metric_value({"by_kind": {"shape": {"accuracy": 1.0}}}, "by_kind.shape.accuracy") == 1.0


@pytest.fixture(scope="module")
def smol_runs(tmp_path_factory):
    """Two tiny random VLMs on the SmolLM2 tokenizer (different seeds) and a 4-question easy-vqa val file of
    held-out train images 3300-3499."""
    from test_generate import SMOL_IMAGE_ID, tiny_vlm

    from vlmjax.data.assets import easy_vqa_data_dir, smollm2_tokenizer

    d = tmp_path_factory.mktemp("smol_runs")
    root = os.path.join(easy_vqa_data_dir(), "train")
    qs = json.load(open(os.path.join(root, "questions.json")))
    (d / "val.json").write_text(json.dumps([q for q in qs if 3300 <= int(q[2]) < 3500][:4]))
    tok = smollm2_tokenizer()
    for i in range(2):
        save_native(tiny_vlm(vocab=49216, image_token_id=SMOL_IMAGE_ID, seed=i), d / f"sft{i}", tokenizer=tok)
    return d, os.path.join(root, "images")


def test_greedy_cli_with_an_easy_vqa_val_file(smol_runs, tmp_path, monkeypatch):
    """The README's command shape: greedy by easy-vqa accuracy on a held-out question file, in memory. Each trial's
    answers (weights streamed into one model) equal those of the same weights loaded fresh from disk: no stale
    engine copy of an earlier candidate's weights."""
    from vlmjax.convert.native import load_folder
    from vlmjax.eval import runner, tasks

    d, images = smol_runs
    seen, predict = [], runner.predict

    def recording(*a, **kw):
        seen.append(predict(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(runner, "predict", recording)
    rec = main(["soup", "greedy", str(d / "sft0"), str(d / "sft1"), "--out", str(tmp_path / "g"),
                "--val-file", str(d / "val.json"), "--val-images", images, "--batch-size", "4"])
    assert rec["val"].startswith("easy_vqa_val:accuracy:n=4:") and 0.0 <= rec["soup_val"] <= 1.0
    state = json.loads((tmp_path / "g" / "soup.json").read_text())
    assert len(state["trials"]) == 2 + 2 and len(state["evaluated"]) == 3 and len(seen) == 3
    task = tasks.easy_vqa_file(d / "val.json", images)
    final = [tmp_path / "g" / "model"] if state["trials"][-1]["accepted"] else []  # else the soup is one of them
    fresh = []
    for folder in [d / "sft0", d / "sft1"] + final:
        model, _, tok = load_folder(folder)
        fresh.append(predict(model, tok, task, batch_size=4, progress=False))
    assert seen[: len(fresh)] == fresh and seen[0] != seen[1]
    with pytest.raises(SystemExit, match="--val-file is required"):
        main(["soup", "greedy", str(d / "sft0"), "--out", str(tmp_path / "h")])


def test_readme_soup_commands_parse():
    """The README's soup commands name placeholder runs (a real run needs SFT ingredients): their flags parse."""
    import shlex

    from vlmjax.recipes.points.__main__ import parser

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = text.split("### POINTS: model soup")[1].split("\n## ")[0].replace("\\\n", " ")
    cmds = [line.strip() for line in section.splitlines() if line.strip().startswith("python -m vlmjax.recipes.points")]
    assert [c.split()[4] for c in cmds] == ["uniform", "greedy"]
    for c in cmds:
        args = [a for a in shlex.split(c)[3:] if a not in ("[", "]")]
        a = parser().parse_args([x.strip("[]") for x in args])
        assert a.ingredients == ["RUN_A", "RUN_B", "RUN_C"] and a.out.startswith("runs/points/soup_")


def test_easy_vqa_file_reads_the_package_layout(tmp_path):
    from vlmjax.data.assets import easy_vqa_data_dir
    from vlmjax.eval import tasks

    root = os.path.join(easy_vqa_data_dir(), "train")
    a = tasks.easy_vqa_file(os.path.join(root, "questions.json"), os.path.join(root, "images"), n=7)
    b = tasks.easy_vqa("train", n=7)
    assert [(s.question, s.answers, s.image, s.meta) for s in a.samples] == \
        [(s.question, s.answers, s.image, s.meta) for s in b.samples]
    assert a.vocab == b.vocab and a.name == "easy_vqa_questions" and a.samples[0].id.startswith("questions_0_")
    (tmp_path / "bad.json").write_text(json.dumps([["What shape?", "circle"]]))
    with pytest.raises(ValueError, match="bad.json: not an easy-vqa question file"):
        tasks.easy_vqa_file(tmp_path / "bad.json", tmp_path)
