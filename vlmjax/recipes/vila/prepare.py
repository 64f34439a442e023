"""VILA's raw pre-training / SFT corpora -> the trainer's formats (vlmjax/data/FORMATS.md), with a report of what was
dropped and why.

    python -m vlmjax.recipes.vila.prepare mmc4 --in docs.jsonl --out mmc4.jsonl [--images DIR]
    python -m vlmjax.recipes.vila.prepare coyo --in coyo.jsonl --out coyo.jsonl [--top 25000000] [--score-key ...]
    python -m vlmjax.recipes.vila.prepare flan --in flan.jsonl --out flan.jsonl

mmc4: documents {"text_list", "image_info": [{"image_name", "matched_text_index", "matched_sim"}]} -> `interleaved`
  records (each image keeps `matched_sim`, so `format_options.min_similarity` can filter at train time). An image
  fails when it has no reference, its `matched_text_index` is outside the document, or (with --images) its file is
  missing or unreadable; failed images are dropped, and a document whose images ALL fail is skipped (VILA trains
  interleaved docs for their images; text alone belongs to the text corpus).
coyo: {"url", "text" | "caption", clip scores, "image" | "image_name" | "key" (img2dataset: KEY.jpg)} -> `caption`
  records, the --top records by --score-key (VILA keeps the top COYO pairs by CLIP score), in input order.
flan: {"inputs", "targets"} -> text-only `llava` records (one user turn, one assistant turn).
Everywhere a literal `<image>` in raw text becomes `<IMAGE>` (as VILA does), so it cannot pose as a placeholder;
each such rewrite is counted. Output is written atomically; the report (`OUT.report.json`, also printed) lists
records in/out and counts by reason.
"""

from __future__ import annotations

import argparse
import array
import collections
import math
import json
import os
import sys
from pathlib import Path

import numpy as np

from vlmjax.data.formats import ESCAPED_PLACEHOLDER as ESCAPED
from vlmjax.data.formats import PLACEHOLDER


class Report:
    def __init__(self, kind: str, src: str):
        self.kind, self.src = kind, src
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}  # reason -> first record it happened to, for the user to look at

    def add(self, reason: str, where: str, n: int = 1):
        self.counts[reason] += n
        self.examples.setdefault(reason, where)

    def escape(self, text: str, where: str) -> str:
        n = text.count(PLACEHOLDER)
        if n:
            self.add("escaped_image_tag", where, n)
            text = text.replace(PLACEHOLDER, ESCAPED)
        return text

    def to_json(self, records_in: int, records_out: int) -> dict:
        return {"kind": self.kind, "input": self.src, "records_in": records_in, "records_out": records_out,
                "counts": dict(sorted(self.counts.items())), "first_example": self.examples}


