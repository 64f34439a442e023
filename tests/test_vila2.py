"""VILA^2 recipe core: seeded prompt choice, resumable host-sharded recaptioning, combine's modes, counts, escaping
and refusals, state.json, and the README's commands (tiny random VLM, SmolLM2 tokenizer; seconds)."""

import collections
import json
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from vlmjax.data.pipeline import SourceSpec
from vlmjax.generate import GenerationConfig, SamplingConfig
from vlmjax.generate.shards import IncompleteShards, shard_paths
from vlmjax.recipes.vila2.combine import combine, combined_path
from vlmjax.recipes.vila2.prompts import PROMPTS, prompt_id
from vlmjax.recipes.vila2.prompts import SPECIALIST_PROMPTS as PROMPTS_SPECIALIST
from vlmjax.recipes.vila2.recaption import recaption, recaption_requests, recaptions_path
from vlmjax.recipes.vila2.state import RunState, StateMismatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_captions(root, n=7):
    """n caption records with images, one whose image is missing, one with an empty caption (does not parse)."""
    os.makedirs(root / "images", exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        key = ("caption", "text")[i % 2]  # the caption parser reads either; combine writes "caption"
        recs.append({"id": f"c{i}", "image": f"{i}.png", key: f"A shape {i}.", "source": "toy"})
    recs.append({"id": "gone", "image": "missing.png", "caption": "A lost image."})
    recs.append({"id": "blank", "image": "0.png", "caption": "  "})
    with open(root / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


def gen_config(max_new_tokens=6):
    # every 3rd token id ends a reply: a random model then finishes some rows (some at once: empty) and runs
    # others to max_new_tokens (truncated)
    return GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=1.0), seed=3,
                            eos_token_ids=tuple(range(0, 49216, 3)))


