"""VILA^2 loop: round bookkeeping, resume inside a round after a kill, min-gain stop (stage runner and recaptioning
faked: milliseconds), the CLI's argument checks, the miniature's data and scoring by hand, and the miniature's
--quick run end to end on the suite's tiny mini base (a kill after a step, then a rerun that resumes)."""

import json
import os
from pathlib import Path

import pytest

from vlmjax.recipes.vila2 import loop as L
from vlmjax.recipes.vila2 import mini_data
from vlmjax.recipes.vila2.state import RunState

ROOT = Path(__file__).resolve().parents[1]


def _captions(root: Path, n=4) -> str:
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "image": f"{i}.png", "caption": f"A shape {i}."}) + "\n"
                            for i in range(n)))
    return str(path)


class Fakes:
    """train_stage, recaption_round and the eval, recording their calls."""

    def __init__(self, monkeypatch, averages):
        self.train, self.recaption, self.eval = [], [], []
        self.averages = averages
        monkeypatch.setattr(L.stages_lib, "train_stage", self.train_stage)
        monkeypatch.setattr(L, "recaption_round", self.recaption_round)

    def train_stage(self, stage, workdir, **kw):
        self.train.append((str(Path(workdir).relative_to(Path(workdir).parents[1])), kw))
        export = Path(workdir) / "export"
        export.mkdir(parents=True, exist_ok=True)
        (export / "config.json").write_text("{}")
        (Path(workdir) / "stage.json").write_text(json.dumps({"steps": 2, "seconds": 1.0, "losses": [1.0]}))
        return export

    def recaption_round(self, spec, out, round_, model_dir):
        self.recaption.append((round_, model_dir))
        rows = [{"id": f"p{i}", "round": round_, "model": L.model_name(round_ - 1), "prompt_id": 0,
                 "output": f"recaption {round_}.{i}", "finish_reason": "eos"} for i in range(4)]
        Path(out, f"recaptions.r{round_}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"requests": 4, "written": 4}

    def eval_fn(self, model_dir, out):
        k = int(Path(model_dir).parts[-3][len("round"):])
        self.eval.append(k)
        return {"accuracy": self.averages[k], "describe_both": self.averages[k]}


def spec_for(tmp_path, fakes, **kw):
    return L.LoopSpec(config_file=str(ROOT / "configs" / "vila2" / "mini.py"), stages=("align", "sft"), captions=_captions(tmp_path),
                      image_root=str(tmp_path), caption_stages=("align",), sources={"sft": "sft.json"},
                      first={"tokenizer": "tok", "load_params": "tower.safetensors"}, eval_fn=fakes.eval_fn,
                      average=("accuracy", "describe_both"), **kw)


class Killed(Exception):
    pass


def test_loop_resumes_inside_a_round_and_stops_when_the_gain_is_small(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch, averages=[0.5, 0.6, 0.62, 0.9])
    spec, out = spec_for(tmp_path, fakes), tmp_path / "run"

    def kill(round_, step):
        if (round_, step) == (1, "combine"):
            raise Killed

    with pytest.raises(Killed):
        L.run_loop(spec, out, 3, min_gain=0.05, on_step=kill, quiet=True)
    state = RunState(out)
    assert (state.round, state.entry(0)["last_step"], state.entry(1)["last_step"]) == (1, "eval", "combine")
    assert [t for t, _ in fakes.train] == ["round0/align", "round0/sft"] and fakes.eval == [0]
    assert fakes.recaption == [(1, str(out / "round0" / "sft" / "export"))]  # VILA^0 (its last stage) recaptions
    assert list(L.finished(out)["rounds"]) == ["0"] and L.finished(out)["last"] == 0  # the report of what is done
    # rerun: round 1 goes on from train (recaption and combine are not redone); round 2 gains 0.02 < 0.05: stop
    summary = L.run_loop(spec, out, 3, min_gain=0.05, quiet=True)
    assert len(fakes.recaption) == 2 and fakes.recaption[1][0] == 2 and fakes.eval == [0, 1, 2]
    assert [t for t, _ in fakes.train] == [f"round{k}/{s}" for k in range(3) for s in ("align", "sft")]
    assert summary["last"] == 2 and summary["stopped"] == "round 2 gained +0.0200 < min_gain 0.05: stopped"
    assert [summary["rounds"][k]["eval"]["average"] for k in "012"] == [0.5, 0.6, 0.62]
    # each round retrains from scratch: stage 0 from spec.first, the caption stage on that round's captions
    calls = dict(fakes.train)
    for k in range(3):
        align, sft = calls[f"round{k}/align"], calls[f"round{k}/sft"]
        assert (align["tokenizer"], align["load_params"]) == ("tok", "tower.safetensors") and "model_path" not in align
        assert align["source"] == (spec.captions if k == 0 else str(out / f"combined.r{k}.jsonl"))
        assert sft["source"] == "sft.json" and sft["model_path"] == str(out / f"round{k}" / "align" / "export")
        assert (align["image_root"], sft["image_root"]) == (str(tmp_path), "images")  # sft: its config's root
    rows = [json.loads(line) for line in open(out / "combined.r2.jsonl")]
    assert rows[1]["caption"] == "A shape 1. recaption 2.1" and rows[1]["source_model"] == "vila1"
    state = json.load(open(out / "state.json"))
    assert [state["rounds"][k]["last_step"] for k in "012"] == ["eval"] * 3 and "3" not in state["rounds"]
    assert state["rounds"]["1"]["recaption"]["model_dir"] == str(out / "round0" / "sft" / "export")
    assert json.load(open(out / "loop.json"))["stopped"] == summary["stopped"]
    # a third run redoes nothing; without min_gain it goes on to round 3
    n = len(fakes.train)
    assert L.run_loop(spec, out, 2, quiet=True)["last"] == 2 and len(fakes.train) == n
    assert L.run_loop(spec, out, 3, quiet=True)["rounds"]["3"]["eval"]["average"] == 0.9
    assert fakes.recaption[-1] == (3, str(out / "round2" / "sft" / "export"))


def test_loop_spec_and_cli_refuse_bad_settings(tmp_path, capsys):
    from vlmjax.recipes.vila2.__main__ import main

    with pytest.raises(ValueError, match=r"caption_stages \['pretrain'\] must be among"):
        L.LoopSpec("c.py", ("align", "sft"), "p.jsonl", ".", ("pretrain",), {"sft": "s.json"})
    with pytest.raises(ValueError, match=r"no data source for stage\(s\) \['sft'\]"):
        L.LoopSpec("c.py", ("align", "sft"), "p.jsonl", ".", ("align",))
    with pytest.raises(KeyError, match="lack \\['describe_both'\\]"):
        L.average({"accuracy": 1.0}, ("accuracy", "describe_both"))
    # VILA's pretrain stage is a mixture: only its caption source reads the round's captions
    vila = L.LoopSpec(str(ROOT / "configs" / "vila" / "llama2_7b.py"), ("align", "pretrain", "sft"), "p.jsonl", "I",
                      ("pretrain",), {"align": "a.jsonl", "sft": {"path": "s.json", "image_root": "S"}})
    mixed = L.stage_data(vila, "pretrain", "combined.r1.jsonl")
    docs, pairs = mixed["data.sources"]
    assert (docs["format"], docs["path"]) == ("interleaved", "data/mmc4/docs.jsonl")
    assert (pairs["format"], pairs["path"], pairs["image_root"]) == ("caption", "combined.r1.jsonl", "I")
    assert L.stage_data(vila, "sft", "x") == {"source": "s.json", "image_root": "S"}
    assert L.stage_data(vila, "align", "x")["source"] == "a.jsonl"
    with pytest.raises(ValueError, match="llama2_7b.py:sft has 0 caption-format sources"):
        L.stage_data(L.dataclasses.replace(vila, caption_stages=("pretrain", "sft")), "sft", "x")
    caps = _captions(tmp_path)
    base = ["loop", "--rounds", "1", "--config", "configs/vila2/mini.py", "--stages", "align", "sft",
            "--caption-stages", "align", "--captions", caps, "--image-root", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, msg in ((["--set", "align.optim.lr=1"], "expected STAGE:KEY=VALUE"), ([], "no data source"),
                       (["--source", "sft"], "expected STAGE=PATH")):
        with pytest.raises(SystemExit):
            main(base + extra)
        assert msg in capsys.readouterr().err
    from vlmjax.recipes.vila2 import miniature

    for bad in ("sft.train.steps=1", "pretrain:train.steps=1", "sft:train.steps"):  # the miniature's --set
        with pytest.raises(SystemExit):
            miniature.main(["--workdir", str(tmp_path / "m"), "--set", bad])
        assert "expected STAGE:KEY=VALUE with STAGE in ('all', 'align', 'sft', 'specialist')" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_stage_data_for_appended_captions_and_a_named_caption_source():
    """caption_qa captions replace the caption stage's source with the turns' chat template; in VILA^2's pretrain
    mixture (MMC4 + COYO rest + COYO subset) only the source named caption_source reads the round's captions."""
    vila2 = str(ROOT / "configs" / "vila2" / "llama2_7b.py")
    spec = L.LoopSpec(vila2, ("align", "pretrain", "sft"), "sub.jsonl", "I", ("pretrain",),
                      {"align": "a.jsonl", "sft": "s.json"}, caption_source="vila2_subset")
    docs, rest, sub = L.stage_data(spec, "pretrain", "combined.r1.jsonl")["data.sources"]
    assert (docs["format"], rest["path"], rest["format"]) == ("interleaved", "data/coyo/pairs.vila2_rest.jsonl",
                                                              "caption")
    assert (sub["path"], sub["format"], sub["name"], sub["weight"]) == ("combined.r1.jsonl", "caption", "vila2_subset",
                                                                        0.05)
    qa = L.dataclasses.replace(spec, caption_format="caption_qa")
    sub = L.stage_data(qa, "pretrain", "appended.r3.jsonl")["data.sources"][2]
    assert (sub["format"], sub["format_options"], sub["image_root"]) == ("caption_qa", {"chat_template": "vicuna_v1"},
                                                                         "I")
    assert L.stage_data(L.dataclasses.replace(qa, chat_template="chatml"), "pretrain", "x")["data.sources"][2][
        "format_options"] == {"chat_template": "chatml"}
    with pytest.raises(ValueError, match="pretrain has 2 caption-format sources"):
        L.stage_data(L.dataclasses.replace(spec, caption_source=None), "pretrain", "x")
    with pytest.raises(ValueError, match="has 0 caption-format sources named 'coyo'"):
        L.stage_data(L.dataclasses.replace(spec, caption_source="coyo"), "pretrain", "x")
    with pytest.raises(ValueError, match="caption_format must be one of"):
        L.dataclasses.replace(spec, caption_format="llava")
    # the miniature's one-source align stage: the whole source, in caption_qa with the SFT stage's template
    mini = L.LoopSpec(str(ROOT / "configs" / "vila2" / "mini.py"), ("align", "sft"), "p.jsonl", "I", ("align",),
                      {"sft": "sft.json"}, caption_format="caption_qa")
    (src,) = L.stage_data(mini, "align", "appended.r1.jsonl")["data.sources"]
    assert src == {"format": "caption_qa", "path": "appended.r1.jsonl", "image_root": "I",
                   "format_options": {"chat_template": "auto"}}


def test_mini_data_captions_and_scores(tmp_path, tiny_mini_base):
    info = mini_data.build(tmp_path / "d", Path(tiny_mini_base["data"]), pairs=(0, 60), sft=(3000, 3006))
    pairs = [json.loads(line) for line in open(tmp_path / "d" / "pairs.jsonl")]
    oracle = {r["id"]: r for r in map(json.loads, open(tmp_path / "d" / "oracle.jsonl"))}
    assert info["pairs"] == len(pairs) > 40 and sum(info["pair_kinds"].values()) == len(pairs)
    assert set(info["pair_kinds"]) == {"shape", "color", "generic"} and min(info["pair_kinds"].values()) > 5
    for r in pairs:
        want = {"shape": f"A {r['shape']}.", "color": f"Something {r['color']}.", "generic": "An image."}[r["kind"]]
        assert r["caption"] == want and oracle[r["id"]]["caption"] == f"A {r['color']} {r['shape']}."
    scores = mini_data.caption_scores(pairs, "caption")
    n = len(pairs)
    assert scores["both"] == 0.0 and scores["shape"] == pytest.approx(info["pair_kinds"]["shape"] / n)
    assert scores["color"] == pytest.approx(info["pair_kinds"]["color"] / n)
    assert mini_data.caption_scores(oracle.values(), "caption")["both"] == 1.0
    by_hand = [{"color": "red", "shape": "circle", "t": "A red circle."},  # both
               {"color": "red", "shape": "circle", "t": "A blue circle, red."},  # first colour word wrong
               {"color": "red", "shape": "circle", "t": None}]  # failed recaption: wrong, 0 words
    s = mini_data.caption_scores(by_hand, "t")
    assert (s["color"], s["shape"], s["both"], s["words"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3),
                                                               pytest.approx(1 / 3), pytest.approx(7 / 3))
    # right when named: colour named in 2 rows (1 right), shape in 2 (2 right); nothing named -> None
    assert (s["color_if_named"], s["shape_if_named"]) == (0.5, 1.0)
    none = mini_data.caption_scores([{"color": "red", "shape": "circle", "t": "An image."}], "t")
    assert none["color_if_named"] is None and none["shape_if_named"] is None
    sft = json.load(open(tmp_path / "d" / "sft.json"))
    assert [r["id"] for r in sft] == [f"train_{n}" for n in range(3000, 3006)]
    assert all(t["value"].startswith("<image>\n") for t in (r["conversations"][0] for r in sft))


def test_mini_data_sft_describe_keeps_the_description_on_the_first_n_images(tmp_path, tiny_mini_base):
    from vlmjax.eval.easy_vqa import DESCRIBE_PROMPT
    from vlmjax.recipes.vila2.prompts import PROMPTS

    asks = set(PROMPTS) | {DESCRIBE_PROMPT}
    base = Path(tiny_mini_base["data"])
    full = mini_data.build(tmp_path / "all", base, pairs=(0, 20), sft=(3000, 3006))
    info = mini_data.build(tmp_path / "two", base, pairs=(0, 20), sft=(3000, 3006), describe=2)
    assert (full["sft_describe"], full["sft_descriptions"]) == (None, 6)
    assert (info["sft_describe"], info["sft_descriptions"]) == (2, 2)
    by_id = {r["id"]: r for r in json.load(open(tmp_path / "all" / "sft.json"))}
    for k, r in enumerate(json.load(open(tmp_path / "two" / "sft.json"))):
        qs = [t["value"].replace("<image>\n", "") for t in r["conversations"][::2]]
        assert (len(asks & set(qs)) == 1) == (k < 2), (k, qs)
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in r["conversations"]) == 1
        # the QA pairs are the full conversation's, less the description pair
        full_pairs = {(a["value"].replace("<image>\n", ""), b["value"])
                      for a, b in zip(by_id[r["id"]]["conversations"][::2], by_id[r["id"]]["conversations"][1::2])}
        pairs = {(a["value"].replace("<image>\n", ""), b["value"])
                 for a, b in zip(r["conversations"][::2], r["conversations"][1::2])}
        assert pairs == full_pairs if k < 2 else pairs == {p for p in full_pairs if p[0] not in asks}
    with pytest.raises(ValueError, match="sft_describe"):  # the folder was built for another describe count
        mini_data.build(tmp_path / "two", base, pairs=(0, 20), sft=(3000, 3006), describe=3)
    assert mini_data.without_description([{"from": "human", "value": "<image>\nWhat?"}]) == \
        [{"from": "human", "value": "<image>\nWhat?"}]


def test_miniature_quick_end_to_end_resumes(tmp_path, tiny_mini_base):
    from train_utils import TINY_MINI

    from vlmjax.recipes.vila2 import miniature

    over = {"align": TINY_MINI, "sft": {"data.batch_size": 2}, "specialist": {"data.batch_size": 2}}

    def kill(round_, step):
        if (round_, step) == (1, "recaption"):
            raise Killed

    # the oracle row is round 0 of another run_loop on other captions: left out here to keep the test short
    kw = dict(seeds=(0,), rounds=1, quick=True, base=tiny_mini_base, over=over, oracle=False)
    with pytest.raises(Killed):
        miniature.run_seeds(tmp_path, on_step=kill, **kw)
    assert RunState(tmp_path / "seed0" / "loop").entry(1)["last_step"] == "recaption"
    out = miniature.run_seeds(tmp_path, ablations=("specialist",), **kw)  # the rerun adds the specialist arm
    rows = out["rows"]
    assert list(rows) == ["round 0", "round 1", "round 1 + shape specialist QA"]
    assert rows["round 0"]["cap_both"]["mean"] == 0.0
    assert 0.0 <= rows["round 1"]["recap_both"]["mean"] <= 1.0 and "recap_both" not in rows["round 0"]
    assert out["base_gate"]["passed"] is None or isinstance(out["base_gate"]["passed"], bool)
    assert "round 0 captions carry colour + shape for 0.0%" in out["info_gate"]["lines"][0]
    assert "| round 1 | 1 |" in out["table"]
    for r in ("round 0", "round 1"):  # the align export's caption-likelihood probe, cached beside the round
        assert 0.0 <= rows[r]["align_color"]["mean"] <= 1.0 and 0.0 <= rows[r]["align_shape"]["mean"] <= 1.0
    assert json.load(open(tmp_path / "seed0" / "loop" / "round0" / "align_probe.json"))["n"] == 16
    for name in ("rounds", "losses", "recaptions"):
        assert os.path.getsize(tmp_path / "figures" / f"{name}.png") > 1000
    saved = json.load(open(tmp_path / "results" / "miniature.json"))
    assert saved["seeds"] == [0] and saved["meta"]["wall_s"] > 0 and saved["config"]["rounds"] == 1
    again = miniature.run_seeds(tmp_path, report_only=True, figures=False, **kw)  # trains nothing: the same rows
    assert again["per_seed"] == {k: v for k, v in out["per_seed"].items() if k.startswith("round ") and "+" not in k}
    combined = [json.loads(line) for line in open(tmp_path / "seed0" / "loop" / "combined.r1.jsonl")]
    assert len(combined) == 24 and all(r["round"] == 1 and r["source_model"] == "vila0" for r in combined)
    # the shape specialist: fine-tuned from VILA^1, asked about round 1's captions, appended, generalist retrained
    loop = tmp_path / "seed0" / "loop"
    spec_row = out["per_seed"]["round 1 + shape specialist QA"][0]
    assert 0.0 <= spec_row["qa_shape"] <= spec_row["qa_appended"] <= 1.0 and "accuracy" in spec_row
    man = json.load(open(loop / "appended.r1.manifest.json"))
    shape = man["specialists"]["shape"]
    assert man["written"] == 24 and sum(shape[k] for k in ("appended", "failed", "empty", "truncated")) == 24
    assert man["with_turns"] == shape["appended"] and shape["model"] == "shape-specialist-of-vila1"
    appended = [json.loads(line) for line in open(loop / "appended.r1.jsonl")]
    assert all(r["conversations"][0]["value"] == mini_data.SHAPE_PROMPT for r in appended if r["conversations"])
    assert [r["caption"] for r in appended] == [r["caption"] for r in combined]  # round 1's captions, in order
    align = json.load(open(tmp_path / "seed0" / "abl_specialist_r1" / "round0" / "align" / "config.json"))
    assert align["data"]["sources"][0]["format"] == "caption_qa"  # the generalist trained on the appended file
    assert (loop / "specialists" / "shape" / "train.r1" / "export").is_dir()


def test_align_probe_asks_each_image_every_colour_and_every_shape_caption():
    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.eval.easy_vqa import description_task
    from vlmjax.recipes.vila2.mini_probe import probe_task

    try:
        images = description_task(6).samples
    except FileNotFoundError as e:
        pytest.skip(f"easy-vqa missing: {e}")
    task = probe_task(6)
    assert (task.template, task.method, task.option_format, task.normalize) == ("plain", "loglik", "text", "sum")
    assert len(task.samples) == 2 * len(images)
    for img, (c, s) in zip(images, zip(task.samples[::2], task.samples[1::2])):
        color, shape = img.answers
        assert (c.meta["kind"], s.meta["kind"], c.image, s.image, c.question) == ("color", "shape", img.image,
                                                                                  img.image, "")
        assert c.choices == [f"Something {x}." for x in COLORS] and s.choices == [f"A {x}." for x in SHAPES]
        assert c.choices[ord(c.answers[0]) - 65] == f"Something {color}."
        assert s.choices[ord(s.answers[0]) - 65] == f"A {shape}."


def test_headroom_gate_by_hand():
    from vlmjax.recipes.vila2.miniature import headroom_gate

    r0 = [{"accuracy": 0.80, "describe_both": 0.70}, {"accuracy": 0.60, "describe_both": 0.50}]
    oracle = [{"accuracy": 0.82, "describe_both": 0.72}, {"accuracy": 0.70, "describe_both": 0.70}]
    ok, line = headroom_gate({"round 0": r0, "oracle (true full captions)": oracle})
    assert ok and "= +0.085" in line and "+0.020, +0.150" in line  # mean of the per-seed differences
    ok, line = headroom_gate({"round 0": r0, "oracle (true full captions)": r0})
    assert not ok and "= +0.000" in line and "FAIL" in line
    assert headroom_gate({"round 0": r0})[0] is None
