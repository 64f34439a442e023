"""The shared mini base of the recipes' miniatures: data, tokenizer and an aligned + SFT'd tiny VLM, built once per
seed into a cache folder and reused, so each miniature spends its CPU budget on its own arms.

    python -m vlmjax.recipes.mini_base [--cache runs/mini_base] [--seed 0] [--n-eval 2000]

Data split (easy-vqa train, 4000 images): images 3000-3999 train the base (captions for alignment, then the QA
conversations with a description turn for SFT), each also seen in `augment` dihedral views (flips / 90 degree
turns: an easy-vqa image's shape and colour, hence every caption and answer, are unchanged by them); images 0-2999
are the recipes' pools and are never seen by the base. The test split is only evaluated.

Cache layout: CACHE/data_v{V}_seed{S}_aug{A}/ (images, captions, SFT conversations, the corpus tokenizer) and
CACHE/{fingerprint}_seed{S}/{align,sft}/export (the models; the fingerprint hashes the config file and overrides,
so a changed design builds afresh instead of reusing a stale model). Every step is skipped when its output exists.
`base_gate` is the check every miniature prints before its own results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np

from vlmjax.recipes.stic import prompts as P

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "mini" / "base.py"
POOL = (3000, 4000)  # easy-vqa train images of the base; the recipes' pools are 0-2999
RECIPE_POOL = (0, 3000)
AUGMENT = 4
# The description turn is asked with generic describe requests (STIC's simple / detailed / DaR prompts, so STIC's
# stage 1 can use the base as it is); the tokenizer also covers STIC's hallucination prompts.
DESCRIBE_PROMPTS = P.SIMPLE + (P.DETAILED, P.DAR_DESCRIBE)
EXTRA_TEXTS = DESCRIBE_PROMPTS + P.HALLUCINATION + ("Image description:", "user", "assistant", "system")
GATE = {"shape": 0.85, "color": 0.85, "yes/no": 0.90, "describe_both": 0.60}
# Miniature-only: 1 in IMAGINE_EVERY SFT conversations also asks one of STIC's hallucination prompts and is answered
# with a description whose colour and shape are both wrong. A real base model follows "imagine..." requests from its
# instruction data; without this turn the mini model answers them with the true description, and STIC's
# hallucination-prompt negatives are not negatives (README "STIC, reproduced in miniature").
IMAGINE_EVERY = 4
TOWER_STEPS = 600  # pretrain_tower steps of 64 views
# easy-vqa's yes/no questions mostly ask about what is absent (81% of them, plain and negated forms alike). The base
# answers 16% of test yes/no questions wrongly, always saying "absent", while its own colour and shape answers for
# those images are right (70 of 73): its decoder answers yes/no from the prior. Keeping an "absent" question with
# probability 0.25 (balanced answers, as VQAv2 did) does not teach the comparison: yes/no falls to chance (0.49;
# README "A mini base that sees"). So the default keeps them all; over={"data": {"keep_absent": p}} is the arm.
KEEP_ABSENT = 1.0
# SFT conversations cut into samples of at most this many QA pairs (0: whole conversations); over={"data":
# {"turns_per_sample": k}} is the arm.
TURNS_PER_SAMPLE = 0
DATA_VERSION = 2  # bump when prepare_data's output changes: the data folder is keyed by it


# ----------------------------------------------------------------------------------------------------- data


def imagined(attrs: dict, rng: np.random.Generator) -> str:
    """A description of what the image is not: another colour and another shape."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES

    color = rng.choice([c for c in COLORS if c != attrs["color"]])
    shape = rng.choice([s for s in SHAPES if s != attrs["shape"]])
    return f"The image shows a {color} {shape}."


def says_absent(question: str, answer: str) -> bool:
    """A yes/no QA pair whose answer is that something is not in the image ("Is there a red shape?" - "No",
    "Is there not a red shape?" - "Yes")."""
    a, q = answer.strip().lower(), f" {question.lower()} "
    negated = " not " in q or " no " in q
    return (a == "no" and not negated) or (a == "yes" and negated)


