"""Evaluation prompts: k-shot in-context demonstrations, and plain-template prompts for pre-trained checkpoints.

Chat template (`Task.template=None`, instruction-tuned models): k demonstrations are earlier turns of the same
conversation, each its own image and question followed by its answer as the assistant's reply, then the query:

    USER: <image>\\nQ1 ASSISTANT: A1</s>USER: <image>\\nQ2 ASSISTANT: A2</s>USER: <image>\\nQ ASSISTANT:

Plain template (`Task.template="plain"`, stage-1/2 checkpoints that never saw a chat turn): the sequence is the
one pre-training packs, `<image>text</s>` per sample, with the question in the text (Flamingo / VILA's few-shot
format, `Task.plain_format`, "Question: {question} Answer:" for questions, "" for captions). The query's text is
a prefill the model continues:

    <image>Question: Q1 Answer: A1</s><image>Question: Q2 Answer: A2</s><image>Question: Q Answer:

Demonstrations are drawn per query without replacement from `Task.demos` (or the task's other samples), never the
query itself nor a sample on the same image, from a stream seeded by (Task.seed, the query's id): a query's prompt
does not depend on which other queries are evaluated. A demonstration answers with its most frequent reference.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter

import numpy as np

from vlmjax.eval.tasks import EvalSample, Task
from vlmjax.generate.requests import Encoded, Encoder, Request


@dataclasses.dataclass
class EvalRequest(Request):
    """A request whose messages end with the query's user turn; `prefill` starts the reply (plain prompts)."""

    prefill: str = ""
    template: str | None = None  # None: the encoder's template

    def prompt_messages(self) -> list[dict]:
        return self.messages


def demo_answer(sample: EvalSample) -> str:
    """The reply a demonstration shows: its most frequent reference (first on ties)."""
    if not sample.answers:
        raise ValueError(f"demonstration {sample.id} has no reference answer")
    return Counter(sample.answers).most_common(1)[0][0]


def pick_demos(task: Task, query: EvalSample) -> list[EvalSample]:
    if not task.shots:
        return []
    same_image = isinstance(query.image, str)
    pool = [d for d in (task.demos if task.demos is not None else task.samples)
            if d.id != query.id and not (same_image and d.image == query.image)
            and not (task.demo_kind and d.meta.get("kind") != query.meta.get("kind"))]
    if len(pool) < task.shots:
        raise ValueError(f"task {task.name}: {task.shots} shots but only {len(pool)} demonstrations for {query.id}")
    rng = np.random.default_rng([task.seed, zlib.crc32(query.id.encode())])
    return [pool[i] for i in rng.choice(len(pool), task.shots, replace=False)]


def plain_text(task: Task, s: EvalSample) -> str:
    fmt = task.plain_format if task.plain_format is not None else ("" if task.kind == "caption"
                                                                    else "Question: {question} Answer:")
    return fmt.format(question=s.question)


def request_for(task: Task, s: EvalSample) -> EvalRequest:
    shown = pick_demos(task, s) + [s]
    images = [x.image for x in shown if x.image is not None]
    messages = []
    if task.template == "plain":
        for x in shown:
            text = plain_text(task, x)
            user = "<image>" if x.image is not None else ""
            if x is s:
                messages.append({"role": "user", "content": user})
                return EvalRequest(s.id, messages, images, prefill=text, template="plain")
            reply = f"{text} {demo_answer(x)}" if text else demo_answer(x)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    for x in shown[:-1]:
        messages += [{"role": "user", "content": task.prompt(x)}, {"role": "assistant", "content": demo_answer(x)}]
    messages.append({"role": "user", "content": task.prompt(s)})
    return EvalRequest(s.id, messages, images, template=task.template)


def requests_for(task: Task) -> list[EvalRequest]:
    return [request_for(task, s) for s in task.samples]


class PromptEncoder:
    """An `Encoder` (or subclass: its image hooks are kept) that also encodes k-shot, plain-template and prefilled
    prompts, and option continuations for log-likelihood scoring."""

    def __init__(self, base: Encoder):
        self.base = base
        self.special = set(getattr(base.tokenizer, "all_special_ids", []) or [])

    def __getattr__(self, name):
        if name == "base":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def _encode(self, messages, req: Request):
        pixels, tiles, image_pos = self.base.images(req)
        enc = self.base.text.encode(messages, tiles, template=getattr(req, "template", None),
                                    image_pos=image_pos)
        return enc, pixels

    def _reply(self, req: Request, content: str) -> tuple[Encoded, int, int]:
        """Encode the conversation + an assistant reply `content`; -> (encoding, reply start, reply end without its
        end-of-turn special tokens)."""
        enc, pixels = self._encode(req.prompt_messages() + [{"role": "assistant", "content": content}], req)
        idx = np.flatnonzero(enc.trained)
        if not len(idx):
            raise ValueError(f"sample {req.id}: no assistant reply")
        end = int(idx[-1]) + 1
        start = end - 1
        while start > 0 and enc.trained[start - 1]:
            start -= 1
        while end > start and int(enc.ids[end - 1]) in self.special:
            end -= 1
        return Encoded(enc.ids.tolist(), pixels, image_pos=enc.image_pos), start, end

    def prompt(self, req: Request) -> Encoded:
        """The generation prompt: everything before the reply, or up to the end of the prefill."""
        prefill = getattr(req, "prefill", "")
        enc, start, end = self._reply(req, prefill if prefill else "x")
        cut = end if prefill else start
        return Encoded(enc.ids[:cut], enc.pixels, image_pos=enc.image_pos)

    def continuation(self, req: Request, option: str) -> Encoded:
        """Prompt + `option` as the reply's text (after the prefill and a space); target = the option's tokens:
        the reply's tokens past the longest common prefix with the bare prompt, without the end-of-turn token."""
        prefill = getattr(req, "prefill", "")
        prompt = self.prompt(req).ids
        enc, start, end = self._reply(req, f"{prefill} {option}" if prefill else option)
        common = 0
        while common < min(len(prompt), end) and prompt[common] == enc.ids[common]:
            common += 1
        if common >= end:
            raise ValueError(f"sample {req.id}: option {option!r} adds no tokens to the prompt")
        target = np.zeros(len(enc.ids), bool)
        target[max(common, 1):end] = True
        return Encoded(enc.ids, enc.pixels, target, enc.image_pos)