def read_records(path: str):
    """(line number or list index, record) from JSONL or a JSON list; a line that is not a JSON object raises,
    naming the file and line (a corrupt input should be fixed, not silently thinned)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            for i, rec in enumerate(json.load(f)):
                yield i, rec
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def _image_ok(ref: str, images: Path | None) -> str | None:
    """None if usable, else the reason."""
    if images is None:
        return None
    path = images / ref
    if not path.is_file():
        return "image_missing"
    try:
        from PIL import Image
        with Image.open(path) as im:
            im.verify()
    except Exception:  # noqa: BLE001 - any decoder error means the same: the trainer could not read it
        return "image_unreadable"
    return None


def convert_mmc4(rec: dict, where: str, report: Report, images: Path | None) -> dict | None:
    sentences = rec.get("text_list")
    if not isinstance(sentences, list) or not any(isinstance(s, str) and s.strip() for s in sentences):
        report.add("no_text", where)
        return None
    sentences = [report.escape(s if isinstance(s, str) else "", where) for s in sentences]
    kept = []
    for info in rec.get("image_info") or []:
        ref = next((info.get(k) for k in ("image_name", "image", "path") if isinstance(info, dict) and info.get(k)),
                   None)
        if ref is None:
            report.add("image_no_reference", where)
            continue
        try:
            index = int(info["matched_text_index"])
        except (KeyError, TypeError, ValueError):
            report.add("image_no_matched_text_index", where)
            continue
        if not 0 <= index < len(sentences):
            report.add("matched_text_index_out_of_range", where)
            continue
        bad = _image_ok(str(ref), images)
        if bad:
            report.add(bad, where)
            continue
        out = {"image_name": str(ref), "matched_text_index": index}
        if info.get("matched_sim") is not None:
            out["matched_sim"] = float(info["matched_sim"])
        kept.append(out)
    if not kept:
        report.add("doc_all_images_failed" if rec.get("image_info") else "doc_no_images", where)
        return None
    doc = {"id": str(rec.get("id") or rec.get("url") or where), "text_list": sentences, "image_info": kept}
    if rec.get("url"):
        doc["url"] = rec["url"]
    return doc


def convert_flan(rec: dict, where: str, report: Report) -> dict | None:
    inputs, targets = rec.get("inputs"), rec.get("targets")
    if not isinstance(inputs, str) or not isinstance(targets, str) or not inputs.strip() or not targets.strip():
        report.add("empty_inputs_or_targets", where)
        return None
    return {"id": str(rec.get("id") or where),
            "conversations": [{"from": "human", "value": report.escape(inputs.strip(), where)},
                              {"from": "gpt", "value": report.escape(targets.strip(), where)}]}


def convert_coyo(rec: dict, where: str, report: Report, key_suffix: str = ".jpg", escape: bool = True) -> dict | None:
    caption = next((rec[k] for k in ("caption", "text") if isinstance(rec.get(k), str)), "").strip()
    if not caption:
        report.add("empty_caption", where)
        return None
    ref = next((rec[k] for k in ("image", "image_name") if rec.get(k)), None)
    if ref is None and rec.get("key"):  # img2dataset: the image is KEY.jpg in the folder / tar shards
        ref = f"{rec['key']}{key_suffix}"
    if ref is None:
        report.add("image_no_reference", where)
        return None
    out = {"id": str(rec.get("id") if rec.get("id") is not None else where), "image": str(ref),
           "caption": report.escape(caption, where) if escape else caption}
    if rec.get("url"):
        out["url"] = rec["url"]
    return out


def _score(rec: dict, key: str, where: str, report: Report) -> float | None:
    try:
        score = float(rec[key])
    except (KeyError, TypeError, ValueError):
        score = math.nan
    if math.isnan(score):
        report.add("no_clip_score", where)
        return None
    return score


def _coyo_threshold(src: str, top: int | None, score_key: str, key_suffix: str, report: Report):
    """Pass 1 over COYO: count bad records and find the `top`-th best score without holding the records (COYO is
    hundreds of millions of rows; one float each fits). Returns (threshold, ties at it to keep, usable count)."""
    scores = array.array("d")
    for i, rec in read_records(src):
        where = f"{src}:{i}"
        if convert_coyo(rec, where, report, key_suffix, escape=False) is not None:
            score = _score(rec, score_key, where, report)
            if score is not None:
                scores.append(score)
    s = np.frombuffer(scores, np.float64) if len(scores) else np.zeros(0)
    if top is None or len(s) <= top:
        return -np.inf, 0, len(s)
    threshold = float(np.partition(s, len(s) - top)[len(s) - top])
    return threshold, top - int((s > threshold).sum()), len(s)


def prepare(kind: str, src: str, out: str, *, images: str | None = None, top: int | None = None,
            score_key: str = "clip_similarity_vitl14", key_suffix: str = ".jpg") -> dict:
    """Convert `src` into `out` (JSONL streamed to a temp file, then renamed); return the report (also written
    to `out`.report.json)."""
    report = Report(kind, src)
    root = Path(images) if images else None
    if kind == "coyo":
        threshold, ties, n_valid = _coyo_threshold(src, top, score_key, key_suffix, report)
        quiet = Report(kind, src)  # pass 2 re-meets the bad records pass 1 counted

        def convert(rec, where):
            nonlocal ties
            doc = convert_coyo(rec, where, quiet, key_suffix, escape=False)
            score = _score(rec, score_key, where, quiet) if doc else None
            if score is None or score < threshold or (score == threshold and ties <= 0 and top is not None):
                return None
            if score == threshold and top is not None:
                ties -= 1  # ties at the threshold go to the earlier records
            doc["caption"] = report.escape(doc["caption"], where)
            return doc
    else:
        convert = {"mmc4": lambda r, w: convert_mmc4(r, w, report, root),
                   "flan": lambda r, w: convert_flan(r, w, report)}[kind]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp, n_in, n_out = out + ".tmp", 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        for i, rec in read_records(src):
            n_in += 1
            doc = convert(rec, f"{src}:{i}")
            if doc is not None:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n_out += 1
    os.replace(tmp, out)
    if kind == "coyo" and n_valid > n_out:
        report.add("below_top_clip_score", src, n_valid - n_out)
    result = report.to_json(n_in, n_out)
    with open(out + ".report.json.tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".report.json.tmp", out + ".report.json")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.vila.prepare", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("mmc4", "coyo", "flan"))
    p.add_argument("--in", dest="src", required=True, help="JSONL or JSON list of raw records")
    p.add_argument("--out", required=True, help="JSONL in our format; the report goes to OUT.report.json")
    p.add_argument("--images", help="mmc4: folder holding image_info[].image_name; missing/unreadable files fail")
    p.add_argument("--top", type=int, help="coyo: keep this many records with the highest --score-key")
    p.add_argument("--score-key", default="clip_similarity_vitl14", help="coyo: the CLIP score field")
    p.add_argument("--key-suffix", default=".jpg", help="coyo: records naming their image by img2dataset `key` "
                   "refer to KEY + this (the member name in the folder or tar shards)")
    a = p.parse_args(argv)
    if a.top is not None and a.top < 1:
        p.error("--top must be >= 1")
    result = prepare(a.kind, a.src, a.out, images=a.images, top=a.top, score_key=a.score_key,
                     key_suffix=a.key_suffix)
    print(json.dumps(result), file=sys.stdout)
    return result


if __name__ == "__main__":
    main()
