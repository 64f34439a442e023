"""The three recaption prompts and the per-sample choice among them.

The choice is a pure function of (round, sample key) (a SHA-256 of both), so it does not depend on batch size,
host shard, worker or resume, unlike the reference's unseeded `random.shuffle` / `np.random.choice` in
`__getitem__`. A new round draws afresh, so an image is not described with the same prompt every round.
"""

from __future__ import annotations

import hashlib

PROMPTS = (
    "Describe the image in details.",
    "Elaborate on the visual and narrative elements of the image in detail.",
    # the paper's third prompt, in our words: no imagined content, no lists
    "You are a careful image captioner. Describe only what can be determined with confidence from the image; do "
    "not describe imagined content or anything the image does not show, and do not itemize the description as a "
    "list. Describe the image in details.",
)


def prompt_id(round_: int, key: str) -> int:
    """Index into PROMPTS for sample `key` in round `round_` (uniform over the three)."""
    digest = hashlib.sha256(f"vila2/{int(round_)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % len(PROMPTS)
