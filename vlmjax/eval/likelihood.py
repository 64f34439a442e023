"""Evaluation by likelihood: multiple choice by option log-likelihood (MMLU-style), and text perplexity.

Multiple choice (`Task(kind="mc", method="loglik")`): each option is scored as the continuation of the sample's
prompt (vlmjax/eval/prompts.py: chat or plain template, k-shot), as the assistant's reply in the chat template or
after the prefill ("... Answer: B") in the plain one. The continuation is the option's letter (`option_format=
"letter"`, MMLU's usual form) or its text ("text"); its end-of-turn token is not scored.

    score(option) = sum_t log p(c_t | prompt, c_<t)            normalize="sum" (the default)
                  = score_sum / number of option tokens        normalize="mean" (no bias towards short options)

The prediction is the option with the highest score (the first on ties). Log-probs come from
`vlmjax.scoring.loglik.sequence_scores`, the function the scoring runs use.

Perplexity (`text_perplexity`): documents are tokenised as the tokenizer does by default (its BOS, if it adds
one), cut into windows of `max_length` tokens that overlap by one token, so every token but a document's first is
predicted exactly once, from the window it falls in. Corpus perplexity = exp(-sum log p / number of predicted
tokens) over all documents (token-weighted); each document's own perplexity is in the per-document records.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from vlmjax.eval.prompts import PromptEncoder, request_for
from vlmjax.eval.tasks import Task
from vlmjax.generate.dataset import iter_batches
from vlmjax.generate.jsonl import ResumableJsonl, read_jsonl
from vlmjax.generate.requests import Encoder, collate_images, image_pos_of, image_slots
from vlmjax.scoring.loglik import data_parallel, pad_rows, sequence_scores, token_logprobs


def _option(task: Task, j: int, text: str) -> str:
    if task.option_format == "letter":
        return chr(65 + j)
    if task.option_format == "text":
        return text
    raise ValueError(f"option_format must be 'letter' or 'text', not {task.option_format!r}")


def option_scores(model, tokenizer, task: Task, *, out_path=None, batch_size: int = 16,
                  encoder: Encoder | None = None, mesh=None, progress: bool = False) -> dict[str, dict]:
    """{f"{sample id}#{option index}": {"sum_logprob", "num_tokens", "mean_logprob"} or {"error"}}; resumable JSONL
    at out_path. mesh: rows split over its data axes, as in `scoring.loglik.on_mesh` (the model placed by
    `sharding.shard_module`); batches are padded to a multiple of the data-parallel size."""
    encoder = PromptEncoder(encoder or Encoder(tokenizer, model.cfg))
    rows_per_batch = -(-batch_size // data_parallel(mesh)) * data_parallel(mesh)
    items = []
    for s in task.samples:
        if not s.choices:
            raise ValueError(f"task {task.name}: sample {s.id} has no choices to score")
        req = request_for(task, s)
        items += [(f"{s.id}#{j}", req, _option(task, j, c)) for j, c in enumerate(s.choices)]
    out = ResumableJsonl(out_path) if out_path is not None else None
    done, results = (out.done if out else set()), {}
    todo = [it for it in items if it[0] not in done]
    try:
        for batch, enc, failed in iter_batches(todo, batch_size, lambda it: encoder.continuation(it[1], it[2]),
                                               desc=task.name, progress=progress):
            recs = [{"id": key, "error": err} for (key, _, _), err in failed]
            if batch:
                ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc], batch_size=rows_per_batch)
                px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
                sc = sequence_scores(model, ids, tgt, px, rows, image_pos=image_pos_of(enc), mesh=mesh)
                recs += [{"id": key, "sum_logprob": float(sc["sum_logprob"][i]),
                          "num_tokens": int(sc["num_tokens"][i]), "mean_logprob": float(sc["mean_logprob"][i])}
                         for i, (key, _, _) in enumerate(batch)]
            results.update((r["id"], r) for r in recs)
            if out:
                out.write(recs)
    finally:
        if out:
            out.close()
    if out_path is not None:
        results = {**read_jsonl(out_path), **results}
    return results


def score_options(task: Task, scores: dict[str, dict]) -> tuple[dict, list[dict]]:
    """(metrics, per-sample rows) from option scores. A sample with a missing or failed option counts as wrong."""
    if task.normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', not {task.normalize!r}")
    key = f"{task.normalize}_logprob"
    rows = []
    for s in task.samples:
        recs = [scores.get(f"{s.id}#{j}", {"error": "not scored"}) for j in range(len(s.choices))]
        errors = [r["error"] for r in recs if "error" in r]
        vals = [r.get(key) for r in recs]
        pick = None if errors else int(np.argmax(vals))
        letter = None if pick is None else chr(65 + pick)
        rows.append({"id": s.id, "answer": letter, "gold": s.answers[0], "correct": float(letter == s.answers[0]),
                     "option_scores": vals, **({"kind": s.meta["kind"]} if "kind" in s.meta else {}),
                     **({"error": errors[0]} if errors else {})})
    n = len(rows)
    metrics = {"accuracy": sum(r["correct"] for r in rows) / max(n, 1), "normalize": task.normalize,
               "errors": sum("error" in r for r in rows), "task": task.name, "kind": task.kind, "n": n}
    return metrics, rows


def read_texts(path, key: str = "text") -> list[tuple[str, str]]:
    """[(id, text)]: a .txt file is one document; .jsonl / .json records give one document each (`key`)."""
    path = Path(path)
    if path.suffix == ".txt":
        return [(path.stem, path.read_text(encoding="utf-8"))]
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        recs = [(n, json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        recs = list(enumerate(json.loads(path.read_text(encoding="utf-8")), 1))
    out = []
    for n, r in recs:
        if not isinstance(r, dict) or not isinstance(r.get(key), str):
            raise ValueError(f"{path}: record {n} has no text field {key!r}")
        out.append((str(r.get("id", n - 1)), r[key]))
    return out


def text_perplexity(model, tokenizer, docs: Sequence[tuple[str, str]] | str | os.PathLike, *, max_length: int = 1024,
                    batch_size: int = 8, out_dir=None, name: str = "perplexity", key: str = "text",
                    mesh=None) -> dict:
    """Corpus perplexity of documents [(id, text)] or a file (read_texts); see the module docstring. A file's
    results are named `{stem}_perplexity` (+ `_len{max_length}` when not 1024). mesh: as `option_scores`."""
    if not isinstance(docs, (list, tuple)):
        if name == "perplexity":
            name = f"{Path(docs).stem}_perplexity" + (f"_len{max_length}" if max_length != 1024 else "")
        docs = read_texts(docs, key)
    if max_length < 2:
        raise ValueError("max_length must be >= 2 (a window predicts its tokens after the first)")
    windows = []  # (doc index, token ids)
    for d, (_, text) in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, max(len(ids) - 1, 1), max_length - 1):
            windows.append((d, ids[start: start + max_length]))
    total = np.zeros(len(docs))
    count = np.zeros(len(docs), np.int64)
    rows_per_batch = -(-batch_size // data_parallel(mesh)) * data_parallel(mesh)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        targets = [np.arange(len(w)) > 0 for _, w in chunk]
        ids, tgt = pad_rows([w for _, w in chunk], targets, batch_size=rows_per_batch)
        lp = token_logprobs(model, ids, tgt, mesh=mesh)
        for r, (d, _) in enumerate(chunk):
            total[d] += lp[r].sum(dtype=np.float64)
            count[d] += int(tgt[r].sum())
    rows = [{"id": doc_id, "num_tokens": int(c), "sum_logprob": float(t),
             "perplexity": math.exp(-t / c) if c else None} for (doc_id, _), t, c in zip(docs, total, count)]
    n_tok = int(count.sum())
    if not n_tok:
        raise ValueError(f"{name}: no token to predict (every document is at most one token)")
    metrics = {"perplexity": math.exp(-total.sum() / n_tok), "nll_per_token": float(-total.sum() / n_tok),
               "num_tokens": n_tok, "task": name, "kind": "perplexity", "n": len(docs), "max_length": max_length}
    if out_dir is not None:
        write_results(out_dir, name, metrics, rows)
    return metrics


def write_results(out_dir, name: str, metrics: dict, rows: list[dict]) -> None:
    """`{name}_results.json` and `{name}_scored.jsonl`, each written to a temporary file and renamed."""
    os.makedirs(out_dir, exist_ok=True)
    for fname, text in ((f"{name}_results.json", json.dumps(metrics, indent=2)),
                        (f"{name}_scored.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))):
        path = os.path.join(out_dir, fname)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