def test_prompt_choice_is_a_function_of_round_and_key(tmp_path):
    keys = [f"img{i}" for i in range(3000)]
    picks = [prompt_id(1, k) for k in keys]
    assert picks == [prompt_id(1, k) for k in keys]  # deterministic (no process-salted hash)
    freq = np.bincount(picks, minlength=3) / len(keys)
    np.testing.assert_allclose(freq, 1 / 3, atol=0.03)  # uniform: 3 sd of a binomial share is ~0.026
    changed = np.mean([prompt_id(2, k) != p for k, p in zip(keys, picks)])
    assert 0.6 < changed < 0.74  # a new round draws afresh (2/3 expected)
    assert len(PROMPTS) == 3 and all(len(set(p.split(". "))) == len(p.split(". ")) for p in PROMPTS)
    assert "imagin" in PROMPTS[2] and "list" in PROMPTS[2]
    # requests carry their prompt and provenance whatever the slice of the data they are built from
    write_captions(tmp_path)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"), image_root=str(tmp_path / "images"))
    reqs = recaption_requests(spec, 1, "m")
    some = recaption_requests(spec, 1, "m", limit=3)
    for r in reqs[:7] + some:
        pid = prompt_id(1, r.id)
        assert r.messages == [{"role": "user", "content": "<image>\n" + PROMPTS[pid]}]
        assert (r.meta["round"], r.meta["model"], r.meta["prompt_id"]) == (1, "m", pid)
    assert reqs[8].error is not None and reqs[8].meta["prompt_id"] == prompt_id(1, "blank")
    # an aligned-only model is asked in its training format: the image alone, plain template, no prompt id
    plain = recaption_requests(spec, 1, "m", prompts=None)
    assert [r.id for r in plain] == [r.id for r in reqs]
    for r in plain[:7]:
        assert r.messages == [{"role": "user", "content": "<image>"}] and r.template == "plain"
        assert (r.meta["round"], r.meta["model"], r.meta["prompt_id"]) == (1, "m", None)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_recaption_resumes_and_two_shards_merge_to_one_host(tmp_path):
    from test_generate import smol_vlm
    from vlmjax.data.assets import smollm2_tokenizer

    write_captions(tmp_path)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"), image_root=str(tmp_path / "images"))
    model, tok, cfg = smol_vlm(), smollm2_tokenizer(), gen_config()
    one = tmp_path / "one"
    st = recaption(model, tok, spec, one, 1, "vila0", cfg, batch_size=4, shard_index=0, shard_count=1,
                   progress=False)
    assert (st["requests"], st["written"], st["failed"]) == (9, 7, 2)
    ref = {r["id"]: r for r in _rows(recaptions_path(one, 1))}
    assert sorted(ref) == sorted([f"c{i}" for i in range(7)] + ["gone", "blank"])
    for r in ref.values():
        assert (r["round"], r["model"], r["prompt_id"]) == (1, "vila0", prompt_id(1, r["id"]))
    assert "image file not found" in ref["gone"]["error"] and "empty caption" in ref["blank"]["error"]
    assert ref["c3"]["caption"] == "A shape 3." and ref["c3"]["prompt"] == "<image>\n" + PROMPTS[ref["c3"]["prompt_id"]]
    state = json.load(open(one / "state.json"))
    assert state["round"] == 1 and state["rounds"]["1"]["last_step"] == "recaption"
    # two hosts as separate jobs (run here one after the other); host 0 crashes after its first batch
    two = tmp_path / "two"
    paths = shard_paths(recaptions_path(two, 1), 2)
    assert recaption(model, tok, spec, two, 1, "vila0", cfg, batch_size=4, shard_index=1, shard_count=2,
                     progress=False)["merged"] is None
    recaption(model, tok, spec, two, 1, "vila0", cfg, batch_size=4, shard_index=0, shard_count=2, progress=False)
    lines = open(paths[0]).read().splitlines(keepends=True)
    with open(paths[0], "w") as f:
        f.write("".join(lines[:3]) + lines[3][:10])  # three records and a torn line
    assert json.load(open(two / "state.json"))["rounds"]["1"]["last_step"] is None  # not merged yet
    with pytest.raises(IncompleteShards, match="00000-of-00002.jsonl:4: torn last line"):
        combine(spec, two, 1)
    with open(paths[0], "w") as f:
        f.write("".join(lines[:3]))
    with pytest.raises(IncompleteShards, match="2 of 9 ids are missing"):
        combine(spec, two, 1)
    with open(paths[0], "a") as f:
        f.write(lines[3][:10])  # the torn line again: the resumed host cuts it off
    st = recaption(model, tok, spec, two, 1, "vila0", cfg, batch_size=4, shard_index=0, shard_count=2,
                   progress=False)
    assert (st["requests"], st["skipped_done"], st["written"] + st["failed"]) == (5, 3, 2)
    man = combine(spec, two, 1)
    merged = _rows(recaptions_path(two, 1))
    assert [r["id"] for r in merged] == [f"c{i}" for i in range(7)] + ["gone", "blank"]  # data order
    assert {r["id"]: r for r in merged} == ref  # == one host, outputs included (sampling streams per id)
    assert man == {**combine(spec, one, 1), "out": combined_path(two, 1)}
    statuses = collections.Counter(r["kept_original"] for r in _rows(combined_path(two, 1)))
    assert sum(statuses.values()) == 8 and statuses["failed"] == 1  # the eos ids give ok and kept rows


def write_state_and_recaptions(out, recs, round_=1, model="vila0", start=True):
    if start:
        RunState(out).start(round_, model)
    with open(recaptions_path(out, round_), "w") as f:
        f.writelines(json.dumps({"round": round_, "model": model, "prompt_id": 0, **r}) + "\n" for r in recs)


HAND = [  # recaption records by hand: one of each outcome
    {"id": "c0", "output": " A red circle on white. ", "finish_reason": "eos", "num_tokens": 7},
    {"id": "c1", "output": "See <image> here.", "finish_reason": "stop", "num_tokens": 5},
    {"id": "c2", "output": "A very long", "finish_reason": "length", "num_tokens": 8},
    {"id": "c3", "output": "  ", "finish_reason": "eos", "num_tokens": 1},
    {"id": "c4", "error": "OSError: image file not found"},
    {"id": "gone", "error": "OSError: image file not found"},
    {"id": "blank", "error": "BadSample: empty caption"},
]


