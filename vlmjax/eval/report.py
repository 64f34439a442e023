"""Report a miniature like a paper: mean +- sd over seeds, which differences exceed the run-to-run spread, and a
results JSON that says what ran where (config, seeds, commit, host, wall-clock).

    per_seed = {"base": [{"accuracy": 0.77}, {"accuracy": 0.78}, {"accuracy": 0.76}], "stic": [...]}
    agg = aggregate(per_seed)                      # {arm: {metric: Stat(mean, sd, n)}}
    print(markdown_table(agg, ["accuracy"], baseline="base"))
    write_results("runs/x/results.json", {"config": cfg, "seeds": [0, 1, 2], "per_seed": per_seed})

The spread rule (`exceeds_spread`): Welch's two-sided t-test at 5% on the per-seed values (unequal variances,
Welch-Satterthwaite degrees of freedom). With 3 seeds per arm the critical |t| is ~2.78 (df 4) rather than the
normal 1.96, so a difference "exceeds the spread" only when it is large against the seeds' own scatter. Fewer than
2 seeds on either side: no spread to compare against, so never marked. scipy is a dependency of jax.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import numbers
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence


class Stat(NamedTuple):
    """One metric of one arm over seeds; sd is the sample sd (ddof=1), None for a single seed."""
    mean: float
    sd: float | None
    n: int


def mean_sd(values: Sequence[float]) -> Stat:
    """Mean and sample sd (ddof=1: seeds are a sample of the runs one could have made); sd None for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd of no values")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"mean_sd: non-finite values {bad} in {vals}")
    n = len(vals)
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return Stat(mean, sd, n)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars register as numbers.Real


def aggregate(per_seed: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, Stat]]:
    """{arm: [{metric: value} per seed]} -> {arm: {metric: Stat(mean, sd, n)}}.

    Numeric values are aggregated; other values (strings, lists, dicts, bools) are ignored. Every seed of an arm
    must report the same numeric metrics (a table compares the same seeds), and each value must be finite: else a
    ValueError names the arm, seed index and metric."""
    out = {}
    for arm, seeds in per_seed.items():
        if isinstance(seeds, Mapping) or not len(seeds):
            raise ValueError(f"arm {arm!r}: expected a non-empty list of per-seed metric dicts, got {type(seeds).__name__}")
        keys = [{k for k, v in s.items() if _is_number(v) or v is None} for s in seeds]
        for i, k in enumerate(keys):
            if k != keys[0]:
                raise ValueError(f"arm {arm!r}: seed {i} reports metrics {sorted(k)}, seed 0 reports {sorted(keys[0])}")
        stats = {}
        for metric in [k for k in seeds[0] if k in keys[0]]:
            for i, s in enumerate(seeds):
                if s[metric] is None or not math.isfinite(float(s[metric])):
                    raise ValueError(f"arm {arm!r}: seed {i}: metric {metric!r} is not finite ({s[metric]})")
            stats[metric] = mean_sd([s[metric] for s in seeds])
        out[arm] = stats
    return out


def _stat(x) -> Stat:
    return x if isinstance(x, Stat) else mean_sd(x)


