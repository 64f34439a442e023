"""STIC reproduced in miniature on offline easy-vqa: the `make demo` pipeline, composed from library pieces.

    python -m vlmjax.recipes.stic.miniature [--workdir runs/stic_mini] [--negatives plain] [--quick] [--llm smollm2]

1. data: easy-vqa train images split into a labelled base set and held-out *unlabeled* images (only their pixels
   are used); a BPE tokenizer fitted to the corpus (`vlmjax.data.tokenizer`).
2. base model (configs/stic/mini.py:align then :sft): caption pre-training, then SFT on the QA conversations whose
   description turn is asked with STIC's simple / detailed / DaR prompts (the skill stage 1 relies on, as LLaVA's
   data teaches it to a real base model). Evaluated on the easy-vqa test split, directly and with DaR.
3. STIC stage 1: `make_preferences` on the unlabeled images with the base model, DPO (:stage1, LoRA + projector,
   reference = adapter off). Stage 2: `make_infused_sft` with the stage-1 model on a subset of the base SFT data,
   SFT continuing the adapter (:stage2). Evaluated again, directly and with DaR.
4. The final model (LoRA merged) is exported to an HF LLaVA folder, reloaded with transformers, logits compared.

Every step is skipped when its output exists, so a rerun resumes; `--negatives plain` reruns STIC from the same
base model with the no-negatives ablation (rejected = a plain description of the clean image). Results go to
WORKDIR/results/*.json and a printed table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np

from vlmjax.eval.easy_vqa import answer_kind, description_accuracy, description_task, evaluate_by_kind  # noqa: F401
from vlmjax.generate.jsonl import read_jsonl
from vlmjax.recipes.mini_base import DESCRIBE_PROMPTS, base_gate, sft_turns
from vlmjax.recipes.stic import prompts as P
from vlmjax.train import stages

REPO = Path(__file__).resolve().parents[3]


CONFIGS = {"scratch": REPO / "configs" / "stic" / "mini.py", "smollm2": REPO / "configs" / "stic" / "mini_smollm2.py"}


def stage_config(stage: str, config_file: Path = CONFIGS["scratch"]):
    return stages.stage_config(config_file, stage)


# ----------------------------------------------------------------------------------------------------- data


def prepare_data(root: Path, *, n_base: int, n_unlabeled: int, seed: int = 0) -> dict:
    """easy-vqa train split -> base captions / base SFT conversations / unlabeled image list + tokenizer."""
    from vlmjax.data import easy_vqa
    from vlmjax.data.tokenizer import train_tokenizer

    data = root / "data"
    done = data / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    easy_vqa.build(str(data), splits=("train",))
    records = json.loads((data / "train.json").read_text())
    captions = read_jsonl(data / "train_captions.jsonl")
    if n_base + n_unlabeled > len(records):
        raise ValueError(f"n_base + n_unlabeled = {n_base + n_unlabeled} > {len(records)} easy-vqa train images")
    base, unlabeled = records[:n_base], records[n_base: n_base + n_unlabeled]
    for rec in base:
        rec["conversations"] = sft_turns(rec["conversations"], np.random.default_rng(zlib.crc32(f"{seed}:{rec['id']}".encode())))
    (data / "base_sft.json").write_text(json.dumps(base))
    with open(data / "base_captions.jsonl", "w") as f:
        f.writelines(json.dumps(captions[r["id"]]) + "\n" for r in base if r["id"] in captions)
    (data / "unlabeled.json").write_text(json.dumps([[r["id"], r["image"]] for r in unlabeled]))
    texts = [t["value"].replace("<image>", "") for r in base for t in r["conversations"]]
    texts += list(DESCRIBE_PROMPTS + P.HALLUCINATION) + ["Image description:", "user", "assistant", "system"]
    train_tokenizer(sorted(texts), root / "tokenizer", vocab_size=1024)  # sorted: BPE ties depend on text order
    info = {"base": len(base), "unlabeled": len(unlabeled), "captions": sum(r["id"] in captions for r in base)}
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------------- training


def train_stage(stage: str, workdir: Path, *, config_file: Path = CONFIGS["scratch"], **kw):
    """`vlmjax.train.stages.train_stage` on one of the miniature's stage configs."""
    return stages.train_stage(stage, workdir, config_file=config_file, **kw)


# ----------------------------------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, out: Path, *, n: int, dar: bool) -> dict:
    """easy-vqa test accuracy (overall and by answer kind), directly (plus describing n/3 test images) or with
    describe-and-respond."""
    from vlmjax.eval.dar import dar_task

    transform = (lambda model, tok, task: dar_task(model, tok, task, max_new_tokens=24)) if dar else None
    return evaluate_by_kind(model_dir, out, n=n, transform=transform, describe=not dar)