def test_combine_modes_counts_escaping_and_manifest(tmp_path):
    recs = write_captions(tmp_path, n=5)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"))
    out = tmp_path / "run"
    write_state_and_recaptions(out, HAND)
    want = {"concat": ["A shape 0. A red circle on white.", "A shape 1. See [image] here."],
            "replace": ["A red circle on white.", "See [image] here."],
            "original": ["A shape 0.", "A shape 1."]}
    for mode, (c0, c1) in want.items():
        man = combine(spec, out, 1, mode=mode)
        rows = {r["id"]: r for r in _rows(combined_path(out, 1))}
        assert [rows["c0"]["caption"], rows["c1"]["caption"]] == [c0, c1]
        assert [rows[f"c{i}"]["caption"] for i in (2, 3, 4)] == ["A shape 2.", "A shape 3.", "A shape 4."]
        assert {k: man[k] for k in ("records", "written", "recaptioned", "failed", "empty", "truncated",
                                    "bad_record")} == {"records": 7, "written": 6, "recaptioned": 2, "failed": 2,
                                                       "empty": 1, "truncated": 1, "bad_record": 1}
        assert man["bad_records"][0]["id"] == "blank" and "empty caption" in man["bad_records"][0]["error"]
    # provenance and flags (last mode: original)
    assert rows["c1"]["recaption"] == "See [image] here." and rows["c1"]["orig_caption"] == "A shape 1."
    assert "text" not in rows["c1"] and rows["c1"]["source"] == "toy" and rows["c1"]["image"] == "1.png"
    assert (rows["c2"]["truncated"], rows["c2"]["kept_original"], rows["c0"]["kept_original"]) == \
        (True, "truncated", None)
    assert rows["c4"]["recaption"] is None and rows["c4"]["kept_original"] == "failed"
    assert rows["gone"]["caption"] == "A lost image." and rows["c0"]["source_model"] == "vila0"
    assert all(r["round"] == 1 for r in rows.values()) and "blank" not in rows
    # manifest word lengths (concat), by hand: originals 3,3,3,3,3,3 words; recaptions 5 and 3
    man = combine(spec, out, 1, mode="concat")
    assert man["words"]["recaption"] == {"n": 2, "mean": 4.0, "min": 3.0, "p25": 3.5, "p50": 4.0, "p75": 4.5,
                                         "max": 5.0}
    concat = [8, 6, 3, 3, 3, 3]
    assert man["words"]["caption"]["mean"] == pytest.approx(np.mean(concat))
    assert man["words"]["caption"]["p75"] == pytest.approx(np.quantile(concat, 0.75))
    assert json.load(open(str(combined_path(out, 1))[:-6] + ".manifest.json")) == man
    state = json.load(open(out / "state.json"))["rounds"]["1"]
    assert state["last_step"] == "combine" and state["combine"]["mode"] == "concat"
    # the combined file is a caption source the trainer parses
    from vlmjax.generate import requests_from_source

    parsed = requests_from_source(SourceSpec(format="caption", path=combined_path(out, 1)), on_bad_sample="error")
    assert [r.meta["caption"] for r in parsed][:2] == want["concat"]
    assert recs[1]["text"] == "A shape 1."


