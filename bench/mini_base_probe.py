"""Where is shape lost in the mini base? Linear probes for an easy-vqa image's shape and colour on what the decoder
receives (the projector's image tokens, flattened), for a trained base, the same architecture at random init, and
raw pixels (16x16 average-pooled) as controls.

    python bench/mini_base_probe.py --model runs/mini_base_study/aug4/sft/export [--out bench/results/...json]

Ridge-regression classifiers on one-hot targets (features standardised; ridge strength picked on the last 200 of
the 1000 base-pool training images), fitted on train images 3000-3999 (the base's own, unturned) and scored on the
test images whose attributes the questions determine. If the probe reads shape from the image tokens well above
chance while the VLM answers shape questions at chance, the decoder fails to read it; if not, the tower never
encoded it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def labelled_images(split: str, ids=None):
    from vlmjax.data.assets import easy_vqa_data_dir
    from vlmjax.data.easy_vqa import infer_attributes

    root = Path(easy_vqa_data_dir()) / split
    by_image: dict[int, list] = {}
    for q, a, image_id in json.loads((root / "questions.json").read_text()):
        by_image.setdefault(int(image_id), []).append((q, a))
    out = []
    for n in sorted(by_image) if ids is None else ids:
        attrs = infer_attributes(by_image[n])
        if attrs["shape"] and attrs["color"]:
            out.append((str(root / "images" / f"{n}.png"), attrs["shape"], attrs["color"]))
    return out


def image_tokens(model, cfg, paths, batch=64) -> np.ndarray:
    from vlmjax.data.image import process_image
    from vlmjax.generate.requests import image_spec_for

    spec = image_spec_for(cfg)
    feats = []
    for i in range(0, len(paths), batch):
        px = np.concatenate([process_image(p, spec) for p in paths[i: i + batch]])
        feats.append(np.asarray(model.image_features(px)).reshape(len(px), -1))
    return np.concatenate(feats)


def pixels(paths) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).reshape(16, 4, 16, 4, 3).mean((1, 3)).ravel()
                     for p in paths])


def ridge_probe(x_tr, y_tr, x_te, y_te, classes) -> float:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    onehot = (np.asarray(y_tr)[:, None] == np.asarray(classes)[None]).astype(np.float64)
    fit, val = slice(0, -200), slice(-200, None)

    def solve(x, y, lam):
        return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)

    def acc(w, x, y):
        return float(np.mean(np.asarray(classes)[np.argmax(x @ w, 1)] == np.asarray(y)))

    lam = max((10.0 ** k for k in range(-1, 5)),
              key=lambda lam: acc(solve(x_tr[fit], onehot[fit], lam), x_tr[val], np.asarray(y_tr)[val]))
    return acc(solve(x_tr, onehot, lam), x_te, y_te)


def main(argv=None) -> int:
    from flax import nnx

    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.generate.loading import load_model
    from vlmjax.models.vlm import VLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mini_base_probe.json")
    args = ap.parse_args(argv)
    train = labelled_images("train", range(3000, 4000))
    test = labelled_images("test")
    model, cfg, _tok = load_model(args.model)
    random_model = VLM(cfg, rngs=nnx.Rngs(0))
    feats = {"trained base": lambda p: image_tokens(model, cfg, p),
             "same architecture, random init": lambda p: image_tokens(random_model, cfg, p), "raw pixels 16x16": pixels}
    rows = {}
    for name, fn in feats.items():
        x_tr, x_te = fn([t[0] for t in train]), fn([t[0] for t in test])
        rows[name] = {"shape": ridge_probe(x_tr, [t[1] for t in train], x_te, [t[1] for t in test], SHAPES),
                      "color": ridge_probe(x_tr, [t[2] for t in train], x_te, [t[2] for t in test], COLORS),
                      "dims": int(x_tr.shape[1])}
        print(f"{name:32s} shape {rows[name]['shape']:.3f}  colour {rows[name]['color']:.3f}  ({x_tr.shape[1]} dims)",
              flush=True)
    chance = {"shape": max(np.mean([t[1] == s for t in test]) for s in SHAPES)}
    result = {"model": str(args.model), "train_images": len(train), "test_images": len(test),
              "majority_shape_share": float(chance["shape"]), "probes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
