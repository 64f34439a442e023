"""VILA^2 specialist-augment: specialists fine-tuned from VILA^k answer a domain prompt about every pretraining
image, and their answers become QA turns after the image's caption (the `caption_qa` format), on which the
generalist is retrained from scratch.

    train      a stage config fine-tuning VILA^k's export on domain data (any llava-format source): `train_stage`
    recaption  the round's training captions (combined.r{k}.jsonl, or the original pairs at round 0), each image
               asked the specialist's domain prompt (one of several, seeded by (round, id)): `recaption.recaption`
               into OUT/specialists/{name}/ (its own state.json; host-sharded and resumable by id, as recaption is)
    append     OUT/appended.r{k}.jsonl: every caption record of the round + one QA turn per specialist (human: the
               domain prompt, gpt: the answer); a failed, empty or truncated answer (or, for `grounding`, one
               without a well-formed [xmin, ymin, xmax, ymax] box) is not appended and is counted in the manifest

The generalist then trains on OUT/appended.r{k}.jsonl through the loop (`LoopSpec(caption_format="caption_qa")`:
round 0 of a run on those captions), the same stage machinery as every round.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from vlmjax.data.formats import PLACEHOLDER
from vlmjax.generate.jsonl import write_json_atomic, write_jsonl_atomic
from vlmjax.recipes.vila2.combine import (TEXT_KEYS, escape, gather, made_by, manifest_path, quantiles, read_source,
                                          recaption_status)
from vlmjax.recipes.vila2.prompts import SPECIALIST_PROMPTS
from vlmjax.recipes.vila2.recaption import recaption, recaptions_path
from vlmjax.recipes.vila2.state import RunState

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STATUSES = ("appended", "failed", "empty", "truncated", "no_box")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"^" + ",".join([_NUMBER] * 4) + r"$")


def check_name(name: str) -> str:
    """A specialist's name is a folder name (letters, digits, _ . -)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"specialist name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
    return name


def specialist_dir(out_dir, name: str) -> str:
    return os.path.join(os.fspath(out_dir), "specialists", check_name(name))


def appended_path(out_dir, round_: int) -> str:
    return os.path.join(os.fspath(out_dir), f"appended.r{int(round_)}.jsonl")


def domain_prompts(name: str, prompts=None) -> tuple[str, ...]:
    """The prompts a specialist is asked: `prompts` when given, else the default of its domain (spatial /
    grounding / ocr in `prompts.SPECIALIST_PROMPTS`)."""
    if prompts:
        bad = [p for p in prompts if not p.strip() or PLACEHOLDER in p]
        if bad:
            raise ValueError(f"specialist {name!r}: prompts must be non-empty and without {PLACEHOLDER} (the image "
                             f"goes first), got {bad}")
        return tuple(prompts)
    if name not in SPECIALIST_PROMPTS:
        raise ValueError(f"specialist {name!r} has no default prompt (defaults: {sorted(SPECIALIST_PROMPTS)}): "
                         "give its prompt(s)")
    return (SPECIALIST_PROMPTS[name],)


def train_specialist(config_file, model_path: str, data: str, image_root: str, workdir, *, stage: str = "specialist",
                     over: dict | None = None, steps_scale: float = 1.0, epochs: float | None = None,
                     quiet: bool = True) -> Path:
    """Fine-tune VILA^k (`model_path`, its export) on the domain data `data` (llava format) with stage `stage` of
    `config_file` in `workdir` (resumable; skipped when exported). `epochs`: the steps are that many passes over
    the domain file's records at the stage's global batch (hosts x data.batch_size x train.grad_accum), instead of
    the config's train.steps x steps_scale. -> the export folder."""
    import jax

    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.train import stages as stages_lib

    c = stages_lib.stage_config(config_file, stage)
    over = dict(over or {})
    if c.model.init != "checkpoint":
        raise ValueError(f"{config_file}:{stage}: a specialist fine-tunes VILA^k's export, so model.init must be "
                         f"'checkpoint', not {c.model.init!r}")
    if len(c.data.sources) != 1 or c.data.sources[0]["format"] != "llava":
        raise ValueError(f"{config_file}:{stage}: a specialist stage reads one llava-format source (the domain "
                         f"data), got {[s['format'] for s in c.data.sources]}")
    if epochs is not None:
        if epochs <= 0 or steps_scale != 1.0 or "train.steps" in over:
            raise ValueError("epochs > 0 sets the steps: not with steps_scale or a train.steps override")
        n = len(SourceSpec(format="llava", path=str(data)).open()[0])
        batch = over.get("data.batch_size", c.data.batch_size) * over.get("train.grad_accum", c.train.grad_accum)
        over["train.steps"] = max(1, math.ceil(epochs * n / (batch * jax.process_count())))
    return stages_lib.train_stage(stage, Path(workdir), config_file=config_file, image_root=image_root, source=data,
                                  model_path=str(model_path), over=over, steps_scale=steps_scale, quiet=quiet)