def welch(a, b) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) vs mean(b): (t, df, two-sided p). a, b: a Stat, or the per-seed values.
    Both sds zero: t = +-inf and p = 0 when the means differ (nothing scatters, so any difference is real), else
    t = 0, p = 1. Raises ValueError when either side has fewer than 2 seeds."""
    from scipy import stats

    a, b = _stat(a), _stat(b)
    if a.n < 2 or b.n < 2:
        raise ValueError(f"Welch's t-test needs >= 2 seeds per side (got {a.n} and {b.n})")
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    diff = a.mean - b.mean
    if va + vb == 0:
        return (math.copysign(math.inf, diff), math.inf, 0.0) if diff else (0.0, math.inf, 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    return t, df, float(2 * stats.t.sf(abs(t), df))


def exceeds_spread(a, b, alpha: float = 0.05) -> bool:
    """Does mean(a) - mean(b) exceed the run-to-run spread? Welch's two-sided t-test at level `alpha` (module
    docstring). a, b: a Stat (from `aggregate`) or a sequence of per-seed values. Fewer than 2 seeds on either
    side: False (no spread measured, so no claim)."""
    a, b = _stat(a), _stat(b)
    if a.n < 2 or b.n < 2:
        return False
    return welch(a, b)[2] < alpha


def format_stat(s: Stat, digits: int = 3) -> str:
    """'0.812 +- 0.011', or '0.812 (1 seed)'."""
    if s.sd is None:
        return f"{s.mean:.{digits}f} (1 seed)"
    return f"{s.mean:.{digits}f} +- {s.sd:.{digits}f}"


def markdown_table(agg: Mapping[str, Mapping[str, Stat]], metrics: Sequence[str], baseline: str | None = None, *,
                   labels: Mapping[str, str] | None = None, digits: int = 3, alpha: float = 0.05,
                   marker: str = "*") -> str:
    """A markdown table, one row per arm (in `agg`'s order): seeds, then 'mean +- sd' per metric; with `baseline`,
    `marker` follows each cell whose difference to the baseline arm's exceeds the spread (`exceeds_spread`).
    A legend line follows the table. A metric an arm lacks is '-'. labels: {arm: row name}."""
    if baseline is not None and baseline not in agg:
        raise KeyError(f"baseline arm {baseline!r} not in {list(agg)}")
    labels = labels or {}
    names = [labels.get(m, m) for m in metrics]
    lines = ["| arm | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm, stats in agg.items():
        ns = sorted({s.n for s in stats.values()})
        cells = [labels.get(arm, arm), "/".join(map(str, ns)) or "-"]
        for m in metrics:
            if m not in stats:
                cells.append("-")
                continue
            cell = format_stat(stats[m], digits)
            base = agg[baseline].get(m) if baseline is not None and arm != baseline else None
            if base is not None and exceeds_spread(stats[m], base, alpha):
                cell += f" {marker}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    legend = "mean +- sample sd (ddof=1) over seeds"
    if baseline is not None:
        legend += (f"; {marker} = differs from {labels.get(baseline, baseline)} by more than the run-to-run spread "
                   f"(Welch's t-test, two-sided, p < {alpha:g}; arms with 1 seed are never marked)")
    return "\n".join(lines) + "\n\n" + legend + "."


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _process_start() -> float | None:
    """Epoch seconds this process started (Linux: /proc/self/stat's start time, counted on the boot-time clock,
    compared with that clock now; /proc/stat's btime can be off by minutes on a VM), else None."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_meta(started: float | None = None, *, repo: str | os.PathLike | None = None, **extra) -> dict:
    """What ran where: commit (HEAD of `repo`, default the checkout vlmjax is imported from; None outside a git
    repository) and whether the checkout differs from it (changed or untracked, not ignored, files), host, versions, JAX backend and devices, start / finish
    times (UTC ISO), wall seconds since `started` (epoch seconds, default this process's start) and this process's
    CPU seconds (all threads; on a shared host the comparable figure). `extra` keys are added as given."""
    finished = time.time()
    started = _process_start() if started is None else float(started)
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    head = _git(repo, "rev-parse", "HEAD")
    dirty = None if head is None else bool(_git(repo, "status", "--porcelain"))
    import jax

    devices = jax.devices()
    meta = {
        "commit": head, "dirty": dirty,
        "host": {"node": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": _version("flax"),
                     "vlmjax": _version("vlmjax")},
        "backend": jax.default_backend(), "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "device_count": len(devices), "argv": list(sys.argv),
        "started": _iso(started), "finished": _iso(finished),
        "wall_s": None if started is None else round(finished - started, 3),
        "cpu_s": round(time.process_time(), 3),
    }
    meta.update(extra)
    return meta


def _jsonable(x, path: str, nonfinite: list[str]):
    """Plain JSON values: ConfigDicts, Stats ({mean, sd, n}), numpy scalars/arrays, Paths and tuples converted;
    NaN/inf -> None, their key paths collected (strict JSON, as metrics.jsonl does)."""
    if hasattr(x, "to_dict") and callable(x.to_dict):  # ml_collections.ConfigDict
        x = x.to_dict()
    if isinstance(x, Stat):
        x = x._asdict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{path}/{k}" if path else str(k), nonfinite) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{path}/{i}", nonfinite) for i, v in enumerate(x)]
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy / jax arrays and scalars
        return _jsonable(x.tolist(), path, nonfinite)
    if isinstance(x, float) and not math.isfinite(x):
        nonfinite.append(path)
        return None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"write_results: {path or 'payload'} is a {type(x).__name__}, not JSON-serialisable")


def cached_json(path: str | os.PathLike, compute) -> dict:
    """The JSON in `path` when it exists, else compute() written there atomically (`generate.jsonl.write_json_atomic`:
    temporary file, fsync, rename): how a miniature's evaluations are cached, so a rerun reads them back instead of
    evaluating again."""
    from vlmjax.generate.jsonl import write_json_atomic

    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    res = compute()
    write_json_atomic(path, res, indent=None)
    return res


def write_results(path: str | os.PathLike, payload: Mapping, *, meta: Mapping | None = None) -> str:
    """Write `payload` plus "meta" (given, the payload's own, or `run_meta()` now) as indented JSON, atomically
    (`generate.jsonl.write_json_atomic`: a crash leaves the old file or the new one). NaN/inf become null and their key
    paths are listed under "nonfinite". Returns the path."""
    path = os.fspath(path)
    body = dict(payload)
    body["meta"] = meta if meta is not None else body.get("meta") or run_meta()
    nonfinite: list[str] = []
    body = _jsonable(body, "", nonfinite)
    if nonfinite:
        body["nonfinite"] = nonfinite
    from vlmjax.generate.jsonl import write_json_atomic

    write_json_atomic(path, body, indent=1, allow_nan=False)
    return path
