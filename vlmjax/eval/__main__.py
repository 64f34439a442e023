"""`python -m vlmjax.eval`: evaluate a model on benchmarks stored locally (layouts: see vlmjax/eval/tasks.py).

    python -m vlmjax.eval --model HF_LLAVA_DIR --out results/ easy_vqa --n 200
    python -m vlmjax.eval --model DIR --out results/ easy_vqa --file val/questions.json --images train/images
    python -m vlmjax.eval --model DIR --out results/ vqav2 --questions Q.json --annotations A.json --images val2014/
    python -m vlmjax.eval --model DIR --out results/ pope --file coco_pope_random.json --images val2014/
    python -m vlmjax.eval --model DIR --out results/ scienceqa --file problems.json --images scienceqa/images
    python -m vlmjax.eval --model DIR --out results/ mmbench --file mmbench_dev_en.tsv
    python -m vlmjax.eval --model DIR --out results/ textvqa --file TextVQA_0.5.1_val.json --images train_images/
    python -m vlmjax.eval --model DIR --out results/ coco_captions --file dataset_coco.json --images coco/
    python -m vlmjax.eval --model DIR --out results/ llava_jsonl --file q.jsonl --images imgs/ --kind vqa
    python -m vlmjax.eval --model DIR --out results/ --dar easy_vqa     # STIC's describe-and-respond
    python -m vlmjax.eval --model LM_DIR --out results/ mmlu --file mmlu/data/test   # option log-likelihood
    python -m vlmjax.eval --model LM_DIR --out results/ perplexity --file text.txt   # or records .jsonl {"text"}

Predictions are resumable; results JSON, per-sample scored predictions and a printed table end the run.
"""

from __future__ import annotations

import argparse
import json

from vlmjax.eval import tasks
from vlmjax.eval.runner import evaluate, format_table
from vlmjax.generate import cli

TASKS = ("easy_vqa", "vqav2", "textvqa", "scienceqa", "mmbench", "pope", "coco_captions", "llava_jsonl", "mmlu",
         "perplexity")
# What each task reads, checked before the model loads: flag -> "file" | "dir".
NEEDS = {
    "easy_vqa": {},
    "vqav2": {"questions": "file", "annotations": "file", "images": "dir"},
    "textvqa": {"file": "file", "images": "dir"},
    "scienceqa": {"file": "file", "images": "dir"},
    "mmbench": {"file": "file"},
    "pope": {"file": "file", "images": "dir"},
    "coco_captions": {"file": "file", "images": "dir"},
    "llava_jsonl": {"file": "file"},  # --images optional: image paths are then taken as given
    "mmlu": {"file": "dir"},  # the MMLU data folder of one split (e.g. data/test), subject CSVs
    "perplexity": {"file": "file"},  # .txt or .jsonl records with a "text" field
}


def build_task(a) -> tasks.Task:
    if a.task == "easy_vqa":
        if a.file:  # a question file in the package's layout (e.g. held-out validation questions)
            return tasks.easy_vqa_file(a.file, a.images or ".", n=a.n)
        return tasks.easy_vqa(a.split or "test", n=a.n)
    if a.task == "vqav2":
        return tasks.vqav2(a.questions, a.annotations, a.images, limit=a.n)
    if a.task == "textvqa":
        return tasks.textvqa(a.file, a.images, limit=a.n)
    if a.task == "scienceqa":
        return tasks.scienceqa(a.file, a.images, split=a.split or "test", pid_splits_json=a.pid_splits, limit=a.n)
    if a.task == "mmbench":
        return tasks.mmbench(a.file, limit=a.n)
    if a.task == "pope":
        return tasks.pope(a.file, a.images, limit=a.n)
    if a.task == "coco_captions":
        return tasks.coco_captions(a.file, a.images, split=a.split or "test", limit=a.n)
    if a.task == "mmlu":
        return tasks.mmlu(a.file, limit=a.n)
    return tasks.llava_jsonl(a.file, a.images or "", a.kind, limit=a.n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF LLaVA folder (or causal LM folder / .gguf for text tasks)")
    p.add_argument("--out", required=True, help="output folder (predictions, results, scored samples)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="rows per batch (default: 16)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="tokens per answer (default: the task kind's, e.g. 16 for vqa)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("task", choices=TASKS, help="benchmark (layouts: vlmjax/eval/tasks.py)")
    p.add_argument("--file", help="the task's main file (all but vqav2; easy_vqa: optional, a questions.json of "
                   "[question, answer, image_id] rows with --images)")
    p.add_argument("--questions", help="vqav2: the official questions JSON")
    p.add_argument("--annotations", help="vqav2: the official annotations JSON")
    p.add_argument("--images", help="image folder (vqav2, textvqa, scienceqa, pope, coco_captions; llava_jsonl)")
    p.add_argument("--pid-splits", help="scienceqa: pid_splits.json (default: the split field of problems.json)")
    p.add_argument("--split", default=None, help="easy_vqa / scienceqa / coco_captions (Karpathy) split "
                   "(default: test)")
    p.add_argument("--kind", default="vqa", choices=["vqa", "mc", "yesno", "caption"],
                   help="llava_jsonl: how answers are scored (default: vqa)")
    p.add_argument("--n", type=cli.positive_int, default=None,
                   help="first N samples (easy_vqa: N spread over the split)")
    p.add_argument("--dar", action="store_true", help="describe-and-respond: the model describes each image first and "
                   "answers with its description before the question (STIC)")
    p.add_argument("--dar-max-new-tokens", type=cli.positive_int, default=256,
                   help="--dar: tokens per description (default: 256)")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    for flag, kind in NEEDS[a.task].items():
        if getattr(a, flag) is None:
            p.error(f"{a.task} needs --{flag}")
    cli.require_paths(p, model=(a.model, "exists"), file=(a.file, NEEDS[a.task].get("file", "file")),
                      questions=(a.questions, "file"),
                      annotations=(a.annotations, "file"), images=(a.images, "dir"),
                      pid_splits=(a.pid_splits, "file"))
    try:
        task = build_task(a) if a.task != "perplexity" else None
    except (OSError, ValueError, KeyError, TypeError) as e:  # a file not in the benchmark's layout
        p.error(f"{a.task}: cannot read its files ({type(e).__name__}: {e})")

    from vlmjax.generate.loading import load_model

    if a.task == "perplexity":
        from vlmjax.eval.likelihood import text_perplexity

        model, _, tok = load_model(a.model, dtype=a.dtype)
        result = text_perplexity(model, tok, a.file, batch_size=a.batch_size, out_dir=a.out)
        print(format_table([result]))
        print(json.dumps(result))
        return 0
    model, _, tok = load_model(a.model, dtype=a.dtype)
    if a.dar:
        from vlmjax.eval.dar import dar_task

        task = dar_task(model, tok, task, max_new_tokens=a.dar_max_new_tokens, batch_size=a.batch_size, out_dir=a.out,
                        progress=True)
    result = evaluate(model, tok, task, out_dir=a.out, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
    print(format_table([result]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
