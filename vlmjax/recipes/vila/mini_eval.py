"""The VILA miniature's evaluations beyond held-out text perplexity, each composed from `vlmjax.eval` and cached as
JSON (README "VILA, reproduced in miniature"):

- fact QA (the MMLU analogue): the held-out ("eval") half of `mini_data.fact_qa`'s multiple-choice items, text only,
  scored by option log-likelihood (`Task(method="loglik")`, `vlmjax.eval.likelihood`): each option's text as the
  continuation of the question, mean log-prob per option token (options differ in length: "no" vs "a slice of
  pizza"). Pre-trained models are asked in the plain template ("Question: Q Answer: option"), SFT'd ones in the chat
  template (the question as the user turn, the option as the reply: the blend's own format).
- captions k-shot: easy-vqa test images asked for a caption in the plain template (`<image>` then the model
  continues, VILA / Flamingo's few-shot captioning), 0-shot or with k demonstrations (`<image>caption</s>` each,
  recipe-pool train images with their easy-vqa captions); scored as `eval.easy_vqa.description_accuracy` scores a
  description: the first colour word and the first shape word against the image's true attributes.
- easy-vqa after SFT: `eval.easy_vqa.evaluate_by_kind` (accuracy by answer kind + describe colour/shape).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.eval.report import cached_json

DEMO_POOL = (2800, 3000)  # recipe-pool train images whose captions are the k-shot demonstrations (never trained on)


def fact_task(fact_qa: Path, *, split: str = "eval", template: str | None = None):
    """The fact-QA items of `split` ("eval", "blend" or "all") as an option-log-likelihood `Task` (text options,
    mean log-prob); template None = the model's chat template, "plain" = pre-training prompts."""
    from vlmjax.eval.tasks import EvalSample, Task, with_mode
    from vlmjax.generate.jsonl import read_jsonl

    rows = [r for r in read_jsonl(fact_qa, key=None) if split == "all" or r["split"] == split]
    if not rows:
        raise ValueError(f"{fact_qa}: no fact QA items of split {split!r}")
    samples = []
    for r in rows:
        if not ("A" <= r["answer"] < chr(65 + len(r["choices"]))):
            raise ValueError(f"{fact_qa}: item {r['id']}: answer {r['answer']!r} is not a letter of its "
                             f"{len(r['choices'])} choices")
        samples.append(EvalSample(r["id"], r["question"], [r["answer"]], choices=list(r["choices"])))
    task = Task(f"vila_fact_qa_{split}", "mc", samples, instruction="", max_new_tokens=4, method="loglik")
    return with_mode(task, template=template, option_format="text", normalize="mean")


def fact_accuracy(model_dir: Path, fact_qa: Path, out: Path, *, template: str | None) -> dict:
    """{"accuracy", "n", ...} of `fact_task` on an exported model; cached in `out`; per-item option scores beside it."""
    from vlmjax.eval.runner import evaluate
    from vlmjax.generate.loading import load_model

    def go():
        model, _cfg, tok = load_model(model_dir)
        m = evaluate(model, tok, fact_task(fact_qa, template=template), out_dir=str(Path(out).parent / "fact_qa"),
                     progress=False)
        return {k: m[k] for k in ("accuracy", "n", "errors", "template")}

    return cached_json(out, go)


def demo_samples(captions: Path, pool: tuple[int, int] = DEMO_POOL) -> list:
    """k-shot demonstrations: the easy-vqa train images of `pool` with a caption (the easy-vqa builder's
    train_captions.jsonl; images beside it under images/), each answering with its caption."""
    from vlmjax.eval.tasks import EvalSample
    from vlmjax.generate.jsonl import read_jsonl

    caps = read_jsonl(captions)
    root = Path(captions).parent / "images"
    out = [EvalSample(f"demo_{n}", "", [caps[f"train_{n}"]["caption"]], str(root / caps[f"train_{n}"]["image"]))
           for n in range(*pool) if f"train_{n}" in caps and caps[f"train_{n}"].get("caption")]
    if not out:
        raise ValueError(f"{captions}: no captioned train images in {pool} for demonstrations")
    return out


def caption_task(n: int, shots: int, demos: list | None):
    """`eval.easy_vqa.description_task(n)` (test images, references [colour, shape]) asked in the plain template
    with `shots` demonstrations drawn from `demos`."""
    from vlmjax.eval.easy_vqa import description_task
    from vlmjax.eval.tasks import with_mode

    return with_mode(description_task(n), shots=shots, demos=demos if shots else None, template="plain")


def caption_accuracy(model_dir: Path, out: Path, *, n: int, shots: int, captions: Path) -> dict:
    """{"describe_color", "describe_shape", "describe_both", "n", "shots"} of `caption_task`; cached in `out`."""
    from vlmjax.eval.easy_vqa import description_accuracy
    from vlmjax.eval.runner import predict
    from vlmjax.generate.loading import load_model

    def go():
        model, _cfg, tok = load_model(model_dir)
        task = caption_task(n, shots, demo_samples(captions) if shots else None)
        preds = predict(model, tok, task, progress=False, batch_size=16)
        examples = [{"id": s.id, "truth": s.answers, "caption": preds.get(s.id, "")} for s in task.samples[:4]]
        return {**description_accuracy(preds, task), "n": len(task.samples), "shots": shots, "examples": examples}

    return cached_json(out, go)


def vqa_by_kind(model_dir: Path, out: Path, *, n: int) -> dict:
    """easy-vqa test accuracy by answer kind + describe colour/shape (`evaluate_by_kind`, chat template)."""
    from vlmjax.eval.easy_vqa import evaluate_by_kind

    return evaluate_by_kind(model_dir, out, n=n)
