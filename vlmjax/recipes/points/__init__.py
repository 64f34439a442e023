"""POINTS (Liu et al., 2024; spec shared/recipes/points.md): perplexity filtering of pre-training captions
(`filter`), the CATTY tiling rule (`vlmjax.data.tiling`, catty_rule="points") and the Yi-9B configs
(configs/points/yi9b.py) and model soup, uniform or greedy (`soup`)."""
