"""VILA-1.5-8B (Llama-3-8B-Instruct + SigLIP-so400m-patch14-384 + `downsample2x2_mlp`: 2x2 neighbouring tokens
concatenated, 27 x 27 = 729 -> 14 x 14 = 196 image tokens, the odd grid zero-padded; images resized to a square,
not padded): the stages and settings of configs/vila/llama2_7b.py with that model, the `llama3` chat template for SFT.

    VILA_CONFIG=configs/vila/llama3_8b_siglip.py scripts/vila.sh WORKDIR LLM_DIR VISION_DIR
"""

from vlmjax.train.config_io import sibling_config

_base = sibling_config(__file__, "llama2_7b.py")
STAGES = _base.STAGES
WORKDIR = _base.WORKDIR


def get_config(stage: str = "align", *, workdir: str = WORKDIR):
    c = _base.get_config(stage, workdir=workdir, llm="/path/to/Meta-Llama-3-8B-Instruct",
                         vision="/path/to/siglip-so400m-patch14-384", projector="downsample2x2_mlp",
                         sft_template="llama3")
    c.data.image = dict(resize_mode="resize")  # mean/std come from the SigLIP tower's config
    return c
