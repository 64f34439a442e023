"""vlmjax: train LLaVA-style vision-language models in JAX/Flax NNX."""

__version__ = "0.1.0"
