"""The data of VILA^2's miniature (README "VILA^2, reproduced in miniature"), on the shared mini base's easy-vqa
images (`mini_base.prepare_data`'s data folder: all 4,000 train images, their true attributes, the conversations).

pairs.jsonl    pre-training pairs: train images 0-2999 (those whose colour and shape the questions determine), each
               with ONE under-informative caption, a third each by a hash of its id: shape only ("A triangle."),
               colour only ("Something teal.") or generic ("An image."); records keep the true `color` / `shape`
               (for scoring only) and `kind`.
oracle.jsonl   the same images with true full captions ("A teal triangle."): the ceiling row.
sft.json       images 3000-3299: easy-vqa's QA conversation with the description turn asked with one of the three
               recaption prompts (or the eval's "Describe the image."), answered with colour + shape; with
               `describe=N` only the first N images keep the description turn (the rest: QA only), so describing is
               learnt mostly from the pre-training captions.
shape_qa.json  the shape specialist's domain data (`--ablations`, `build_shape_qa`): the same SFT images, each asked
               SHAPE_PROMPT and answered with its shape as easy-vqa answers ("Rectangle").
Everything is a pure function of (seed, id); the folder is skipped when prepared.json exists.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

PAIRS = (0, 3000)
SFT = (3000, 3300)
KINDS = ("shape", "color", "generic")
SHAPE_PROMPT = "What shape is in the image?"
VERSION = 1


def poor_caption(kind: str, attrs: dict) -> str:
    """The under-informative caption of `kind` for an image with true attributes `attrs`."""
    if kind == "shape":
        return f"A {attrs['shape']}."
    if kind == "color":
        return f"Something {attrs['color']}."
    if kind == "generic":
        return "An image."
    raise ValueError(f"caption kind {kind!r}: one of {KINDS}")


def caption_kind(key: str, seed: int = 0) -> str:
    """shape / color / generic, a third each, by a hash of (seed, id)."""
    return KINDS[zlib.crc32(f"vila2/{seed}/{key}".encode()) % len(KINDS)]


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def without_description(turns: list[dict]) -> list[dict]:
    """easy-vqa's conversation less its description pair (the first, asked "Describe the image briefly."), the
    image moved to the next question."""
    if not turns or turns[0]["value"].replace("<image>\n", "") != "Describe the image briefly.":
        return list(turns)
    rest = [dict(t) for t in turns[2:]]
    if rest:
        rest[0]["value"] = "<image>\n" + rest[0]["value"].replace("<image>\n", "")
    return rest


def build(out: Path, base_data: Path, *, seed: int = 0, pairs: tuple[int, int] = PAIRS,
          sft: tuple[int, int] = SFT, describe: int | None = None) -> dict:
    """Write OUT/{pairs.jsonl, oracle.jsonl, sft.json, prepared.json} from the mini base's data folder; describe:
    how many SFT images (the first) keep their description turn (None: all)."""
    from vlmjax.data import easy_vqa
    from vlmjax.eval.easy_vqa import DESCRIBE_PROMPT
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.recipes.mini_base import sft_turns
    from vlmjax.recipes.vila2.prompts import PROMPTS

    out, base_data = Path(out), Path(base_data)
    if (out / "prepared.json").exists():
        info = json.loads((out / "prepared.json").read_text())
        want = {"pairs_pool": list(pairs), "sft_pool": list(sft), "seed": seed, "version": VERSION,
                "sft_describe": describe}
        have = {k: info.get(k) for k in want}
        if have != want:
            raise ValueError(f"{out / 'prepared.json'} was built for {have}, not {want}: use another workdir")
        return info
    truth = read_jsonl(base_data / "train_captions.jsonl")
    records = {r["id"]: r for r in json.loads((base_data / "train.json").read_text())}
    out.mkdir(parents=True, exist_ok=True)
    poor, oracle, counts = [], [], dict.fromkeys(KINDS, 0)
    for n in range(*pairs):
        t = truth.get(f"train_{n}")
        if not t or not (t.get("color") and t.get("shape")):
            continue  # scoring a recaption needs both true attributes
        key = f"train_{n}"
        kind = caption_kind(key, seed)
        counts[kind] += 1
        row = {"id": key, "image": t["image"], "color": t["color"], "shape": t["shape"], "kind": kind}
        poor.append({**row, "caption": poor_caption(kind, t)})
        oracle.append({**row, "kind": "oracle", "caption": easy_vqa.caption(t, 0)})
    conv = []
    for n in range(*sft):
        rec = records.get(f"train_{n}")
        if rec is None:
            raise ValueError(f"{base_data / 'train.json'}: easy-vqa train image {n} (SFT pool {sft}) is missing")
        rng = np.random.default_rng(zlib.crc32(f"{seed}:sft:{rec['id']}".encode()))
        turns = rec["conversations"] if describe is None or n - sft[0] < describe else \
            without_description(rec["conversations"])
        if not turns:
            continue  # a description-only conversation with its description dropped
        conv.append({"id": rec["id"], "image": rec["image"],
                     "conversations": sft_turns(turns, rng, prompts=PROMPTS + (DESCRIBE_PROMPT,))})
    _write(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in poor))
    _write(out / "oracle.jsonl", "".join(json.dumps(r) + "\n" for r in oracle))
    _write(out / "sft.json", json.dumps(conv))
    info = {"pairs": len(poor), "pair_kinds": counts, "sft": len(conv), "pairs_pool": list(pairs),
            "sft_pool": list(sft), "seed": seed, "version": VERSION, "sft_describe": describe,
            "sft_descriptions": sum(any(t["value"].replace("<image>\n", "") in PROMPTS + (DESCRIBE_PROMPT,)
                                        for t in c["conversations"][::2]) for c in conv)}
    _write(out / "prepared.json", json.dumps(info))
    return info


def build_shape_qa(out: Path, base_data: Path, *, sft: tuple[int, int] = SFT) -> str:
    """OUT/shape_qa.json (llava format; kept when it exists): every SFT image whose shape its questions determine,
    asked SHAPE_PROMPT, answered with the shape as easy-vqa's shape answers are written. -> its path."""
    from vlmjax.generate.jsonl import read_jsonl

    path = Path(out) / "shape_qa.json"
    if path.exists():
        return str(path)
    truth = read_jsonl(Path(base_data) / "train_captions.jsonl")
    rows = []
    for n in range(*sft):
        t = truth.get(f"train_{n}")
        if t and t.get("shape"):
            rows.append({"id": f"train_{n}", "image": t["image"], "shape": t["shape"],
                         "conversations": [{"from": "human", "value": "<image>\n" + SHAPE_PROMPT},
                                           {"from": "gpt", "value": t["shape"].capitalize()}]})
    if not rows:
        raise ValueError(f"{base_data}: no SFT image {sft} has a known shape")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(rows))
    return str(path)


def caption_scores(rows, field: str) -> dict:
    """Fractions of `rows` (records with the true `color` / `shape`) whose `field` text names the true colour, the
    true shape, both, and its mean word count; rows without the field (a failed recaption) count as wrong.
    `color_if_named` / `shape_if_named`: right among the texts that name a colour / shape at all (None if none do),
    which tells a blind model (chance: 1/8, 1/3) from a terse one that sees what it names."""
    from vlmjax.eval.easy_vqa import named_attributes

    rows = list(rows)
    if not rows:
        raise ValueError(f"caption_scores: no rows for {field!r}")
    hits = []
    for r in rows:
        m = named_attributes(r.get(field))
        hits.append((m["color"] == r["color"], m["shape"] == r["shape"], len(str(r.get(field) or "").split()),
                     m["color"] is not None, m["shape"] is not None))
    c, s, w, nc, ns = (np.array(x, np.float64) for x in zip(*hits))
    return {"color": float(c.mean()), "shape": float(s.mean()), "both": float((c * s).mean()), "words": float(w.mean()),
            "color_if_named": float(c.sum() / nc.sum()) if nc.sum() else None,
            "shape_if_named": float(s.sum() / ns.sum()) if ns.sum() else None}
