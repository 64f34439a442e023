"""POINTS command line: perplexity filtering of caption pairs, model soup.

    python -m vlmjax.recipes.points filter score --data caps.jsonl --images imgs --out runs/points/ppl.jsonl \\
        [--model SCORER_DIR --scorer-name NAME --template auto --batch-size 16 --shard-index I --shard-count N]
    python -m vlmjax.recipes.points filter select --ppl runs/points/ppl.jsonl --data caps.jsonl --images imgs \\
        --out runs/points/filter [--fraction 0.2 --scorer NAME]

    python -m vlmjax.recipes.points soup uniform RUN_A RUN_B RUN_C --out runs/points/soup_uniform
    python -m vlmjax.recipes.points soup greedy RUN_A RUN_B RUN_C --out runs/points/soup_greedy \\
        --val-file val/questions.json --val-images train/images [--val-task easy_vqa --metric accuracy --val-n N]

`--data`: caption records (.json/.jsonl, the `caption` format: id, image, caption). `score` writes this host's
shard (`ppl-i-of-n.jsonl` with --shard-count > 1, default the jax processes); `select` merges the shards.
`soup`: ingredients are native or HF folders of one model (LoRA runs exported merged); the soup is written to
OUT/model, the members (greedy: every trial and the cache of evaluated sets) to OUT/soup.json. Greedy's val task is
any `python -m vlmjax.eval` task given by the --val-* flags (default easy_vqa: a held-out question file in the
easy-vqa layout, never the test split), read at --metric (dotted for nested results: by_kind.shape.accuracy).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlmjax.recipes.points import filter as PF


def _spec(a):
    from vlmjax.data.pipeline import SourceSpec

    return SourceSpec(format="caption", path=a.data, image_root=a.images)


def cmd_score(a) -> dict:
    from vlmjax.generate import load_model

    model, _, tok = load_model(a.model)
    st = PF.score(model, tok, _spec(a), a.out, scorer=a.scorer_name or a.model, prompt=a.prompt,
                  template=a.template, batch_size=a.batch_size, shard_index=a.shard_index,
                  shard_count=a.shard_count, progress=a.progress)
    return {k: st[k] for k in ("pool", "requests", "written", "failed", "skipped_done", "out", "header")}


def cmd_select(a) -> dict:
    rep = PF.select(a.ppl, _spec(a), a.out, fraction=a.fraction, expect={"scorer": a.scorer})
    print("\n".join(rep["histogram"]), file=sys.stderr)
    return {k: rep[k] for k in ("scored", "failed", "non_finite_ppl", "kept", "cut")}


def val_task(a):
    from vlmjax.eval.__main__ import load_task

    if a.val_task == "easy_vqa" and not a.val_file:
        raise SystemExit("soup greedy: --val-file is required (held-out questions, easy-vqa layout "
                         "[question, answer, image_id] rows with --val-images); the test split is never a val set")
    ns = argparse.Namespace(task=a.val_task, file=a.val_file, images=a.val_images, split=a.val_split,
                            kind=a.val_kind, questions=a.val_questions, annotations=a.val_annotations, pid_splits=None)
    return load_task(ns, limit=a.val_n)


def cmd_uniform(a) -> dict:
    from vlmjax.recipes.points import soup

    return soup.uniform(a.ingredients, a.out)


def cmd_greedy(a) -> dict:
    from vlmjax.recipes.points import soup

    rec = soup.greedy(a.ingredients, a.out, soup.task_val(val_task(a), a.metric, batch_size=a.batch_size),
                      dtype=a.dtype, log=lambda m: print(m, file=sys.stderr))
    return {k: rec[k] for k in ("val", "order", "members", "soup_val", "best_single", "model")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.points")
    top = p.add_subparsers(dest="part", required=True)
    f = top.add_parser("filter").add_subparsers(dest="cmd", required=True)
    s = f.add_parser("score", help="PPL of every caption given its image, this host's shard")
    s.add_argument("--model", default=PF.DEFAULT_SCORER,
                   help="HF LLaVA folder (default: the LLaVA-1.5-7B substitute for the paper's Qwen2-VL-7B)")
    s.add_argument("--scorer-name", default=None, help="name in the ppl header (default: --model)")
    s.add_argument("--prompt", default=PF.PROMPT)
    s.add_argument("--template", default="auto", help="the scorer's own chat template (default: its tokenizer's)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard-index", type=int, default=None)
    s.add_argument("--shard-count", type=int, default=None)
    s.add_argument("--no-progress", dest="progress", action="store_false")
    t = f.add_parser("select", help="merge shards, keep the lowest-PPL fraction, write the report")
    t.add_argument("--ppl", required=True, help="ppl.jsonl (or the stem of its host shards)")
    t.add_argument("--fraction", type=float, default=0.2)
    t.add_argument("--scorer", default=None, help="refuse ppl files from another scorer")
    for q in (s, t):
        q.add_argument("--data", required=True)
        q.add_argument("--images", default=None)
        q.add_argument("--out", required=True)
    sp = top.add_parser("soup").add_subparsers(dest="cmd", required=True)
    u = sp.add_parser("uniform", help="the uniform weight average of all ingredients")
    g = sp.add_parser("greedy", help="greedy soup (Wortsman et al. 2022) by a held-out val task, in memory")
    from vlmjax.eval.__main__ import TASKS
    from vlmjax.generate.cli import positive_int

    g.add_argument("--val-task", default="easy_vqa", choices=[t for t in TASKS if t != "perplexity"],
                   help="a python -m vlmjax.eval task (default: %(default)s)")
    g.add_argument("--val-file", help="the val task's file (easy_vqa: questions.json of held-out questions)")
    g.add_argument("--val-images", help="the val task's image folder")
    g.add_argument("--val-questions", help="vqav2: questions JSON")
    g.add_argument("--val-annotations", help="vqav2: annotations JSON")
    g.add_argument("--val-kind", default="vqa", choices=["vqa", "mc", "yesno", "caption"], help="llava_jsonl: kind")
    g.add_argument("--val-split", default=None, help="scienceqa / coco_captions split")
    g.add_argument("--val-n", type=positive_int, default=None,
                   help="first N val samples (easy_vqa: N spread over the file)")
    g.add_argument("--metric", default="accuracy", help="metric read from the task's results (default: accuracy)")
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="in-memory model dtype")
    for q in (u, g):
        q.add_argument("ingredients", nargs="+", help="native or HF model folders (LoRA runs exported merged)")
        q.add_argument("--out", required=True, help="OUT/model (the soup, native) and OUT/soup.json")
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    return {"score": cmd_score, "select": cmd_select, "uniform": cmd_uniform, "greedy": cmd_greedy}[a.cmd](a)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main()))
