"""state.json: which round a VILA^2 run is in, which model recaptions it, and the last finished step of each round
(recaption -> combine -> train -> eval, with each step's info: what `loop` resumes from).

Written atomically (temp file + os.replace), so a crash leaves the old state or the new one, never half of
either. It is what lets `combine` refuse recaptions made by another round or model than the run's.
"""

from __future__ import annotations

import json
import os

from vlmjax.generate.jsonl import write_json_atomic

STEPS = ("recaption", "combine", "train", "eval")  # a round's steps, in order (`loop.run_round`)


class StateMismatch(ValueError):
    """Outputs of another round or model than state.json names."""


class RunState:
    def __init__(self, out_dir):
        self.path = os.path.join(os.fspath(out_dir), "state.json")
        self.data = {"round": None, "rounds": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except ValueError as e:
                raise ValueError(f"{self.path}: not valid JSON ({e})") from None

    @property
    def round(self) -> int | None:
        return self.data["round"]

    def entry(self, round_: int) -> dict | None:
        return self.data["rounds"].get(str(round_))

    def start(self, round_: int, model: str) -> None:
        """Round `round_` is recaptioned by `model`: resuming it with another model is an error naming both."""
        entry = self.entry(round_)
        if entry is not None and entry["model"] != model:
            raise StateMismatch(f"{self.path}: round {round_} is recaptioned by model {entry['model']!r}, not "
                                f"{model!r} (use another --out, or the same --model to resume)")
        if entry is None:
            self.data["rounds"][str(round_)] = {"model": model, "last_step": None}
        if entry is None or self.round != round_:
            self.data["round"] = round_
            self.save()

    def check(self, round_: int, model: str, what: str) -> None:
        """`what` (recaptions of `round_` by `model`) must be of the round and model that state.json names."""
        entry = self.entry(self.round) if self.round is not None else None
        if entry is None:
            raise StateMismatch(f"{self.path} names no round: run recaption first")
        if (self.round, entry["model"]) != (round_, model):
            raise StateMismatch(f"{what} are round {round_} by model {model!r}, but {self.path} says round "
                                f"{self.round} by model {entry['model']!r}")

    def finish(self, round_: int, step: str, **info) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; one of {STEPS}")
        entry = self.data["rounds"][str(round_)]
        last = entry.get("last_step")
        # only forward: rerunning an earlier step (e.g. `recaption` again, all of it resumed) keeps the later ones
        if last is None or STEPS.index(step) > STEPS.index(last):
            entry["last_step"] = step
        entry[step] = info
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data, indent=1)