def test_combine_refuses_other_rounds_models_duplicates_and_gaps(tmp_path):
    write_captions(tmp_path, n=5)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"))
    out = tmp_path / "run"
    write_state_and_recaptions(out, HAND)
    with pytest.raises(StateMismatch, match="round 1 is recaptioned by model 'vila0', not 'vila9'"):
        RunState(out).start(1, "vila9")
    RunState(out).start(2, "vila1")  # the run moved on: round 1's recaptions no longer match state.json
    with pytest.raises(StateMismatch, match="round 1 by model 'vila0', but .*state.json says round 2 by model "
                                            "'vila1'"):
        combine(spec, out, 1)
    # round 2's file, written by another model than state.json names for round 2
    write_state_and_recaptions(out, HAND, round_=2, model="vila0", start=False)
    with pytest.raises(StateMismatch, match="round 2 by model 'vila0', but .* round 2 by model 'vila1'"):
        combine(spec, out, 2)
    # host shards: a duplicate across shards, then a missing id, are errors; nothing is written
    shards = tmp_path / "shards"
    RunState(shards).start(1, "vila0")
    paths = shard_paths(recaptions_path(shards, 1), 2)
    head = {"round": 1, "model": "vila0", "prompt_id": 0}
    for p, part in zip(paths, (HAND[0::2], HAND[1::2] + [HAND[0]])):
        with open(p, "w") as f:
            f.writelines(json.dumps({**head, **r}) + "\n" for r in part)
    with pytest.raises(ValueError, match="'c0' in .*00000-of-00002.jsonl:1 and .*00001-of-00002.jsonl:4"):
        combine(spec, shards, 1)
    with open(paths[1], "w") as f:
        f.writelines(json.dumps({**head, **r}) + "\n" for r in HAND[1:4:2])
    with pytest.raises(IncompleteShards, match="1 of 7 ids are missing from the shards: 'gone'"):
        combine(spec, shards, 1)
    assert not os.path.exists(recaptions_path(shards, 1)) and not os.path.exists(combined_path(shards, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        combine(spec, out, 2, mode="append")
    # a recaption run over the first N records combines with the same limit (and only with it)
    part = tmp_path / "part"
    write_state_and_recaptions(part, HAND[:3])
    assert combine(spec, part, 1, limit=3)["written"] == 3
    with pytest.raises(IncompleteShards, match="4 of 7 ids are missing"):
        combine(spec, part, 1)


README_COMMANDS = [
    "python -m vlmjax.recipes.vila2 recaption --model runs/vila2/vila0 --data captions.jsonl --image-root images "
    "--round 1 --out runs/vila2 --max-new-tokens 8",
    "python -m vlmjax.recipes.vila2 combine --data captions.jsonl --round 1 --out runs/vila2 --mode concat",
    "python -m vlmjax.recipes.vila2 specialist train --config configs/vila2/mini.py --model runs/vila2/vila1 "
    "--data shape_qa.json --image-root images --workdir runs/vila2/specialists/shape/train --set train.steps=2 "
    "--set data.batch_size=2",
    "python -m vlmjax.recipes.vila2 specialist recaption --model runs/vila2/specialists/shape/train/export "
    "--name shape --prompt 'What shape is in the image?' --data runs/vila2/combined.r1.jsonl --image-root images "
    "--round 1 --out runs/vila2 --max-new-tokens 8",
    "python -m vlmjax.recipes.vila2 append --data runs/vila2/combined.r1.jsonl --round 1 --out runs/vila2 "
    "--specialists shape",
    "python -m vlmjax.recipes.vila2 subset --data pairs.jsonl --fraction 0.05 --out pairs.subset.jsonl "
    "--rest pairs.rest.jsonl",
]


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## VILA^2 (vlmjax/recipes/vila2)")[1].split("\n## ")[0]
    return [" ".join(line.split()) for line in section.replace("\\\n", " ").splitlines()
            if line.strip().startswith(tuple(f"python -m vlmjax.recipes.vila2 {cmd}" for cmd in
                                              ("recaption", "combine", "specialist", "append", "subset")))]


def test_readme_commands_recaption_combine_and_specialist(tmp_path, monkeypatch):
    """The README's commands verbatim (on a tiny random VLM): recaption + combine round 1, then a specialist
    fine-tuned from VILA^1 answers its prompt about round 1's captions and `append` writes the caption_qa file."""
    from test_generate import smol_vlm
    from vlmjax.convert import hf
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.recipes.vila2.__main__ import main

    assert _readme_commands() == README_COMMANDS
    monkeypatch.chdir(tmp_path)
    write_captions(tmp_path, n=3)
    hf.save_vlm(smol_vlm(), tmp_path / "runs" / "vila2" / "vila0", tokenizer=smollm2_tokenizer())
    st = main(shlex.split(README_COMMANDS[0])[3:])
    assert (st["requests"], st["written"], st["failed"]) == (5, 3, 2)
    rows = _rows("runs/vila2/recaptions.r1.jsonl")
    assert all(r["model"] == "runs/vila2/vila0" and r["round"] == 1 for r in rows)
    assert all(r["num_tokens"] <= 8 for r in rows if "error" not in r)
    man = main(shlex.split(README_COMMANDS[1])[3:])
    assert (man["records"], man["written"], man["bad_record"], man["source_model"]) == (5, 4, 1, "runs/vila2/vila0")
    assert man["recaptioned"] + man["failed"] + man["empty"] + man["truncated"] == 4
    again = main(shlex.split(README_COMMANDS[0])[3:])  # resumed: nothing left to do
    assert (again["written"], again["skipped_done"], again["previous_errors"]) == (0, 3, 2)
    with pytest.raises(StateMismatch, match="not 'other'"):  # refused before the weights load
        main(shlex.split(README_COMMANDS[0])[3:] + ["--model-name", "other", "--model", "."])
    # the specialist: VILA^1 (here the same random weights) fine-tuned on shape QA, 2 steps
    from vlmjax.data.formats import parse_caption_qa
    from vlmjax.recipes.vila2.combine import recaption_status

    hf.save_vlm(smol_vlm(), tmp_path / "runs" / "vila2" / "vila1", tokenizer=smollm2_tokenizer())
    (tmp_path / "configs").symlink_to(os.path.join(ROOT, "configs"))
    (tmp_path / "shape_qa.json").write_text(json.dumps([
        {"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"}, {"from": "gpt", "value": "Circle"}]}
        for i in range(3)]))
    run_state = json.load(open("runs/vila2/state.json"))
    tr = main(shlex.split(README_COMMANDS[2])[3:])
    assert tr["steps"] == 2 and os.path.exists("runs/vila2/specialists/shape/train/export/config.json")
    st = main(shlex.split(README_COMMANDS[3])[3:])
    assert (st["requests"], st["written"], st["failed"]) == (4, 3, 1)  # combined.r1 has 4 records; 'gone' fails
    answers = _rows("runs/vila2/specialists/shape/recaptions.r1.jsonl")
    assert all(r["round"] == 1 and r["specialist"] == "shape" and r["prompt_id"] == 0 for r in answers)
    assert all(r["prompt"] == "<image>\nWhat shape is in the image?" for r in answers if "error" not in r)
    assert json.load(open("runs/vila2/state.json")) == run_state  # the run's own state is not the specialist's
    man = main(shlex.split(README_COMMANDS[4])[3:])
    by_hand = collections.Counter(recaption_status(r) for r in answers)  # a random model: mostly truncated
    shape = man["specialists"]["shape"]
    assert (shape["appended"], shape["failed"], shape["empty"], shape["truncated"]) == \
        (by_hand["ok"], by_hand["failed"], by_hand["empty"], by_hand["truncated"])
    assert (man["written"], man["with_turns"], man["bad_record"]) == (4, by_hand["ok"], 0)
    rows = _rows("runs/vila2/appended.r1.jsonl")
    for r in rows:
        assert len(parse_caption_qa(r).messages) == 2 + len(r["conversations"]) and r["source_model"] == \
            "runs/vila2/vila0" and r["specialists"][0]["model"] == "runs/vila2/specialists/shape/train/export"
    again = main(shlex.split(README_COMMANDS[3])[3:])  # resumed by id: nothing left
    assert (again["written"], again["skipped_done"]) == (0, 3)


