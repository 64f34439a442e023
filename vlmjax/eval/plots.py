"""Figures for miniature reports (PNG, matplotlib): grouped bars with sd error bars, training loss curves from
the trainer's metrics.jsonl, and image grids with captions.

matplotlib is optional (`pip install 'vlmjax[plot]'`) and imported only here, when a figure is made. Figures are
built on matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg), never pyplot: no window opens and the
caller's pyplot backend is left alone. Each `*_figure` returns the Figure (to inspect or restyle); `bar_chart`,
`loss_curves` and `image_grid` save it and return the path written.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Mapping, Sequence

import numpy as np


def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("vlmjax.eval.plots needs matplotlib: pip install 'vlmjax[plot]'") from e
    return Figure(**kw)


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def bar_figure(agg: Mapping[str, Mapping], metrics: Sequence[str], *, title: str | None = None,
               labels: Mapping[str, str] | None = None, baseline: str | None = None, alpha: float = 0.05):
    """Grouped bars: one group per metric, one bar per arm (its mean), error bars = sample sd (none for 1 seed);
    the legend gives each arm's seed count. agg: `report.aggregate`'s {arm: {metric: Stat}}. A metric an arm
    lacks is left out of that arm's bars (NaN height). With `baseline`, a '*' above a bar marks a difference to
    the baseline arm's bar that exceeds the run-to-run spread (`report.exceeds_spread`, as the markdown table)."""
    from vlmjax.eval.report import exceeds_spread

    labels = labels or {}
    if baseline is not None and baseline not in agg:
        raise KeyError(f"baseline arm {baseline!r} not in {list(agg)}")
    arms = list(agg)
    if not arms or not metrics:
        raise ValueError(f"bar_figure needs arms and metrics (got {arms}, {list(metrics)})")
    fig = _figure(figsize=(max(4.0, 0.6 * len(metrics) * len(arms) + 1.0) + 2.0, 3.6), dpi=100)  # + legend
    ax = fig.add_subplot()
    x = np.arange(len(metrics))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        stats = [agg[arm].get(m) for m in metrics]
        means = [np.nan if s is None else s.mean for s in stats]
        sds = [np.nan if s is None or s.sd is None else s.sd for s in stats]  # NaN: no error bar drawn
        ns = sorted({s.n for s in stats if s is not None})
        seeds = "/".join(map(str, ns))
        pos = x + (i - (len(arms) - 1) / 2) * width
        ax.bar(pos, means, width, yerr=sds, capsize=3,
               label=f"{labels.get(arm, arm)} (n={seeds} seed{'' if ns == [1] else 's'})")
        for p, s, m in zip(pos, stats, metrics):
            base = agg[baseline].get(m) if baseline is not None and arm != baseline else None
            if s is not None and base is not None and exceeds_spread(s, base, alpha):
                ax.annotate("*", (p, s.mean + (s.sd or 0.0)), ha="center", va="bottom", fontsize=12)
    ax.set_xticks(x, [labels.get(m, m) for m in metrics])
    ax.set_ylabel("mean +- sd over seeds")
    ax.legend(fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),  # outside: never over a bar
              title=f"* beyond the spread vs {labels.get(baseline, baseline)}" if baseline is not None else None)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def bar_chart(agg: Mapping[str, Mapping], metrics: Sequence[str], path, *, title: str | None = None,
              labels: Mapping[str, str] | None = None, baseline: str | None = None) -> str:
    """`bar_figure` saved as a PNG at `path`; returns the path."""
    return _save(bar_figure(agg, metrics, title=title, labels=labels, baseline=baseline), path)


