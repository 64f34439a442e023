"""Inputs for generation, scoring and feature capture: requests from files, and their model-ready encoding.

A `Request` is one sample: an id, a conversation and its images. `Encoder` turns it into token ids and pixels
exactly the way training does (`vlmjax.data.text.TextProcessor` for chat templates and `<image>` expansion,
`vlmjax.data.image.process_image` for pixels), so a prompt at generation time is byte-identical to the same
prompt in a training batch.

Supported input layouts:
  * LLaVA JSON (`llava_requests`): `[{"id", "image" (path relative to image_folder) or "images", "conversations":
    [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}, ...]}]`, or JSON lines of such records.
    For generation the prompt is the conversation up to its first human turn (later turns are dropped);
    scoring and capture use the whole conversation.
  * A folder of images with one prompt (`folder_requests`): id = the path relative to the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass
class Request:
    id: str
    messages: list[dict]  # [{"role", "content"}], "<image>" marks image positions
    images: list[Any] = dataclasses.field(default_factory=list)  # paths / bytes / PIL / uint8 arrays
    meta: dict = dataclasses.field(default_factory=dict)  # copied into output records

    def prompt_messages(self) -> list[dict]:
        """Messages up to and including the first user turn (the generation prompt)."""
        out = []
        for m in self.messages:
            out.append(m)
            if m["role"] == "user":
                return out
        raise ValueError(f"sample {self.id}: no user turn")


def read_records(path) -> list[dict]:
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else list(data.values())


def record_images(rec: dict) -> list:
    """A LLaVA record's images ("images" list or one "image"), [] for a text-only record."""
    imgs = rec.get("images", rec.get("image"))
    return [] if imgs is None else list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]


