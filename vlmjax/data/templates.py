"""Chat templates rendered to text chunks flagged trained/untrained.

The loss mask must cover exactly the assistant replies (plus their end-of-turn token, so the model learns to stop),
whatever template the checkpoint uses. A template therefore renders a conversation to `[(text, trained), ...]`
rather than one string. Built-in templates reproduce the formats VLM recipes were trained with; `HFTemplate` uses
the checkpoint's own Jinja template and recovers the turn boundaries by rendering growing prefixes of the
conversation (which works for every template whose rendering of a prefix is a prefix of the full rendering, and
fails loudly otherwise). Image placeholders stay in the text; `text.TextProcessor` expands them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from vlmjax.data.errors import BAD_TURNS, UNKNOWN_ROLE, BadSample

Chunk = tuple[str, bool]
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

# Failures of the environment, not of the conversation (a missing jinja2, an unreadable template file): they must
# stop the run, not turn every sample into a `bad_turns` skip.
ENVIRONMENT_ERRORS = (ImportError, OSError, MemoryError)

LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def check_turns(messages: Sequence[Message], *, needs_reply: bool = True) -> None:
    """Optional leading system message, then user/assistant alternating, starting with user, ending with assistant
    (or, with `needs_reply=False`, a generation prompt: ending with a user turn allowed)."""
    if not messages:
        raise BadSample(BAD_TURNS, "no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        if m["role"] not in ("user", "assistant"):
            raise BadSample(UNKNOWN_ROLE if m["role"] != "system" else BAD_TURNS,
                            f"unexpected role {m['role']!r} at turn {i}")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadSample(BAD_TURNS, f"turn {i} is {m['role']!r}, expected {expected!r} (turns must alternate)")
    if not body or (needs_reply and body[-1]["role"] != "assistant"):
        raise BadSample(BAD_TURNS, "conversation does not end with an assistant turn")


@dataclasses.dataclass(frozen=True)
class BuiltinTemplate:
    """A template as format strings. `{bos}`/`{eos}` are the tokenizer's tokens (bos only where the tokenizer adds
    one itself, so e.g. ChatML models get none). Header and separators are untrained; the reply and `assistant_end`
    are trained. `system_joiner` set: the system prompt is merged into the first user turn (Mistral)."""

    name: str
    prefix: str = ""
    system: str = "{content}"
    default_system: str | None = None
    user: str = "{content}"
    assistant_header: str = ""
    assistant_end: str = "{eos}"
    after_assistant: str = ""
    system_joiner: str | None = None
    user_images_only: bool = False  # LLaVA "plain": the user turn is reduced to its image placeholders

    def render(self, messages: Sequence[Message], *, bos: str, eos: str, placeholder: str = "<image>",
               system_prompt: str | None = None) -> list[Chunk]:
        fill = lambda s, content="": s.replace("{bos}", bos).replace("{eos}", eos).replace("{content}", content)
        messages = list(messages)
        system = system_prompt if system_prompt is not None else self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        chunks: list[Chunk] = [(fill(self.prefix), False)]
        if system and self.system_joiner is None and not self.user_images_only:
            chunks.append((fill(self.system, system), False))
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "user":
                if self.user_images_only:
                    content = placeholder * content.count(placeholder)
                elif i == 0 and system and self.system_joiner is not None:
                    content = system + self.system_joiner + content
                chunks.append((fill(self.user, content), False))
            elif m["role"] == "assistant":
                chunks.append((fill(self.assistant_header), False))
                chunks.append((content + fill(self.assistant_end), True))
                chunks.append((fill(self.after_assistant), False))
            else:
                raise BadSample(UNKNOWN_ROLE, f"role {m['role']!r} cannot be rendered by template {self.name!r}")
        return [c for c in chunks if c[0]]


_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
               assistant_header="<|im_start|>assistant\n", assistant_end="<|im_end|>", after_assistant="\n")

BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    # LLaVA-1.5 conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": BuiltinTemplate("vicuna_v1", prefix="{bos}", system="{content} ", default_system=LLAVA_SYSTEM,
                                 user="USER: {content} ", assistant_header="ASSISTANT: "),
    "llama3": BuiltinTemplate(
        "llama3", prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_end="<|eot_id|>"),
    "chatml": BuiltinTemplate("chatml", **_CHATML),
    "qwen": BuiltinTemplate("qwen", default_system="You are a helpful assistant.", **_CHATML),
    # Mistral-Instruct v0.1/v0.2: "<s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>"
    "mistral_instruct": BuiltinTemplate("mistral_instruct", prefix="{bos}", user="[INST] {content} [/INST]",
                                        assistant_header=" ", system_joiner="\n\n"),
    # LLaVA pre-training: "<image>caption</s>", loss on the caption.
    "plain": BuiltinTemplate("plain", prefix="{bos}", user_images_only=True),
}


class HFTemplate:
    """The tokenizer's (or a given) Jinja chat template, split into turns by prefix rendering.

    Prefix rendering costs O(turns^2) Jinja renders, so the split is computed once per sequence of roles with
    opaque markers as contents, cached, filled with the real contents, and accepted only if it equals one full
    rendering of the real conversation; otherwise (templates that transform or branch on content) the exact
    prefix rendering of the real conversation is used."""

    name = "hf"
    _MARKER = re.compile("\ue000(\\d+)\ue001")
    _CACHE_SIZE = 4096

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template; pick a built-in one: " + ", ".join(BUILTIN_TEMPLATES))
        self._tokenizer = tokenizer
        self._skeletons: dict[tuple[str, ...], list[Chunk]] = {}

    def _render(self, messages, generation_prompt=False) -> str:
        return self._tokenizer.apply_chat_template(list(messages), tokenize=False, chat_template=self.chat_template,
                                                   add_generation_prompt=generation_prompt)

    def render(self, messages: Sequence[Message], *, bos: str = "", eos: str = "", placeholder: str = "<image>",
               system_prompt: str | None = None) -> list[Chunk]:
        messages = list(messages)
        if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}] + messages
        roles = tuple(m["role"] for m in messages)
        skeleton = self._skeletons.get(roles)
        if skeleton is None:
            skeleton = self.split([{"role": r, "content": f"\ue000{i}\ue001"} for i, r in enumerate(roles)])
            if len(self._skeletons) < self._CACHE_SIZE:
                self._skeletons[roles] = skeleton
        fill = lambda m: messages[int(m.group(1))]["content"]
        chunks = [(self._MARKER.sub(fill, text), trained) for text, trained in skeleton]
        try:
            full = self._render(messages)
        except ENVIRONMENT_ERRORS:
            raise
        except Exception:  # noqa: BLE001 - split() below renders again and names the failing turn
            full = None
        if full is not None and "".join(text for text, _ in chunks) == full:
            return [c for c in chunks if c[0]]
        return self.split(messages)

    def split(self, messages: Sequence[Message]) -> list[Chunk]:
        """Exact split by rendering every prefix of the conversation."""
        chunks: list[Chunk] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":  # the generation prompt is the untrained assistant header
                header = self._render(messages[:i], generation_prompt=True) if i else ""
                chunks.append((self._extend(done, header, i), False))
                done = header
            try:
                text = self._render(messages[: i + 1])
            except ENVIRONMENT_ERRORS:
                raise
            except Exception as e:  # templates raise on conversations they do not support (jinja raise_exception)
                raise BadSample(BAD_TURNS, f"chat template cannot render turn {i}: {e}") from None
            new = self._extend(done, text, i)
            if m["role"] == "assistant":
                # Templates without a generation prompt put the role header here: find it with a probe reply.
                try:
                    probe = self._render(list(messages[:i]) + [{"role": "assistant", "content": "\ue002"}])
                except ENVIRONMENT_ERRORS:
                    raise
                except Exception:  # noqa: BLE001 - no probe, no header split
                    probe = ""
                if probe.startswith(done) and "\ue002" in probe:
                    header = probe[len(done):probe.index("\ue002")]
                    if header and new.startswith(header):
                        chunks.append((header, False))
                        new = new[len(header):]
                body = new.rstrip()  # trailing whitespace after the end-of-turn token is a separator
                chunks += [(body, True), (new[len(body):], False)]
            else:
                chunks.append((new, False))
            done = text
        return [c for c in chunks if c[0]]

    @staticmethod
    def _extend(done: str, text: str, i: int) -> str:
        if not text.startswith(done):
            raise BadSample(BAD_TURNS, f"chat template renders turn {i} inconsistently with the turns before it "
                                       "(it rewrites history); use a built-in template")
        return text[len(done):]


@dataclasses.dataclass(frozen=True)
class PlainThenChat:
    """A caption in the `plain` template, then chat turns in a chat template (VILA^2 specialist data):
    `<bos><image>caption</s>` + the chat template's rendering of the later turns, without a second BOS. The first
    two messages are the caption exchange (user: the image placeholders, assistant: the caption)."""

    chat: BuiltinTemplate | HFTemplate
    plain: BuiltinTemplate = BUILTIN_TEMPLATES["plain"]

    @property
    def name(self) -> str:
        return f"plain+{self.chat.name}"

    @property
    def assistant_end(self) -> str:  # the caption ends with the tokenizer's eos (TextProcessor checks it has one)
        return self.plain.assistant_end

    def render(self, messages: Sequence[Message], *, bos: str, eos: str, placeholder: str = "<image>",
               system_prompt: str | None = None) -> list[Chunk]:
        messages = list(messages)
        if len(messages) < 2 or [m["role"] for m in messages[:2]] != ["user", "assistant"]:
            raise BadSample(BAD_TURNS, "a caption with chat turns starts with the caption exchange (user, assistant)")
        chunks = self.plain.render(messages[:2], bos=bos, eos=eos, placeholder=placeholder)
        if len(messages) == 2:
            return chunks
        check_turns(messages[2:])
        if any(placeholder in m["content"] for m in messages[2:]):
            raise BadSample(BAD_TURNS, f"the chat turns after a caption cannot hold {placeholder} (its image is "
                                       "the caption's)")
        chat = self.chat.render(messages[2:], bos=bos, eos=eos, placeholder=placeholder, system_prompt=system_prompt)
        if bos and chat and chat[0][0].startswith(bos):
            chat[0] = (chat[0][0][len(bos):], chat[0][1])
        return chunks + [c for c in chat if c[0]]


def get_template(name: str, tokenizer) -> BuiltinTemplate | HFTemplate | PlainThenChat:
    """"auto": the tokenizer's chat template if it has one; "hf": it must; a built-in name; or "plain+NAME": a
    caption in `plain`, then chat turns in NAME (PlainThenChat)."""
    if name.startswith("plain+"):
        return PlainThenChat(get_template(name[len("plain+"):], tokenizer))
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if name == "hf" or (name == "auto" and getattr(tokenizer, "chat_template", None)):
        return HFTemplate(tokenizer)
    if name == "auto":
        raise ValueError("tokenizer has no chat template; set template to one of " + ", ".join(BUILTIN_TEMPLATES))
    raise ValueError(f"unknown template {name!r}; use 'auto', 'hf' or one of " + ", ".join(BUILTIN_TEMPLATES))
