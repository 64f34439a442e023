"""Tokenisation with image-token expansion and the loss mask.

Rendered chunks are split on the image placeholder *before* tokenising, and the image ids are inserted directly:
a BPE tokenizer would otherwise split "<image>" into "<", "image", ">" or merge it with neighbours, and the number
of feature tokens must equal what the tower + projector produce for that image (`tokens_per_image` per tile). The
count is checked. Truncation never separates an image from its tokens: an overlong sample is cut only after its
last image (or rejected, per `truncation`); interleaved documents instead lose whole trailing images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from vlmjax.data import templates
from vlmjax.data.errors import BAD_TURNS, IMAGE_COUNT, TOO_LONG, BadSample


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """template: "auto" (the tokenizer's chat template), "hf", or a built-in name (see templates.BUILTIN_TEMPLATES).
    image_token_id: id inserted for image features; None -> `default_image_token_id(tokenizer)`.
    loss_on: "assistant" (replies only) or "all" (all text; images never).
    truncation: "text_only" cuts an overlong sample if all its image tokens survive, else rejects it;
      "reject" rejects every overlong sample. Rejection goes through the bad-sample policy (reason too_long)."""

    template: str = "auto"
    image_token_id: int | None = None
    placeholder: str = "<image>"
    loss_on: Literal["assistant", "all"] = "assistant"
    truncation: Literal["text_only", "reject"] = "text_only"
    system_prompt: str | None = None


def default_image_token_id(tokenizer, placeholder: str = "<image>") -> int:
    """The placeholder's id when the vocabulary has it as one token (LLaVA checkpoints do), else `len(tokenizer)`:
    an id no text can produce. The model must not look it up in the embedding table (it splices image features
    there), or must size the table to include it."""
    vocab = tokenizer.get_vocab()
    if placeholder in vocab:
        return int(vocab[placeholder])
    return len(tokenizer)


def _bos_text(tokenizer) -> str:
    """The BOS string only if the tokenizer itself prepends it (Llama/Mistral yes, ChatML models no)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray  # int32 (L,)
    trained: np.ndarray  # bool (L,): this token is a trained prediction target
    num_images: int  # images kept (fewer than given only for documents cut by truncation)
    # With per-image positions given to `encode`: for each image token in order, the tile feature it takes,
    # counted from the sample's first tile (-1: the image newline). None otherwise.
    image_pos: np.ndarray | None = None


class TextProcessor:
    """Renders and tokenises conversations for one tokenizer, template and max length."""

    def __init__(self, tokenizer, spec: TextSpec, tokens_per_image: int, max_length: int):
        self.tokenizer, self.spec = tokenizer, spec
        self.tokens_per_image, self.max_length = tokens_per_image, max_length
        self.template = templates.get_template(spec.template, tokenizer)
        self.image_token_id = (spec.image_token_id if spec.image_token_id is not None
                               else default_image_token_id(tokenizer, spec.placeholder))
        self.bos = _bos_text(tokenizer)
        self.eos = tokenizer.eos_token or ""
        self._templates = {self.template.name: self.template}

    def _get_template(self, name: str | None):
        if name is None:
            return self.template
        if name not in self._templates:
            self._templates[name] = templates.get_template(name, self.tokenizer)
        return self._templates[name]

    def chunks(self, messages, template: str | None = None) -> list[templates.Chunk]:
        tpl = self._get_template(template)
        if "{eos}" in getattr(tpl, "assistant_end", "") and not self.eos:
            raise ValueError(f"template {tpl.name!r} needs an eos token and the tokenizer has none")
        return tpl.render(messages, bos=self.bos, eos=self.eos, placeholder=self.spec.placeholder,
                          system_prompt=self.spec.system_prompt)

    def encode(self, messages, image_tiles: Sequence[int], *, template: str | None = None,
               loss_on: str | None = None, document: bool = False, untrained_replies: int = 0,
               image_pos: Sequence[np.ndarray] | None = None) -> Encoded:
        """messages -> ids with `tokens_per_image * tiles` image ids per placeholder, and per-token trained flags.

        `image_pos`: per image, the tile feature each of its tokens takes (`data.image.image_pos`; the
        batch's `image_pos` is their concatenation);
        image i then gets len(image_pos[i]) ids instead. `untrained_replies`: leave the first n assistant replies
        untrained (DPO: replies inside the prompt)."""
        loss_on = loss_on or self.spec.loss_on
        pieces, flags, slots = [], [], []  # slots: None for text pieces, image index for placeholders
        n_images = 0
        replies = 0
        for text, trained in self.chunks(messages, template):
            if trained:  # templates emit exactly one trained chunk per assistant reply
                replies += 1
                trained = replies > untrained_replies
            parts = text.split(self.spec.placeholder)
            for j, part in enumerate(parts):
                if j:
                    slots.append(n_images)
                    n_images += 1
                if part:
                    pieces.append(part)
                    flags.append(trained or loss_on == "all")
                    slots.append(None)
        if n_images != len(image_tiles):
            raise BadSample(IMAGE_COUNT,
                            f"{n_images} {self.spec.placeholder} placeholders for {len(image_tiles)} images")
        if image_pos is not None:
            first_tile = np.cumsum([0, *image_tiles[:-1]]) * self.tokens_per_image
            image_pos = [np.where(p >= 0, p + t0, -1).astype(np.int32)
                               for p, t0 in zip(image_pos, first_tile)]
        counts = ([len(p) for p in image_pos] if image_pos is not None
                  else [self.tokens_per_image * t for t in image_tiles])
        token_lists = iter(self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else [])
        flag_iter = iter(flags)
        ids_parts, trained_parts, image_spans = [], [], []
        pos = 0
        for slot in slots:
            if slot is None:
                toks = np.asarray(next(token_lists), np.int32)
                ids_parts.append(toks)
                trained_parts.append(np.full(len(toks), next(flag_iter), bool))
            else:
                n = counts[slot]
                toks = np.full(n, self.image_token_id, np.int32)
                ids_parts.append(toks)
                trained_parts.append(np.zeros(n, bool))
                image_spans.append((pos, pos + n))
            pos += len(toks)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
        trained = np.concatenate(trained_parts) if trained_parts else np.zeros(0, bool)
        n_image_tokens = int((ids == self.image_token_id).sum())
        if n_image_tokens != sum(counts):
            raise BadSample(IMAGE_COUNT, f"text tokenises to the image token id {self.image_token_id} "
                                         f"({n_image_tokens} image ids for {sum(counts)} image tokens)")
        kept = len(image_tiles)
        if len(ids) > self.max_length:
            ids, trained, kept = self._truncate(ids, trained, image_spans, document)
        if not trained[1:].any():  # position 0 is never a target
            raise BadSample(BAD_TURNS if len(ids) < self.max_length else TOO_LONG, "no trained tokens")
        pos = None
        if image_pos is not None:
            pos = np.concatenate([np.zeros(0, np.int32), *image_pos[:kept]])
        return Encoded(ids, trained, kept, pos)

    def _truncate(self, ids, trained, image_spans, document):
        limit = self.max_length
        kept = len(image_spans)
        if document:  # cut before any image that would be split, then drop images left with no text after them
            while kept and image_spans[kept - 1][1] > limit:
                limit = min(limit, image_spans[kept - 1][0])
                kept -= 1
            while kept and image_spans[kept - 1][1] >= limit:
                limit = image_spans[kept - 1][0]
                kept -= 1
            return ids[:limit], trained[:limit], kept
        if self.spec.truncation == "reject":
            raise BadSample(TOO_LONG, f"{len(ids)} tokens > max length {self.max_length}")
        if image_spans and image_spans[-1][1] > limit:
            raise BadSample(TOO_LONG, f"{len(ids)} tokens > max length {self.max_length} and truncation would cut "
                                      f"image tokens (last image ends at token {image_spans[-1][1]})")
        return ids[:limit], trained[:limit], kept
