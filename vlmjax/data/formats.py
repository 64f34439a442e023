"""Record parsers: each dataset layout -> one `Example` (messages + image references).

Everything downstream (templates, tokenisation, packing) sees only `Example`, so adding a layout means adding a
parser here. Layouts are documented with examples in FORMATS.md. Parsers validate structure (roles, empty turns,
placeholder counts) and raise `BadSample`, because a malformed record caught here names its problem precisely.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vlmjax.data.errors import BAD_RECORD, EMPTY_CONVERSATION, IMAGE_COUNT, UNKNOWN_ROLE, BadSample
from vlmjax.data.templates import check_turns

PLACEHOLDER = "<image>"
ESCAPED_PLACEHOLDER = "<IMAGE>"  # what a literal "<image>" in raw document text becomes (VILA's escape)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass
class Example:
    """One training sample. `messages` is the conversation (the prompt for preference pairs, whose replies are in
    `chosen`/`rejected`). `template`/`loss_on` override the pipeline's settings (captions and documents use
    "plain"); `document` allows truncation to drop whole trailing images."""

    sample_id: str
    messages: list[dict]
    images: list[Any] = dataclasses.field(default_factory=list)
    template: str | None = None
    loss_on: str | None = None
    document: bool = False
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def _text(value, what: str) -> str:
    if isinstance(value, bytes):  # TFDS returns text features as bytes
        value = value.decode("utf-8")
    if isinstance(value, list):  # HF/TRL multimodal content: [{"type": "image"}, {"type": "text", "text": ...}]
        out = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append(_text(part.get("text", ""), what))
            elif kind == "image":
                out.append(PLACEHOLDER)
            else:
                raise BadSample(BAD_RECORD, f"{what}: unknown content part {str(part)[:60]}")
        return "".join(out)
    if not isinstance(value, str):
        raise BadSample(BAD_RECORD, f"{what} must be text, got {type(value).__name__}")
    return value


def _images(record: dict, *keys: str) -> list:
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            return list(value) if isinstance(value, (list, tuple)) else [value]
    return []


def record_id(record: dict) -> str | None:
    """The record's own id (LLaVA "id", WebDataset "__key__", ...), if it has one."""
    for key in ("id", "key", "__key__", "sample_id"):
        if record.get(key) is not None:
            v = record[key]
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def _messages(turns, what: str) -> list[dict]:
    if isinstance(turns, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": turns}]
    if not isinstance(turns, (list, tuple)):
        raise BadSample(BAD_RECORD, f"{what} must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample(BAD_RECORD, f"{what}[{i}] is not a dict")
        raw_role = turn.get("from", turn.get("role"))
        raw_role = raw_role.decode() if isinstance(raw_role, bytes) else raw_role
        if raw_role not in ROLES:
            raise BadSample(UNKNOWN_ROLE, f"{what}[{i}] has unknown role {raw_role!r}")
        content = _text(turn.get("value", turn.get("content")), f"{what}[{i}]")
        out.append({"role": ROLES[raw_role], "content": content})
    return out


def _place_images(messages: list[dict], n_images: int) -> None:
    """LLaVA convention: a sample with images but no placeholder gets them at the start of the first user turn."""
    count = sum(m["content"].count(PLACEHOLDER) for m in messages)
    if count == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample(IMAGE_COUNT, f"{n_images} images but no user turn to place them in")
        first_user["content"] = (PLACEHOLDER + "\n") * n_images + first_user["content"]
    elif count != n_images:
        raise BadSample(IMAGE_COUNT, f"{count} {PLACEHOLDER} placeholders for {n_images} images")


def parse_llava(record: dict, needs_reply: bool = True) -> Example:
    """{"id", "image" | "images", "conversations": [{"from": "human" | "gpt" | "system", "value"}]}.
    `needs_reply=False` accepts a conversation that ends with a user turn (a generation prompt)."""
    turns = record.get("conversations", record.get("messages"))
    if isinstance(turns, (str, bytes)):  # conversations stored as a JSON string (e.g. a TFDS Text feature)
        try:
            turns = json.loads(turns)
        except ValueError as e:
            raise BadSample(BAD_RECORD, f"conversations is not valid JSON: {e}") from None
    if not turns:
        raise BadSample(EMPTY_CONVERSATION, "no conversation turns")
    messages = _messages(turns, "conversations")
    if not any(m["content"].strip() for m in messages):
        raise BadSample(EMPTY_CONVERSATION, "all turns are empty")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise BadSample(EMPTY_CONVERSATION, "an assistant turn is empty")
    images = _images(record, "images", "image")
    _place_images(messages, len(images))
    check_turns(messages, needs_reply=needs_reply)
    return Example(record_id(record), messages, images)


def parse_caption(record: dict) -> Example:
    """{"id", "image" (or WebDataset "jpg"/"png"/"webp"), "caption" (or "text"/"txt")} -> "<image>caption<eos>"."""
    images = _images(record, "image", "jpg", "jpeg", "png", "webp")
    if len(images) != 1:
        raise BadSample(BAD_RECORD, f"caption records need exactly one image, got {len(images)}")
    key = next((k for k in ("caption", "text", "txt") if k in record), None)
    caption = _text(record[key], key).strip() if key else ""
    if not caption:
        raise BadSample(EMPTY_CONVERSATION, "empty caption")
    messages = [{"role": "user", "content": PLACEHOLDER}, {"role": "assistant", "content": caption}]
    return Example(record_id(record), messages, images, template="plain")


def parse_interleaved(record: dict, max_images: int = 8, min_similarity: float | None = None) -> Example:
    """MMC4: {"text_list": [sentences], "image_info": [{"image_name" | "image" | "bytes", "matched_text_index",
    "matched_sim"}]}. Each image goes right before its matched sentence; only the first `max_images` (in document
    order, after dropping those below `min_similarity`) are kept; images with no text after them are dropped;
    loss on all text; a literal "<image>" in the text becomes "<IMAGE>". The record is never modified."""
    # A literal "<image>" in web text would pose as a placeholder (and miscount the images): escaped as VILA does.
    raw = [_text(s, "text_list") for s in (record.get("text_list") or [])]
    sentences = [s.replace(PLACEHOLDER, ESCAPED_PLACEHOLDER) for s in raw]
    escaped = sum(s.count(PLACEHOLDER) for s in raw)
    if not any(s.strip() for s in sentences):
        raise BadSample(EMPTY_CONVERSATION, "document has no text")
    placed = []
    for info in record.get("image_info") or []:
        if not isinstance(info, dict) or "matched_text_index" not in info:
            raise BadSample(BAD_RECORD, f"image_info entry without matched_text_index: {str(info)[:80]}")
        if min_similarity is not None and info.get("matched_sim", 1.0) < min_similarity:
            continue
        ref = next((info[k] for k in ("image", "bytes", "image_name", "path") if info.get(k) is not None), None)
        if ref is None:
            raise BadSample(BAD_RECORD, "image_info entry without an image reference")
        index = int(info["matched_text_index"])
        if not 0 <= index <= len(sentences):
            raise BadSample(BAD_RECORD, f"matched_text_index {index} outside the {len(sentences)} sentences")
        placed.append((index, len(placed), ref))
    placed.sort()
    # An image has text after it iff some non-empty sentence has index >= its matched index.
    last_text = max(i for i, s in enumerate(sentences) if s.strip())
    placed = [p for p in placed if p[0] <= last_text][:max_images]
    parts, images = [], []
    by_index: dict[int, list] = {}
    for index, _, ref in placed:
        by_index.setdefault(index, []).append(ref)
    for i, sentence in enumerate(sentences):
        refs = by_index.get(i, [])
        images += refs
        if refs or sentence.strip():
            parts.append(PLACEHOLDER * len(refs) + sentence.strip())
    text = " ".join(p for p in parts if p)
    messages = [{"role": "assistant", "content": text}]
    meta = {k: record[k] for k in ("url",) if k in record}
    if escaped:
        meta["escaped_image_tags"] = escaped
    return Example(record_id(record), messages, images, template="plain", loss_on="all", document=True, meta=meta)


def parse_preference(record: dict) -> Example:
    """DPO pairs. Flat: {"image(s)", "prompt": str, "chosen": str, "rejected": str, ...metadata}. TRL
    conversational: prompt/chosen/rejected as lists of {"role", "content"} (content may be typed parts); with no
    "prompt", the common leading turns of chosen and rejected are the prompt (TRL's implicit-prompt layout)."""
    for key in ("chosen", "rejected"):
        if record.get(key) in (None, "", []):
            raise BadSample(EMPTY_CONVERSATION, f"missing or empty {key!r}")
    chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
    if record.get("prompt") not in (None, "", []):
        prompt = _messages(record["prompt"], "prompt")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise BadSample(EMPTY_CONVERSATION, "no prompt and no shared leading turns in chosen/rejected")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in reply if m["role"] == "assistant"):
            raise BadSample(EMPTY_CONVERSATION, f"{name} has no assistant reply")
        if any(PLACEHOLDER in m["content"] for m in reply):
            raise BadSample(IMAGE_COUNT, f"{name} contains {PLACEHOLDER}; images belong in the prompt")
    images = _images(record, "images", "image")
    _place_images(prompt, len(images))
    check_turns(prompt + chosen)
    check_turns(prompt + rejected)
    meta = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "image", "images", "id")}
    return Example(record_id(record), prompt, images, chosen=chosen, rejected=rejected, meta=meta)