def sft_turns(turns: list[dict], rng: np.random.Generator, prompts=DESCRIBE_PROMPTS,
              imagine: tuple[str, str] | None = None, keep_absent: float = 1.0) -> list[dict]:
    """easy-vqa's conversation (description turn, then its QA) in a random order, so any question can be the first
    turn that carries the image (as the evaluation asks it); the description is asked with one of `prompts`;
    `imagine` = (hallucination prompt, imagined description) adds one more turn; a yes/no pair that `says_absent`
    is kept with probability `keep_absent`."""
    pairs = [[turns[i]["value"].replace("<image>\n", ""), turns[i + 1]["value"]] for i in range(0, len(turns), 2)]
    if pairs[0][0] == "Describe the image briefly.":
        pairs[0][0] = prompts[int(rng.integers(len(prompts)))]
    if keep_absent < 1:
        pairs = pairs[:1] + [p for p in pairs[1:] if not says_absent(*p) or rng.random() < keep_absent]
    if imagine is not None:
        pairs.append(list(imagine))
    order = rng.permutation(len(pairs))
    out = []
    for k, i in enumerate(order):
        q, a = pairs[i]
        out += [{"from": "human", "value": P.with_image(q) if k == 0 else q}, {"from": "gpt", "value": a}]
    return out


def split_turns(conversation: list[dict], per_sample: int) -> list[list[dict]]:
    """A conversation cut into conversations of at most `per_sample` QA pairs, each asking its first question with
    the image (0: the conversation as it is). One pair per sample asks every question as the evaluation does, with
    no earlier turn whose text gives the answer away."""
    if per_sample <= 0:
        return [conversation]
    pairs = [conversation[i:i + 2] for i in range(0, len(conversation), 2)]
    out = []
    for k in range(0, len(pairs), per_sample):
        chunk = [dict(t) for pair in pairs[k:k + per_sample] for t in pair]
        chunk[0]["value"] = P.with_image(chunk[0]["value"].replace("<image>\n", "").replace("<image>", ""))
        out.append(chunk)
    return out


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """View k in 0..7 of the square image a (H, W, C): k % 4 quarter turns, mirrored when k >= 4."""
    a = np.rot90(a, k % 4)
    return np.ascontiguousarray(a[:, ::-1] if k >= 4 else a)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def prepare_data(data: Path, *, seed: int = 0, augment: int = AUGMENT, pool: tuple[int, int] = POOL,
                 keep_absent: float = KEEP_ABSENT, imagine_every: int = IMAGINE_EVERY,
                 turns_per_sample: int = TURNS_PER_SAMPLE) -> dict:
    """easy-vqa train split -> data/images (all 4000 train images, for the recipes too), the base's captions and SFT
    conversations on `pool` (+ augmented views) and data/tokenizer fitted to the corpus. Skipped when done."""
    from PIL import Image

    from vlmjax.data import easy_vqa
    from vlmjax.data.tokenizer import train_tokenizer
    from vlmjax.generate.jsonl import read_jsonl

    data = Path(data)
    done = data / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    if not 1 <= augment <= 8:
        raise ValueError(f"augment={augment}: the number of dihedral views per image is 1..8")
    easy_vqa.build(str(data), splits=("train",))
    records = {r["id"]: r for r in json.loads((data / "train.json").read_text())}
    captions = read_jsonl(data / "train_captions.jsonl")
    ids = [f"train_{n}" for n in range(*pool)]
    missing = [i for i in ids if i not in records]
    if missing:
        raise ValueError(f"{data / 'train.json'}: easy-vqa train images {missing[:3]}... of the base pool {pool} are "
                         "missing")
    (data / "images" / "aug").mkdir(parents=True, exist_ok=True)
    sft, caps, texts, n_imagine = [], [], [], 0
    for sample_id in ids:
        rec, n = records[sample_id], int(sample_id.split("_")[1])
        pixels = np.asarray(Image.open(data / "images" / rec["image"]).convert("RGB"))
        for k in range(augment):
            image = rec["image"]
            if k:
                image = f"aug/{n}_{k}.png"
                if not (data / "images" / image).exists():
                    Image.fromarray(dihedral(pixels, k)).save(data / "images" / image)
            vid = sample_id + (f"_aug{k}" if k else "")
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{vid}".encode()))
            cap = captions.get(sample_id)
            imagine = None
            if imagine_every and cap and cap.get("shape") and cap.get("color") and rng.random() < 1 / imagine_every:
                imagine = (P.HALLUCINATION[int(rng.integers(len(P.HALLUCINATION)))], imagined(cap, rng))
                n_imagine += 1
            conv = sft_turns(rec["conversations"], rng, imagine=imagine, keep_absent=keep_absent)
            texts += [t["value"].replace("<image>", "") for t in conv]
            parts = split_turns(conv, turns_per_sample)
            sft += [{"id": vid if len(parts) == 1 else f"{vid}_t{j}", "image": image, "conversations": c}
                    for j, c in enumerate(parts)]
            if cap is not None:
                text = easy_vqa.caption({"shape": cap["shape"], "color": cap["color"]}, n + k)
                caps.append({**cap, "id": vid, "image": image, "caption": text})
    _write_json(data / "base_sft.json", sft)
    with open(data / "base_captions.jsonl.tmp", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in caps)
    os.replace(data / "base_captions.jsonl.tmp", data / "base_captions.jsonl")
    # the tokenizer is fitted to the whole conversations, so cutting them (turns_per_sample) keeps it
    train_tokenizer(sorted(set(texts + list(EXTRA_TEXTS))), data / "tokenizer", vocab_size=1024)  # sorted: BPE ties follow text order
    info = {"pool": list(pool), "images": len(ids), "augment": augment, "sft": len(sft), "captions": len(caps),
            "imagine_turns": n_imagine,
            "seed": seed, "version": DATA_VERSION, "keep_absent": keep_absent, "imagine_every": imagine_every,
            "turns_per_sample": turns_per_sample}
    _write_json(done, info)
    return info


