"""bench/jobs.py's scoring cases (issue 21, cases 2-3): POINTS-style caption perplexity and COINCIDE-style
feature capture, vlmjax against transformers on the same exported weights and byte-identical inputs (our Encoder).

Pairs: easy-vqa training images, each with a caption of 1-6 of its own question/answer sentences (varied length),
as the reply to POINTS' prompt. Functions take the case's dependencies (model, tokenizer, image root, `result`)
from bench/jobs.py.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

POINTS_PROMPT = "please generate a caption for this image."
CAPTURE_LAYERS = (3, 7, 11, 15, 19)  # COINCIDE's five layers


def caption_pairs(data_root: Path, n: int, seed: int = 0) -> list:
    from vlmjax.generate import Request

    rows = json.loads((data_root / "train" / "questions.json").read_text())
    by_image: dict = {}
    for q, a, img in rows:
        by_image.setdefault(img, []).append(f"{q[:-1] if q.endswith('?') else q}: {a}.")
    rng = np.random.default_rng(seed)
    out = []
    for img in sorted(by_image)[:n]:
        k = int(rng.integers(1, 7))
        caption = " ".join(by_image[img][:k])
        out.append(Request(f"img{img}", [{"role": "user", "content": "<image>\n" + POINTS_PROMPT},
                                         {"role": "assistant", "content": caption}],
                           [str(data_root / "train" / "images" / f"{img}.png")]))
    if len(out) < n:
        raise ValueError(f"easy-vqa has {len(out)} training images, asked for {n}")
    return out


def hf_vlm(model, tok, threads: int):
    import torch
    import transformers

    from vlmjax.convert import hf

    torch.set_num_threads(threads)
    folder = Path(tempfile.mkdtemp(prefix="vlmjax_jobs_hf_"))
    hf.save_vlm(model, folder, tokenizer=tok)
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def _padded(encoded, pad: int):
    """Right-padded (ids, attention mask, NCHW pixels) for transformers (positions 0.. per row, as ours)."""
    s = max(len(e.ids) for e in encoded)
    ids = np.full((len(encoded), s), pad, np.int64)
    mask = np.zeros((len(encoded), s), np.int64)
    for r, e in enumerate(encoded):
        ids[r, : len(e.ids)], mask[r, : len(e.ids)] = e.ids, 1
    px = np.concatenate([e.pixels for e in encoded]).transpose(0, 3, 1, 2)
    return ids, mask, px


def hf_mean_logprobs(ref, encoded, batch: int, pad: int) -> np.ndarray:
    """Per pair mean log p(caption + end-of-turn): the full-vocabulary log_softmax of every position's logits, as
    POINTS' script does (batch 1: one pair per forward, no padding)."""
    import torch

    out = []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i: i + batch]
        ids, mask, px = _padded(chunk, pad)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(px)).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            lp = lp.gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0].numpy()
        for r, e in enumerate(chunk):
            t = np.asarray(e.target[1:], bool)
            out.append(float(lp[r, : len(e.ids) - 1][t[: len(e.ids) - 1]].mean()))
    return np.asarray(out)


def _median_time(fn, reps: int):
    """(median wall seconds, median process CPU seconds, last value) of `reps` calls after a warm-up call. CPU
    seconds count every thread of this process (XLA's and torch's alike), so they hold up on a shared host."""
    fn()  # warm-up (compiles)
    walls, cpus, value = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), value


