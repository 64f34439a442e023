"""The miniature report kit: statistics against numpy / hand-computed values, the spread rule on hand-computed
Welch tests, the markdown cells, the results JSON, and the figures (valid PNGs whose plotted data is read back)."""

import json
import math
import subprocess

import numpy as np
import pytest
from PIL import Image

from vlmjax.eval import plots, report
from vlmjax.eval.report import Stat


def _t4_two_sided_p(t):
    """Two-sided p of Student's t with 4 degrees of freedom, closed form (CDF = 1/2 + 3/8 x (1 - x^2/12)/..., with
    x = t / sqrt(1 + t^2/4)): independent of scipy."""
    u = 1 + t * t / 4
    cdf = 0.5 + 0.375 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))
    return 2 * (1 - cdf)


def test_mean_sd_matches_numpy_and_handles_one_seed():
    vals = np.random.default_rng(0).normal(0.8, 0.05, size=5)
    s = report.mean_sd(vals)
    assert s.n == 5
    np.testing.assert_allclose([s.mean, s.sd], [vals.mean(), vals.std(ddof=1)], rtol=1e-12)
    one = report.mean_sd([0.75])
    assert one == Stat(0.75, None, 1) and report.format_stat(one) == "0.750 (1 seed)"
    assert report.format_stat(Stat(0.8123, 0.0114, 3)) == "0.812 +- 0.011"
    with pytest.raises(ValueError, match="no values"):
        report.mean_sd([])
    with pytest.raises(ValueError, match="non-finite"):
        report.mean_sd([0.1, float("nan")])


def test_aggregate_per_arm_and_errors_name_arm_seed_metric():
    per_seed = {"base": [{"acc": 0.80, "n": 300, "note": "x"}, {"acc": 0.82, "n": 300, "note": "y"}],
                "stic": [{"acc": np.float32(0.9)}]}
    agg = report.aggregate(per_seed)
    assert set(agg["base"]) == {"acc", "n"}  # strings are not metrics
    assert agg["base"]["acc"].n == 2 and agg["base"]["acc"].mean == pytest.approx(0.81)
    assert agg["base"]["acc"].sd == pytest.approx(np.std([0.80, 0.82], ddof=1))
    assert agg["base"]["n"] == Stat(300.0, 0.0, 2)
    assert agg["stic"]["acc"] == Stat(pytest.approx(0.9), None, 1)
    with pytest.raises(ValueError, match=r"arm 'b': seed 1 reports metrics \['acc', 'f1'\]"):
        report.aggregate({"b": [{"acc": 1.0}, {"acc": 1.0, "f1": 0.5}]})
    with pytest.raises(ValueError, match=r"arm 'b': seed 0: metric 'acc' is not finite"):
        report.aggregate({"b": [{"acc": None}]})


def test_spread_rule_on_hand_computed_welch_tests():
    base = [0.80, 0.81, 0.82]  # mean 0.81, sd 0.01
    # exceeds: means 0.04 apart, se = sqrt(2 x 0.01^2 / 3) = 0.008165, t = 4.899, df = 4, p = 0.0080 < 0.05
    t, df, p = report.welch(base, [0.76, 0.77, 0.78])
    assert t == pytest.approx(0.04 / math.sqrt(2e-4 / 3), rel=1e-9) and t == pytest.approx(4.899, abs=1e-3)
    assert df == pytest.approx(4.0, rel=1e-9)
    assert p == pytest.approx(_t4_two_sided_p(t), rel=1e-9) and p == pytest.approx(0.0080, abs=1e-4)
    assert report.exceeds_spread(base, [0.76, 0.77, 0.78])
    # does not: means 0.01 apart, t = 1.2247, df = 4, p = 0.288 (critical |t| at df 4 is 2.776)
    t, df, p = report.welch(base, [0.79, 0.80, 0.81])
    assert t == pytest.approx(1.2247, abs=1e-4) and p == pytest.approx(_t4_two_sided_p(t), rel=1e-9)
    assert p == pytest.approx(0.288, abs=1e-3)
    assert not report.exceeds_spread(base, [0.79, 0.80, 0.81])
    # unequal sizes and variances: Welch-Satterthwaite df by hand, p against scipy's own Welch test
    a, b = [1.0, 2.0, 3.0], [1.0, 1.5, 2.0, 5.0, 6.0]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 5
    t, df, p = report.welch(report.mean_sd(a), b)  # a Stat or raw values
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 4), rel=1e-12)
    from scipy import stats

    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    # no spread measured: never a claim; zero spread on both sides: any difference is real
    assert not report.exceeds_spread([0.9], [0.1, 0.1, 0.2])
    with pytest.raises(ValueError, match=">= 2 seeds"):
        report.welch([0.9], [0.1, 0.2])
    assert report.exceeds_spread([1.0, 1.0], [2.0, 2.0]) and not report.exceeds_spread([1.0, 1.0], [1.0, 1.0])