# ----------------------------------------------------------------------------------------------------- tower


def pretrain_tower(data: Path, out: Path, *, config_file: Path = CONFIG, over: dict | None = None,
                   steps: int = TOWER_STEPS, batch: int = 64, lr: float = 2e-3, seed: int = 0, quiet: bool = False) -> dict:
    """The miniature's stand-in for a pretrained CLIP/SigLIP tower (real VLMs never align a tower from scratch, and a
    from-scratch tower aligned through the decoder's caption loss learns no shape in our budget: README "A mini base
    that sees"): the align stage's tower + a linear head classify each base-pool view's shape and colour (the
    attributes its caption states), mean-pooled features, AdamW. Writes OUT/tower.safetensors keyed by the VLM's
    parameter paths (the align stage loads it: `model.load_params`) and OUT/tower.json. Skipped when done."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.data.image import model_image_spec, process_image
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.train.config_io import apply_overrides
    from vlmjax.train.params_io import save_params
    from vlmjax.train.setup import build_model
    from vlmjax.train.stages import stage_config

    out = Path(out)
    if (out / "tower.json").exists():
        return json.loads((out / "tower.json").read_text())
    t0, cpu0 = time.time(), time.process_time()
    c = stage_config(config_file, "align")
    c.model.tokenizer = str(data / "tokenizer")
    apply_overrides(c, {"model.seed": seed, **(over or {})})
    model, cfg, _tok = build_model(c.model, image=c.data.image)
    tower, spec = model.vision, model_image_spec(cfg)
    rows = [r for r in read_jsonl(data / "base_captions.jsonl", key=None) if r.get("shape") and r.get("color")]
    x = np.stack([process_image(str(data / "images" / r["image"]), spec)[0] for r in rows])
    y_shape = np.array([SHAPES.index(r["shape"]) for r in rows])
    y_color = np.array([COLORS.index(r["color"]) for r in rows])
    layers = cfg.vision_layers_used

    class Probe(nnx.Module):
        def __init__(self, rngs):
            self.tower = tower
            self.head = nnx.Linear(cfg.vision.hidden_size, len(SHAPES) + len(COLORS), rngs=rngs)

        def __call__(self, px):
            return self.head(self.tower.features(px, layers).mean(1))

    probe = Probe(nnx.Rngs(seed))
    opt = nnx.Optimizer(probe, optax.adamw(lr, b2=0.95, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(probe, opt, px, ys, yc):
        def loss_fn(p):
            logits = p(px)
            s, col = logits[:, :len(SHAPES)], logits[:, len(SHAPES):]
            loss = (optax.softmax_cross_entropy_with_integer_labels(s, ys).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(col, yc).mean())
            return loss, (jnp.mean(s.argmax(-1) == ys), jnp.mean(col.argmax(-1) == yc))

        (loss, accs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(probe)
        opt.update(probe, grads)
        return loss, accs

    rng = np.random.default_rng(seed)
    hist = []
    for i in range(steps):
        b = rng.integers(0, len(rows), batch)
        loss, (acc_s, acc_c) = step(probe, opt, jnp.asarray(x[b]), jnp.asarray(y_shape[b]), jnp.asarray(y_color[b]))
        hist.append((float(loss), float(acc_s), float(acc_c)))  # blocks on each step (CPU: no overlap to lose)
        if not quiet and (i + 1) % 50 == 0:
            print(f"  tower {i + 1}/{steps}: loss {hist[-1][0]:.3f} shape {acc_s:.2f} colour {acc_c:.2f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_params(nnx.state(model, nnx.All(nnx.Param, lambda path, _: path[0] == "vision")),
                str(out / "tower.safetensors"))
    tail = np.array(hist[-50:])
    info = {"stage": "tower", "steps": steps, "batch": batch, "lr": lr, "images": len(rows),
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "loss_first": hist[0][0], "loss_last": hist[-1][0], "losses": [round(h[0], 5) for h in hist],
            "train_shape_acc_last50": round(float(tail[:, 1].mean()), 3),
            "train_color_acc_last50": round(float(tail[:, 2].mean()), 3)}
    _write_json(out / "tower.json", info)
    return info


# ----------------------------------------------------------------------------------------------------- build


def data_dir(cache, seed: int = 0, augment: int = AUGMENT, keep_absent: float = KEEP_ABSENT,
             imagine_every: int = IMAGINE_EVERY, turns_per_sample: int = TURNS_PER_SAMPLE) -> Path:
    return Path(cache) / (f"data_v{DATA_VERSION}_seed{seed}_aug{augment}"
                          + (f"_absent{keep_absent:g}" if keep_absent != 1.0 else "")
                          + (f"_imagine{imagine_every}" if imagine_every != IMAGINE_EVERY else "")
                          + (f"_turns{turns_per_sample}" if turns_per_sample != TURNS_PER_SAMPLE else ""))


def fingerprint(config_file: Path, over: dict | None) -> str:
    """Hash of the resolved stage configs and the overrides (not the file text: a docstring edit keeps the cache)."""
    from vlmjax.train.stages import stage_config

    stages = [stage_config(config_file, s).to_json(sort_keys=True) for s in ("align", "sft")]
    text = json.dumps([stages, over or {}, {"tower_steps": TOWER_STEPS, "data": DATA_VERSION}], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def base_root(cache, seed: int = 0, *, config_file: str | Path = CONFIG, over: dict | None = None,
              steps_scale: float = 1.0) -> Path:
    """The model folder of a base design in `cache`: CACHE/{fingerprint}_seed{S}."""
    return Path(cache) / f"{fingerprint(config_file, {**(over or {}), 'scale': steps_scale})}_seed{seed}"


def design_data(cache, seed: int = 0, augment: int = AUGMENT, over: dict | None = None) -> tuple[Path, dict]:
    """The data folder of a base design (`over["data"]`: keep_absent, imagine_every, turns_per_sample), prepared
    (skipped when done) -> (folder, prepared.json's info)."""
    data_over = (over or {}).get("data", {})
    keep_absent = float(data_over.get("keep_absent", KEEP_ABSENT))
    imagine_every = int(data_over.get("imagine_every", IMAGINE_EVERY))
    turns = int(data_over.get("turns_per_sample", TURNS_PER_SAMPLE))
    data = data_dir(cache, seed, augment, keep_absent, imagine_every, turns)
    return data, prepare_data(data, seed=seed, augment=augment, keep_absent=keep_absent,
                              imagine_every=imagine_every, turns_per_sample=turns)


def build_base(cache: str | Path = "runs/mini_base", *, seed: int = 0, augment: int = AUGMENT,
               config_file: str | Path = CONFIG, over: dict | None = None, steps_scale: float = 1.0,
               root: str | Path | None = None, quiet: bool = False) -> dict:
    """Build (or reuse) the base for `seed`: -> {"model" (the SFT'd export), "align", "tokenizer", "images" (all
    easy-vqa train images: the recipes' pools are RECIPE_POOL), "data", "root", "stages" (each stage's
    stage.json), "seconds", "cpu_seconds" (what building took, summed over stages and data)}.
    over = {"tower": {"steps": N}, "data": {"keep_absent": p, "imagine_every": k (0: none),
    "turns_per_sample": k (0: whole conversations)}, "align": {dotted: value},
    "sft": {...}} changes the design (a fresh fingerprint
    folder, unless `root` names the model folder); steps_scale shrinks every stage (tests)."""
    from vlmjax.train.stages import train_stage

    cache, config_file = Path(cache), Path(config_file)
    t0, cpu0 = time.time(), time.process_time()
    data, info = design_data(cache, seed, augment, over)
    prep = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}
    if not (data / "prep_time.json").exists():
        _write_json(data / "prep_time.json", prep)
    if root is None:
        root = base_root(cache, seed, config_file=config_file, over=over, steps_scale=steps_scale)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = str(data / "images")
    over = over or {}
    seeds = {"train.seed": seed, "model.seed": seed}
    kw = dict(config_file=config_file, image_root=images, steps_scale=steps_scale, quiet=quiet)
    tower_steps = int(over.get("tower", {}).get("steps", TOWER_STEPS))  # 0: align a fresh tower (the study's arm)
    tower = None
    if tower_steps:
        tower = pretrain_tower(data, root / "tower", config_file=config_file, over=over.get("align"), seed=seed,
                               steps=max(2, int(round(tower_steps * steps_scale))), quiet=quiet)
    align = train_stage("align", root / "align", source=str(data / "base_captions.jsonl"),
                        tokenizer=str(data / "tokenizer"),
                        load_params=str(root / "tower" / "tower.safetensors") if tower else None,
                        over={**seeds, **over.get("align", {})}, **kw)
    sft = train_stage("sft", root / "sft", model_path=str(align), source=str(data / "base_sft.json"),
                      over={**seeds, **over.get("sft", {})}, **kw)
    stages = {**({"tower": tower} if tower else {}),
              **{s: json.loads((root / s / "stage.json").read_text()) for s in ("align", "sft")}}
    spent = json.loads((data / "prep_time.json").read_text())
    out = {"model": str(sft), "align": str(align), "tokenizer": str(data / "tokenizer"), "images": images,
           "data": str(data), "root": str(root), "data_info": info, "stages": stages,
           "seconds": round(spent["seconds"] + sum(s["seconds"] for s in stages.values()), 1),
           "cpu_seconds": round(spent["cpu_seconds"] + sum(s.get("cpu_seconds", 0) for s in stages.values()), 1)}
    _write_json(root / "base.json", {k: v for k, v in out.items() if k != "stages"})
    return out


