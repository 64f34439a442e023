"""Round k's training captions from the original captions and the recaptions.

caption = original + " " + recaption (`concat`, the paper's choice), the recaption alone (`replace`, its ablation)
or the original (`original`, a control that keeps the provenance fields). A recaption that failed (error record),
came back empty, or hit max_new_tokens without EOS (`truncated`) is not used: the record keeps its original
caption and the reason is counted and flagged, never silently (the reference falls back per URL without counting,
and trains on an empty caption when none is found). "<image>" in a recaption is escaped to "[image]" so it cannot
become an image placeholder. A source record that does not parse is left out, counted and listed in the manifest.

Host shards are merged here (`generate.merge_shards`): an id in two shards is an error naming both lines, missing
ids are listed (`IncompleteShards`), never filled with originals. Recaptions whose round or model differ from what
state.json says are refused, naming both.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from vlmjax.data.formats import PLACEHOLDER
from vlmjax.generate import merge_shards, requests_from_source, sample_keys
from vlmjax.generate.jsonl import write_json_atomic, write_jsonl_atomic
from vlmjax.generate.shards import IncompleteShards, check_coverage
from vlmjax.recipes.vila2.recaption import recaptions_path
from vlmjax.recipes.vila2.state import RunState

MODES = ("concat", "replace", "original")
ESCAPED = "[image]"
TEXT_KEYS = ("caption", "text", "txt")


def escape(text: str) -> str:
    return text.replace(PLACEHOLDER, ESCAPED)


def combined_path(out_dir, round_: int) -> str:
    return os.path.join(os.fspath(out_dir), f"combined.r{int(round_)}.jsonl")


def recaption_status(rec: dict) -> str:
    """ok | failed | empty | truncated."""
    if "error" in rec:
        return "failed"
    if not str(rec.get("output") or "").strip():
        return "empty"
    if rec.get("finish_reason") == "length":
        return "truncated"
    return "ok"


def gather(out_dir, round_: int, keys: list[str]) -> dict[str, dict]:
    """Round `round_`'s recaptions by key: host shards merged into recaptions.r{k}.jsonl (coverage checked), or
    the merged file checked for duplicate, unexpected and missing keys."""
    path = recaptions_path(out_dir, round_)
    stem = path[: -len(".jsonl")]
    shards = sorted(glob.glob(glob.escape(stem) + "-[0-9]*-of-[0-9]*.jsonl"))
    if shards:
        counts = {int(re.search(r"-of-(\d+)\.jsonl$", s).group(1)) for s in shards}
        if len(counts) != 1:
            raise ValueError(f"recaption shards of different host counts {sorted(counts)} in {out_dir}: {shards}")
        n = counts.pop()
        merge_shards([f"{stem}-{i:05d}-of-{n:05d}.jsonl" for i in range(n)], path, ids=keys)
    elif not os.path.exists(path):
        raise IncompleteShards(f"no recaptions for round {round_} in {out_dir} ({path} or its host shards)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    check_coverage(((str(r["id"]), f"{path}:{n}") for n, r in enumerate(rows, 1)), keys)
    return {str(r["id"]): r for r in rows}


def read_source(spec, limit: int | None = None):
    """(keys, raw records, requests, name) of a caption source's first `limit` records (all: None), parsed as the
    trainer parses them (a record that does not parse is a request with `.error`); its images are not read."""
    reqs = requests_from_source(spec, role="generate", limit=limit)
    records, name = spec.open()
    records = [records[i] for i in range(len(reqs))] if limit is not None else records
    if len(records) != len(reqs):
        raise ValueError(f"{name}: {len(records)} records but {len(reqs)} requests (not a caption source?)")
    return sample_keys(reqs), records, reqs, name


def manifest_path(out_path: str) -> str:
    """`X.jsonl` -> `X.manifest.json`."""
    return out_path[: -len(".jsonl")] + ".manifest.json"


def made_by(state: RunState, recs: dict[str, dict], round_: int, what: str) -> str:
    """The model that made round `round_`'s recaptions `recs`; every record's (round, model) must be the round and
    model that `state` names (else `StateMismatch` naming both)."""
    pairs = sorted({(int(r["round"]), str(r["model"])) for r in recs.values()})
    for r, m in pairs or [(round_, (state.entry(round_) or {}).get("model"))]:
        state.check(r, m, what)
    return pairs[0][1] if pairs else state.entry(round_)["model"]


def quantiles(lengths) -> dict:
    x = np.asarray(lengths, np.float64)
    if not len(x):
        return {"n": 0}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"n": int(len(x)), "mean": float(x.mean()), **dict(zip(("min", "p25", "p50", "p75", "max"), map(float, q)))}


def combine(spec, out_dir, round_: int, *, mode: str = "concat", limit: int | None = None) -> dict:
    """Write DIR/combined.r{k}.jsonl (caption records: the source record with "caption" replaced, plus
    "orig_caption", "recaption", "round", "source_model", "prompt_id", "truncated", "kept_original") and
    DIR/combined.r{k}.manifest.json (counts, word-length quantiles); mark the round's combine step in state.json.
    `spec`: the caption `SourceSpec` that was recaptioned (its images are not read); `limit`: its first N records,
    as recaptioned with the same limit."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    state = RunState(out_dir)
    keys, records, reqs, name = read_source(spec, limit)
    recs = gather(out_dir, round_, keys)
    model = made_by(state, recs, round_, f"the recaptions in {recaptions_path(out_dir, round_)}")
    counts = {"records": len(reqs), "written": 0, "recaptioned": 0, "failed": 0, "empty": 0, "truncated": 0,
              "bad_record": 0}
    bad, words = [], {"orig_caption": [], "recaption": [], "caption": []}

    def rows():
        for key, source, req in zip(keys, records, reqs):
            if req.error is not None:
                counts["bad_record"] += 1
                bad.append({"id": key, "error": str(req.error)})
                continue
            rec = recs[key]
            status = recaption_status(rec)
            orig = req.meta["caption"]
            text = escape(str(rec.get("output") or "").strip()) if "error" not in rec else None
            if status == "ok":
                counts["recaptioned"] += 1
                caption = {"concat": f"{orig} {text}", "replace": text, "original": orig}[mode]
                words["recaption"].append(len(text.split()))
            else:
                counts[status] += 1
                caption = orig
            out = {k: v for k, v in source.items() if k not in TEXT_KEYS}
            out.update(caption=caption, orig_caption=orig, recaption=text, round=int(round_), source_model=model,
                       prompt_id=rec.get("prompt_id"), truncated=status == "truncated",
                       kept_original=None if status == "ok" else status)
            counts["written"] += 1
            words["orig_caption"].append(len(orig.split()))
            words["caption"].append(len(caption.split()))
            yield out

    out_path = combined_path(out_dir, round_)
    write_jsonl_atomic(out_path, rows())
    manifest = {"round": int(round_), "source_model": model, "mode": mode, "data": name, "out": out_path, **counts,
                "words": {k: quantiles(v) for k, v in words.items()}, "bad_records": bad}
    write_json_atomic(manifest_path(out_path), manifest)
    state.finish(round_, "combine", mode=mode, out=out_path, **counts)
    return manifest