def read_metrics(path, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` from a trainer metrics.jsonl (vlmjax/train/metrics.py: one JSON object per line,
    "step" plus the metrics; eval rows carry "eval/..." keys; a non-finite value is null, plotted as a gap).
    A torn last line (a run still writing) is skipped; a bad line elsewhere raises naming file and line. A step
    logged twice keeps its last row."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file {path}")
    with open(path) as f:
        lines = f.readlines()
    rows, seen = {}, set()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue
            raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
        seen |= set(row)
        if key in row:
            if "step" not in row:
                raise ValueError(f"{path}:{i + 1}: row has {key!r} but no 'step'")
            rows[int(row["step"])] = np.nan if row[key] is None else float(row[key])
    if not rows:
        raise ValueError(f"{path}: no rows with {key!r} (keys seen: {sorted(seen - {'step', 'nonfinite'})})")
    steps = np.array(sorted(rows))
    return steps, np.array([rows[s] for s in steps], dtype=float)


def loss_figure(curves: Mapping[str, str | os.PathLike], *, key: str = "loss", title: str | None = None,
                logy: bool = False):
    """`key` vs step, one line per {label: metrics.jsonl path} (e.g. one per stage or seed)."""
    if not curves:
        raise ValueError("loss_figure needs at least one {label: metrics.jsonl path}")
    fig = _figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot()
    for label, path in curves.items():
        try:
            steps, vals = read_metrics(path, key)
        except (OSError, ValueError) as e:
            raise type(e)(f"curve {label!r}: {e}") from e
        ax.plot(steps, vals, label=str(label), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, str | os.PathLike], path, *, key: str = "loss", title: str | None = None,
                logy: bool = False) -> str:
    """`loss_figure` saved as a PNG at `path`; returns the path."""
    return _save(loss_figure(curves, key=key, title=title, logy=logy), path)


def _image(item, i: int) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        if not os.path.exists(item):
            raise FileNotFoundError(f"image_grid item {i}: no image file {os.fspath(item)}")
        with Image.open(item) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(item)
    if arr.ndim not in (2, 3) or arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ValueError(f"image_grid item {i}: an image array is HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    return arr


def grid_figure(items: Sequence[tuple], *, cols: int = 4, wrap: int = 38, title: str | None = None,
                cell_in: float = 2.4, fontsize: float = 7.0):
    """Images in a grid of `cols` columns, each with its text lines wrapped to `wrap` characters (monospace) underneath
    (e.g. STIC's chosen vs rejected description of one image). items: [(image path or array, [text lines])];
    arrays are HxW (grey) or HxWx3/4, uint8 or floats in [0, 1]."""
    if not items:
        raise ValueError("grid_figure needs at least one (image, [text lines]) item")
    imgs, texts = [], []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"image_grid item {i}: expected (image, [text lines]), got {type(item).__name__}")
        img, lines = item
        if isinstance(lines, str):
            lines = [lines]
        imgs.append(_image(img, i))
        # model output may hold control characters (no glyph in any font): shown as U+FFFD
        lines = ["".join(ch if ch.isprintable() else "\ufffd" for ch in str(line)) for line in lines]
        texts.append("\n".join(w for line in lines for w in (textwrap.wrap(line, wrap) or [""])))
    cols = max(1, min(cols, len(items)))
    rows = -(-len(items) // cols)
    line_in = fontsize * 1.3 / 72  # one text line in inches
    caption_in = [0.1 + line_in * max(t.count("\n") + 1 for t in texts[r * cols:(r + 1) * cols]) for r in range(rows)]
    title_in = 0.4 if title else 0.1
    width, height = cols * cell_in, title_in + sum(cell_in + c for c in caption_in)
    fig = _figure(figsize=(width, height), dpi=100)
    top = height - title_in
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if i >= len(items):
                break
            pad = 0.06 * cell_in
            ax = fig.add_axes([(c * cell_in + pad) / width, (top - cell_in + pad) / height,
                               (cell_in - 2 * pad) / width, (cell_in - 2 * pad) / height])
            ax.imshow(imgs[i], cmap="gray" if imgs[i].ndim == 2 else None, interpolation="nearest")
            ax.set_axis_off()
            fig.text((c * cell_in + pad) / width, (top - cell_in) / height, texts[i], va="top", ha="left",
                     fontsize=fontsize, family="monospace")
        top -= cell_in + caption_in[r]
    if title:
        fig.suptitle(title, y=1 - 0.05 / height, va="top")
    return fig


def image_grid(items: Sequence[tuple], path, *, cols: int = 4, wrap: int = 38, title: str | None = None) -> str:
    """`grid_figure` saved as a PNG at `path`; returns the path."""
    return _save(grid_figure(items, cols=cols, wrap=wrap, title=title), path)