def sft_variant(base: dict, out: str | Path, sft_over: dict, *, seed: int = 0, config_file: str | Path = CONFIG,
                quiet: bool = True) -> dict:
    """The base with its SFT stage rerun from the base's own align export under `sft_over` (dotted overrides, e.g.
    {"train.steps": 250}): a weaker or different base for a miniature without rebuilding the tower and align.
    -> a `build_base`-style dict whose "model" and "root" are the variant's (OUT/sft/export, OUT)."""
    from vlmjax.train.stages import train_stage

    out = Path(out)
    sft = train_stage("sft", out / "sft", config_file=Path(config_file), model_path=str(base["align"]),
                      image_root=base["images"], source=str(Path(base["data"]) / "base_sft.json"), quiet=quiet,
                      over={"train.seed": seed, "model.seed": seed, **sft_over})
    variant = {**{k: v for k, v in base.items() if k != "stages"}, "model": str(sft), "root": str(out),
               "variant_of": base["root"], "sft_over": dict(sft_over)}
    _write_json(out / "base.json", variant)
    return variant


def evaluate_base(base: dict, *, n: int = 2000) -> dict:
    """The base's easy-vqa test results by answer kind + describe colour/shape (cached in ROOT/results)."""
    from vlmjax.eval.easy_vqa import evaluate_by_kind

    return evaluate_by_kind(base["model"], Path(base["root"]) / "results" / f"base_n{n}.json", n=n)


