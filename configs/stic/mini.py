"""STIC reproduced in miniature on easy-vqa (`make demo`): a from-scratch tiny VLM, one config per stage.

    python -m vlmjax.recipes.stic.miniature              # data, all stages, evaluations, export (what make demo runs)
    python -m vlmjax.train --config configs/stic/mini.py:sft --workdir runs/stic_mini/sft   # one stage by hand

Stages (the argument after the colon): align (caption pre-training, plain template), sft (easy-vqa
conversations + descriptions), stage1 (STIC DPO with alpha x NLL, LoRA + projector), stage2 (description-infused
SFT continuing the stage-1 adapter). Paths point into runs/stic_mini, where the miniature's data step writes the
data and the tokenizer; the runner sets them for its own workdir. The model is small enough to learn easy-vqa's
shapes and colours in minutes on 2 CPU cores: a 3-layer 128-wide decoder over a 1024-entry BPE vocabulary fitted
to the corpus, a 3-layer SigLIP-style tower on 64 px images (16 patches) and an mlp2x_gelu projector. LoRA lr and
step counts are scaled from the paper's (1e-7 LoRA / 2e-5 projector over 750 steps at 7B) for a 1.3M-parameter model
and ~50 steps; the structure (what trains, which loss, which reference) is the paper's.
"""

from vlmjax.train.config_io import sibling_config
from vlmjax.train.defaults import LLAMA_LINEAR, base

_base = sibling_config(__file__, "../mini/base.py")

STAGES = ("align", "sft", "stage1", "stage2")
ROOT = "runs/stic_mini"
VOCAB = 1024


def model_dict():
    """The shared mini base's model (configs/mini/base.py), so the STIC miniature and the base the other recipes
    use cannot drift apart."""
    return _base.model_dict()


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"configs/stic/mini.py:{stage}: stages are {STAGES}")
    c = base()
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.max_images = 32
    c.data.text = dict(template="auto")
    c.optim.warmup_frac = 0.05
    c.optim.weight_decay = 0.0
    c.optim.b2 = 0.95
    c.train.save_every = 100
    c.train.keep_checkpoints = 1
    c.export_dir = f"{ROOT}/{stage}/export"
    images = f"{ROOT}/data/images"
    if stage == "align":
        c.model.init = "random"
        c.model.tokenizer = f"{ROOT}/tokenizer"
        c.model.vlm = model_dict()
        c.train.trainable = (".*",)  # everything is fresh here; with a pretrained LLM: ("^projector/",)
        c.train.steps = 300
        c.optim.lr = 2e-3
        c.optim.schedule = "constant"  # grounding (loss below the text prior) only starts after ~150 steps
        c.data.seq_len = 128
        c.data.max_images = 160  # ~5 captions per row
        c.data.sources = (dict(format="caption", path=f"{ROOT}/data/base_captions.jsonl", image_root=images),)
    elif stage == "sft":
        c.model.init = "checkpoint"  # native (conv stem) or HF export of the previous stage
        c.model.path = f"{ROOT}/align/export"
        c.train.trainable = (".*",)
        c.train.steps = 250
        c.optim.lr = 2e-3
        c.optim.end_factor = 0.1
        c.data.sources = (dict(format="llava", path=f"{ROOT}/data/base_sft.json", image_root=images),)
    else:
        c.model.init = "checkpoint"  # native (conv stem) or HF export of the previous stage
        c.model.path = f"{ROOT}/sft/export"  # the base model; stage 2 starts from it plus the stage-1 adapter
        c.lora.update(rank=16, alpha=32.0, dropout=0.05, targets=LLAMA_LINEAR)
        c.train.trainable = ("lora_", "^projector/")
        c.train.save_trainable = True
        c.optim.groups = (dict(pattern="^projector/", lr=2e-4),)
        if stage == "stage1":
            c.train.objective = "dpo"
            c.train.steps = 50
            # the paper's projector lr; LoRA 1e-4 (at 5e-4 LoRA / 2e-4 projector, stage 1 alone cut colour-question
            # accuracy from 0.56 to 0.10 in a preview run: the adapter drifts towards describing everything)
            c.optim.lr = 1e-4
            c.optim.groups = (dict(pattern="^projector/", lr=2e-5),)
            c.dpo.update(loss="stic", beta=0.1, alpha=1.0 / 1024, reference="lora_off")
            c.data.pack = False
            c.data.batch_size = 8
            c.data.sources = (dict(format="preference", path=f"{ROOT}/stic/pairs.jsonl", image_root=images),)
        else:
            c.model.load_params = f"{ROOT}/stage1/trainable.safetensors"
            c.train.steps = 60
            c.optim.lr = 5e-4
            c.data.sources = (dict(format="llava", path=f"{ROOT}/stic/infused.json", image_root=images),)
    return c