SPATIAL = "Where are the objects relative to each other?"  # hand prompts (the records name what was asked)
GROUNDING = "Give the boxes."
SPECIALIST_HAND = {  # per specialist, one outcome per caption id (write_captions(n=5): c0-c4, gone; blank: bad)
    "spatial": [{"id": "c0", "output": " The circle is left of the square. ", "finish_reason": "eos"},
                {"id": "c1", "output": "See <image> above.", "finish_reason": "stop"},
                {"id": "c2", "output": "The circle is", "finish_reason": "length"},  # truncated
                {"id": "c3", "output": " ", "finish_reason": "eos"},  # empty
                {"id": "c4", "error": "OSError: image file not found"},
                {"id": "gone", "error": "OSError: image file not found"},
                {"id": "blank", "error": "BadSample: empty caption"}],
    "grounding": [{"id": "c0", "output": "A circle [0.1, 0.2, 0.5, 0.9].", "finish_reason": "eos"},
                  {"id": "c1", "output": "A circle on the left.", "finish_reason": "eos"},  # no box
                  {"id": "c2", "output": "A circle [0.5, 0.2, 0.1, 0.9].", "finish_reason": "eos"},  # xmin > xmax
                  {"id": "c3", "output": "[0, 0, 1, 1] the whole image", "finish_reason": "eos"},
                  {"id": "c4", "output": "Two: [0.1,0.1,0.2,0.2] and [0.3, 0.3, 0.4, 0.4]", "finish_reason": "eos"},
                  {"id": "gone", "error": "OSError: image file not found"},
                  {"id": "blank", "error": "BadSample: empty caption"}],
}


