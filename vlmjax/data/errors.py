"""Bad-sample handling: every sample that cannot be trained on is either a hard error or a counted skip.

Web-scale data always has broken images and malformed records. Silently dropping them hides data bugs (a wrong image
root drops 100% of a source); crashing on the first one makes long runs fragile. So a sample failure is a `BadSample`
with a short `reason` tag and the sample's id and file; the policy decides whether it raises (default) or becomes a
`Skipped` marker that flows down the pipeline to be counted, logged and checked against `max_skip_fraction`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Literal

log = logging.getLogger("vlmjax.data")

# Reason tags. Kept small and stable so skip counts are comparable across runs.
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
EMPTY_CONVERSATION = "empty_conversation"
UNKNOWN_ROLE = "unknown_role"
BAD_TURNS = "bad_turns"  # roles out of order, nothing to train on, template cannot render it
IMAGE_COUNT = "image_count"  # number of <image> placeholders != number of images
TOO_LONG = "too_long"
TOO_MANY_IMAGES = "too_many_images"  # more image tiles than a batch has slots
BAD_RECORD = "bad_record"  # missing/ill-typed fields


class BadSample(ValueError):
    """A sample that cannot become a training example. `str()` names the reason, the sample id and the file."""

    def __init__(self, reason: str, message: str, sample_id: str | None = None, source: str | None = None):
        self.reason, self.message, self.sample_id, self.source = reason, message, sample_id, source
        super().__init__(str(self))

    def with_context(self, sample_id: str | None, source: str | None) -> BadSample:
        return BadSample(self.reason, self.message, self.sample_id or sample_id, self.source or source)

    def __str__(self) -> str:
        return f"[{self.reason}] {self.message} (sample {self.sample_id!r} in {self.source or '<unknown source>'})"

    def __reduce__(self):  # exceptions with extra init args do not pickle by default (grain workers pickle them)
        return (BadSample, (self.reason, self.message, self.sample_id, self.source))


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker that replaces a bad sample under the `skip` policy so that the skip is counted downstream."""

    reason: str
    sample_id: str | None
    source: str | None
    message: str


@dataclasses.dataclass(frozen=True)
class BadSamplePolicy:
    """`error`: raise on the first bad sample. `skip`: count it, log it, and raise only once more than
    `max_skip_fraction` of the samples seen so far were skipped (checked after `min_samples` samples, so a few
    early bad samples do not abort a run, but a wrong image root does)."""

    on_bad_sample: Literal["error", "skip"] = "error"
    max_skip_fraction: float = 0.01
    min_samples: int = 100
    log_first: int = 20  # per reason; then only every 1000th, to keep logs readable on dirty data

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")


class TooManySkipped(RuntimeError):
    pass


class SkipStats:
    """Running counts of used and skipped samples; lives in the main process, saved with the iterator state."""

    def __init__(self, policy: BadSamplePolicy):
        self.policy = policy
        self.used = 0
        self.skipped: collections.Counter[str] = collections.Counter()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def update(self, used: int, skipped: list[tuple[str, str | None, str | None, str]]) -> None:
        self.used += used
        for reason, sample_id, source, message in skipped:
            self.skipped[reason] += 1
            n = self.skipped[reason]
            if n <= self.policy.log_first or n % 1000 == 0:
                log.warning("skipped sample %r in %s [%s, #%d]: %s", sample_id, source, reason, n, message)
        seen = self.used + self.num_skipped
        if seen >= self.policy.min_samples and self.num_skipped > self.policy.max_skip_fraction * seen:
            raise TooManySkipped(
                f"{self.num_skipped} of {seen} samples skipped (> {self.policy.max_skip_fraction:.1%}): "
                f"{dict(self.skipped)}. Fix the data or raise max_skip_fraction."
            )

    def state(self) -> dict:
        return {"used": self.used, "skipped": dict(self.skipped)}

    def load(self, state: dict) -> None:
        self.used = int(state["used"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
