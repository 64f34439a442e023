"""VILA in miniature (README "VILA, reproduced in miniature"; `python -m vlmjax.recipes.vila.miniature`): the shared
mini base's model shape (configs/mini/base.py: 64 px conv-stem tower, 3x128 decoder) with a 2048-token vocabulary
fitted to the miniature's corpus, trained as VILA's stages on the files of `vlmjax.recipes.vila.mini_data`.
The runner sets each stage's data paths, tokenizer and starting model.

text_lm:         the decoder alone on corpus C (text-only `interleaved` documents, loss on all text), from scratch,
                 the pretrained tower loaded (`model.load_params`) and frozen: the LLM must have text skill to lose.
align:           tower + projector on caption pairs, LLM frozen (VILA stage 1; the tower trains too, as the brief
                 of issue 19 asks: it is the mini base's pretrained stand-in, aligned to this decoder).
pretrain_frozen: arm (a): pairs, LLM frozen (projector only).
pretrain_pairs:  arm (b): pairs, LLM + projector (VILA stage 2, ViT frozen).
pretrain_docs:   arm (d): interleaved documents of 3-6 images, LLM + projector.
pretrain_mix:    arm (e): (b) + (d), equal weights.
sft:             easy-vqa QA (`llava`), LLM + projector; the text-only blend (a second source) and the LLM-frozen
                 variant (projector only) are set by the runner.
Every pretrain arm takes the same steps, batch and lr, so they differ only in data and what trains.
"""

import os

from vlmjax.train.config_io import load_module
from vlmjax.train.defaults import base

STAGES = ("text_lm", "align", "pretrain_frozen", "pretrain_pairs", "pretrain_docs", "pretrain_mix", "sft")
ARMS = {"pretrain_frozen": "a", "pretrain_pairs": "b", "pretrain_docs": "d", "pretrain_mix": "e"}
VOCAB = 2048
STEPS = {"text_lm": 400, "align": 150, "pretrain": 200, "sft": 100}


def _mini():
    return load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mini", "base.py"))


def model_dict():
    m = _mini().model_dict()
    m["llm"]["vocab_size"] = VOCAB
    return m


def get_config(stage: str = "text_lm"):
    if stage not in STAGES:
        raise ValueError(f"configs/vila/mini.py:{stage}: stages are {STAGES}")
    c = _mini().mini_defaults(base())
    c.data.seq_len = 128
    c.optim.lr = 2e-3
    c.model.init = "checkpoint"  # the previous stage's export (native: the conv stem)
    if stage == "text_lm":
        c.model.init = "random"
        c.model.vlm = model_dict()
        c.train.trainable = ("^llm/",)
        c.train.steps = STEPS["text_lm"]
        c.optim.end_factor = 0.1
        c.data.max_images = 1
        c.data.sources = (dict(format="interleaved", path="text_lm.jsonl", image_root="images"),)
    elif stage == "align":
        c.train.trainable = ("^vision/", "^projector/")
        c.train.steps = STEPS["align"]
        c.optim.schedule = "constant"
        c.data.sources = (dict(format="caption", path="pairs.jsonl", image_root="images"),)
    elif stage.startswith("pretrain"):
        c.train.trainable = ("^projector/",) if stage == "pretrain_frozen" else ("^projector/", "^llm/")
        c.train.steps = STEPS["pretrain"]
        c.optim.lr = 5e-4  # VILA's stage 2 lr is 1/20 of its alignment lr; ours 1/4 (far fewer steps)
        c.optim.end_factor = 0.1
        pairs = dict(format="caption", path="pairs.jsonl", image_root="images", weight=1.0)
        docs = dict(format="interleaved", path="docs.jsonl", image_root="images", weight=1.0,
                    format_options=dict(max_images=6))
        c.data.sources = {"pretrain_docs": (docs,), "pretrain_mix": (pairs, docs)}.get(stage, (pairs,))
    else:
        c.train.trainable = ("^projector/", "^llm/")
        c.train.steps = STEPS["sft"]
        c.data.seq_len = 256  # one image's QA conversation (~10 turns) per row, as the mini base's SFT
        c.data.batch_size = 8  # 100 steps x 8 = 800 conversations: 1.3 epochs of the 600 SFT images
        c.optim.lr = 1e-3
        c.optim.end_factor = 0.1
        c.data.sources = (dict(format="llava", path="sft.json", image_root="images"),)
    return c