def test_markdown_table_cells_markers_and_legend():
    agg = report.aggregate({"base": [{"acc": 0.80}, {"acc": 0.81}, {"acc": 0.82}],
                            "stic": [{"acc": 0.76, "f1": 0.5}, {"acc": 0.77, "f1": 0.6}, {"acc": 0.78, "f1": 0.7}],
                            "close": [{"acc": 0.79}, {"acc": 0.80}, {"acc": 0.81}],
                            "single": [{"acc": 0.1}]})
    table = report.markdown_table(agg, ["acc", "f1"], baseline="base", labels={"acc": "accuracy"})
    lines = table.splitlines()
    assert lines[:6] == ["| arm | seeds | accuracy | f1 |",
                         "|---|---|---|---|",
                         "| base | 3 | 0.810 +- 0.010 | - |",
                         "| stic | 3 | 0.770 +- 0.010 * | 0.600 +- 0.100 |",
                         "| close | 3 | 0.800 +- 0.010 | - |",
                         "| single | 1 | 0.100 (1 seed) | - |"]
    assert lines[6] == "" and "* = differs from base by more than the run-to-run spread" in lines[7]
    assert "Welch" in lines[7] and "p < 0.05" in lines[7]
    assert "*" not in report.markdown_table(agg, ["acc"]).split("\n\n")[0]  # no baseline, no markers
    with pytest.raises(KeyError, match="baseline arm 'nope'"):
        report.markdown_table(agg, ["acc"], baseline="nope")


