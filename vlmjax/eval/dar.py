"""Describe-and-respond (DaR, from STIC): the model first describes the image, then answers with that description
inserted before the question. The description block is the layout STIC's stage-2 data is built in
(`recipes.stic.prompts.infused` uses `described`), so a model trained on it is evaluated on what it saw."""

from __future__ import annotations

import dataclasses

from vlmjax.eval.runner import evaluate, predict
from vlmjax.eval.tasks import EvalSample, Task

DAR_DESCRIBE = "Detail the composition and subjects within the frame."


def described(description: str, question: str) -> str:
    """The description block put before a question (STIC stage-2 data and DaR prompts)."""
    return f"Image description:\n{description.strip()}\n\n{question.strip()}"


def dar_task(model, tokenizer, task: Task, *, describe_prompt: str = DAR_DESCRIBE, max_new_tokens: int = 256,
             batch_size: int = 16, encoder=None, out_dir=None, mesh=None, progress: bool = False) -> Task:
    """`task` with each question prefixed by the model's description of its image (one per distinct image)."""
    images = {}
    for s in task.samples:
        if s.image is not None:
            images.setdefault(str(s.image), s.image)
    describe = Task(f"{task.name}_dar_describe", "caption", [EvalSample(k, describe_prompt, [], img) for k, img in images.items()],
                    instruction="", max_new_tokens=max_new_tokens)
    desc = predict(model, tokenizer, describe, out_dir=out_dir, batch_size=batch_size, encoder=encoder, mesh=mesh,
                   progress=progress)
    samples = [dataclasses.replace(s, question=described(desc.get(str(s.image), ""), s.question))
               if s.image is not None else s for s in task.samples]
    return dataclasses.replace(task, name=f"{task.name}_dar", samples=samples)


def evaluate_dar(model, tokenizer, task: Task, *, describe_prompt: str = DAR_DESCRIBE, max_new_tokens: int = 256,
                 batch_size: int = 16, encoder=None, out_dir=None, mesh=None, progress: bool = False) -> dict:
    """Metrics of `task` answered with describe-and-respond."""
    t = dar_task(model, tokenizer, task, describe_prompt=describe_prompt, max_new_tokens=max_new_tokens,
                 batch_size=batch_size, encoder=encoder, out_dir=out_dir, mesh=mesh, progress=progress)
    return evaluate(model, tokenizer, t, out_dir=out_dir, batch_size=batch_size, encoder=encoder, mesh=mesh,
                    progress=progress)
