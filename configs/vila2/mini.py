"""VILA^2 in miniature (README "VILA^2, reproduced in miniature"; `python -m vlmjax.recipes.vila2.miniature`): the
shared mini base's model shape (configs/mini/base.py: 64 px conv-stem tower, 3x128 decoder, its 1024-token corpus
tokenizer) retrained from scratch every round: the base's pretrained tower (`mini_base.pretrain_tower`, loaded with
`model.load_params`) + a fresh decoder. The runner (`vlmjax.recipes.vila2.loop`) sets each stage's data, tokenizer,
tower and starting model.

align: the round's caption pairs (images 0-2999; round 0 = the under-informative captions, round k = original +
       VILA^{k-1}'s recaption), projector + decoder trainable (the decoder is fresh: it learns its language here),
       the pretrained tower frozen, as VILA's stage 1 keeps its ViT. Training the tower here on one-attribute
       captions left a blind VILA^0 (caption-likelihood probe, `vila2.mini_probe`: colour 0.125, shape 0.365 =
       chance; frozen: 0.72 / 0.66, seed 0, README).
sft:   easy-vqa QA + a description turn on images 3000-3299 (small, so the pre-training still matters), tower
       frozen (as the mini base: SFT at lr 2e-3 blurs the tower's shape features).
specialist: the shape specialist (`--ablations`): the last round's SFT'd model fine-tuned on "What shape is in the
       image?" about the SFT images (`mini_data.build_shape_qa`), tower frozen, lower lr (it starts trained).
Steps (STEPS) are the mini base's (align 300, SFT 400): at 80 + 80 VILA^0 did not learn to see (its recaptions were
right on colour and shape at chance, README), so no round could add information.
"""

import os

from vlmjax.train.config_io import load_module
from vlmjax.train.defaults import base

STAGES = ("align", "sft", "specialist")
STEPS = {"align": 300, "sft": 400, "specialist": 100}


def _mini():
    return load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mini", "base.py"))


def get_config(stage: str = "align"):
    if stage not in STAGES:
        raise ValueError(f"configs/vila2/mini.py:{stage}: stages are {STAGES}")
    mini = _mini()
    c = mini.mini_defaults(base())
    c.optim.lr = 2e-3
    c.train.steps = STEPS[stage]
    if stage == "align":
        c.model.init = "random"
        c.model.vlm = mini.model_dict()
        c.train.trainable = ("^projector/", "^llm/")
        c.optim.schedule = "constant"
        c.data.seq_len = 128
        c.data.max_images = 64  # several short captions per packed row
        c.data.sources = (dict(format="caption", path="captions.jsonl", image_root="images"),)
    elif stage == "specialist":
        c.model.init = "checkpoint"  # VILA^k's SFT export (the runner sets model.path)
        c.train.trainable = ("^projector/", "^llm/")
        c.optim.lr = 1e-3
        c.optim.end_factor = 0.1
        c.data.seq_len = 128  # one short QA per sample, several per packed row
        c.data.sources = (dict(format="llava", path="shape_qa.json", image_root="images"),)
    else:
        c.model.init = "checkpoint"  # the align stage's export (native: the conv stem)
        c.train.trainable = ("^projector/", "^llm/")
        c.optim.end_factor = 0.1
        c.data.seq_len = 256
        c.data.sources = (dict(format="llava", path="sft.json", image_root="images"),)
    return c
