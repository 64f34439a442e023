"""POINTS model soup: the weight average of SFT runs, uniform or greedy (Wortsman et al., 2022).

`uniform`: the fp32 average of every ingredient (`convert.average`, streamed tensor by tensor).
`greedy`: score every ingredient on a held-out validation task, sort descending (ties keep the given order), start
from the best and add the next ingredient when val(soup + it) >= val(soup); the soup is the uniform average of the
accepted set. Candidate soups are evaluated in memory: one model is loaded once and each candidate's average is
streamed into its parameters (`convert.average.average_into`), never exported per trial. Every evaluated set's
score is cached in `OUT/soup.json` (keyed by the members' folders and a fingerprint of their files, written after
each evaluation), so a rerun or a resumed crash re-evaluates nothing it has; a cache made with another validation
task or metric is refused. `OUT/soup.json` also holds every trial (ingredient, val, accepted, soup members);
the soup is written as the native folder `OUT/model`.

Ingredients must be one model (paths, shapes, dtypes, config, tokenizer: errors name what differs) with whole
weights: a LoRA run is merged at export (train.export_lora='merge') before souping. The public POINTS code only has
uniform averaging (in bf16, integer buffers averaged, all models in memory); none of that is copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

STATE = "soup.json"
MODEL = "model"


@dataclasses.dataclass
class Val:
    """A validation score of an in-memory model: `fn(model, tokenizer) -> float`, higher is better. `name`
    identifies the task and metric in soup.json (cached scores under another name are not reused)."""
    name: str
    fn: Callable


def metric_value(metrics: dict, metric: str) -> float:
    """metrics["accuracy"], or a dotted path into nested results ("by_kind.shape.accuracy")."""
    node = metrics
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise KeyError(f"metric {metric!r} is not in the results of task {metrics.get('task')!r} "
                           f"(numeric: {numeric}; nested: by_kind.KIND.METRIC)")
        node = node[part]
    return float(node)


def task_val(task, metric: str = "accuracy", *, batch_size: int = 16) -> Val:
    """Val of an eval task (`vlmjax.eval.tasks`) scored by `vlmjax.eval.evaluate` in memory, read at `metric`."""
    from vlmjax.eval.runner import evaluate

    digest = hashlib.sha1(json.dumps([(s.id, s.question, s.answers, str(s.image)) for s in task.samples])
                          .encode()).hexdigest()[:12]

    def fn(model, tokenizer):
        return metric_value(evaluate(model, tokenizer, task, batch_size=batch_size, progress=False), metric)

    return Val(f"{task.name}:{metric}:n={len(task.samples)}:{digest}", fn)


def check_ingredients(folders: Sequence, least: int = 1) -> list[str]:
    """Existing, distinct model folders with whole weights (an adapter-only folder is an error naming it)."""
    from vlmjax.convert.native import folder_kind

    folders = [os.fspath(f) for f in folders]
    if len(folders) < least:
        raise ValueError(f"a soup needs at least {least} ingredient folders, got {len(folders)}")
    seen = {}
    for f in folders:
        key = os.path.realpath(f)
        if key in seen:
            raise ValueError(f"ingredient {f} is given twice (also as {seen[key]})")
        seen[key] = f
        if (Path(f) / "adapter_config.json").is_file() and not (Path(f) / "config.json").is_file() \
                and not (Path(f) / "vlmjax_config.json").is_file():
            raise ValueError(f"ingredient {f} is a LoRA adapter only; soups average whole weights: export the run "
                             "merged (train.export_lora='merge') and soup that folder")
        folder_kind(f)  # neither native nor HF: an error naming the folder
    return folders


def fingerprint(folder) -> str:
    """Config file content + name/size/mtime of every weight file: a re-exported ingredient is a new one."""
    folder = Path(folder)
    h = hashlib.sha1()
    for name in ("vlmjax_config.json", "config.json"):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _writer() -> bool:
    """Under jax.distributed every process evaluates the same soups (SPMD); process 0 alone writes files."""
    import jax

    return jax.process_index() == 0


def _atomic_json(path: Path, obj: dict) -> None:
    if not _writer():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def uniform(folders: Sequence, out_dir) -> dict:
    """The uniform average of all ingredients -> OUT/model; OUT/soup.json records the members."""
    from vlmjax.convert.average import average_folders

    folders = check_ingredients(folders, least=2)
    out_dir = Path(out_dir)
    if _writer():
        average_folders(folders, out_dir / MODEL)
    record = {"method": "uniform", "members": folders, "model": str(out_dir / MODEL)}
    _atomic_json(out_dir / STATE, record)
    return record


class _Cache:
    """Scores of evaluated ingredient sets in soup.json, keyed by members' real paths and fingerprints."""

    def __init__(self, path: Path, val_name: str):
        self.path, self.val_name, self.evaluated = path, val_name, {}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("method") != "greedy":
                raise ValueError(f"{path} holds a {old.get('method')!r} soup, not a greedy one; use another out dir")
            if old.get("val") != val_name:
                raise ValueError(f"{path} was scored with val {old.get('val')!r}, now {val_name!r}: cached scores "
                                 "would mix tasks; use another out dir")
            self.evaluated = dict(old.get("evaluated", {}))

    def save(self, extra: dict | None = None) -> None:
        _atomic_json(self.path, {"method": "greedy", "val": self.val_name, **(extra or {}),
                                 "evaluated": self.evaluated})


