"""POINTS perplexity filtering: score every (image, caption) pair with an existing VLM, keep the lowest-PPL share.

`score`: the caption becomes the assistant reply to `<image>` + "please generate a caption for this image." in the
scorer's own chat template (`requests_from_source(spec, role="score", prompt=PROMPT)`), scored by
`scoring.score_dataset` on the caption plus its end-of-turn token, in fp32 log-softmax (the reference rounds
probabilities to bf16 first and splices a fixed 14-token span of Qwen2-VL's prompt; neither is copied). Each host
writes `ppl[-i-of-n].jsonl`: a header line naming scorer, prompt and template, then one record per pair, resumable
by id; a file with another header is refused. Pairs that cannot be encoded (empty caption, missing image) are
error records with their reason, never dropped (the reference's catch-all print loses them uncounted).

`select`: merge the shards (same header, every pair once), drop errors and non-finite PPL (counted), sort
ascending (ties by id), keep floor(fraction x scored), write the kept data records with their `ppl` and
`filter_report.json` (counts, failures by reason, quantiles, the cut, a text histogram).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
from collections import Counter
from typing import Sequence

import numpy as np

PROMPT = "please generate a caption for this image."
# The paper's scorer is Qwen2-VL-7B, which vlmjax cannot load (core-gaps G11); this importable LLaVA model is the
# labelled substitute (any HF LLaVA folder works: --model).
DEFAULT_SCORER = "llava-hf/llava-1.5-7b-hf"
HEADER_ID = "__points_ppl_header__"


def header(scorer: str, template: str, prompt: str = PROMPT) -> dict:
    return {"id": HEADER_ID, "header": {"scorer": scorer, "prompt": prompt, "template": template}}


def template_id(template, tokenizer) -> str:
    """A built-in template's name, or "hf:" + a hash of the tokenizer's chat template (every HF template is "hf")."""
    if template.name != "hf":
        return template.name
    return "hf:" + hashlib.sha1(str(tokenizer.chat_template).encode()).hexdigest()[:12]


def caption_requests(spec, prompt: str = PROMPT):
    """Caption records -> scoring requests: the caption as the reply to `<image>\\n{prompt}` (chat template)."""
    from vlmjax.generate.requests import requests_from_source

    return requests_from_source(spec, role="score", prompt=prompt)


def _check_header(path: str, want: dict) -> bool:
    """True when `path` already starts with `want`'s header; raises when it starts with another one."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        got = json.loads(first)
    except ValueError:
        got = None
    if not isinstance(got, dict) or got.get("id") != HEADER_ID:
        raise ValueError(f"{path}: first line is not a POINTS ppl header; not a file this scorer wrote")
    if got["header"] != want["header"]:
        diff = {k: (got["header"].get(k), v) for k, v in want["header"].items() if got["header"].get(k) != v}
        raise ValueError(f"{path} was scored with another setup (on disk vs now: {diff}); use a new --out")
    return True


def score(model, tokenizer, spec, out_path, *, scorer: str, prompt: str = PROMPT, template: str = "auto",
          batch_size: int = 16, shard_index: int | None = None, shard_count: int | None = None,
          progress: bool = True) -> dict:
    """Score this host's share (every n-th pair) into its own shard of `out_path`; returns score_dataset's counts."""
    from vlmjax.generate import Encoder, sample_keys
    from vlmjax.generate.shards import host_shard, shard_path, take_shard
    from vlmjax.scoring import score_dataset

    encoder = Encoder(tokenizer, model.cfg, template=template)
    want = header(scorer, template_id(encoder.text.template, tokenizer), prompt)
    reqs = caption_requests(spec, prompt)
    keyed = [dataclasses.replace(r, id=k) for r, k in zip(reqs, sample_keys(reqs))]  # keys of the whole pool
    i, n = host_shard(shard_index, shard_count)
    path = shard_path(out_path, i, n)
    if not _check_header(path, want):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _atomic(path, json.dumps(want) + "\n")  # a crash never leaves a torn header
    stats = score_dataset(model, tokenizer, take_shard(keyed, i, n), path, batch_size=batch_size, encoder=encoder,
                          shard_index=0, shard_count=1, progress=progress)
    return {**stats, "header": want["header"], "pool": len(keyed)}


