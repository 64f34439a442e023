"""The STIC miniature (configs/stic/mini.py) on the pretrained SmolLM2-135M-Instruct (offline GGUF) instead of the
from-scratch decoder, for users with more time: ~100x the compute per step of the miniature (not measured end to
end on the 2-core machine; `--quick` is).

    python -m vlmjax.recipes.stic.miniature --llm smollm2 --workdir runs/stic_smollm2

Same stages, data and STIC settings; what changes is what a pretrained LLM needs: the tower (64 px, fresh) and the
projector are aligned with the LLM frozen (LLaVA's stage 1, plus the tower since ours starts random), SFT then
trains everything at a fine-tuning learning rate, and the text uses SmolLM2's own tokenizer and ChatML template.
"""

from vlmjax.train.config_io import sibling_config

_mini = sibling_config(__file__, "mini.py")

STAGES = _mini.STAGES


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"configs/stic/mini_smollm2.py:{stage}: stages are {STAGES}")
    c = _mini.get_config(stage)
    c.data.batch_size = 8
    if stage == "align":
        # the linear patchify (an HF-exportable tower, as before the shared base moved to a pretrained conv stem)
        tower = {**_mini.model_dict()["vision"], "patch_stem": "linear"}
        c.model.init = "assemble"
        c.model.llm = "smollm2"
        with c.model.ignore_type():  # a fresh tower's config (a dict) instead of an HF folder path
            c.model.vision = tower
        c.model.vision_feature_layer = -1
        c.model.tokenizer = "smollm2"
        c.train.trainable = ("^vision/", "^projector/")
        c.optim.lr = 1e-3
        c.data.max_images = 80
    elif stage == "sft":
        c.optim.lr = 5e-5
    elif stage == "stage2":
        c.optim.lr = 1e-4
    return c
