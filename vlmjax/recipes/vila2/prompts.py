"""The three recaption prompts, the specialists' domain prompts, and the per-sample choice among a prompt set.

The choice is a pure function of (salt, round, sample key) (a SHA-256 of them), so it does not depend on batch size,
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

# Specialist-augment (the paper's section on specialists, in our words): each specialist, fine-tuned on its
# domain's data, answers one task-oriented prompt about every pretraining image; the answer becomes a QA turn
# after the caption. Grounding boxes are [xmin, ymin, xmax, ymax] in image coordinates normalised to 0-1.
SPECIALIST_PROMPTS = {
    "spatial": "Describe the spatial relationships between the objects in the image: for each pair that matters, "
               "say where one is relative to the other (left of, right of, above, below, in front of, behind, "
               "inside, next to), and how near or far they are.",
    "grounding": "Describe the image in detail, and give the bounding box of every object you mention as "
                 "[xmin, ymin, xmax, ymax], in coordinates normalised to the range 0 to 1.",
    "ocr": "Read all the text in the image, word for word, and say where each piece of text appears and what it "
           "is written on. If there is no text, say so.",
}


def prompt_id(round_: int, key: str, n: int = len(PROMPTS), salt: str = "vila2") -> int:
    """Index into a set of `n` prompts (default PROMPTS) for sample `key` in round `round_` (uniform over them);
    another `salt` (a specialist's) draws independently of the recaption prompts."""
    if n < 1:
        raise ValueError(f"prompt_id: need at least one prompt, got n={n}")
    digest = hashlib.sha256(f"{salt}/{int(round_)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n