def write_specialist(out, name, recs, round_=1, model=None, shards=1):
    """A specialist's recaption records by hand in OUT/specialists/NAME (host shards when shards > 1)."""
    from vlmjax.recipes.vila2.specialist import specialist_dir

    folder = specialist_dir(out, name)
    model = model or f"{name}-model"
    RunState(folder).start(round_, model)
    prompt = {"spatial": SPATIAL, "grounding": GROUNDING}.get(name, "Say it.")
    rows = [{"round": round_, "model": model, "prompt_id": 0, "specialist": name,
             **({} if "error" in r else {"prompt": "<image>\n" + prompt}), **r} for r in recs]
    for path, part in zip(shard_paths(recaptions_path(folder, round_), shards), [rows[i::shards] for i in
                                                                                 range(shards)]):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return folder


def test_append_turns_counts_provenance_and_refusals(tmp_path):
    from vlmjax.data.formats import parse_caption, parse_caption_qa
    from vlmjax.recipes.vila2.specialist import append, appended_path

    write_captions(tmp_path, n=5)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"))
    out = tmp_path / "run"
    for name, recs in SPECIALIST_HAND.items():
        write_specialist(out, name, recs)
    man = append(spec, out, 1, ["spatial", "grounding"])
    rows = {r["id"]: r for r in _rows(appended_path(out, 1))}
    # by hand: spatial appends c0, c1; grounding c0, c3, c4 (c1 has no box, c2's box is inverted)
    assert {k: man[k] for k in ("records", "written", "with_turns", "without_turns", "bad_record")} == \
        {"records": 7, "written": 6, "with_turns": 4, "without_turns": 2, "bad_record": 1}
    sp, gr = man["specialists"]["spatial"], man["specialists"]["grounding"]
    assert {k: sp[k] for k in ("appended", "failed", "empty", "truncated", "no_box")} == \
        {"appended": 2, "failed": 2, "empty": 1, "truncated": 1, "no_box": 0}
    assert {k: gr[k] for k in ("appended", "failed", "empty", "truncated", "no_box")} == \
        {"appended": 3, "failed": 1, "empty": 0, "truncated": 0, "no_box": 2}
    assert (sp["model"], gr["model"]) == ("spatial-model", "grounding-model")
    assert sp["answer_words"]["n"] == 2 and sp["answer_words"]["mean"] == (7 + 3) / 2  # "[image]" is one word
    assert man["bad_records"][0]["id"] == "blank" and "blank" not in rows
    assert rows["c0"]["conversations"] == [
        {"from": "human", "value": SPATIAL}, {"from": "gpt", "value": "The circle is left of the square."},
        {"from": "human", "value": GROUNDING}, {"from": "gpt", "value": "A circle [0.1, 0.2, 0.5, 0.9]."}]
    assert rows["c1"]["conversations"][1]["value"] == "See [image] above."  # escaped: not an image placeholder
    assert [t["value"] for t in rows["c3"]["conversations"]] == [GROUNDING, "[0, 0, 1, 1] the whole image"]
    assert rows["c2"]["conversations"] == [] and rows["gone"]["conversations"] == []
    assert [p["status"] for p in rows["c2"]["specialists"]] == ["truncated", "no_box"]
    assert rows["c4"]["specialists"] == [
        {"name": "spatial", "model": "spatial-model", "round": 1, "prompt_id": 0, "status": "failed"},
        {"name": "grounding", "model": "grounding-model", "round": 1, "prompt_id": 0, "status": "appended"}]
    assert rows["c1"]["caption"] == "A shape 1." and "text" not in rows["c1"] and rows["c1"]["source"] == "toy"
    # every record is a caption_qa record the trainer parses; one without turns is its plain caption
    for r in rows.values():
        ex = parse_caption_qa(r)
        assert len(ex.messages) == 2 + len(r["conversations"])
    no_turns = {k: v for k, v in rows["c2"].items() if k != "conversations"}
    assert parse_caption_qa(rows["c2"]) == parse_caption(no_turns)
    assert json.load(open(appended_path(out, 1)[:-6] + ".manifest.json")) == man
    # appending to appended records keeps their turns and provenance (a third specialist, same ids)
    write_specialist(out, "ocr", [{"id": k, "output": f"No text {k}.", "finish_reason": "eos"}
                                  for k in ("c0", "c1", "c2", "c3", "c4", "gone")], round_=2)
    again = append(SourceSpec(format="caption", path=appended_path(out, 1)), out, 2, ["ocr"])
    rows2 = {r["id"]: r for r in _rows(appended_path(out, 2))}
    assert again["specialists"]["ocr"]["appended"] == 6 and rows2["c0"]["conversations"][:4] == \
        rows["c0"]["conversations"] and rows2["c0"]["conversations"][5]["value"] == "No text c0."
    assert [p["name"] for p in rows2["c0"]["specialists"]] == ["spatial", "grounding", "ocr"]


