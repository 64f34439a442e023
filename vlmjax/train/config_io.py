"""The one way a training config is read: `FILE[:ARG]` -> ConfigDict, dotted `key=value` overrides, validation.

The CLI, the benches and the tests all go through here, so a key that can be set in a config file can be set
from the command line with the same checks. Config files may replace a whole section (`c.data.text =
dict(template=...)`); `load_config` fills every key the file left out from `defaults.base()`, so all of
`data.text.*`, `data.image.*`, `data.bad_samples.*` stay settable. Override values are Python literals, plus
`dict(k=v, ...)` calls (so `--config.data.sources="(dict(format='llava', path='x.json'),)"` works); a value that
is not a literal is taken as a string when the key holds a string.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import typing
from collections.abc import Iterable, Mapping

from ml_collections import ConfigDict, FieldReference

from vlmjax.train import defaults


def load_module(file: str):
    """Import a config file (config files are not a package)."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"config file {file} does not exist")
    name = "_vlmjax_config_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} defines no get_config()")
    return module


def sibling_config(config_file: str, name: str):
    """The config module `name` next to `config_file` (config files are not a package; a variant config builds
    on its base this way: `_base = sibling_config(__file__, "mini.py")`)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_config(spec: str | os.PathLike, overrides: Mapping[str, object] | Iterable[str] = (), *,
                validate_config: bool = True) -> ConfigDict:
    """`configs/x.py` or `configs/x.py:stage` -> the config with base() keys filled in, `overrides` applied
    (a mapping of dotted keys to values, or `key=value` strings as on the command line) and validated."""
    file, _, arg = str(spec).partition(":")
    module = load_module(file)
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except TypeError as e:
        raise ValueError(f"{file}: get_config({arg!r}) failed: {e}") from e
    fill_defaults(cfg)
    apply_overrides(cfg, overrides)
    if validate_config:
        validate(cfg)
    return cfg


def fill_defaults(cfg: ConfigDict, like: ConfigDict | None = None) -> ConfigDict:
    """Add every key of `like` (default: defaults.base()) that `cfg` lacks, recursively. An `eval_data` section
    gets the data defaults."""
    top = like is None
    like = defaults.base() if top else like
    for key in like.keys():
        if key not in cfg:
            cfg[key] = like._fields[key]  # FieldReferences keep their type (placeholders stay typed)
        elif isinstance(cfg[key], ConfigDict) and isinstance(like[key], ConfigDict):
            fill_defaults(cfg[key], like[key])
    if top and isinstance(cfg.get("eval_data"), ConfigDict):
        fill_defaults(cfg.eval_data, like.data)
    return cfg


# ---- override values


def _literal(node: ast.AST):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_value(text: str):
    """A command-line value: a Python literal or `dict(...)` call; anything else is the string itself."""
    try:
        return _literal(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        return text


def _coerce(key: str, value, current, typ, raw: str | None):
    """Fit `value` to the field's type (ints for floats, lists for tuples, raw text for strings)."""
    if typ is None or typ is type(None):
        return value
    if isinstance(value, typ):
        return value
    if typ is str and raw is not None:
        return raw
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is tuple and isinstance(value, list):
        return tuple(value)
    if typ is tuple and isinstance(value, dict):  # one source given without the tuple
        return (value,)
    if typ is ConfigDict and isinstance(value, dict):
        return value
    raise ValueError(f"config key {key}: {value!r} is a {type(value).__name__}, the key holds a {typ.__name__}"
                     f" (now {current!r})")


def all_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k in cfg.keys():
        out.append(prefix + k)
        if isinstance(cfg[k], ConfigDict):
            out += all_keys(cfg[k], prefix + k + ".")
    return out