def read_ppl(paths: Sequence[str]) -> tuple[dict, dict[str, dict]]:
    """(header, records by id) of ppl shards: one header for all, every id once."""
    head, by_id, where = None, {}, {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        if not lines or json.loads(lines[0]).get("id") != HEADER_ID:
            raise ValueError(f"{p}: no POINTS ppl header on the first line")
        h = json.loads(lines[0])["header"]
        if head is not None and h != head:
            raise ValueError(f"{p}: header {h} differs from {paths[0]}'s {head}; shards of different runs")
        head = h
        for n, ln in enumerate(lines[1:], 2):
            if not ln.endswith("\n"):
                raise ValueError(f"{p}:{n}: torn last line (is its host still scoring?)")
            r = json.loads(ln)
            if r["id"] in by_id:
                raise ValueError(f"{p}:{n}: id {r['id']!r} already in {where[r['id']]}")
            by_id[r["id"]], where[r["id"]] = r, f"{p}:{n}"
    if head is None:
        raise ValueError("no ppl files given")
    return head, by_id


def error_reason(error: str) -> str:
    """"BadSample: [missing_image] ..." -> "missing_image"; other exceptions by type name."""
    m = re.search(r"\[([A-Za-z0-9_\-]+)\]", error)
    return m.group(1) if m else error.split(":", 1)[0] or "error"


def text_histogram(values: np.ndarray, bins: int = 12, width: int = 40) -> list[str]:
    """Log-spaced PPL histogram as text lines `lo - hi | ### count`."""
    if len(values) == 0:
        return []
    lo, hi = float(values.min()), float(values.max())
    edges = np.geomspace(lo, hi, bins + 1) if hi > lo else np.array([lo, hi])
    counts, _ = np.histogram(values, edges)
    top = max(counts.max(), 1)
    return [f"{a:10.3f} - {b:10.3f} | {'#' * int(round(width * c / top)):<{width}} {c}"
            for a, b, c in zip(edges[:-1], edges[1:], counts)]


def select_ppl(records: dict[str, dict], fraction: float = 0.2) -> tuple[list[dict], dict]:
    """(kept records, lowest PPL first; report). Errors and non-finite PPL are excluded and counted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    failed = Counter(error_reason(r["error"]) for r in records.values() if "error" in r)
    ok = [r for r in records.values() if "error" not in r]
    finite = [r for r in ok if math.isfinite(r["perplexity"])]
    ranked = sorted(finite, key=lambda r: (r["perplexity"], r["id"]))
    keep = math.floor(fraction * len(ranked))
    ppl = np.array([r["perplexity"] for r in ranked], np.float64)
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    report = {"pairs": len(records), "scored": len(ranked), "failed": dict(sorted(failed.items())),
              "non_finite_ppl": len(ok) - len(finite), "fraction": fraction, "kept": keep,
              "cut": ranked[keep - 1]["perplexity"] if keep else None,
              "quantiles": {f"p{int(q * 100)}": float(np.quantile(ppl, q)) for q in qs} if len(ppl) else {},
              "histogram": text_histogram(ppl)}
    return ranked[:keep], report


def shard_files(ppl) -> list[str]:
    """`ppl.jsonl` -> itself, or its host shards `ppl-*-of-*.jsonl` when it does not exist."""
    ppl = os.fspath(ppl)
    if os.path.exists(ppl):
        return [ppl]
    stem, ext = os.path.splitext(ppl)
    found = sorted(glob.glob(f"{glob.escape(stem)}-[0-9]*-of-[0-9]*{ext}"))
    counts = {re.search(r"-of-(\d+)", p).group(1) for p in found}
    if not found:
        raise FileNotFoundError(f"{ppl}: neither the file nor host shards {stem}-*-of-*{ext} exist")
    if len(counts) != 1 or len(found) != int(counts.pop()):
        raise ValueError(f"{ppl}: incomplete or mixed host shards: {found}")
    return found


def select(ppl, spec, out_dir, *, fraction: float = 0.2, expect: dict | None = None) -> dict:
    """Merge ppl shards, check every pair of `spec` was scored, write `kept.jsonl` (the data records + `ppl`,
    lowest first) and `filter_report.json` atomically; returns the report."""
    from vlmjax.generate import sample_keys

    head, records = read_ppl(shard_files(ppl))
    for k, v in (expect or {}).items():
        if v is not None and head.get(k) != v:
            raise ValueError(f"{ppl}: scored with {k}={head.get(k)!r}, expected {v!r}")
    reqs = caption_requests(spec, head["prompt"])
    keys = sample_keys(reqs)
    missing = [k for k in keys if k not in records]
    known = set(keys)
    stray = [k for k in records if k not in known]
    if missing or stray:
        raise ValueError(f"{ppl} does not cover {spec.path}: {len(missing)} pairs unscored (first {missing[:3]}), "
                         f"{len(stray)} unknown ids (first {stray[:3]})")
    kept, report = select_ppl(records, fraction)
    source, _ = spec.open()
    index = {k: j for j, k in enumerate(keys)}
    rows = [{**dict(source[index[r["id"]]]), "ppl": r["perplexity"]} for r in kept]
    report = {"header": head, **report}
    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, "kept.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _atomic(os.path.join(out_dir, "filter_report.json"), json.dumps(report, indent=1))
    return report


def _atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
