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

Modes (recorded in the results JSON and in its file name, e.g. easy_vqa_test_4shot_plain_results.json):
    --shots 4 --template plain easy_vqa          # 4-shot, pre-training prompts (stage-2 checkpoints)
    --shots 4 pope --file test.jsonl --images val2014/ --demos demos.jsonl   # demonstrations from --demos
    --by loglik scienceqa --file problems.json --images scienceqa/images     # option log-likelihood, not text
    --shots 5 mmlu --file mmlu/data/test --demos mmlu/data/dev
    perplexity --file docs.jsonl --max-length 512
Demonstration pools: easy_vqa, scienceqa, coco_captions (Karpathy): the train split; textvqa, pope, mmbench,
llava_jsonl, mmlu: --demos (a file, or the dev folder, in --file's layout, images from --images); vqav2: none.
Predictions are resumable; results JSON, per-sample scored predictions and a printed table end the run.
"""

from __future__ import annotations

import argparse
import json

from vlmjax.eval import tasks
from vlmjax.eval.prompts import pick_demos
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
SPLIT_POOL = ("easy_vqa", "scienceqa", "coco_captions")  # --shots: demonstrations from the train split
FILE_POOL = ("textvqa", "pope", "mmbench", "llava_jsonl", "mmlu")  # --shots: demonstrations from --demos


def load_task(a, file=None, split=None, limit=None) -> tasks.Task:
    """The task as its loader reads it (`file` / `split`: another file or split of it, the demonstration pool)."""
    file, split = file or a.file, split or a.split
    if a.task == "easy_vqa":
        if file:  # a question file in the package's layout (e.g. held-out validation questions)
            return tasks.easy_vqa_file(file, a.images or ".", n=limit)
        return tasks.easy_vqa(split or "test", n=limit)
    if a.task == "vqav2":
        return tasks.vqav2(a.questions, a.annotations, a.images, limit=limit)
    if a.task == "textvqa":
        return tasks.textvqa(file, a.images, limit=limit)
    if a.task == "scienceqa":
        return tasks.scienceqa(file, a.images, split=split or "test", pid_splits_json=a.pid_splits, limit=limit)
    if a.task == "mmbench":
        return tasks.mmbench(file, limit=limit)
    if a.task == "pope":
        return tasks.pope(file, a.images, limit=limit)
    if a.task == "coco_captions":
        return tasks.coco_captions(file, a.images, split=split or "test", limit=limit)
    if a.task == "mmlu":
        return tasks.mmlu(file, limit=limit)
    return tasks.llava_jsonl(file, a.images or "", a.kind, limit=limit)


def build_task(p: argparse.ArgumentParser, a) -> tasks.Task:
    """The task in the mode the flags ask for: its loader, the demonstration pool, then `tasks.with_mode`."""
    if a.task == "easy_vqa" and not a.file:  # spreads --n over the split; demonstrations from 1000 train rows
        task = tasks.easy_vqa(a.split or "test", n=a.n, shots=a.shots, template=a.template)
    elif a.task == "mmlu":  # demonstrations from the query's own subject
        task = tasks.mmlu(a.file, limit=a.n, shots=a.shots, dev_path=a.demos, option_format=a.options,
                          normalize=a.normalize)
    else:
        task = load_task(a, limit=a.n)
        if a.shots:
            pool = load_task(a, file=a.demos) if a.task in FILE_POOL else load_task(a, split="train")
            task = tasks.with_mode(task, shots=a.shots, demos=pool.samples)
        task = tasks.with_mode(task, template=a.template, option_format=a.options, normalize=a.normalize,
                               method=a.by)
    if a.task in ("easy_vqa", "mmlu"):
        task = tasks.with_mode(task, method=a.by)
    task = tasks.with_mode(task, seed=a.seed)
    if a.shots:
        where = "--demos" if a.task in FILE_POOL else "the train split"
        if not task.demos:
            p.error(f"--shots {a.shots}: {where} of {a.task} has no samples")
        shared = {d.id for d in task.demos} & {s.id for s in task.samples}
        if shared:
            p.error(f"--shots: {where} shares samples with the queries (e.g. {sorted(shared)[0]}); demonstrations "
                    "must come from other samples" + (" (coco_captions: the Karpathy dataset_coco.json has the "
                                                       "splits)" if a.task == "coco_captions" else ""))
    # what would fail mid-run, named now: options to score; a pool too small (one draw per kind: mmlu's subjects)
    bare = next((s.id for s in task.samples if task.method == "loglik" and not s.choices), None)
    if bare is not None:
        p.error(f"--by loglik: {a.task} sample {bare} has no choices (llava_jsonl: a \"choices\" list)")
    for s in {str(s.meta.get("kind")): s for s in task.samples}.values():
        try:
            pick_demos(task, s)
        except ValueError as e:
            p.error(f"--shots {a.shots}: {e}")
    return task


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
    p.add_argument("--shots", type=cli.non_negative_int, default=0,
                   help="in-context demonstrations before each query, each with its image (default: 0)")
    p.add_argument("--demos", help="--shots: the demonstration pool in --file's layout (textvqa, pope, mmbench, "
                   "llava_jsonl: a file; mmlu: the dev folder)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="--shots: seed of the per-query demonstration draws (default: 0)")
    p.add_argument("--template", default="chat", choices=["chat", "plain"],
                   help="chat: the model's chat template (default); plain: pre-training prompts "
                   "'<image>Question: q Answer:' for stage-1/2 checkpoints that never saw a chat turn")
    p.add_argument("--by", default=None, choices=["generate", "loglik"],
                   help="multiple choice: generate an answer and extract its letter, or pick the option the model "
                   "finds most likely (default: the task's; mmlu: loglik)")
    p.add_argument("--options", default=None, choices=["letter", "text"],
                   help="--by loglik: the continuation scored is the option's letter (default) or its text")
    p.add_argument("--normalize", default=None, choices=["sum", "mean"],
                   help="--by loglik: option score = sum of its token log-probs (default) or their mean")
    p.add_argument("--max-length", type=cli.positive_int, default=None,
                   help="perplexity: tokens per window (windows overlap by one; default: 1024)")
    p.add_argument("--text-key", default=None, help="perplexity: the text field of .jsonl / .json records "
                   "(default: text)")
    p.add_argument("--mesh", type=cli.mesh_sizes, default=None,
                   help="data,fsdp,tensor device counts, e.g. -1,1,1 (rows split over every device)")
    return p


def check_mode(p: argparse.ArgumentParser, a) -> None:
    """Flags that do not fit together, refused before anything is read (each error names the flag)."""
    if a.task == "perplexity":
        for flag, bad in (("shots", a.shots), ("template", a.template != "chat"), ("by", a.by),
                          ("options", a.options), ("normalize", a.normalize), ("dar", a.dar),
                          ("max_new_tokens", a.max_new_tokens), ("demos", a.demos)):
            if bad:
                p.error(f"--{flag.replace('_', '-')}: perplexity scores the text as it is (no prompt, no answer)")
    else:
        for flag in ("max_length", "text_key"):
            if getattr(a, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to perplexity only, not {a.task}")
    kind = "mc" if a.task in ("scienceqa", "mmbench", "mmlu") else a.kind if a.task == "llava_jsonl" else "other"
    by = a.by or ("loglik" if a.task == "mmlu" else "generate")
    if by == "loglik" and kind != "mc":
        p.error(f"--by loglik needs a multiple-choice task (scienceqa, mmbench, mmlu, llava_jsonl --kind mc), "
                f"not {a.task}" + (f" --kind {a.kind}" if a.task == "llava_jsonl" else ""))
    for flag in ("options", "normalize"):
        if getattr(a, flag) is not None and by != "loglik" and a.task != "perplexity":
            p.error(f"--{flag} applies to --by loglik only")
    if by == "loglik" and a.max_new_tokens is not None:
        p.error("--max-new-tokens: --by loglik generates nothing")
    if a.shots and a.task == "vqav2":
        p.error("--shots: vqav2 has no demonstration pool here (its train split is another questions + "
                "annotations pair; write it as llava_jsonl and pass --demos)")
    if a.shots and a.task in FILE_POOL and a.demos is None:
        p.error(f"--shots {a.shots}: {a.task} needs --demos (the demonstration pool, in --file's layout)")
    if a.demos is not None and not a.shots:
        p.error("--demos needs --shots")
    if a.demos is not None and a.task in SPLIT_POOL:
        p.error(f"--demos: {a.task} draws its demonstrations from its train split")
    if a.seed and not a.shots:
        p.error("--seed (demonstration draws) needs --shots")
    if a.dar and (a.shots or a.template == "plain"):
        p.error(f"--dar with {'--shots' if a.shots else '--template plain'}: describe-and-respond prompts are "
                "zero-shot chat turns")


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    for flag, kind in NEEDS[a.task].items():
        if getattr(a, flag) is None:
            p.error(f"{a.task} needs --{flag}")
    check_mode(p, a)
    cli.require_paths(p, model=(a.model, "exists"), file=(a.file, NEEDS[a.task].get("file", "file")),
                      questions=(a.questions, "file"), annotations=(a.annotations, "file"), images=(a.images, "dir"),
                      pid_splits=(a.pid_splits, "file"), demos=(a.demos, NEEDS[a.task].get("file", "file")))
    try:
        if a.task == "perplexity":
            from vlmjax.eval.likelihood import read_texts

            read_texts(a.file, a.text_key or "text")  # a record without its text field: an error before loading
        else:
            task = build_task(p, a)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a file not in the benchmark's layout
        p.error(f"{a.task}: cannot read its files ({type(e).__name__}: {e})")
    mesh = cli.make_mesh_or_exit(p, a.mesh)

    from vlmjax.eval.likelihood import text_perplexity
    from vlmjax.generate.loading import load_model

    model, _, tok = load_model(a.model, dtype=a.dtype, mesh=mesh)
    if a.task == "perplexity":
        result = text_perplexity(model, tok, a.file, max_length=a.max_length or 1024, batch_size=a.batch_size,
                                 out_dir=a.out, key=a.text_key or "text", mesh=mesh)
    else:
        if a.dar:
            from vlmjax.eval.dar import dar_task

            task = dar_task(model, tok, task, max_new_tokens=a.dar_max_new_tokens, batch_size=a.batch_size,
                            out_dir=a.out, mesh=mesh, progress=True)
        result = evaluate(model, tok, task, out_dir=a.out, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                          mesh=mesh)
    print(format_table([result]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
