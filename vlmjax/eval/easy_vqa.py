"""Built-in benchmark: accuracy on the offline easy-vqa test split, for the demo and the recipes.

Single-word answers (circle/rectangle/triangle, eight colours, yes/no); a prediction counts as correct when the
first answer word it contains (closed vocabulary) is the gold one, so "Circle", "circle." and "It is a circle"
all score. Questions are spread evenly over the split, so N=200 covers ~200 different images.
"""

from __future__ import annotations

from vlmjax.eval.runner import evaluate
from vlmjax.eval.tasks import easy_vqa


def easy_vqa_accuracy(model, tokenizer, cfg=None, *, n: int = 200, batch_size: int = 16, out_dir=None,
                      split: str = "test", progress: bool = False, mesh=None) -> dict:
    """-> {"accuracy", "exact_match", "n", ...} for an in-memory VLM. cfg defaults to model.cfg (only its
    image preprocessing and image token are used)."""
    from vlmjax.generate.requests import Encoder

    encoder = Encoder(tokenizer, cfg if cfg is not None else model.cfg)
    return evaluate(model, tokenizer, easy_vqa(split, n=n), out_dir=out_dir, batch_size=batch_size, encoder=encoder,
                    progress=progress, mesh=mesh)


# ------------------------------------------------------------------- by answer kind, and "describe colour + shape"
# The miniatures' measurements (every recipe's miniature and the shared mini base's gate use them): accuracy split by
# what a question asks, because overall accuracy hides a model that sees colour but not shape.

DESCRIBE_PROMPT = "Describe the image."
KINDS = ("shape", "color", "yes/no")


def answer_kind(gold: str) -> str:
    """"shape" / "color" / "yes/no" of an easy-vqa gold answer."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES

    g = gold.lower()
    return "shape" if g in SHAPES else "color" if g in COLORS else "yes/no"


def accuracy_by_kind(model, tokenizer, *, n: int, transform=None, describe: bool = True, n_describe: int | None = None,
                     batch_size: int = 16) -> dict:
    """easy-vqa test accuracy overall and by answer kind on n questions spread over the split; with `describe`,
    also describe_color / describe_shape / describe_both on n_describe (default max(8, n // 3)) test images.
    transform(model, tokenizer, task) -> task rewrites the questions first (e.g. STIC's describe-and-respond)."""
    import numpy as np

    from vlmjax.eval.runner import predict, score

    task = easy_vqa("test", n=n)
    if transform is not None:
        task = transform(model, tokenizer, task)
    metrics, rows = score(task, predict(model, tokenizer, task, progress=False, batch_size=batch_size))
    by_kind: dict[str, list] = {}
    for r in rows:
        by_kind.setdefault(answer_kind(r["gold"][0]), []).append(r["exact_match"])
    res = {"accuracy": metrics["accuracy"], "n": metrics["n"],
           **{k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}
    if describe:
        task = description_task(n_describe or max(8, n // 3))
        res.update(description_accuracy(predict(model, tokenizer, task, progress=False, batch_size=batch_size), task))
    return res


def evaluate_by_kind(model_dir, out, *, n: int, transform=None, describe: bool = True) -> dict:
    """`accuracy_by_kind` of an exported model folder, cached in the JSON file `out` (returned as is when it exists;
    written atomically)."""
    from vlmjax.eval.report import cached_json
    from vlmjax.generate.loading import load_model

    def compute():
        model, _cfg, tok = load_model(model_dir)
        return accuracy_by_kind(model, tok, n=n, transform=transform, describe=describe)

    return cached_json(out, compute)


def description_task(n: int):
    """n test images (spread over the split) whose shape and colour the easy-vqa questions determine, asked for a
    plain description; the references are the true [colour, shape]. Scored by `description_accuracy`."""
    import json
    from pathlib import Path

    from vlmjax.data.assets import easy_vqa_data_dir
    from vlmjax.data.easy_vqa import infer_attributes
    from vlmjax.eval.tasks import EvalSample, Task

    root = Path(easy_vqa_data_dir()) / "test"
    by_image: dict[int, list] = {}
    for q, a, image_id in json.loads((root / "questions.json").read_text()):
        by_image.setdefault(int(image_id), []).append((q, a))
    samples = []
    for image_id in sorted(by_image):
        attrs = infer_attributes(by_image[image_id])
        if attrs["shape"] and attrs["color"]:
            samples.append(EvalSample(f"test_{image_id}", DESCRIBE_PROMPT, [attrs["color"], attrs["shape"]],
                                      str(root / "images" / f"{image_id}.png")))
    step = max(1, len(samples) // n)
    return Task("easy_vqa_describe", "caption", samples[::step][:n], instruction="", max_new_tokens=24)


def named_attributes(text: str | None) -> dict:
    """{"color", "shape"}: the first colour word and the first shape word a description names (None where it names
    none): how every easy-vqa description, caption or recaption is judged against an image's true attributes."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.eval.answers import first_vocab_answer

    text = text or ""
    return {"color": first_vocab_answer(text, list(COLORS)), "shape": first_vocab_answer(text, list(SHAPES))}


def description_accuracy(preds: dict, task) -> dict:
    """The first colour word and the first shape word of each description against the truth (missing = wrong)."""
    import numpy as np

    named = [named_attributes(preds.get(s.id, "")) for s in task.samples]
    color = [m["color"] == s.answers[0] for m, s in zip(named, task.samples)]
    shape = [m["shape"] == s.answers[1] for m, s in zip(named, task.samples)]
    return {"describe_color": float(np.mean(color)), "describe_shape": float(np.mean(shape)),
            "describe_both": float(np.mean([c and s for c, s in zip(color, shape)]))}
