"""Inputs for generation, scoring and feature capture: requests from data sources, and their model-ready encoding.

A `Request` is one sample: an id, a conversation and its images. `Encoder` turns it into token ids and pixels
exactly the way training does (`vlmjax.data.text.TextProcessor` for chat templates and `<image>` expansion,
`vlmjax.data.image.process_image` for pixels), so a prompt at generation time is byte-identical to the same
prompt in a training batch.

`requests_from_source(SourceSpec, role=..., prompt=...)` reads what the trainer reads: the same `SourceSpec`s
(JSON / JSONL files, TFDS, in-memory records; images from a folder, tar shards or inline bytes), the same record
parsers (llava, caption, interleaved, preference; vlmjax/data/FORMATS.md) and the same bad-sample policy. A record
that does not parse becomes a request carrying its `BadSample` (under the "skip" policy): the runners write it as
an `{"id", "error"}` record naming the sample and the file, and never retry it. `role`:
  * "generate": the prompt is the conversation up to its first user turn (llava; a reply is not needed), the image
    alone under the "plain" template it was trained with (caption; the reference caption goes to `meta`), or the
    pair's prompt (preference). `prompt=` replaces the record's prompt with one instruction for every sample.
  * "score": the whole conversation, scored on its last reply (llava), the caption given the image (caption;
    `prompt=` puts an instruction before it under the chat template), the document (interleaved; score with
    `which="all"`), or each side of a pair as its own request, ids "ID/chosen" and "ID/rejected" (preference).
Records without an id get "#INDEX", as in training. `llava_requests` and `folder_requests` are the two layouts
the CLI reads by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from vlmjax.data import formats
from vlmjax.data.errors import BAD_RECORD, BadSample, BadSamplePolicy, SkipStats
from vlmjax.data.image_store import TarStore, open_image_store, resolve_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class Request:
    id: str
    messages: list[dict]  # [{"role", "content"}], "<image>" marks image positions
    images: list[Any] = dataclasses.field(default_factory=list)  # paths / bytes / PIL / uint8 arrays / store refs
    meta: dict = dataclasses.field(default_factory=dict)  # copied into output records
    template: str | None = None  # overrides the Encoder's template (captions, documents: "plain", as trained)
    loss_on: str | None = None  # overrides the Encoder's loss_on (documents: "all")
    source: str | None = None  # the file or dataset it came from, named in errors
    store: Any = None  # image store that resolves `images` (folder, tar shards); None: images as given
    error: BadSample | None = None  # the record did not parse: encoding raises this (the runner writes it)

    def prompt_messages(self) -> list[dict]:
        """Messages up to and including the first user turn (the generation prompt)."""
        if self.error is not None:
            raise self.error
        out = []
        for m in self.messages:
            out.append(m)
            if m["role"] == "user":
                return out
        raise ValueError(f"sample {self.id}: no user turn")


def read_records(path) -> list[dict]:
    """Every record of a .json list (or dict of records) or a .jsonl file; raises on the first invalid one (STIC's
    infused-SFT builder rewrites whole files). Runners read through `requests_from_source` instead."""
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
    """Every image under `folder` (recursive, sorted by path). A missing folder is an error, not zero images."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]


def _json_meta(meta: dict) -> dict:
    """The record's extra fields that can go into a JSON output record."""
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _with_prompt(prompt: str, n_images: int) -> list[dict]:
    content = prompt if formats.PLACEHOLDER in prompt else (formats.PLACEHOLDER + "\n") * n_images + prompt
    return [{"role": "user", "content": content}]


def _build(ex: formats.Example, fmt: str, role: str, prompt: str | None) -> list[tuple[str, list, dict, dict]]:
    """One parsed record -> [(id suffix, messages, Request overrides, meta)] for `role`."""
    meta = _json_meta(ex.meta)
    if len(ex.images) == 1 and isinstance(ex.images[0], str):
        meta["image"] = ex.images[0]
    plain = {"template": ex.template, "loss_on": ex.loss_on}
    if fmt == "preference":
        head = _with_prompt(prompt, len(ex.images)) if prompt is not None else ex.messages
        if role == "generate":
            return [("", head, {}, meta)]
        return [(f"/{side}", head + reply, {}, {**meta, "side": side})
                for side, reply in (("chosen", ex.chosen), ("rejected", ex.rejected))]
    if fmt == "caption":
        caption = ex.messages[-1]
        head = _with_prompt(prompt, 1) if prompt is not None else ex.messages[:1]
        over = {} if prompt is not None else plain
        if role == "generate":
            return [("", head, over, {**meta, "caption": caption["content"]})]
        return [("", head + [caption], over, meta)]
    if fmt == "interleaved":
        return [("", ex.messages, plain, meta)]
    # llava: a prompt override keeps the replies after the record's prompt (the scored span)
    if prompt is None:
        return [("", ex.messages, plain, meta)]
    replies = ex.messages[max(i for i, m in enumerate(ex.messages) if m["role"] == "user") + 1:]
    return [("", _with_prompt(prompt, len(ex.images)) + (replies if role == "score" else []), {}, meta)]


