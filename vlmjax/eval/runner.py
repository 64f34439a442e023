"""Run a task: generate answers with the KV-cache engine (or score its options, `method="loglik"`), score them,
save results and per-sample predictions.

With `out_dir`, predictions go through the resumable generation runner (`{task}_predictions.jsonl`, rerun-safe;
option scores: `{task}_options.jsonl`), and `{task}_results.json` (metrics) plus `{task}_scored.jsonl`
(prediction, extracted answer, score per sample) are written for inspection. Without it everything stays in
memory (the trainer's periodic evaluation). Prompts (k-shot, plain template) are built by vlmjax/eval/prompts.py.
Samples with `meta["kind"]` add `by_kind`: the task's metrics over each kind's samples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from vlmjax.eval.answers import (exact_match, extract_choice, extract_yes_no, first_vocab_answer, vqa_accuracy,
                                 yes_no_metrics)
from vlmjax.eval.caption import bleu, cider_d
from vlmjax.eval.likelihood import option_scores, score_options, write_results
from vlmjax.eval.prompts import PromptEncoder, requests_for
from vlmjax.eval.tasks import MAX_NEW_TOKENS, Task
from vlmjax.generate.dataset import generate_dataset, iter_batches
from vlmjax.generate.engine import GenerationConfig, generate
from vlmjax.generate.jsonl import read_jsonl
from vlmjax.generate.requests import Encoder, collate_images, default_eos_ids, image_pos_of, image_slots


def predict(model, tokenizer, task: Task, *, out_dir=None, batch_size: int = 16, max_new_tokens: int | None = None,
            encoder: Encoder | None = None, mesh=None, progress: bool = True) -> dict[str, str]:
    """Greedy answers {sample id: text}."""
    config = GenerationConfig(max_new_tokens=max_new_tokens or task.max_new_tokens or MAX_NEW_TOKENS[task.kind],
                              eos_token_ids=default_eos_ids(tokenizer, model.cfg))
    encoder = PromptEncoder(encoder or Encoder(tokenizer, model.cfg))
    reqs = requests_for(task)
    if out_dir is not None:
        path = os.path.join(out_dir, f"{task.name}_predictions.jsonl")
        generate_dataset(model, tokenizer, reqs, path, config, batch_size=batch_size, encoder=encoder, mesh=mesh,
                         progress=progress)
        return {k: r.get("output", "") for k, r in read_jsonl(path).items()}
    preds = {}
    for batch, enc, _failed in iter_batches(reqs, batch_size, encoder.prompt, desc=task.name, progress=progress):
        if not batch:
            continue
        px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
        gens = generate(model, [e.ids for e in enc], config, pixel_values=px, image_rows=rows,
                        image_pos=image_pos_of(enc), tokenizer=tokenizer, batch_size=batch_size, mesh=mesh)
        preds.update((r.id, g.text) for r, g in zip(batch, gens))
    return preds


def score(task: Task, preds: dict[str, str]) -> tuple[dict, list[dict]]:
    """(metrics, per-sample records). Missing predictions count as empty answers."""
    metrics, rows = _score(task, preds)
    return with_kinds(task, metrics, rows, lambda sub: _score(sub, preds)[0]), rows


def with_kinds(task: Task, metrics: dict, rows: list[dict], score_fn) -> dict:
    """Adds each row's kind and metrics["by_kind"] = {kind: score_fn(the task on that kind's samples)} (for
    captions, CIDEr-D's document frequencies then come from that kind's references)."""
    kinds = [s.meta.get("kind") for s in task.samples]
    if all(k is None for k in kinds):
        return metrics
    for r, k in zip(rows, kinds):
        r["kind"] = k
    by_kind = {}
    for k in sorted({str(k) for k in kinds}):
        sub = [s for s, kk in zip(task.samples, kinds) if str(kk) == k]
        m = score_fn(_subtask(task, sub))
        by_kind[k] = {key: v for key, v in m.items() if key not in ("task", "kind", "metric", "normalize")}
    metrics["by_kind"] = by_kind
    return metrics


def _subtask(task: Task, samples) -> Task:
    return dataclasses.replace(task, samples=samples)


def _score(task: Task, preds: dict[str, str]) -> tuple[dict, list[dict]]:
    rows, samples = [], task.samples
    texts = [preds.get(s.id, "") or "" for s in samples]
    n = len(samples)
    if task.kind == "vqa":
        soft = all(len(s.answers) >= 3 for s in samples)
        for s, t in zip(samples, texts):
            ans = (first_vocab_answer(t, task.vocab) or t) if task.vocab else t
            row = {"id": s.id, "prediction": t, "answer": ans, "gold": s.answers,
                   "exact_match": exact_match(ans, s.answers)}
            if soft:
                row["vqa_accuracy"] = vqa_accuracy(ans, s.answers)
            rows.append(row)
        key = "vqa_accuracy" if soft else "exact_match"
        metrics = {"accuracy": sum(r[key] for r in rows) / max(n, 1), "metric": key,
                   "exact_match": sum(r["exact_match"] for r in rows) / max(n, 1)}
    elif task.kind == "mc":
        for s, t in zip(samples, texts):
            idx = extract_choice(t, s.choices or [])
            letter = None if idx is None else chr(65 + idx)
            rows.append({"id": s.id, "prediction": t, "answer": letter, "gold": s.answers[0],
                         "correct": float(letter == s.answers[0])})
        metrics = {"accuracy": sum(r["correct"] for r in rows) / max(n, 1),
                   "unparsed": sum(r["answer"] is None for r in rows)}
    elif task.kind == "yesno":
        answers = [extract_yes_no(t) for t in texts]
        golds = [s.answers[0] for s in samples]
        rows = [{"id": s.id, "prediction": t, "answer": a, "gold": g, "correct": float(a == g)}
                for s, t, a, g in zip(samples, texts, answers, golds)]
        metrics = yes_no_metrics(answers, golds)
    elif task.kind == "caption":
        refs = [s.answers for s in samples]
        cider, per = cider_d(texts, refs)
        metrics = {"bleu4": bleu(texts, refs), "cider_d": cider}
        rows = [{"id": s.id, "prediction": t, "gold": s.answers, "cider_d": c} for s, t, c in zip(samples, texts, per)]
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    metrics.update(task=task.name, kind=task.kind, n=n)
    return metrics, rows


def evaluate(model, tokenizer, task: Task, *, out_dir=None, batch_size: int = 16, max_new_tokens: int | None = None,
             encoder: Encoder | None = None, mesh=None, progress: bool = True) -> dict:
    """Predict + score one task (or score its options, method="loglik"); with out_dir also write results JSON and
    per-sample scored predictions."""
    if task.method == "loglik":
        if task.kind != "mc":
            raise ValueError(f"task {task.name}: method 'loglik' needs kind 'mc', not {task.kind!r}")
        path = None if out_dir is None else os.path.join(out_dir, f"{task.name}_options.jsonl")
        scores = option_scores(model, tokenizer, task, out_path=path, batch_size=batch_size, encoder=encoder,
                               mesh=mesh, progress=progress)
        metrics, rows = score_options(task, scores)
        metrics = with_kinds(task, metrics, rows, lambda sub: score_options(sub, scores)[0])
    elif task.method == "generate":
        preds = predict(model, tokenizer, task, out_dir=out_dir, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, encoder=encoder, mesh=mesh, progress=progress)
        metrics, rows = score(task, preds)
    else:
        raise ValueError(f"task {task.name}: unknown method {task.method!r} (generate or loglik)")
    # the mode, so two runs are never confused (names differ too: tasks.with_mode)
    metrics.update(shots=task.shots, template=task.template or "chat", by=task.method)
    if task.shots:
        metrics["seed"] = task.seed
    if task.method == "loglik":
        metrics["options"] = task.option_format
    if out_dir is not None:
        write_results(out_dir, task.name, metrics, rows)
    return metrics


def format_table(results: Sequence[dict]) -> str:
    """One line per task: name, kind, n, then its numeric metrics."""
    lines = [f"{'task':<24} {'kind':<10} {'n':>6}  metrics"]
    for r in results:
        nums = "  ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float))
        lines.append(f"{r['task']:<24} {r['kind']:<10} {r['n']:>6}  {nums}")
        for k, m in (r.get("by_kind") or {}).items():
            nums = "  ".join(f"{key}={v:.4f}" for key, v in m.items() if isinstance(v, float))
            lines.append(f"  {k:<22} {'':<10} {m.get('n', 0):>6}  {nums}")
    return "\n".join(lines)