def parse_caption_qa(record: dict, chat_template: str = "auto") -> Example:
    """A caption record followed by chat turns about the same image (VILA^2 specialists): the `caption` fields plus
    "conversations" (LLaVA turns, human first, no <image>). Rendered as the caption in `plain`, then the turns in
    `chat_template` (template "plain+{chat_template}"; set it to the pipeline's template when that is not "auto").
    "conversations": [] (given, empty) is the caption alone, exactly as the `caption` format renders it; a record
    without the key is an error (a caption file read as caption_qa by mistake)."""
    example = parse_caption(record)
    turns = record.get("conversations", record.get("messages"))
    if isinstance(turns, (str, bytes)):
        try:
            turns = json.loads(turns)
        except ValueError as e:
            raise BadSample(BAD_RECORD, f"conversations is not valid JSON: {e}") from None
    if turns is None or (not turns and not isinstance(turns, list)):
        raise BadSample(EMPTY_CONVERSATION, "caption_qa record without conversations (use the caption format)")
    if not turns:  # an explicit [] (no specialist answered about this image): the caption alone
        return example
    qa = _messages(turns, "conversations")
    if any(m["role"] == "system" for m in qa):
        raise BadSample(BAD_RECORD, "caption_qa turns cannot hold a system message")
    if any(PLACEHOLDER in m["content"] for m in qa):
        raise BadSample(IMAGE_COUNT, f"caption_qa turns cannot hold {PLACEHOLDER}: the image is the caption's")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in qa):
        raise BadSample(EMPTY_CONVERSATION, "an assistant turn is empty")
    check_turns(qa)
    example.messages += qa
    example.template = f"plain+{chat_template}"
    return example


PARSERS = {"llava": parse_llava, "caption": parse_caption, "interleaved": parse_interleaved,
           "preference": parse_preference, "caption_qa": parse_caption_qa}
