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