def test_append_refuses_duplicates_gaps_other_models_and_names(tmp_path):
    from vlmjax.recipes.vila2.specialist import append, appended_path, specialist_dir

    write_captions(tmp_path, n=5)
    spec = SourceSpec(format="caption", path=str(tmp_path / "captions.jsonl"))
    out = tmp_path / "run"
    # an id in two host shards: an error naming both lines; nothing is written
    write_specialist(out, "spatial", SPECIALIST_HAND["spatial"] + [SPECIALIST_HAND["spatial"][0]], shards=2)
    with pytest.raises(ValueError, match="'c0' in .*00000-of-00002.jsonl:1 and .*00001-of-00002.jsonl:4"):
        append(spec, out, 1, ["spatial"])
    assert not os.path.exists(appended_path(out, 1))
    for p in shard_paths(recaptions_path(specialist_dir(out, "spatial"), 1), 2):
        os.remove(p)
    write_specialist(out, "spatial", SPECIALIST_HAND["spatial"][:-2])  # 'gone' and 'blank' were never answered
    with pytest.raises(IncompleteShards, match="2 of 7 ids are missing.*'gone', 'blank'"):
        append(spec, out, 1, ["spatial"])
    with pytest.raises(IncompleteShards, match="no recaptions for round 1"):
        append(spec, out, 1, ["ocr"])  # a specialist that never ran
    write_specialist(out, "spatial", SPECIALIST_HAND["spatial"])
    RunState(specialist_dir(out, "spatial")).start(2, "spatial-v2")  # its folder moved on to another round
    with pytest.raises(StateMismatch, match="round 1 by model 'spatial-model', but .* round 2 by model 'spatial-v2'"):
        append(spec, out, 1, ["spatial"])
    with pytest.raises(ValueError, match="each specialist once"):
        append(spec, out, 1, ["spatial", "spatial"])
    with pytest.raises(ValueError, match="specialist name '../x'"):
        append(spec, out, 1, ["../x"])