def greedy(folders: Sequence, out_dir, val: Val, *, dtype: str = "float32", log=print) -> dict:
    """Greedy soup of `folders` by `val` -> OUT/model + OUT/soup.json; returns the soup.json record."""
    from vlmjax.convert.average import average_into, open_sources, write_average
    from vlmjax.convert.native import load_folder

    folders = check_ingredients(folders)
    sources = open_sources(folders)  # one model and tokenizer, checked before anything is evaluated
    out_dir = Path(out_dir)
    keys = [f"{os.path.realpath(f)}@{fingerprint(f)}" for f in folders]
    cache = _Cache(out_dir / STATE, val.name)
    loaded = []  # [model, tokenizer] once a set is not in the cache

    def score(members: list[int]) -> tuple[float, bool]:
        members = sorted(members)  # one summation order per set
        key = json.dumps([keys[i] for i in members])
        if key in cache.evaluated:
            return cache.evaluated[key]["val"], True
        if not loaded:
            model, _cfg, tok = load_folder(folders[members[0]], dtype=dtype, param_dtype=dtype)
            loaded.extend([model, tok])
        average_into(loaded[0], [sources[i] for i in members])
        v = float(val.fn(loaded[0], loaded[1]))
        if not math.isfinite(v):
            raise ValueError(f"val {val.name} of soup {[folders[i] for i in members]} is {v}")
        cache.evaluated[key] = {"members": [folders[i] for i in members], "val": v}
        cache.save()
        return v, False

    trials, singles = [], []
    for i, f in enumerate(folders):
        v, cached = score([i])
        singles.append(v)
        trials.append({"stage": "ingredient", "ingredient": f, "val": v, "members": [f], "cached": cached})
        log(f"soup: ingredient {f}: val {v:.4f}" + (" (cached)" if cached else ""))
    order = sorted(range(len(folders)), key=lambda i: -singles[i])  # stable: ties keep the given order
    soup, best = [order[0]], singles[order[0]]
    trials.append({"stage": "greedy", "ingredient": folders[order[0]], "val": best, "soup_val": None,
                   "accepted": True, "members": [folders[order[0]]], "cached": trials[order[0]]["cached"]})
    for i in order[1:]:
        cand = soup + [i]
        v, cached = score(cand)
        accepted = v >= best
        trials.append({"stage": "greedy", "ingredient": folders[i], "val": v, "soup_val": best, "accepted": accepted,
                       "members": [folders[j] for j in cand], "cached": cached})
        log(f"soup: + {folders[i]}: val {v:.4f} vs soup {best:.4f} -> {'accepted' if accepted else 'rejected'}")
        if accepted:
            soup, best = cand, v
    members = sorted(soup)
    if _writer():
        write_average([sources[i] for i in members], out_dir / MODEL)
    record = {"order": [folders[i] for i in order], "trials": trials, "members": [folders[i] for i in members],
              "soup_val": best, "best_single": {"ingredient": folders[order[0]], "val": singles[order[0]]},
              "model": str(out_dir / MODEL)}
    cache.save(record)
    return {"method": "greedy", "val": val.name, **record}