def test_run_meta_and_atomic_results(tmp_path):
    import time

    import jax
    import ml_collections

    t0 = time.time() - 5.0
    meta = report.run_meta(started=t0, seed=3)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=report.__file__.rsplit("/vlmjax/", 1)[0])
    assert meta["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert meta["seed"] == 3 and meta["versions"]["jax"] == jax.__version__
    assert meta["backend"] == jax.default_backend() and meta["device_count"] == jax.device_count()
    assert 5.0 <= meta["wall_s"] < 600 and meta["host"]["cpu_count"] >= 1 and meta["cpu_s"] > 0
    assert meta["started"] < meta["finished"]
    outside = report.run_meta(repo=tmp_path)
    assert outside["commit"] is None and outside["dirty"] is None and outside["wall_s"] >= 0

    cfg = ml_collections.ConfigDict({"optim": {"lr": 1e-3}, "seeds": (0, 1, 2)})
    path = report.write_results(tmp_path / "r" / "results.json",
                                {"config": cfg, "acc": np.float32(0.5), "curve": np.array([1.0, np.inf]),
                                 "path": tmp_path, "agg": report.aggregate({"a": [{"m": 1.0}]})},
                                meta={"commit": "abc"})
    assert path == str(tmp_path / "r" / "results.json")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["results.json"]  # no temporary file left
    body = json.loads((tmp_path / "r" / "results.json").read_text())
    assert body["config"] == {"optim": {"lr": 1e-3}, "seeds": [0, 1, 2]} and body["acc"] == 0.5
    assert body["curve"] == [1.0, None] and body["nonfinite"] == ["curve/1"] and body["path"] == str(tmp_path)
    assert body["meta"] == {"commit": "abc"} and body["agg"] == {"a": {"m": {"mean": 1.0, "sd": None, "n": 1}}}
    body = json.loads(open(report.write_results(tmp_path / "b.json", {"x": 1})).read())
    assert set(body["meta"]) >= {"commit", "host", "versions", "started", "finished", "wall_s"}
    with pytest.raises(TypeError, match="x/y is a object"):
        report.write_results(tmp_path / "c.json", {"x": {"y": object()}}, meta={})


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
        im.load()
        return im.size


def test_bar_chart_heights_and_error_bars(tmp_path):
    per_seed = {"base": [{"acc": 0.8, "f1": 0.3}, {"acc": 0.82, "f1": 0.35}, {"acc": 0.85, "f1": 0.31}],
                "one": [{"acc": 0.5}]}
    agg = report.aggregate(per_seed)
    fig = plots.bar_figure(agg, ["acc", "f1"], title="t")
    from matplotlib.container import BarContainer

    ax = fig.axes[0]
    base, one = [c for c in ax.containers if isinstance(c, BarContainer)]  # one per arm, in order
    for bar, metric in zip(base.patches, ["acc", "f1"]):
        vals = [s[metric] for s in per_seed["base"]]
        assert bar.get_height() == pytest.approx(np.mean(vals), rel=1e-12)
    segs = base.errorbar.lines[2][0].get_segments()
    for seg, metric in zip(segs, ["acc", "f1"]):
        vals = [s[metric] for s in per_seed["base"]]
        np.testing.assert_allclose(seg[:, 1], [np.mean(vals) - np.std(vals, ddof=1), np.mean(vals) + np.std(vals, ddof=1)])
    assert one.patches[0].get_height() == pytest.approx(0.5) and np.isnan(one.patches[1].get_height())
    assert np.isnan(one.errorbar.lines[2][0].get_segments()[0]).all()  # 1 seed: no error bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base (n=3 seeds)", "one (n=1 seed)"]
    assert not ax.texts  # no baseline, no markers
    # base vs a clearly lower arm: acc exceeds the spread (p = 0.008, as above), f1 does not (p = 0.288)
    agg = report.aggregate({"base": [{"acc": 0.80, "f1": 0.80}, {"acc": 0.81, "f1": 0.81}, {"acc": 0.82, "f1": 0.82}],
                            "low": [{"acc": 0.76, "f1": 0.79}, {"acc": 0.77, "f1": 0.80}, {"acc": 0.78, "f1": 0.81}]})
    ax = plots.bar_figure(agg, ["acc", "f1"], baseline="base").axes[0]
    low = [c for c in ax.containers if isinstance(c, BarContainer)][1].patches[0]
    (star,) = ax.texts
    assert star.get_text() == "*" and star.xy == pytest.approx((low.get_x() + low.get_width() / 2, 0.77 + 0.01))
    out = plots.bar_chart(agg, ["acc", "f1"], tmp_path / "bars.png", baseline="base")
    assert out == str(tmp_path / "bars.png")
    _png(out)


def test_loss_curves_from_the_trainers_metrics_jsonl(tmp_path):
    from vlmjax.train.metrics import MetricsWriter

    curves = {}
    for stage, scale in (("stage1", 3.0), ("stage2", 1.0)):
        w = MetricsWriter(str(tmp_path / stage), total_steps=6)
        for step in range(1, 7):
            loss = float("nan") if (stage, step) == ("stage1", 4) else scale / step
            w.write(step, {"loss": loss, "lr": 1e-3, "grad_norm": 1.0})
            if step % 3 == 0:
                w.write(step, {"loss": scale / step + 0.1}, prefix="eval/")
        w.close()
        curves[stage] = tmp_path / stage / "metrics.jsonl"
    with open(curves["stage2"], "a") as f:
        f.write('{"step": 7, "lo')  # torn last line: a run still writing
    fig = plots.loss_figure(curves)
    l1, l2 = fig.axes[0].get_lines()
    np.testing.assert_array_equal(l1.get_xdata(), np.arange(1, 7))
    np.testing.assert_allclose(l1.get_ydata(), [3.0, 1.5, 1.0, np.nan, 0.6, 0.5])  # null (non-finite): a gap
    np.testing.assert_allclose(l2.get_ydata(), 1.0 / np.arange(1, 7))
    assert [l1.get_label(), l2.get_label()] == ["stage1", "stage2"]
    ev = plots.loss_figure(curves, key="eval/loss").axes[0].get_lines()[0]
    np.testing.assert_allclose(ev.get_xdata(), [3, 6]) and np.testing.assert_allclose(ev.get_ydata(), [1.1, 0.6])
    _png(plots.loss_curves(curves, tmp_path / "loss.png", title="stages"))
    with pytest.raises(ValueError, match=r"curve 'stage1': .*no rows with 'acc' \(keys seen: \['eval/loss', 'grad_norm'"):
        plots.loss_figure({"stage1": curves["stage1"]}, key="acc")
    with pytest.raises(FileNotFoundError, match="curve 'x': no metrics file"):
        plots.loss_figure({"x": tmp_path / "missing.jsonl"})
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        plots.loss_figure({"b": tmp_path / "bad.jsonl"})


def test_image_grid_images_and_wrapped_captions(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    long = "chosen: a large red circle in the middle of a plain white background"
    items = [(tmp_path / "a.png", [long, "rejected: a blue square"])] + [(a, [f"image {i}"]) for i, a in
                                                                          enumerate(arrays[1:], 1)]
    items.append((rng.random((8, 8)), "grey floats"))
    fig = plots.grid_figure(items, cols=2, wrap=30)
    assert len(fig.axes) == 5
    for ax, want in zip(fig.axes, arrays):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), want)
    texts = [t.get_text() for t in fig.texts]
    assert texts[0] == "chosen: a large red circle in\nthe middle of a plain white\nbackground\nrejected: a blue square"
    assert texts[1:] == ["image 1", "image 2", "image 3", "grey floats"]
    w, h = _png(plots.image_grid(items, tmp_path / "grid.png", cols=2, title="pairs"))
    assert w == pytest.approx(2 * 2.4 * 100, abs=2) and h > 3 * 2.4 * 100
    with pytest.raises(FileNotFoundError, match="item 1: no image file"):
        plots.grid_figure([items[1], (tmp_path / "missing.png", [])])
    with pytest.raises(ValueError, match=r"item 0: an image array is HxW.*\(2, 3, 5\)"):
        plots.grid_figure([(np.zeros((2, 3, 5)), [])])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'vlmjax\[plot\]'"):
        plots.loss_figure({"x": "unused.jsonl"})
