"""The shared mini base of every recipe's miniature: a from-scratch tiny VLM aligned on captions and SFT'd on easy-vqa
conversations of train images 3000-3999 (the recipes' pools are 0-2999). Built and cached by
`vlmjax.recipes.mini_base.build_base` (the runner sets the data and tokenizer paths of its cache folder).

    python -m vlmjax.recipes.mini_base --cache runs/mini_base --seed 0     # build (or reuse) the base, print its gate

Stages: tower (`mini_base.pretrain_tower`: the tower + a linear head classify each view's shape and colour, the
miniature's stand-in for a pretrained CLIP/SigLIP tower), align (caption pre-training from that tower, everything
trainable: the decoder is fresh) and sft (the QA conversations with a description turn, an "imagine" turn in 1 of 4;
tower frozen). 64 px images, a conv patch stem (`vision.patch_stem="conv"`: 4 stride-2 convolutions to 16 image
tokens, native folders only), a 3x128 tower and decoder, 600 tower + 300 align + 400 SFT steps at lr 2e-3, 4 dihedral
views per image. Design and measurements: bench/mini_base_study.py and README "A mini base that sees".
"""

from vlmjax.train.defaults import base

STAGES = ("align", "sft")
VOCAB = 1024


def model_dict():
    return dict(
        llm=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=320, num_layers=3, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                 max_position_embeddings=1024),
        vision=dict(kind="siglip", image_size=64, patch_size=16, hidden_size=128, intermediate_size=384, num_layers=3,
                    num_heads=4, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), patch_stem="conv"),
        projector="mlp2x_gelu", vision_feature_layer=-1, vision_feature_select="full")


def mini_defaults(c):
    """The miniatures' shared training settings (configs/vila/mini.py starts from them too)."""
    c.data.batch_size = 16
    c.data.max_images = 32
    c.data.text = dict(template="auto")
    c.optim.warmup_frac = 0.05
    c.optim.weight_decay = 0.0
    c.optim.b2 = 0.95
    c.train.save_every = 100
    c.train.keep_checkpoints = 1
    return c


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"configs/mini/base.py:{stage}: stages are {STAGES}")
    c = mini_defaults(base())
    c.data.seq_len = 256
    c.train.trainable = (".*",)
    c.optim.lr = 2e-3
    if stage == "align":
        c.model.init = "random"
        c.model.vlm = model_dict()
        c.train.steps = 300
        c.optim.schedule = "constant"
        c.data.seq_len = 128
        c.data.max_images = 160  # ~5 captions per row
        c.data.sources = (dict(format="caption", path="base_captions.jsonl", image_root="images"),)
    else:
        c.model.init = "checkpoint"  # the previous stage's export: native (the conv stem) or HF
        # the tower stays as aligned: SFT at lr 2e-3 blurred its shape features (linear probe 0.945 -> 0.870) and
        # shape questions came out at 0.49; frozen, 0.94 (README "A mini base that sees")
        c.train.trainable = ("^projector/", "^llm/")
        # 400: at 250 steps the decoder describes colours right (0.985) but answers colour questions at 0.667;
        # at 400, 0.962 (bench/mini_base_study.py arms base / sft250, README "A mini base that sees")
        c.train.steps = 400
        c.optim.end_factor = 0.1
        c.data.sources = (dict(format="llava", path="base_sft.json", image_root="images"),)
    return c
