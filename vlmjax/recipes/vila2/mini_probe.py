"""Does an aligned-only model see what its captions name? A caption-likelihood probe of the VILA^2 miniature's align
exports: for each easy-vqa test image, the caption the model finds most likely among the pre-training formats
with every colour ("Something teal.", 8 options) and every shape ("A triangle.", 3 options), scored after the image
alone (the caption format's "<image>caption<eos>", no template). Accuracy vs the true attributes; chance 1/8, 1/3.

Generation cannot ask this: an aligned-only model has no prompt format, and sampling picks the caption kind ("An
image." a third of the time) before any attribute. The probe separates the two stages of VILA^0: if its align
export is right here while its SFT'd model describes at chance, SFT lost what align learnt.
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.eval.report import cached_json


def probe_task(n: int):
    """`n` test images (`easy_vqa.description_task`'s) x 2 questions: kind "color" (8 "Something C." options) and
    kind "shape" (3 "A S." options), scored by summed option log-likelihood after the image."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.eval.easy_vqa import description_task
    from vlmjax.eval.tasks import EvalSample, Task, with_mode
    from vlmjax.recipes.vila2.mini_data import poor_caption

    samples = []
    for s in description_task(n).samples:
        color, shape = s.answers
        for kind, values, truth in (("color", COLORS, color), ("shape", SHAPES, shape)):
            choices = [poor_caption(kind, {kind: v}) for v in values]
            gold = chr(65 + list(values).index(truth))
            samples.append(EvalSample(f"{s.id}_{kind}", "", [gold], s.image, choices, meta={"kind": kind}))
    task = Task("vila2_align_probe", "mc", samples, instruction="", max_new_tokens=4, method="loglik")
    return with_mode(task, template="plain", option_format="text", normalize="sum")


def align_probe(model_dir: str | Path, out: str | Path, *, n: int = 200) -> dict:
    """{"color", "shape", "n"}: the probe's accuracy by kind for the model in `model_dir`; cached in `out` (JSON),
    per-option scores beside it."""
    from vlmjax.eval.runner import evaluate
    from vlmjax.generate.loading import load_model

    def go():
        model, _cfg, tok = load_model(str(model_dir))
        m = evaluate(model, tok, probe_task(n), out_dir=str(Path(out).parent / "align_probe"), progress=False)
        return {"color": m["by_kind"]["color"]["accuracy"], "shape": m["by_kind"]["shape"]["accuracy"],
                "n": m["by_kind"]["color"]["n"], "model": str(model_dir)}

    return cached_json(out, go)