def image_files(folder, *, limit: int | None = None) -> list[Path]:
    """Every image under `folder` (recursive, sorted by path)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]


def llava_requests(path, image_folder=None, *, limit: int | None = None) -> list[Request]:
    """LLaVA conversation records -> requests (see module docstring). Ids default to the record index."""
    out = []
    for i, rec in enumerate(read_records(path)[:limit]):
        turns = rec.get("conversations") or rec.get("messages") or []
        messages = [{"role": _ROLES[t.get("from", t.get("role"))], "content": t.get("value", t.get("content"))}
                    for t in turns]
        imgs = record_images(rec)
        meta = {"image": rec["image"]} if isinstance(rec.get("image"), str) else {}
        if imgs and not any("<image>" in m["content"] for m in messages):
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = "<image>\n" * len(imgs) + first["content"]
        if image_folder is not None:
            imgs = [os.path.join(image_folder, p) if isinstance(p, str) else p for p in imgs]
        out.append(Request(str(rec.get("id", i)), messages, imgs, meta))
    return out


def folder_requests(image_folder, prompt: str, *, limit: int | None = None) -> list[Request]:
    """Every image under `image_folder` (sorted, recursive) with the same prompt."""
    root = Path(image_folder)
    files = image_files(root, limit=limit)
    content = prompt if "<image>" in prompt else "<image>\n" + prompt
    return [Request(str(p.relative_to(root)), [{"role": "user", "content": content}], [str(p)],
                    {"image": str(p.relative_to(root))}) for p in files]


def default_eos_ids(tokenizer, cfg=None) -> tuple[int, ...]:
    """EOS id(s) of the tokenizer and config, plus the end-of-turn tokens of common chat templates."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    llm_cfg = getattr(cfg, "llm", cfg)
    eos = getattr(llm_cfg, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>") if t in vocab)
    return tuple(sorted(int(i) for i in ids))


def image_spec_for(cfg, resize_mode: str | None = None):
    """`data.image.model_image_spec`: the preprocessing the model config records (tiling, resize mode, mean/std).
    A `resize_mode` that disagrees with the model's is an error naming both."""
    from vlmjax.data.image import model_image_spec

    return model_image_spec(cfg, **({} if resize_mode is None else {"resize_mode": resize_mode}))


@dataclasses.dataclass
class Encoded:
    ids: list[int]
    pixels: np.ndarray | None  # (k, H, W, 3) float32, k image tiles, or None
    target: np.ndarray | None = None  # bool (len(ids),): scored tokens
    image_pos: np.ndarray | None = None  # LLaVA-1.6 layouts: each image token's feature (see data.text.Encoded)


class Encoder:
    """Tokenizer + template + image preprocessing for one model. `cfg` is a VLMConfig or an LLMConfig."""

    def __init__(self, tokenizer, cfg, *, template: str = "auto", resize_mode: str | None = None,
                 system_prompt: str | None = None):
        from vlmjax.data.text import TextProcessor, TextSpec

        self.tokenizer, self.cfg = tokenizer, cfg
        self.is_vlm = hasattr(cfg, "llm")
        tpi = cfg.tokens_per_image if self.is_vlm else 1
        image_token_id = cfg.image_token_id if self.is_vlm else None
        spec = TextSpec(template=template, image_token_id=image_token_id, system_prompt=system_prompt)
        self.text = TextProcessor(tokenizer, spec, tpi, 1 << 30)
        self.image_spec = image_spec_for(cfg, resize_mode) if self.is_vlm else None

    def source_image(self, req: Request, image):
        """The image to encode for `req` (a hook: STIC's rejected side corrupts it here)."""
        return image

    def images(self, req: Request):
        """(float32 tiles (k, H, W, 3), tiles per image, per-image feature positions or None); (None, [], None)
        without images."""
        if not req.images:
            return None, [], None
        if not self.is_vlm:
            raise ValueError(f"sample {req.id} has images but the model is text-only")
        from vlmjax.data.image import load_image, normalize

        loaded = [load_image(self.source_image(req, img), self.image_spec, name=f"{req.id}") for img in req.images]
        pixels = np.concatenate([normalize(t, self.image_spec) for t, _ in loaded])
        positions = [p for _, p in loaded] if self.image_spec.feature_layout != "tiles" else None
        return pixels, [len(t) for t, _ in loaded], positions

    def pixels(self, req: Request) -> np.ndarray | None:
        return self.images(req)[0]

    def _encode(self, messages, req: Request):
        pixels, tiles, positions = self.images(req)
        return self.text.encode(messages, tiles, image_positions=positions), pixels

    def prompt(self, req: Request) -> Encoded:
        """Generation prompt: the first user turn(s) plus the assistant header."""
        msgs = req.prompt_messages()
        enc, pixels = self._encode(msgs + [{"role": "assistant", "content": "x"}], req)
        start = _last_run_start(enc.trained)
        return Encoded(enc.ids[:start].tolist(), pixels, image_pos=enc.image_pos)

    def scored(self, req: Request, which: str = "last") -> Encoded:
        """Whole conversation; target = the last assistant reply (+ its end-of-turn), or every reply ("all")."""
        enc, pixels = self._encode(req.messages, req)
        target = enc.trained.copy()
        if which == "last":
            target[: _last_run_start(target)] = False
        return Encoded(enc.ids.tolist(), pixels, target, enc.image_pos)

    def full(self, req: Request) -> Encoded:
        """Whole conversation as trained on (feature capture)."""
        enc, pixels = self._encode(req.messages, req)
        return Encoded(enc.ids.tolist(), pixels, image_pos=enc.image_pos)


def _last_run_start(flags: np.ndarray) -> int:
    idx = np.flatnonzero(flags)
    if not len(idx):
        raise ValueError("no assistant reply to score")
    i = int(idx[-1])
    while i > 0 and flags[i - 1]:
        i -= 1
    return i


def image_slots(batch_size: int, enc: Sequence[Encoded]) -> int:
    """Fixed image-tile slots for a batch (the most tiles any row has, per row) so the last batch does not
    recompile."""
    per_row = max((len(e.pixels) if e.pixels is not None else 0) for e in enc)
    return batch_size * max(per_row, 1)


def image_pos_of(enc: Sequence[Encoded]) -> list | None:
    """Per-row image positions for the model, or None when the layout has none."""
    return [e.image_pos for e in enc] if any(e.image_pos is not None for e in enc) else None


def collate_images(pixels: Sequence[np.ndarray | None], slots: int | None = None):
    """Per-row image stacks -> (pixel_values (N, H, W, 3), image_rows (N,)) padded to `slots` (None if no images)."""
    real = [(r, p) for r, p in enumerate(pixels) if p is not None and len(p)]
    if not real:
        return None, None
    n = sum(len(p) for _, p in real)
    slots = max(slots or n, n)
    shape = real[0][1].shape[1:]
    px = np.zeros((slots,) + shape, np.float32)
    rows = np.full((slots,), -1, np.int32)
    i = 0
    for r, p in real:
        px[i: i + len(p)] = p
        rows[i: i + len(p)] = r
        i += len(p)
    return px, rows
