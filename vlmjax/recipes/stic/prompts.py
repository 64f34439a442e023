"""STIC's prompt sets (shared/recipes/stic.md), in our own words.

The detailed prompt elicits the preferred description; hallucination prompts elicit dispreferred ones from the clean
image; the stored prompt of every pair is one of the simple prompts, so training teaches simple prompt -> detailed,
faithful description. Every stored prompt carries the image placeholder (the public reference data drops it).
"""

from __future__ import annotations

from vlmjax.eval.dar import DAR_DESCRIBE, described  # noqa: F401  (DaR's prompt and layout are the library's)

DETAILED = (
    "Describe the image step by step. First name the main subjects and what they are doing. Then describe the "
    "setting, the mood and the lighting. Next describe the colours and the composition. Point out any symbolic or "
    "notable details, and finish with an overall interpretation of the image.")

HALLUCINATION = (
    "Describe the image with imaginative objects that may exist in the scene.",
    "Describe the image and add details that could plausibly be there but are not visible.",
    "Describe the scene, inventing a few objects and people that might be just outside the frame.",
    "Give a description of the image that includes things you imagine rather than see.",
    "Describe the image, guessing freely about colours and objects you are unsure of.",
    "Tell a story about the image, adding objects that are not in the picture.",
    "Describe the picture as if it contained more objects than it does.",
    "Describe the image, mixing what is shown with what could be there.",
)

SIMPLE = (
    "Illustrate the details of the picture.",
    "Summarize the visual content of the image.",
    "Explain what is shown in the picture.",
    "Describe the image.",
    "What is in this picture?",
    "Give a description of the image.",
    "Tell me what you see in the image.",
    "Describe the contents of this image.",
)

def with_image(prompt: str, placeholder: str = "<image>") -> str:
    """The prompt as stored and trained: the image placeholder first (LLaVA's convention)."""
    return prompt if placeholder in prompt else f"{placeholder}\n{prompt}"


def infused(description: str, question: str, placeholder: str = "<image>") -> str:
    """Stage 2: the first user turn with the model's description inserted after the image, before the question."""
    return with_image(described(description, question.replace(placeholder, "")), placeholder)