def shared_base(cache: Path, *, seed: int = 0, quick: bool = False) -> dict:
    """The shared mini base, read from its cache (base.json) when built, else built (`build_base`)."""
    scale = 0.02 if quick else 1.0
    root = base_root(cache, seed, steps_scale=scale)
    if (root / "base.json").exists():  # read only: never rewritten here (the cache may be another checkout's)
        return json.loads((root / "base.json").read_text())
    return build_base(cache, seed=seed, steps_scale=scale, quiet=True)


def base_results(base: dict, out: Path, n: int) -> dict:
    """The base's easy-vqa test results by kind: its cache's (the largest ROOT/results/base_n*.json, as
    `evaluate_base` wrote it) or evaluated on n questions into `out`."""
    from vlmjax.eval.easy_vqa import evaluate_by_kind

    cached = sorted(Path(base["root"]).glob("results/base_n*.json"), key=lambda p: int(p.stem[len("base_n"):]))
    return json.loads(cached[-1].read_text()) if cached else evaluate_by_kind(base["model"], out, n=n)


def base_gate(results: dict, gate: dict = GATE) -> tuple[bool, list[str]]:
    """Does the base see? -> (passed, printable lines): each gated metric against its threshold. A miniature prints
    these before its own results, so a failed base is never read past."""
    names = {"shape": "shape questions", "color": "colour questions", "yes/no": "yes/no questions",
             "describe_both": "describes colour + shape"}
    rows, failed = [], []
    for key, floor in gate.items():
        value = results.get(key)
        ok = value is not None and value >= floor
        failed += [] if ok else [names.get(key, key)]
        shown = "missing" if value is None else f"{value:.3f}"
        rows.append(f"  {names.get(key, key):<26} {shown:>7}  (gate >= {floor:.2f})  {'ok' if ok else 'FAIL'}")
    head = f"mini base gate (easy-vqa test, n={results.get('n', '?')} questions): "
    if failed:
        head += ("FAILED - the base does not see well enough (" + ", ".join(failed) + "); differences below that run "
                 "through these skills cannot be read as the recipe's effect")
    else:
        head += "passed"
    return not failed, [head] + rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/mini_base"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=2000)
    args = ap.parse_args(argv)
    base = build_base(args.cache, seed=args.seed)
    print(f"mini base: {base['model']} (built in {base['seconds']:.0f} s wall, {base['cpu_seconds']:.0f} s CPU)")
    passed, lines = base_gate(evaluate_base(base, n=args.n_eval))
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
