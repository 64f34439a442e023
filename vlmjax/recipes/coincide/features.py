"""COINCIDE step 1: capture rows -> one unit-norm vector per sample, streamed to an fp16 memmap.

Per layer l (v = image mean, t = after-image text mean of the attention output, from `scoring.capture_dataset`
with parts=("attn",), span="after_image"):  f_l = [l2n(tanh(v)), l2n(tanh(t))] / sqrt(2L); f = concat_l f_l,
so |f| = 1 and dim = 2 L D. A text-only sample has v = 0: its image halves stay 0 and its text halves are scaled
by sqrt(2) so the row norm is still 1 (counted in meta.json as `text_only`). A sample with a zero text mean (no
text after the image) is dropped and listed in meta.json `dropped` {id: why}, never a NaN or zero row (the
reference zeroes NaN rows and clusters them).

Output folder: features.npy (N, 2LD) float16 (np.load(..., mmap_mode="r")), ids.json, meta.json
{"model", "layers", "span", "parts", "hidden", "dim", "rows", "text_only", "capture_errors", "dropped"}; written
under temp names and renamed, meta.json last, so a folder with meta.json is complete.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from vlmjax.scoring import open_shards

log = logging.getLogger(__name__)
EXPECT_KEYS = ("model", "layers", "span", "parts")
SPAN, PARTS = "after_image", ["attn"]


def _l2n(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0), n[..., 0]


def sample_vectors(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(B, 1, L, 2, D) capture rows -> ((B, 2LD) fp32 unit vectors, (B,) bool text-only, {row: why} for rows
    that cannot make a vector: a zero text mean at some layer (no text after the image) or an image mean that is
    zero at some layers only; their vectors are left zero for the caller to drop)."""
    x = np.asarray(rows, np.float32)
    if x.ndim != 5 or x.shape[1] != 1 or x.shape[3] != 2:
        raise ValueError(f"capture rows {x.shape}: expected (B, 1 part, L, 2 groups, D)")
    b, _, n_layers, _, d = x.shape
    u, norms = _l2n(np.tanh(x[:, 0]))  # (B, L, 2, D), (B, L, 2)
    no_image = (norms[:, :, 0] == 0).all(1)
    bad = {int(i): "zero text mean (no text after the image)" for i in np.flatnonzero((norms[:, :, 1] == 0).any(1))}
    for i in np.flatnonzero((norms[:, :, 0] == 0).any(1) & ~no_image):
        bad.setdefault(int(i), "zero image mean at some layers only")
    u[no_image, :, 1] *= np.sqrt(2.0)
    u[list(bad)] = 0.0
    return (u / np.sqrt(2 * n_layers)).reshape(b, 2 * n_layers * d), no_image & ~np.isin(np.arange(b), list(bad)), bad


def check_meta(capture_dir, index_meta: dict, expect: dict | None) -> None:
    """The capture must be attention outputs over the after-image span; with `expect` its model/layers/span/parts
    must equal the expected ones (an error names both)."""
    got = {k: index_meta.get(k) for k in EXPECT_KEYS}
    want = {"span": SPAN, "parts": PARTS, **{k: v for k, v in (expect or {}).items() if k in EXPECT_KEYS}}
    if "layers" in want:
        want["layers"] = [int(i) for i in want["layers"]]
    if "parts" in want:
        want["parts"] = list(want["parts"])
    diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if diff:
        raise ValueError(f"{capture_dir}: captured with " + ", ".join(f"{k}={g!r}" for k, (g, _) in diff.items())
                         + "; expected " + ", ".join(f"{k}={w!r}" for k, (_, w) in diff.items()))


def capture(model, tokenizer, requests, capture_dir, *, layers, model_name: str, dtype: str = "float16",
            **kw) -> dict:
    """`scoring.capture_dataset` with COINCIDE's settings (attention outputs, after-image text span, fp16 rows),
    plus capture_dir/reference.json naming the reference model, so features from another model are caught."""
    from vlmjax.scoring import capture_dataset

    os.makedirs(capture_dir, exist_ok=True)
    ref = os.path.join(capture_dir, "reference.json")
    if os.path.exists(ref):
        with open(ref) as f:
            old = json.load(f)["model"]
        if old != model_name:
            raise ValueError(f"{capture_dir} holds features of {old!r}, not {model_name!r}: use another folder")
    else:
        _write_json(ref, {"model": model_name})
    return capture_dataset(model, tokenizer, requests, capture_dir, layers=layers, parts=tuple(PARTS), span=SPAN,
                           dtype=dtype, **kw)