@dataclasses.dataclass(frozen=True)
class _Inline:
    """An image stored inside its record (TFDS bytes, arrays): re-read when encoded, so a list of requests over
    millions of records does not hold every image in memory."""

    records: Any
    index: int
    parse: Any
    j: int

    def load(self):
        return self.parse(self.records[self.index]).images[self.j]


def requests_from_source(spec, *, role: Literal["generate", "score"] = "generate", prompt: str | None = None,
                         on_bad_sample: str | BadSamplePolicy = "skip", limit: int | None = None) -> list[Request]:
    """A `vlmjax.data.pipeline.SourceSpec` -> requests, parsed as the trainer parses it (see module docstring).

    `on_bad_sample`: "skip" (a bad record becomes a request with `.error`, written as an error record; a
    `BadSamplePolicy` also caps the fraction), or "error" (raise the first `BadSample`, naming sample and file).
    A missing image folder, an unreadable or compressed tar shard and an invalid .json file raise at once."""
    if role not in ("generate", "score"):
        raise ValueError(f"role must be 'generate' or 'score', got {role!r}")
    if spec.format not in formats.PARSERS:
        raise ValueError(f"unknown format {spec.format!r}; one of {sorted(formats.PARSERS)}")
    if spec.format == "interleaved" and (role == "generate" or prompt is not None):
        raise ValueError("interleaved documents can only be scored (role='score', no prompt)")
    policy = on_bad_sample if isinstance(on_bad_sample, BadSamplePolicy) else BadSamplePolicy(
        on_bad_sample, max_skip_fraction=1.0)
    store = open_image_store(spec.image_root)
    if isinstance(store, TarStore):
        store.index()  # a compressed or unreadable shard fails here, named, not once per sample
    options = dict(spec.format_options)
    if spec.format == "llava" and role == "generate":
        options["needs_reply"] = False
    parse = functools.partial(formats.PARSERS[spec.format], **options)
    records, name = spec.open()
    out, skipped = [], []
    for index in range(len(records) if limit is None else min(limit, len(records))):
        record, sample_id = records[index], f"#{index}"
        try:
            if not isinstance(record, dict):
                raise BadSample(BAD_RECORD, getattr(record, "message", f"record is a {type(record).__name__}"))
            sample_id = formats.record_id(record) or sample_id
            ex = parse(record)
            images = [ref if isinstance(ref, str) else _Inline(records, index, parse, j)
                      for j, ref in enumerate(ex.images)]
            for suffix, messages, over, meta in _build(ex, spec.format, role, prompt):
                out.append(Request(sample_id + suffix, messages, images, meta, source=name, store=store, **over))
        except BadSample as e:
            e = e.with_context(sample_id, name)
            if policy.on_bad_sample == "error":
                raise e from None
            skipped.append((e.reason, e.sample_id, e.source, e.message))
            out.append(Request(sample_id, [], source=name, error=e))
    SkipStats(policy).update(len(out) - len(skipped), skipped)  # logs each (first N per reason); enforces the cap
    return out


def llava_requests(path, image_folder=None, *, limit: int | None = None,
                   on_bad_sample: str | BadSamplePolicy = "skip") -> list[Request]:
    """LLaVA conversation records (.json list or .jsonl) with images under `image_folder` (a folder, a .tar shard
    or a glob of shards): `requests_from_source` with role "generate", so records need no reply; those that have
    one can be scored too."""
    from vlmjax.data.pipeline import SourceSpec

    spec = SourceSpec(format="llava", path=str(path), image_root=None if image_folder is None else str(image_folder))
    return requests_from_source(spec, role="generate", limit=limit, on_bad_sample=on_bad_sample)


def folder_requests(image_folder, prompt: str, *, limit: int | None = None) -> list[Request]:
    """Every image under `image_folder` (sorted, recursive) with the same prompt; id = the path relative to it."""
    root = Path(image_folder)
    files = image_files(root, limit=limit)
    content = prompt if "<image>" in prompt else "<image>\n" + prompt
    return [Request(str(p.relative_to(root)), [{"role": "user", "content": content}], [str(p)],
                    {"image": str(p.relative_to(root))}, source=str(root)) for p in files]


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

        loaded = []
        for img in req.images:
            name = img if isinstance(img, str) else f"{req.id}"
            if isinstance(img, _Inline):
                img = img.load()
            if req.store is not None:
                img = resolve_image(img, req.store)
            loaded.append(load_image(self.source_image(req, img), self.image_spec, name=name))
        pixels = np.concatenate([normalize(t, self.image_spec) for t, _ in loaded])
        image_pos = [p for _, p in loaded] if self.image_spec.image_layout != "tiles" else None
        return pixels, [len(t) for t, _ in loaded], image_pos

    def pixels(self, req: Request) -> np.ndarray | None:
        return self.images(req)[0]

    def _encode(self, messages, req: Request):
        if req.error is not None:
            raise req.error
        try:
            pixels, tiles, image_pos = self.images(req)
            enc = self.text.encode(messages, tiles, template=req.template, loss_on=req.loss_on,
                                   image_pos=image_pos)
        except BadSample as e:  # name the sample and its file, as the training pipeline does
            raise e.with_context(req.id, req.source) from None
        return enc, pixels

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