def score_cases(args, cases, model, tok, data_root: Path, result) -> None:
    """score_vs_loop and score_vs_batched: pairs/s of score_dataset (packed, and the padded path) vs
    transformers at batch 1 (the reference loop) and at the same batch, padded; max |diff| of per-pair mean NLL."""
    from vlmjax.generate import Encoder
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.scoring import score_dataset

    pairs = caption_pairs(data_root, args.pairs)
    enc = [Encoder(tok, model.cfg).scored(r) for r in pairs]
    lengths = [len(e.ids) for e in enc]
    print(f"score: {len(pairs)} pairs, tokens mean {np.mean(lengths):.1f} (min {min(lengths)}, max {max(lengths)}), "
          f"targets mean {np.mean([e.target.sum() for e in enc]):.1f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vlmjax_jobs_score_"))
    b = args.score_batch
    ours, st = {}, {}
    for name, kw in (("packed", dict(pack=True, batch_size=max(1, b // args.pack_per_row),
                                     row_len=args.row_len or None)),
                     ("padded", dict(pack=False, batch_size=b))):
        runs = iter(range(10**6))

        def run():
            out = tmp / f"{name}{next(runs)}.jsonl"
            score_dataset(model, tok, pairs, out, progress=False, stats=st, **kw)
            return read_jsonl(out)

        t, cpu, recs = _median_time(run, args.reps)
        ours[name] = dict(pps=len(pairs) / t, cpu=cpu / len(pairs),
                          mean=np.array([recs[r.id]["mean_logprob"] for r in pairs]))
        extra = (f" ({st['rows']} rows x {st['row_len']} tokens, {len(pairs) / st['packed_batches']:.1f} pairs "
                 f"per forward, {st['packed_tokens'] / (st['packed_batches'] * st['rows'] * st['row_len']):.2f} "
                 f"of the grid filled, {st['long']} alone)" if name == "packed" else f" (batch {b})")
        print(f"score ours {name}: {ours[name]['pps']:.2f} pairs/s, {ours[name]['cpu']:.3f} CPU s/pair{extra}",
              flush=True)
    np.testing.assert_allclose(ours["packed"]["mean"], ours["padded"]["mean"], atol=1e-5)

    ref = hf_vlm(model, tok, args.torch_threads)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf = {}
    for name, batch, subset in (("loop", 1, enc[: args.loop_pairs]), ("batched", b, enc)):
        if f"score_vs_{name}" not in cases:
            continue
        t, cpu, means = _median_time(lambda: hf_mean_logprobs(ref, subset, batch, pad), args.reps)
        diff = float(np.abs(means - ours["packed"]["mean"][: len(subset)]).max())
        hf[name] = dict(pps=len(subset) / t, cpu=cpu / len(subset), diff=diff)
        print(f"score transformers {name} (batch {batch}, {len(subset)} pairs, {args.torch_threads} threads): "
              f"{hf[name]['pps']:.2f} pairs/s, {hf[name]['cpu']:.3f} CPU s/pair; max |mean NLL ours - "
              f"transformers| {diff:.2e}", flush=True)
        result(f"score_vs_{name}", ours["packed"]["pps"], hf[name]["pps"], unit="pairs/s", pairs=len(pairs),
               baseline_pairs=len(subset), baseline_batch=batch, padded_path=round(ours["padded"]["pps"], 4),
               cpu_s_per_pair=round(ours["packed"]["cpu"], 4), baseline_cpu_s_per_pair=round(hf[name]["cpu"], 4),
               cpu_ratio=round(hf[name]["cpu"] / ours["packed"]["cpu"], 4),
               padded_cpu_s_per_pair=round(ours["padded"]["cpu"], 4), max_abs_mean_nll_diff=diff,
               rows=st["rows"], row_len=st["row_len"], torch_threads=args.torch_threads)


def hf_features(ref, encoded, batch: int, pad: int, layers, image_token_id: int) -> np.ndarray:
    """(N, L, 2, D): forward hooks on each layer's self_attn.o_proj, means over image tokens and over the text after
    the image (COINCIDE's span), at `batch` right-padded rows; the full forward runs, as the reference does."""
    import torch

    mods = ref.model.language_model.layers
    out = []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i: i + batch]
        ids, mask, px = _padded(chunk, pad)
        img = torch.tensor(ids == image_token_id)
        pos = torch.arange(ids.shape[1])[None]
        last_img = torch.where(img, pos, -1).max(1).values[:, None]
        text = torch.tensor(mask.astype(bool)) & ~img & (pos > last_img)
        w = torch.stack([img, text], -1).float()
        w = w / w.sum(1, keepdim=True).clamp(min=1)
        got = {}
        hooks = [mods[li].self_attn.o_proj.register_forward_hook(
            lambda _m, _i, o, li=li: got.__setitem__(li, torch.einsum("bsg,bsd->bgd", w, o))) for li in layers]
        try:
            with torch.no_grad():
                ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
        finally:
            for h in hooks:
                h.remove()
        out.append(torch.stack([got[li] for li in layers], 1).numpy())
    return np.concatenate(out)


def capture_case(args, model, tok, data_root: Path, result) -> None:
    """capture: capture_dataset at COINCIDE's 5 layers (attn, after_image) vs transformers with hooks, same batch."""
    from vlmjax.generate import Encoder
    from vlmjax.scoring import capture_dataset, load_shards

    pairs = caption_pairs(data_root, args.pairs)
    b = args.score_batch
    tmp = Path(tempfile.mkdtemp(prefix="vlmjax_jobs_capture_"))
    runs = iter(range(10**6))

    def run():
        out = tmp / f"c{next(runs)}"
        capture_dataset(model, tok, pairs, out, layers=CAPTURE_LAYERS, parts=("attn",), span="after_image",
                        batch_size=b, progress=False)
        ids, rows, _ = load_shards(out, mmap=False)
        return np.asarray(rows)[:, 0]

    t, cpu, feats = _median_time(run, args.reps)
    ours, ours_cpu = len(pairs) / t, cpu / len(pairs)
    print(f"capture ours: {ours:.2f} samples/s, {ours_cpu:.3f} CPU s/sample (batch {b}, layers {CAPTURE_LAYERS})",
          flush=True)
    enc = [Encoder(tok, model.cfg).full(r) for r in pairs]
    ref = hf_vlm(model, tok, args.torch_threads)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    th, hcpu, ref_feats = _median_time(
        lambda: hf_features(ref, enc, b, pad, CAPTURE_LAYERS, model.cfg.image_token_id), args.reps)
    hf, hf_cpu = len(pairs) / th, hcpu / len(pairs)
    diff = float(np.abs(ref_feats - feats).max())
    print(f"capture transformers hooks: {hf:.2f} samples/s, {hf_cpu:.3f} CPU s/sample; max |features ours - "
          f"transformers| {diff:.2e}", flush=True)
    result("capture", ours, hf, unit="samples/s", samples=len(pairs), batch=b, layers=list(CAPTURE_LAYERS),
           cpu_s_per_sample=round(ours_cpu, 4), baseline_cpu_s_per_sample=round(hf_cpu, 4),
           cpu_ratio=round(hf_cpu / ours_cpu, 4), max_abs_feature_diff=diff, torch_threads=args.torch_threads)