def test_boxes_and_the_subset_rule(tmp_path, monkeypatch):
    import hashlib

    from vlmjax.recipes.vila2.specialist import boxes, domain_prompts
    from vlmjax.recipes.vila2.subset import in_subset, split

    assert boxes("a [0.1, 0.2, 0.3, 0.4] b [1,2] c [0.5,0.5,0.5,0.9] d [0, 0, 1, 1] e [x, 0, 1, 1]") == \
        [(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0)]  # [1,2]: 2 numbers; xmin == xmax; not numbers
    assert boxes("[0.2, 0.1, 0.9, 1.5]") == [] and boxes(None) == []  # outside 0-1
    assert domain_prompts("ocr") == (PROMPTS_SPECIALIST["ocr"],) and domain_prompts("x", ["P"]) == ("P",)
    with pytest.raises(ValueError, match="'shape' has no default prompt"):
        domain_prompts("shape")
    with pytest.raises(ValueError, match="without <image>"):
        domain_prompts("ocr", ["<image> Read it."])
    keys = [f"coyo_{i}" for i in range(20000)]
    by_hand = [int.from_bytes(hashlib.sha256(f"vila2/subset/{k}".encode()).digest()[:8], "little") / 2**64 < 0.05
               for k in keys]
    five = [in_subset(k, 0.05) for k in keys]
    assert five == by_hand and abs(np.mean(five) - 0.05) < 0.005  # 3 sd of a binomial share is 0.0046
    assert all(in_subset(k, 0.1) for k, f in zip(keys, five) if f)  # a larger fraction's subset contains it
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        in_subset("a", 1.5)
    recs = [{"id": k, "image": f"{i}.jpg", "caption": f"c{i}"} for i, k in enumerate(keys[:200])]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    from vlmjax.recipes.vila2.__main__ import main

    monkeypatch.chdir(tmp_path)
    st = main(shlex.split(README_COMMANDS[5])[3:])
    sub, rest = _rows("pairs.subset.jsonl"), _rows("pairs.rest.jsonl")
    assert sub == [r for r, f in zip(recs, five) if f] and rest == [r for r, f in zip(recs, five) if not f]
    assert (st["records"], st["subset"], st["rest"]) == (200, len(sub), 200 - len(sub))
    (tmp_path / "noid.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="noid.jsonl: record #0 has no id"):
        split(SourceSpec(format="caption", path=str(tmp_path / "noid.jsonl")), 0.5, tmp_path / "a.jsonl",
              tmp_path / "b.jsonl")


def test_train_specialist_stage_checks_and_epochs(tmp_path, monkeypatch):
    """`train_specialist` runs the config's specialist stage from VILA^k's export on the domain file; --epochs sets
    the steps to ceil(epochs x records / global batch) (stage runner faked: milliseconds)."""
    from vlmjax.recipes.vila2 import specialist as S
    from vlmjax.train import stages as stages_lib

    calls = []
    monkeypatch.setattr(stages_lib, "train_stage", lambda stage, workdir, **kw: calls.append((stage, kw)) or workdir)
    domain = tmp_path / "domain.json"
    domain.write_text(json.dumps([{"id": f"d{i}", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]} for i in range(10)]))
    mini = os.path.join(ROOT, "configs", "vila2", "mini.py")
    S.train_specialist(mini, "vila1", str(domain), "imgs", tmp_path / "w", epochs=2)
    stage, kw = calls[-1]
    assert stage == "specialist" and (kw["model_path"], kw["source"], kw["image_root"]) == ("vila1", str(domain),
                                                                                          "imgs")
    assert kw["over"] == {"train.steps": 2}  # ceil(2 x 10 / 16): the mini stage's batch 16, grad_accum 1
    S.train_specialist(mini, "vila1", str(domain), "imgs", tmp_path / "w", epochs=2, over={"data.batch_size": 3})
    assert calls[-1][1]["over"] == {"data.batch_size": 3, "train.steps": 7}  # ceil(20 / 3)
    S.train_specialist(mini, "vila1", str(domain), "imgs", tmp_path / "w", steps_scale=0.5)
    assert calls[-1][1]["over"] == {} and calls[-1][1]["steps_scale"] == 0.5  # the config's 40 steps, scaled
    with pytest.raises(ValueError, match="epochs > 0 sets the steps"):
        S.train_specialist(mini, "vila1", str(domain), "imgs", tmp_path / "w", epochs=1, steps_scale=0.5)
    with pytest.raises(ValueError, match="mini.py:align: a specialist fine-tunes VILA\\^k's export"):
        S.train_specialist(mini, "vila1", str(domain), "imgs", tmp_path / "w", stage="align")
    with pytest.raises(ValueError, match="llama2_7b.py:pretrain: a specialist stage reads one llava-format source"):
        S.train_specialist(os.path.join(ROOT, "configs", "vila", "llama2_7b.py"), "v", str(domain), "i", tmp_path,
                           stage="pretrain")


def test_state_steps_only_move_forward(tmp_path):
    st = RunState(tmp_path)
    st.start(1, "vila0")
    for step in ("recaption", "combine", "train", "eval"):
        st.finish(1, step, n=1)
    RunState(tmp_path).finish(1, "recaption", n=2)  # a rerun of an earlier step (resumed: nothing new)
    again = RunState(tmp_path)
    assert again.entry(1)["last_step"] == "eval" and again.entry(1)["recaption"] == {"n": 2}
    with pytest.raises(ValueError, match="unknown step"):
        again.finish(1, "merge")
