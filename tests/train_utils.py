"""Tiny on-disk datasets and configs for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

_V, _L = "model.vlm.vision.", "model.vlm.llm."
# configs/mini/base.py shrunk to seconds per step (dotted overrides of a stage)
TINY_MINI = {_L + "hidden_size": 32, _L + "intermediate_size": 64, _L + "num_layers": 1, _L + "num_heads": 2,
             _L + "num_kv_heads": 1, _V + "image_size": 32, _V + "hidden_size": 16, _V + "intermediate_size": 32,
             _V + "num_layers": 1, _V + "num_heads": 2, "data.batch_size": 2, "data.max_images": 8}
# The suite's one tiny mini base (conftest's `tiny_mini_base` builds it once per run): 2 views per image, 2 steps
# per stage. Recipe miniatures' end-to-end tests run on it instead of each building its own.
TINY_BASE_KW = dict(seed=0, augment=2, over={"align": TINY_MINI, "sft": {"data.batch_size": 2}}, steps_scale=1e-3,
                    quiet=True)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_dataset(root: Path, n: int = 8) -> dict[str, str]:
    """Solid-colour images with SFT conversations and DPO pairs about their colour."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    sft, dpo = [], []
    for i in range(n):
        c = names[i % len(names)]
        Image.fromarray(np.full((32, 32, 3), COLOURS[c], np.uint8)).save(img_dir / f"{i}.png")
        sft.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {c}."}]})
        wrong = names[(i + 1) % len(names)]
        dpo.append({"id": f"p{i}", "image": f"{i}.png", "prompt": "<image>\nWhat colour is this?",
                    "chosen": f"It is {c}.", "rejected": f"It is {wrong}."})
    (root / "sft.json").write_text(json.dumps(sft))
    (root / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in dpo))
    return {"sft": str(root / "sft.json"), "dpo": str(root / "dpo.jsonl"), "images": str(img_dir)}


def tiny_config(data: dict[str, str], objective: str = "sft", **over):
    """configs/tiny_sft.py on the tiny data, with dotted-key overrides, through the library's config loader."""
    from vlmjax.train.config_io import load_config

    fmt = "llava" if objective == "sft" else "preference"
    base = {"train.objective": objective, "data.text.template": "chatml",
            "data.sources": (dict(format=fmt, path=data[objective], image_root=data["images"]),)}
    if objective == "dpo":
        base["data.pack"] = False
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_sft.py", {**base, **over})


def write_config_file(path: Path, data: dict[str, str], extra: str = "") -> Path:
    """A config file for `python -m vlmjax.train`: configs/tiny_sft.py on the SFT data, plus `extra` lines
    (indented statements on `c`)."""
    repo = Path(__file__).resolve().parents[1]
    path.write_text(
        "from vlmjax.train.config_io import load_module\n"
        f"m = load_module({str(repo / 'configs' / 'tiny_sft.py')!r})\n"
        "def get_config():\n"
        "    c = m.get_config()\n"
        f"    c.data.sources = [dict(format='llava', path={data['sft']!r}, image_root={data['images']!r})]\n"
        + extra + "    return c\n")
    return path
