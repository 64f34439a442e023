"""Real weights: the KV-cache engine against transformers' `generate` on SmolLM2-135M-Instruct (offline GGUF),
greedy, a batch of two prompts of different lengths (left-padded on the transformers side)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from vlmjax.generate import GenerationConfig, default_eos_ids, generate, unpad_left  # noqa: E402

pytestmark = pytest.mark.slow

NEW = 16


@pytest.fixture
def assets(smollm2):
    return smollm2


def test_batched_greedy_equals_transformers_generate(assets):
    model, cfg, ref, tok = assets
    texts = ["What is the capital of France?", "Write one sentence about the sea at night, please."]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    tok.padding_side = "left"
    enc = tok(chats, add_special_tokens=False, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[0].sum() < mask[1].sum() and mask[0, 0] == 0  # row 0 is left-padded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's 2-thread decode is ~10x slower when other processes share the 2 cores
    try:
        with torch.no_grad():
            theirs = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                                  do_sample=False, pad_token_id=tok.pad_token_id or 0)[:, ids.shape[1]:].tolist()
    finally:
        torch.set_num_threads(threads)
    eos = default_eos_ids(tok, cfg)
    ours = generate(model, unpad_left(ids, mask), GenerationConfig(max_new_tokens=NEW, eos_token_ids=eos),
                    tokenizer=tok)
    for o, t in zip(ours, theirs):
        cut = next((i for i, x in enumerate(t) if x in eos), len(t))
        assert o.tokens == t[:cut]
        assert o.finish_reason == ("eos" if cut < NEW else "length")
    assert "Paris" in ours[0].text and ours[0].finish_reason == "eos"
    assert len(ours[1].tokens) == NEW  # the long answer runs to the limit: 16 tokens compared
    assert np.all(np.asarray(ours[1].tokens) == np.asarray(theirs[1]))