def recaption_specialist(model, tokenizer, spec, out_dir, round_: int, name: str, model_name: str, config, *,
                         prompts=None, **kw) -> dict:
    """The specialist `name` (its model, recorded as `model_name`) answers its domain prompt(s) about every image
    of `spec` (the round's captions, caption format) into OUT/specialists/{name}/recaptions.r{k}.jsonl: the
    generalist's `recaption` (host shards, resume by id, state.json) with the domain's prompts, a salt of its own
    (its prompt choice is independent of the recaption prompts') and "specialist" in every record."""
    return recaption(model, tokenizer, spec, specialist_dir(out_dir, name), round_, model_name, config,
                     prompts=domain_prompts(name, prompts), salt=f"vila2/{name}", meta={"specialist": name}, **kw)


def boxes(text: str) -> list[tuple[float, float, float, float]]:
    """The well-formed boxes in `text`: "[xmin, ymin, xmax, ymax]" with 0 <= xmin < xmax <= 1 and
    0 <= ymin < ymax <= 1 (normalised coordinates); anything else in brackets is ignored."""
    out = []
    for inner in _BRACKETS.findall(text or ""):
        m = _BOX.match(inner)
        if m is None:
            continue
        x0, y0, x1, y1 = map(float, m.groups())
        if 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1:
            out.append((x0, y0, x1, y1))
    return out


def answer_status(rec: dict, name: str) -> str:
    """ok | failed | empty | truncated (as `combine.recaption_status`) | no_box (the grounding specialist's answer
    has no well-formed box)."""
    status = recaption_status(rec)
    if status == "ok" and name == "grounding" and not boxes(rec["output"]):
        return "no_box"
    return status


def question(rec: dict) -> str:
    """The domain prompt a specialist answered (its output record's prompt without the image placeholder)."""
    text = str(rec.get("prompt") or "").replace(PLACEHOLDER, "").strip()
    if not text:
        raise ValueError(f"specialist record {rec.get('id')!r} has no prompt: not a recaption record")
    return text


def append(spec, out_dir, round_: int, names, *, limit: int | None = None) -> dict:
    """Write OUT/appended.r{k}.jsonl: every record of `spec` (the round's caption records, caption or caption_qa
    format) with its fields kept, "caption", and "conversations" = its own turns (if any) + one (human: domain
    prompt, gpt: answer) pair per specialist in `names` order whose answer is usable; "specialists" lists each
    specialist's name, model, round, prompt_id and status (appended or why not). A record with no usable answer
    keeps the image with its caption ("conversations": []). Each specialist's recaptions must cover exactly the
    source's ids (host shards merged; an id twice, even across shards, is an error naming both lines; missing ids
    are listed) and be of the round and model its state.json names. Also writes the manifest (counts per
    specialist, answer word lengths, records left out because they do not parse). -> the manifest."""
    names = [check_name(n) for n in names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"append: give each specialist once, got {names}")
    keys, records, reqs, data_name = read_source(spec, limit)
    answers, models = {}, {}
    for name in names:
        folder = specialist_dir(out_dir, name)
        answers[name] = gather(folder, round_, keys)
        models[name] = made_by(RunState(folder), answers[name], round_,
                               f"the {name} specialist's answers in {recaptions_path(folder, round_)}")
    counts = {name: dict.fromkeys(STATUSES, 0) for name in names}
    totals = {"records": len(reqs), "written": 0, "with_turns": 0, "without_turns": 0, "bad_record": 0}
    words = {name: [] for name in names}
    bad = []

    def rows():
        for key, source, req in zip(keys, records, reqs):
            if req.error is not None:
                totals["bad_record"] += 1
                bad.append({"id": key, "error": str(req.error)})
                continue
            turns = source.get("conversations") or []
            turns = list(json.loads(turns) if isinstance(turns, (str, bytes)) else turns)  # as the parser reads it
            prov = list(source.get("specialists") or [])
            for name in names:
                rec = answers[name][key]
                status = answer_status(rec, name)
                if status == "ok":
                    text = escape(str(rec["output"]).strip())
                    turns += [{"from": "human", "value": escape(question(rec))}, {"from": "gpt", "value": text}]
                    words[name].append(len(text.split()))
                    status = "appended"
                counts[name][status] += 1
                prov.append({"name": name, "model": models[name], "round": int(round_),
                             "prompt_id": rec.get("prompt_id"), "status": status})
            totals["with_turns" if turns else "without_turns"] += 1
            totals["written"] += 1
            out = {k: v for k, v in source.items() if k not in TEXT_KEYS}
            out.update(caption=req.meta["caption"], conversations=turns, specialists=prov)
            yield out

    out_path = appended_path(out_dir, round_)
    write_jsonl_atomic(out_path, rows())
    manifest = {"round": int(round_), "data": data_name, "out": out_path, **totals,
                "specialists": {n: {"model": models[n], **counts[n], "answer_words": quantiles(words[n])}
                                for n in names},
                "bad_records": bad}
    write_json_atomic(manifest_path(out_path), manifest)
    return manifest
