"""Can the mini tower learn easy-vqa's shapes at all? The mini base's tower (configs/mini/base.py's vision config)
+ a linear head on mean-pooled features, trained directly on shape labels (the upper bound of what any alignment
signal could teach it), linear patchify vs the conv stem, scored on the labelled test images.

    python bench/mini_tower_supervised.py --stem linear conv --steps 300 [--batch 64] [--lr 2e-3]

Train: the 879 labelled base-pool images (train 3000-3999), a random dihedral view per sample; test: the 888
labelled test images (bench/mini_base_probe.py's sets). Prints test shape accuracy every 50 steps and a
`RESULT {json}` line per stem with CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def main(argv=None) -> int:
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from PIL import Image

    from mini_base_probe import labelled_images
    from vlmjax.models.config import VisionConfig
    from vlmjax.models.vit import VisionTower
    from vlmjax.recipes.mini_base import CONFIG, dihedral
    from vlmjax.train.stages import stage_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stem", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args(argv)
    shapes = ("circle", "rectangle", "triangle")

    def load(rows):
        x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1 for p, _, _ in rows])
        return x, np.array([shapes.index(s) for _, s, _ in rows])

    xtr, ytr = load(labelled_images("train", range(3000, 4000)))
    xte, yte = load(labelled_images("test"))
    vis = {k: tuple(v) if isinstance(v, list) else v
           for k, v in stage_config(CONFIG, "align").model.vlm.vision.to_dict().items()}
    for stem in a.stem:
        cfg = VisionConfig(**{**vis, "patch_stem": stem})

        class Probe(nnx.Module):
            def __init__(self, rngs):
                self.tower = VisionTower(cfg, rngs=rngs)
                self.head = nnx.Linear(cfg.hidden_size, 3, rngs=rngs)

            def __call__(self, x):
                return self.head(self.tower(x).mean(1))

        model = Probe(nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adamw(a.lr, b2=0.95, weight_decay=0.0), wrt=nnx.Param)

        @nnx.jit
        def step(m, o, x, y):
            loss, g = nnx.value_and_grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(m)
            o.update(m, g)
            return loss

        predict = nnx.jit(lambda m, x: m(x).argmax(-1))
        rng = np.random.default_rng(0)
        t0, cpu0, curve = time.time(), time.process_time(), []
        for i in range(a.steps):
            b = rng.integers(0, len(xtr), a.batch)
            x = np.stack([dihedral(img, int(rng.integers(8))) for img in xtr[b]])
            float(step(model, opt, jnp.asarray(x), jnp.asarray(ytr[b])))
            if (i + 1) % 50 == 0 or i + 1 == a.steps:
                acc = float((np.asarray(predict(model, jnp.asarray(xte))) == yte).mean())
                curve.append((i + 1, round(acc, 3)))
                print(f"{stem:6s} step {i + 1:4d}: test shape accuracy {acc:.3f}", flush=True)
        print("RESULT " + json.dumps({"case": f"tower_supervised_{stem}", "steps": a.steps, "batch": a.batch,
                                      "test_shape_accuracy": curve[-1][1], "curve": curve,
                                      "cpu_seconds": round(time.process_time() - cpu0, 1),
                                      "wall_seconds": round(time.time() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
