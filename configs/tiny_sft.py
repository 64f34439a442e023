"""A tiny random VLM with the SmolLM2 tokenizer: tests and smoke runs (seconds per step on CPU)."""

from vlmjax.train.defaults import base


def get_config():
    c = base()
    c.model.vlm = dict(
        llm=dict(vocab_size=49216, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=True, eos_token_id=2, bos_token_id=1),
        vision=dict(kind="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
        projector="mlp2x_gelu", vision_feature_select="full")
    c.train.steps = 20
    c.train.save_every = 10
    c.optim.lr = 3e-3
    c.data.batch_size = 2
    c.data.seq_len = 96
    c.data.max_images = 4
    return c
