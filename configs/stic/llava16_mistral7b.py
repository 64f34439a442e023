"""STIC on LLaVA-1.6-Mistral-7B (llava-hf/llava-v1.6-mistral-7b-hf, imported from HF), the model of the paper's
headline numbers (shared/recipes/stic.md): the LLaVA-1.5 settings of configs/stic/llava15_7b.py, plus what 1.6 is.

    STIC_CONFIG=configs/stic/llava16_mistral7b.py STIC_TEMPLATE=mistral_instruct \
        scripts/stic.sh MODEL_DIR UNLABELED_IMAGES SFT_JSON SFT_IMAGES WORKDIR          # all stages
    python -m vlmjax.train --config configs/stic/llava16_mistral7b.py:stage1 --workdir W/stage1 \\
        --config.model.path=MODEL_DIR --config.data.sources="(dict(format='preference', path='W/pairs.jsonl', image_root='IMAGES'),)"

What differs from 1.5: the checkpoint is a LlavaNextForConditionalGeneration, so the model config carries
image_layout="llava_next" and the pinpoints, and the data pipeline follows it (anyres tiles: a stretched global
view + up to 4 grid tiles per image, the grid cropped back to the image's aspect ratio, a newline token per feature
row: up to 576 + 48 x 49 = 2,928 tokens per image, hence seq_len 4096); the Mistral [INST] template; up to 5 tiles
per image, so 10 image slots per DPO pair. Trained: the LoRA adapter and the projector (image_newline stays
frozen, as LLaVA's LoRA recipe leaves it).
"""

from vlmjax.train.config_io import sibling_config

_llava15 = sibling_config(__file__, "llava15_7b.py")

STAGES = _llava15.STAGES


def get_config(stage: str = "stage1"):
    if stage not in STAGES:
        raise ValueError(f"configs/stic/llava16_mistral7b.py:{stage}: stages are {STAGES}")
    c = _llava15.get_config(stage)
    c.model.path = "/path/to/llava-v1.6-mistral-7b-hf"
    c.data.text = dict(template="mistral_instruct")
    c.data.seq_len = 4096
    c.data.max_images = 10 if stage == "stage1" else 5
    return c
