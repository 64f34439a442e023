"""Train a small byte-level BPE tokenizer (HF `tokenizers`) with a ChatML chat template, for models trained from
scratch on a narrow corpus (the demo's miniature runs).

A 49k-entry vocabulary makes the unembedding the largest matmul of a 1M-parameter decoder; a vocabulary fitted to
the corpus removes that cost. Byte-level BPE means no text is ever out of vocabulary, so prompts outside the corpus
still tokenise. The result is a `PreTrainedTokenizerFast` folder that `AutoTokenizer` loads, `apply_chat_template`
renders (ChatML, no default system prompt) and the HF export copies.
"""

from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 1024,
                    min_frequency: int = 2):
    """Fit byte-level BPE on `texts`, save a transformers tokenizer folder at `out_dir`, return the tokenizer.
    eos = `<|im_end|>` (end of an assistant turn), pad = `<|endoftext|>`; `<image>` is a single special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, additional_special_tokens=["<|im_start|>", "<image>"],
                                   chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(str(out_dir))
    return fast