def build_features(capture_dir, out_dir, *, expect: dict | None = None, model: str | None = None) -> dict:
    """Stream `capture_dir` (a `capture_dataset` folder) shard by shard into `out_dir` (module docstring).
    expect: {"model", "layers", "span", "parts"} the capture must match; model: the reference model's name, also
    used when the capture folder has no reference.json (written by `capture`)."""
    view = open_shards(capture_dir)
    meta = dict(view.index["meta"])
    ref = os.path.join(capture_dir, "reference.json")
    if os.path.exists(ref):
        with open(ref) as f:
            meta["model"] = json.load(f)["model"]
    if model is not None:
        meta.setdefault("model", model)
    check_meta(capture_dir, meta, expect)
    n_parts, n_layers, n_groups, d = view.row_shape
    dim = 2 * n_layers * d
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):  # meta.json marks a complete folder: gone until this build is
        os.remove(meta_path)
    final = os.path.join(out_dir, "features.npy")
    tmp = final + ".tmp.npy"
    # rows are written in capture order; dropped rows shrink the file to the kept count at the end
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(view), dim))
    start, text_only, kept, dropped = 0, 0, [], {}
    for ids, rows in view.iter_shards():
        for b in range(0, len(ids), 4096):
            vec, no_img, bad = sample_vectors(rows[b: b + 4096])
            keep = np.ones(len(vec), bool)
            keep[list(bad)] = False
            for pos, why in bad.items():
                dropped[ids[b + pos]] = why
            out[start: start + int(keep.sum())] = vec[keep].astype(np.float16)
            kept += [i for i, k in zip(ids[b: b + 4096], keep) if k]
            text_only += int(no_img.sum())
            start += int(keep.sum())
    out.flush()
    del out
    if dropped:
        log.warning("%s: %d samples dropped (%s)", capture_dir, len(dropped), list(dropped.items())[:3])
        full = np.load(tmp, mmap_mode="r")
        short = np.lib.format.open_memmap(tmp + ".kept.npy", mode="w+", dtype=np.float16, shape=(start, dim))
        for s0 in range(0, start, 65536):
            short[s0: s0 + 65536] = full[s0: min(s0 + 65536, start)]
        short.flush()
        del short, full
        os.replace(tmp + ".kept.npy", tmp)
    os.replace(tmp, final)
    info = {"model": meta.get("model"), "layers": meta.get("layers"), "span": meta.get("span"),
            "parts": meta.get("parts"), "hidden": d, "dim": dim, "rows": start, "text_only": text_only,
            "capture_errors": len(view.errors), "dropped": dropped}
    _write_json(os.path.join(out_dir, "ids.json"), kept)
    _write_json(os.path.join(out_dir, "meta.json"), info)
    return info


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def load_features(feat_dir, *, expect: dict | None = None) -> tuple[list[str], np.ndarray, dict]:
    """(ids, (N, 2LD) fp16 memmap, meta) of a `build_features` folder, meta checked against `expect` and the
    file's dim against 2 L D (the reference's users hit "all centroids identical" on mis-shaped features)."""
    meta_path = os.path.join(feat_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run the features step first")
    with open(meta_path) as f:
        meta = json.load(f)
    check_meta(feat_dir, meta, expect)
    with open(os.path.join(feat_dir, "ids.json")) as f:
        ids = json.load(f)
    x = np.load(os.path.join(feat_dir, "features.npy"), mmap_mode="r")
    want = (len(ids), 2 * len(meta["layers"]) * meta["hidden"])
    if x.shape != want:
        raise ValueError(f"{feat_dir}/features.npy is {x.shape}, expected {want} (N, 2 x layers x hidden)")
    return ids, x, meta