def pair_report(pairs_path: Path, captions_path: Path) -> dict:
    """How often each kind of rejected side is really wrong, judged against the true attributes of the unlabeled
    images (known here, never used for training): {kind: {n, identical, chosen/rejected colour and shape right}}."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.eval.answers import first_vocab_answer

    truth = read_jsonl(captions_path)
    out: dict[str, dict] = {}
    for r in read_jsonl(pairs_path, key=None):
        t = truth.get(r["id"])
        if t is None or not (t.get("color") and t.get("shape")):
            continue
        kind = r["rejected_kind"] + (f"/{r['corruption']}" if r.get("corruption") else "")
        k = out.setdefault(kind, {"n": 0, "identical": 0, "chosen_color": 0, "rejected_color": 0, "chosen_shape": 0,
                                  "rejected_shape": 0})
        k["n"] += 1
        k["identical"] += r["chosen"] == r["rejected"]
        for side in ("chosen", "rejected"):
            k[f"{side}_color"] += first_vocab_answer(r[side], list(COLORS)) == t["color"]
            k[f"{side}_shape"] += first_vocab_answer(r[side], list(SHAPES)) == t["shape"]
    return {kind: {"n": k["n"], **{x: round(v / k["n"], 3) for x, v in k.items() if x != "n"}} for kind, k in out.items()}


def hf_reload_check(model_dir: Path, image) -> float:
    """Max |logit| difference between vlmjax and transformers on one image + prompt of the exported folder."""
    import torch
    import transformers

    from vlmjax.generate.loading import load_model
    from vlmjax.generate.requests import Encoder, Request

    model, cfg, tok = load_model(model_dir)
    enc = Encoder(tok, cfg).prompt(Request("check", [{"role": "user", "content": "<image>\nWhat shape is this?"}], [image]))
    ours = np.asarray(model(np.array([enc.ids], np.int32), enc.pixels, np.zeros(1, np.int32)))
    ref = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([enc.ids]), pixel_values=torch.tensor(enc.pixels.transpose(0, 3, 1, 2))).logits.numpy()
    return float(np.abs(theirs - ours).max())


# ----------------------------------------------------------------------------------------------------- pipeline


def run(root: Path, *, negatives: str = "generated", quick: bool = False, n_eval: int = 300, seed: int = 0,
        stic_seed: int = 0, llm: str = "scratch") -> dict:
    """seed: data preparation and base training; stic_seed: pair plans, sampling and STIC training (a nonzero
    stic_seed gets its own folder, so several STIC runs share one base model). llm: "scratch" (the miniature's
    own decoder) or "smollm2" (configs/stic/mini_smollm2.py)."""
    from vlmjax.generate.loading import load_model
    from vlmjax.recipes.stic.make_infused_sft import make_infused_sft
    from vlmjax.recipes.stic.make_preferences import make_preferences

    # a smoke run of SmolLM2: 2 rows per batch keeps its steps to seconds
    quick_over = {"data.batch_size": 2} if quick and llm != "scratch" else {}

    def train_stage_(stage, workdir, *, over=None, **kw):
        return train_stage(stage, workdir, config_file=CONFIGS[llm], over={**(over or {}), **quick_over}, **kw)

    scale = 0.02 if quick else 1.0  # quick: 2-6 steps per stage, a smoke run of every step of the pipeline
    n_base, n_unlabeled, n_subset = (64, 12, 12) if quick else (3000, 480, 480)
    n_eval = 16 if quick else n_eval
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"[1/6] data: {prepare_data(root, n_base=n_base, n_unlabeled=n_unlabeled, seed=seed)}", flush=True)
    images = str(root / "data" / "images")
    data = root / "data"

    print("[2/6] base model: caption pre-training, then SFT", flush=True)
    base_over = {"train.seed": seed, "model.seed": seed}
    align = train_stage_("align", root / "align", image_root=images, source=str(data / "base_captions.jsonl"),
                        steps_scale=scale, over=base_over)
    base = train_stage_("sft", root / "sft", model_path=str(align), image_root=images, source=str(data / "base_sft.json"),
                       steps_scale=scale, over=base_over)
    results = {"base": evaluate(base, root / "results" / "base.json", n=n_eval, dar=False),
               "base_dar": evaluate(base, root / "results" / "base_dar.json", n=n_eval, dar=True)}
    print(f"[3/6] base on easy-vqa test: {results['base']} | DaR {results['base_dar']}", flush=True)
    passed, gate_lines = base_gate(results["base"])
    results["base_gate"] = {"passed": passed, "lines": gate_lines}
    print("\n".join(gate_lines), flush=True)

    stic = root / (f"stic_{negatives}" + (f"_seed{stic_seed}" if stic_seed else ""))
    stic.mkdir(exist_ok=True)
    # quick: a few steps leave the model ending every reply at once; min_new_tokens keeps its pairs non-empty
    gen = dict(max_new_tokens=24, batch_size=32, progress=False, min_new_tokens=4 if quick else 0)
    if not (stic / "pairs.jsonl").exists():
        model, _cfg, tok = load_model(base)
        unlabeled = [tuple(x) for x in json.loads((data / "unlabeled.json").read_text())]
        stats = make_preferences(model, tok, unlabeled, images, stic / "pairs.jsonl", negatives=negatives, seed=stic_seed,
                                 temperature=0.2, **gen)
        (stic / "pairs_stats.json").write_text(json.dumps(stats))
    pair_stats = json.loads((stic / "pairs_stats.json").read_text())
    print(f"[4/6] STIC stage 1 ({negatives} negatives): {pair_stats}", flush=True)
    s1 = train_stage_("stage1", stic / "stage1", model_path=str(base), image_root=images, source=str(stic / "pairs.jsonl"),
                     steps_scale=scale, over={"data.seq_len": 96, "train.seed": stic_seed})
    results["stage1"] = evaluate(s1, stic / "results" / "stage1.json", n=n_eval, dar=False)

    if not (stic / "infused.json").exists():
        model, _cfg, tok = load_model(s1)
        subset = json.loads((data / "base_sft.json").read_text())[:n_subset]
        (stic / "infused_stats.json").write_text(json.dumps(
            make_infused_sft(model, tok, subset, images, stic / "infused.json", seed=stic_seed, **gen)))
    print(f"[5/6] STIC stage 2: {json.loads((stic / 'infused_stats.json').read_text())}", flush=True)
    s2 = train_stage_("stage2", stic / "stage2", model_path=str(base), image_root=images, source=str(stic / "infused.json"),
                     load_params=str(stic / "stage1" / "trainable.safetensors"), steps_scale=scale,
                     over={"train.seed": stic_seed})
    results["stic"] = evaluate(s2, stic / "results" / "stic.json", n=n_eval, dar=False)
    results["stic_dar"] = evaluate(s2, stic / "results" / "stic_dar.json", n=n_eval, dar=True)

    err = hf_reload_check(s2, str(data / "images" / "train" / "0.png"))
    results["hf_reload_max_abs_logit_diff"] = err
    results["seconds"] = round(time.time() - t_start, 1)
    results["pairs"] = pair_stats
    results["pairs_by_kind"] = pair_report(stic / "pairs.jsonl", data / "train_captions.jsonl")
    (stic / "results" / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"[6/6] final model exported to {s2}; transformers reloads it: max |logit diff| = {err:.2e}", flush=True)
    print("\n".join(gate_lines))  # the gate first: a base that does not see makes the table below unreadable
    print(format_table(results, negatives))
    return results


def format_table(r: dict, negatives: str) -> str:
    rows = [("base", "base"), ("base + DaR", "base_dar"), ("STIC stage 1", "stage1"), ("STIC (stage 1 + 2)", "stic"),
            ("STIC + DaR", "stic_dar")]
    kinds = [k for k in ("shape", "color", "yes/no", "describe_both") if k in r["base"]]
    head = f"| model ({negatives} negatives) | accuracy | " + " | ".join(kinds) + " |"
    lines = [head, "|" + "---|" * (2 + len(kinds))]
    for name, key in rows:
        m = r[key]
        lines.append(f"| {name} | {m['accuracy']:.3f} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in kinds) + " |")
    lines.append(f"(easy-vqa test, n={r['base']['n']} questions; {r['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/stic_mini"))
    ap.add_argument("--negatives", default="generated", choices=["generated", "plain"],
                    help="plain = the no-negatives ablation (rejected = a plain description of the clean image)")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (CI smoke run)")
    ap.add_argument("--llm", default="scratch", choices=sorted(CONFIGS),
                    help="smollm2: the same pipeline on the pretrained SmolLM2-135M (configs/stic/mini_smollm2.py)")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="data preparation and base training (use a fresh --workdir)")
    ap.add_argument("--stic-seed", type=int, default=0, help="pair plans, sampling, STIC training (own folder if nonzero)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = run(args.workdir, negatives=args.negatives, quick=args.quick, n_eval=args.n_eval, seed=args.seed,
            stic_seed=args.stic_seed, llm=args.llm)
    return 0 if r["hf_reload_max_abs_logit_diff"] < 1e-3 else 1


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