def apply_overrides(cfg: ConfigDict, overrides: Mapping[str, object] | Iterable[str]) -> ConfigDict:
    """Set dotted keys. Strings `key=value` are parsed with `parse_value`; mapping values are used as given.
    An unknown key is an error listing the closest valid keys."""
    items = []
    if isinstance(overrides, Mapping):
        items = [(k, v, None) for k, v in overrides.items()]
    else:
        for o in overrides:
            if "=" not in o:
                raise ValueError(f"override {o!r}: use key=value")
            k, raw = o.split("=", 1)
            items.append((k, parse_value(raw), raw))
    for key, value, raw in items:
        node, parts = cfg, key.split(".")
        for i, p in enumerate(parts):
            if not isinstance(node, ConfigDict) or p not in node:
                valid = all_keys(cfg)
                close = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
                raise KeyError(f"unknown config key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                               + "; valid keys:\n  " + "\n  ".join(sorted(valid)))
            if i < len(parts) - 1:
                node = node[p]
        leaf = parts[-1]
        current = node[leaf]
        typ = node.get_type(leaf) if isinstance(node._fields[leaf], FieldReference) else type(current)
        if current is None and not isinstance(node._fields[leaf], FieldReference):
            typ = None  # an untyped None (e.g. eval_data): anything goes
        value = _coerce(key, value, current, typ, raw)
        if isinstance(current, ConfigDict) and isinstance(value, dict):
            apply_overrides(current, {k: v for k, v in value.items()})
        else:
            node[leaf] = value
    return cfg


# ---- validation


def _literal_values(cls, field: str) -> tuple:
    hint = typing.get_type_hints(cls)[field]
    return typing.get_args(hint)


def enums() -> dict[str, tuple]:
    """Keys with a fixed set of values -> the values (taken from the code that consumes them where it can)."""
    from vlmjax.data import BadSamplePolicy, SourceSpec, TextSpec
    from vlmjax.data.image import ImageSpec
    from vlmjax.losses import PREFERENCE_LOSSES
    from vlmjax.train.export import FORMATS, LORA_MODES
    from vlmjax.train.setup import INITS

    out = {
        "model.init": INITS,
        "model.dtype": ("float32", "bfloat16", "float16"),
        "model.param_dtype": ("float32", "bfloat16", "float16"),
        "model.frozen_param_dtype": ("", "float32", "bfloat16", "float16"),
        "train.export_format": FORMATS,
        "train.export_lora": LORA_MODES,
        "model.remat": ("none", "full", "dots", "dots_no_batch", "everything"),
        "train.objective": ("sft", "dpo"),
        "train.nan_policy": ("stop", "skip"),
        "optim.schedule": ("cosine", "linear", "constant"),
        "loss.reduction": ("token", "sequence"),
        "loss.remat_logits": ("auto", True, False),
        "dpo.loss": tuple(PREFERENCE_LOSSES),
        "dpo.reference": ("lora_off", "frozen_copy"),
        "data.bad_samples.on_bad_sample": _literal_values(BadSamplePolicy, "on_bad_sample"),
    }
    for f in ("loss_on", "truncation"):
        out[f"data.text.{f}"] = _literal_values(TextSpec, f)
    for f in ("resize_mode", "tiling", "resample", "image_layout", "catty_rule"):
        out[f"data.image.{f}"] = _literal_values(ImageSpec, f)
    out["data.sources.format"] = _literal_values(SourceSpec, "format")
    return out


def _get(cfg, key: str):
    node = cfg
    for p in key.split("."):
        if not isinstance(node, (ConfigDict, Mapping)) or p not in node:
            return _MISSING
        node = node[p]
    return node


_MISSING = object()


def validate(cfg: ConfigDict) -> ConfigDict:
    """Every enumerated key holds one of its values, counts are positive, sources name real SourceSpec fields.
    All problems are reported at once."""
    from vlmjax.data import SourceSpec

    problems = []
    table = enums()
    for key, allowed in table.items():
        if key.startswith("data.sources"):
            continue
        for section in ("data", "eval_data") if key.startswith("data.") else ("",):
            k = section + key[4:] if section else key
            v = _get(cfg, k)
            if v is _MISSING or v is None:
                continue
            if v not in allowed:
                problems.append(f"{k}={v!r}: allowed values are {', '.join(map(repr, allowed))}")
    fields = {f.name for f in dataclasses.fields(SourceSpec)}
    for section in ("data", "eval_data"):
        sources = _get(cfg, section + ".sources")
        if sources is _MISSING or sources is None:
            continue
        for i, s in enumerate(sources):
            if not isinstance(s, Mapping):
                problems.append(f"{section}.sources[{i}] is a {type(s).__name__} ({s!r}), not a dict(format=..., "
                                "path=..., image_root=...)")
                continue
            unknown = sorted(set(s) - fields)
            if unknown:
                problems.append(f"{section}.sources[{i}]: unknown field(s) {unknown}; fields are {sorted(fields)}")
            fmt = s.get("format", "llava")
            if fmt not in table["data.sources.format"]:
                problems.append(f"{section}.sources[{i}].format={fmt!r}: allowed values are "
                                f"{', '.join(map(repr, table['data.sources.format']))}")
    for key, lo in (("train.steps", 1), ("train.grad_accum", 1), ("data.batch_size", 1), ("data.seq_len", 2),
                    ("train.max_consecutive_skips", 1), ("train.epochs", 1), ("data.num_epochs", 1),
                    ("train.keep_checkpoints", 1), ("train.save_every", 1), ("optim.warmup_steps", 0)):
        v = _get(cfg, key)
        if v is not _MISSING and v is not None and v < lo:
            problems.append(f"{key}={v!r}: must be >= {lo}")
    frac = _get(cfg, "data.bad_samples.max_skip_fraction")
    if frac is not _MISSING and frac is not None and not 0.0 <= frac <= 1.0:
        problems.append(f"data.bad_samples.max_skip_fraction={frac!r}: must be in [0, 1]")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def describe(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """`key = value` lines for every leaf (for --help)."""
    lines = []
    for k in cfg.keys():
        v = cfg[k]
        if isinstance(v, ConfigDict) and len(v):
            lines += describe(v, prefix + k + ".")
        else:
            ref = cfg._fields[k]
            typ = f"  ({ref.get_type().__name__})" if isinstance(ref, FieldReference) and v is None else ""
            lines.append(f"{prefix}{k} = {v!r}{typ}")
    return lines
