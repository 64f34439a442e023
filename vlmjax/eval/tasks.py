"""Benchmark tasks read from local files in each benchmark's usual layout.

kind      metric                                               loaders (layout)
vqa       VQA soft accuracy (>= 3 human answers) else           vqav2: official questions + annotations JSON,
          normalised exact match; `vocab` -> closed-vocabulary     images COCO_{subtype}_{image_id:012d}.jpg
          answer extraction first                               textvqa: TextVQA_0.5.1_{split}.json, {image_id}.jpg
                                                                easy_vqa: the easy-vqa package (built in)
mc        accuracy of the extracted option letter               scienceqa: problems.json (+ pid_splits.json),
                                                                  images {folder}/{split}/{pid}/image.png
                                                                mmbench: the MMBench TSV (base64 images, A..E)
yesno     accuracy, precision, recall, F1, yes ratio            pope: POPE / LLaVA JSONL {"question_id", "image",
                                                                  "text", "label"}
caption   BLEU-4, CIDEr-D                                       coco_captions: COCO captions_*.json, or the
                                                                  Karpathy dataset_coco.json (with `split`)
any       (as `kind`)                                           llava_jsonl: {"question_id", "image", "text",
                                                                  "answer" | "answers" | "label", "choices"?}
mc        accuracy of the most likely option (method="loglik")  mmlu: the MMLU CSVs (question, A, B, C, D, answer;
                                                                  no header), one file per subject

Prompting (vlmjax/eval/prompts.py): `shots` k-shot demonstrations drawn from `demos`; `template="plain"` for
pre-trained (stage-1/2) checkpoints. `with_mode(task, shots=, template=, method=, ...)` sets them and names the
task after its mode (easy_vqa_test_4shot_plain), so outputs of two modes never mix. Samples with `meta["kind"]` (easy-vqa: shape / color / yes_no; VQAv2: the
answer type; MMLU: the subject) get per-kind metrics in the results (`by_kind`).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

PROMPTS = {
    "vqa": "Answer the question using a single word or phrase.",
    "yesno": "Answer the question using a single word or phrase.",
    "mc": "Answer with the option's letter from the given choices directly.",
    "caption": "Provide a one-sentence caption for the provided image.",
}
MAX_NEW_TOKENS = {"vqa": 16, "yesno": 8, "mc": 8, "caption": 48}


@dataclasses.dataclass
class EvalSample:
    id: str
    question: str  # the text shown to the model (options / hint already included for mc)
    answers: list[str]  # vqa: human answers; mc: [gold letter]; yesno: ["yes" | "no"]; caption: references
    image: Any = None  # path / bytes / PIL, or None (text-only question)
    choices: list[str] | None = None
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Task:
    name: str
    kind: str  # vqa | mc | yesno | caption
    samples: list[EvalSample]
    instruction: str | None = None  # appended to each question; None -> PROMPTS[kind]
    max_new_tokens: int | None = None
    vocab: list[str] | None = None  # closed answer vocabulary (vqa)
    shots: int = 0  # in-context demonstrations before each query (vlmjax/eval/prompts.py)
    demos: list[EvalSample] | None = None  # their pool; None -> the task's other samples
    template: str | None = None  # None: the model's chat template; "plain": pre-training prompts
    plain_format: str | None = None  # plain prompts' text; None -> "Question: {question} Answer:" ("" captions)
    seed: int = 0  # demonstration draws
    demo_kind: bool = False  # demonstrations share the query's meta["kind"] (MMLU: its subject)
    method: str = "generate"  # "loglik" (mc): pick the option the model finds most likely (eval/likelihood.py)
    option_format: str = "letter"  # loglik: the continuation scored is the option's letter, or its "text"
    normalize: str = "sum"  # loglik: option score = "sum" of its token log-probs, or their "mean"

    def prompt(self, s: EvalSample) -> str:
        inst = PROMPTS[self.kind] if self.instruction is None else self.instruction
        text = "\n".join(x for x in (s.question, inst) if x)
        return ("<image>\n" + text) if s.image is not None else text


def _limit(samples, limit):
    return samples if limit is None else samples[:limit]


def vqav2(questions_json, annotations_json, image_folder, *, limit=None) -> Task:
    q = json.loads(Path(questions_json).read_text())
    ann = {a["question_id"]: a for a in json.loads(Path(annotations_json).read_text())["annotations"]}
    subtype = q.get("data_subtype", "val2014")
    samples = []
    for item in _limit(q["questions"], limit):
        a = ann[item["question_id"]]
        image = os.path.join(image_folder, f"COCO_{subtype}_{int(item['image_id']):012d}.jpg")
        samples.append(EvalSample(str(item["question_id"]), item["question"], [x["answer"] for x in a["answers"]],
                                  image, meta={"answer_type": a.get("answer_type"), "kind": a.get("answer_type")}))
    return Task("vqav2", "vqa", samples)


def textvqa(json_path, image_folder, *, limit=None) -> Task:
    data = json.loads(Path(json_path).read_text())["data"]
    samples = [EvalSample(str(d["question_id"]), d["question"], list(d["answers"]),
                          os.path.join(image_folder, f"{d['image_id']}.jpg")) for d in _limit(data, limit)]
    return Task("textvqa", "vqa", samples)


def _options(choices) -> str:
    return "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def scienceqa(problems_json, image_folder, *, split="test", pid_splits_json=None, limit=None) -> Task:
    problems = json.loads(Path(problems_json).read_text())
    pids = (json.loads(Path(pid_splits_json).read_text())[split] if pid_splits_json
            else [p for p, v in problems.items() if v.get("split") == split])
    samples = []
    for pid in _limit(pids, limit):
        p = problems[pid]
        hint = (p.get("hint") or "").strip()
        question = (f"Context: {hint}\n" if hint else "") + f"{p['question']}\n{_options(p['choices'])}"
        image = os.path.join(image_folder, split, pid, p["image"]) if p.get("image") else None
        samples.append(EvalSample(str(pid), question, [chr(65 + int(p["answer"]))], image, list(p["choices"])))
    return Task(f"scienceqa_{split}", "mc", samples)


def mmbench(tsv_path, *, limit=None) -> Task:
    csv.field_size_limit(sys.maxsize)
    samples = []
    with open(tsv_path, newline="", encoding="utf-8") as f:
        for row in _limit(list(csv.DictReader(f, delimiter="\t")), limit):
            choices = [row[c] for c in "ABCDE" if row.get(c) not in (None, "", "nan")]
            hint = (row.get("hint") or "").strip()
            hint = "" if hint == "nan" else hint
            question = (f"{hint}\n" if hint else "") + f"{row['question']}\n{_options(choices)}"
            samples.append(EvalSample(str(row["index"]), question, [row["answer"].strip()],
                                      base64.b64decode(row["image"]), choices,
                                      meta={"category": row.get("category")}))
    return Task("mmbench", "mc", samples)


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def llava_jsonl(path, image_folder, kind: str, *, name: str | None = None, limit=None) -> Task:
    samples = []
    for d in _limit(_jsonl(path), limit):
        gold = d.get("answers", d.get("answer", d.get("label")))
        gold = [gold] if isinstance(gold, str) else list(gold or [])
        image = os.path.join(image_folder, d["image"]) if d.get("image") else None
        choices = d.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{path}: question {d['question_id']}: choices must be a list of strings")
        samples.append(EvalSample(str(d["question_id"]), d["text"], gold, image, choices, meta=d.get("meta", {})))
    return Task(name or Path(path).stem, kind, samples)


def pope(path, image_folder, *, limit=None) -> Task:
    task = llava_jsonl(path, image_folder, "yesno", name=Path(path).stem, limit=limit)
    for s in task.samples:
        s.answers = [s.answers[0].strip().lower()]
    return task


def coco_captions(json_path, image_folder, *, split: str | None = "test", limit=None) -> Task:
    data = json.loads(Path(json_path).read_text())
    samples = []
    if "annotations" in data:  # COCO captions_*.json
        refs: dict[int, list[str]] = {}
        for a in data["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        for im in _limit(data["images"], limit):
            samples.append(EvalSample(str(im["id"]), "", refs.get(im["id"], []),
                                      os.path.join(image_folder, im["file_name"])))
    else:  # Karpathy dataset_coco.json
        images = [im for im in data["images"] if split is None or im["split"] == split]
        for im in _limit(images, limit):
            samples.append(EvalSample(str(im.get("cocoid", im.get("imgid"))), "", [s["raw"] for s in im["sentences"]],
                                      os.path.join(image_folder, im.get("filepath", ""), im["filename"])))
    return Task("coco_captions", "caption", samples)


def _spread(rows, n):
    if n is not None and n < len(rows):
        step = len(rows) / n
        rows = [rows[int(i * step)] for i in range(n)]
    return rows


def _easy_vqa_samples(questions, images, prefix: str, count: int | None) -> list[EvalSample]:
    from vlmjax.data.easy_vqa import answer_kind

    try:
        rows = json.loads(Path(questions).read_text())
        rows = _spread([(i, (str(q), str(a), int(image_id))) for i, (q, a, image_id) in enumerate(rows)], count)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{questions}: not an easy-vqa question file ([question, answer, image_id] rows): "
                         f"{e}") from None
    return [EvalSample(f"{prefix}_{i}_{image_id}", q[0].upper() + q[1:], [a], str(Path(images) / f"{image_id}.png"),
                       meta={"kind": answer_kind(a)}) for i, (q, a, image_id) in rows]


def _easy_vqa_vocab() -> list[str]:
    from vlmjax.data.assets import easy_vqa_data_dir

    text = (Path(easy_vqa_data_dir()) / "answers.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def easy_vqa(split: str = "test", *, n: int | None = 200, shots: int = 0, demo_split: str = "train",
             n_demos: int = 1000, template: str | None = None) -> Task:
    """easy-vqa questions (single-word answers: shapes, colours, yes/no), prompted as in the training data built by
    `vlmjax.data.easy_vqa` (capitalised question, no instruction). n questions spread evenly over the split;
    meta["kind"] is the answer kind (shape, color, yes_no). With shots, demonstrations come from n_demos
    questions spread over demo_split."""
    from vlmjax.data.assets import easy_vqa_data_dir

    root = Path(easy_vqa_data_dir())

    def load(part, count):
        return _easy_vqa_samples(root / part / "questions.json", root / part / "images", part, count)

    task = Task(f"easy_vqa_{split}", "vqa", load(split, n), instruction="", max_new_tokens=8, vocab=_easy_vqa_vocab())
    return with_mode(task, shots=shots, demos=load(demo_split, n_demos) if shots else None, template=template)


def easy_vqa_file(questions, images, *, n: int | None = None, name: str | None = None) -> Task:
    """easy-vqa questions from a file in the package's layout (`questions.json`: [question, answer, image_id] rows,
    images `{images}/{image_id}.png`), scored as `easy_vqa`: e.g. a validation set of held-out train images."""
    name = name or f"easy_vqa_{Path(questions).stem}"
    return Task(name, "vqa", _easy_vqa_samples(questions, images, Path(questions).stem, n), instruction="",
                max_new_tokens=8, vocab=_easy_vqa_vocab())


def mmlu(path, *, subjects=None, limit=None, shots: int = 0, dev_path=None, option_format: str = "letter",
         normalize: str = "sum") -> Task:
    """MMLU (Hendrycks et al.): `path` is one `{subject}_test.csv` or a folder of them (rows: question, A, B, C, D,
    answer letter; no header). Scored by option log-likelihood; meta["kind"] = the subject. Demonstrations (shots)
    come from `dev_path` (a `{subject}_dev.csv` or folder; the same subject's rows when a folder)."""
    def read(p):
        p = Path(p)
        files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
        out = []
        for f in files:
            subject, part = f.stem.rsplit("_", 1) if "_" in f.stem else (f.stem, "")
            if subjects is not None and subject not in subjects:
                continue
            with open(f, newline="", encoding="utf-8") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                        raise ValueError(f"{f}: row {i} is not question,A,B,C,D,answer: {row[:1]}")
                    out.append(EvalSample(f"{subject}_{part}_{i}", f"{row[0]}\n{_options(row[1:5])}",
                                          [row[5].strip()], choices=row[1:5], meta={"kind": subject}))
        if not out:
            raise ValueError(f"{p}: no MMLU rows" + (f" for subjects {subjects}" if subjects else ""))
        return out

    if shots and dev_path is None:
        raise ValueError("mmlu: shots need dev_path (the {subject}_dev.csv demonstrations)")
    demos = read(dev_path) if shots else None
    task = Task("mmlu", "mc", _limit(read(path), limit), instruction="", max_new_tokens=1, demo_kind=True,
                method="loglik")
    return with_mode(task, shots=shots, demos=demos, option_format=option_format, normalize=normalize)


def with_mode(task: Task, *, shots: int | None = None, demos=None, template: str | None = None,
              method: str | None = None, option_format: str | None = None, normalize: str | None = None,
              seed: int | None = None) -> Task:
    """`task` prompted or scored another way (arguments left None keep the task's own), its name suffixed with each
    change, `{name}[_{k}shot][_plain][_{method}][_{format}-options][_{normalize}][_seed{n}]`, so two modes never share
    a results, predictions or option-scores file (those are resumed by sample id). template: "chat" | "plain"."""
    if template not in (None, "chat", "plain"):
        raise ValueError(f"template must be 'chat' or 'plain', not {template!r}")
    if method not in (None, "generate", "loglik"):
        raise ValueError(f"method must be 'generate' or 'loglik', not {method!r}")
    new = {"shots": shots, "demos": demos, "template": {"chat": None}.get(template, template), "method": method,
           "option_format": option_format, "normalize": normalize, "seed": seed}
    new = {k: v for k, v in new.items() if v is not None or (k == "template" and template is not None)}
    if new.get("shots", task.shots) < 0:
        raise ValueError(f"shots must be >= 0, not {new['shots']}")
    out = dataclasses.replace(task, **new)
    if out.method == "loglik" and out.kind != "mc":
        raise ValueError(f"task {task.name}: method 'loglik' needs kind 'mc', not {out.kind!r}")
    if out.method != "loglik" and (option_format is not None or normalize is not None):
        raise ValueError(f"task {task.name}: option_format / normalize apply to method 'loglik' only")
    if out.option_format not in ("letter", "text") or out.normalize not in ("sum", "mean"):
        raise ValueError(f"option_format must be 'letter' or 'text' and normalize 'sum' or 'mean', not "
                         f"{out.option_format!r}, {out.normalize!r}")
    suffix = [(out.shots != task.shots and out.shots, f"{out.shots}shot"),
              (out.template != task.template, out.template or "chat"),
              (out.method != task.method, out.method),
              (out.option_format != task.option_format, f"{out.option_format}-options"),
              (out.normalize != task.normalize, out.normalize),
              (out.seed != task.seed, f"seed{out.seed}")]
    out.name = "_".join([task.name] + [text for changed, text in suffix if changed])
    return out
