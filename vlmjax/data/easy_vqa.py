"""Offline dataset builder: easy-VQA (the `easy-vqa` PyPI package) -> LLaVA JSON + caption pairs + DPO pairs.

easy-VQA ships 64x64 images of one coloured shape with template questions, but no captions. Each image's shape and
colour are recovered from its questions: wh-answers and the words a question presupposes ("what color is the
circle?" says there is a circle) are facts, yes/no answers confirm or exclude a value (negated questions flip), and
a single remaining candidate after exclusions is accepted. That yields captions ("A blue rectangle.") for
pre-training-style alignment, the QA pairs for instruction tuning, and wrong-answer pairs for DPO, all offline.

    python -m vlmjax.data.easy_vqa --out DIR [--splits train test] [--limit N] [--per-question]

writes DIR/images/{split}/{n}.png, DIR/{split}.json (LLaVA conversations), DIR/{split}_captions.jsonl and
DIR/{split}_dpo.jsonl. Image paths in the files are relative to DIR/images. `--per-question` adds recipe pools:
DIR/{split}_questions.jsonl (LLaVA, one record per question, with its answer `kind` and the image's true
`color` / `shape`, None where the questions do not determine them) and DIR/{split}_partial_captions.jsonl
(caption records that state only the colour, only the shape, or both: `mentions`, with the true attributes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

from tqdm.auto import tqdm

from vlmjax.data.assets import easy_vqa_data_dir

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_CAPTIONS = ("A {color} {shape}.", "The image shows a {color} {shape}.", "A {color} {shape} on a plain background.")


def infer_attributes(questions: list[tuple[str, str]]) -> dict[str, str | None]:
    """{"shape", "color"} of one image from its (question, answer) pairs; None where they do not determine it.
    Raises ValueError on contradictory facts (which would mean the parser misreads a question form)."""
    facts = {"shape": set(), "color": set()}
    excluded = {"shape": set(), "color": set()}
    for question, answer in questions:
        words = re.findall(r"[a-z]+", question.lower())
        mentioned = [(("shape" if w in SHAPES else "color"), w) for w in words if w in SHAPES or w in COLORS]
        if answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            for kind, value in mentioned:
                ((facts if (answer == "yes") != negated else excluded)[kind]).add(value)
        else:
            for kind, value in mentioned:  # presupposed by the question
                facts[kind].add(value)
            facts["shape" if answer in SHAPES else "color"].add(answer)
    out = {}
    for kind, values in (("shape", SHAPES), ("color", COLORS)):
        if len(facts[kind]) > 1 or facts[kind] & excluded[kind]:
            raise ValueError(f"contradictory {kind} facts {facts[kind]} / excluded {excluded[kind]}")
        remaining = [v for v in values if v not in excluded[kind]]
        out[kind] = next(iter(facts[kind])) if facts[kind] else (remaining[0] if len(remaining) == 1 else None)
    return out


def answer_kind(answer: str) -> str:
    """The kind of question an answer belongs to: "shape", "color" or "yes_no"."""
    a = answer.strip().lower()
    if a in SHAPES:
        return "shape"
    if a in COLORS:
        return "color"
    if a in ("yes", "no"):
        return "yes_no"
    raise ValueError(f"unknown easy-vqa answer {answer!r}")


def caption(attrs: dict, variant: int = 0) -> str | None:
    shape, color = attrs["shape"], attrs["color"]
    if shape and color:
        return _CAPTIONS[variant % len(_CAPTIONS)].format(color=color, shape=shape)
    if shape:
        return f"A {shape}."
    if color:
        return f"A {color} shape."
    return None


def _wrong_answer(answer: str, variant: int) -> str:
    for group in (("yes", "no"), SHAPES, COLORS):
        if answer in group:
            others = [a for a in group if a != answer]
            return others[variant % len(others)]
    raise ValueError(f"unknown answer {answer!r}")


def partial_captions(attrs: dict) -> list[tuple[list[str], str]]:
    """[(mentioned attributes, caption)]: colour only, shape only, both (those the attributes allow)."""
    shape, color = attrs["shape"], attrs["color"]
    out = [(["color"], f"A {color} shape.")] if color else []
    out += [(["shape"], f"A {shape}.")] if shape else []
    out += [(["color", "shape"], f"A {color} {shape}.")] if shape and color else []
    return out


def build_split(split: str, out: str, limit: int | None = None, src: str | None = None,
                per_question: bool = False, progress: bool = True) -> dict[str, int]:
    src = src or easy_vqa_data_dir()
    with open(os.path.join(src, split, "questions.json")) as f:
        questions = json.load(f)
    by_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in questions:
        by_image.setdefault(int(image_id), []).append((question, answer))
    image_ids = sorted(by_image)[:limit]
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    conversations, captions, pairs, per_q, partial = [], [], [], [], []
    stats = {"images": 0, "captions": 0, "questions": 0, "shape_unknown": 0, "color_unknown": 0}
    for n in tqdm(image_ids, desc=f"easy-vqa {split}", unit="image", disable=not progress):
        rel = f"{split}/{n}.png"
        shutil.copyfile(os.path.join(src, split, "images", f"{n}.png"), os.path.join(out, "images", rel))
        attrs = infer_attributes(by_image[n])
        stats["images"] += 1
        stats["shape_unknown"] += attrs["shape"] is None
        stats["color_unknown"] += attrs["color"] is None
        sample_id = f"{split}_{n}"
        turns = []
        text = caption(attrs, n)
        if text:
            captions.append({"id": sample_id, "image": rel, "caption": text, **attrs})
            turns += [{"from": "human", "value": "Describe the image briefly."}, {"from": "gpt", "value": text}]
            stats["captions"] += 1
        for j, (question, answer) in enumerate(by_image[n]):
            turns += [{"from": "human", "value": question[0].upper() + question[1:]},
                      {"from": "gpt", "value": answer[0].upper() + answer[1:]}]
            stats["questions"] += 1
            per_q.append({"id": f"{sample_id}_q{j}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\n" + question[0].upper() + question[1:]},
                {"from": "gpt", "value": answer[0].upper() + answer[1:]}], "kind": answer_kind(answer), **attrs})
        partial += [{"id": f"{sample_id}_{'_'.join(m)}", "image": rel, "caption": c, "mentions": m, **attrs}
                    for m, c in partial_captions(attrs)]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        conversations.append({"id": sample_id, "image": rel, "conversations": turns})
        question, answer = by_image[n][0]
        pairs.append({"id": sample_id, "image": rel, "prompt": "<image>\n" + question[0].upper() + question[1:],
                      "chosen": answer[0].upper() + answer[1:],
                      "rejected": (w := _wrong_answer(answer, n))[0].upper() + w[1:], "source": "easy_vqa"})
    _write(os.path.join(out, f"{split}.json"), json.dumps(conversations))
    files = [("captions", captions), ("dpo", pairs)]
    if per_question:
        files += [("questions", per_q), ("partial_captions", partial)]
        stats["partial_captions"] = len(partial)
    for name, rows in files:
        _write(os.path.join(out, f"{split}_{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return stats


def _write(path: str, text: str) -> None:
    """Whole file or nothing: a temporary file renamed into place."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def build(out: str, splits=("train", "test"), limit: int | None = None, per_question: bool = False,
          progress: bool = True) -> dict[str, dict[str, int]]:
    """Writes the dataset under `out` (a progress bar per split unless `progress=False`); returns per-split counts."""
    os.makedirs(out, exist_ok=True)
    return {split: build_split(split, out, limit, per_question=per_question, progress=progress) for split in splits}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.easy_vqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                        help="splits to build (default: train test)")
    parser.add_argument("--limit", type=int, default=None, help="first N images per split (for quick tests)")
    parser.add_argument("--per-question", action="store_true",
                        help="also write {split}_questions.jsonl and {split}_partial_captions.jsonl (recipe pools)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.splits, args.limit, per_question=args.per_question), indent=1))


if __name__ == "__main__":
    main()
