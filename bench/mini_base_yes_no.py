"""Why does the mini base fail yes/no questions? For each wrong yes/no answer on the easy-vqa test questions, ask the
same model "What color is the shape?" and "What shape is in the image?" about that image and check whether its own
answers imply the gold yes/no answer (then the eyes are right and the decoder's yes/no reasoning is wrong).

    python bench/mini_base_yes_no.py --model runs/mini_base/<fingerprint>_seed0/sft/export [--n 600]

Prints the wrong answers' direction (says "absent" when present, or the reverse) and the consistency counts, for the
wrong answers and for 80 right ones as a control; last line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from vlmjax.eval.runner import predict, score
    from vlmjax.eval.tasks import EvalSample, easy_vqa
    from vlmjax.generate.loading import load_model
    from vlmjax.recipes.mini_base import says_absent

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=600)
    a = ap.parse_args(argv)
    model, _cfg, tok = load_model(a.model)
    task = easy_vqa("test", n=a.n)
    _metrics, rows = score(task, predict(model, tok, task, progress=False, batch_size=32))
    by_id = {s.id: s for s in task.samples}
    yn = [r for r in rows if r["kind"] == "yes_no"]
    wrong = [by_id[r["id"]] for r in yn if not r["exact_match"]]
    right = [by_id[r["id"]] for r in yn if r["exact_match"]][:80]
    probes = [EvalSample(s.id + q, text, ["?"], s.image) for s in wrong + right
              for q, text in (("_c", "What color is the shape?"), ("_s", "What shape is in the image?"))]
    seen = predict(model, tok, dataclasses.replace(task, samples=probes), progress=False, batch_size=32)

    def implied(s) -> str:
        """The yes/no answer the model's own colour and shape answers imply."""
        named = {seen[s.id + "_c"].strip().lower(), seen[s.id + "_s"].strip().lower()}
        q = f" {s.question.lower().rstrip('?')} "
        present = any(f" {w} " in q for w in named if w)
        negated = " not " in q or " no " in q
        return "yes" if present != negated else "no"

    direction = collections.Counter("says absent" if says_absent(s.question, "yes" if s.answers[0] == "no" else "no")
                                    else "says present" for s in wrong)
    out = {"yes_no": len(yn), "wrong": len(wrong), "wrong_direction": dict(direction),
           "wrong_but_own_answers_imply_gold": sum(implied(s) == s.answers[0] for s in wrong),
           "right_control": len(right), "right_own_answers_imply_gold": sum(implied(s) == s.answers[0] for s in right)}
    for s in wrong[:8]:
        print(f"{s.question} gold {s.answers[0]} | sees: {seen[s.id + '_c']} {seen[s.id + '_s']}")
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
