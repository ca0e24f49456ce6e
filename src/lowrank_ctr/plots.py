"""Report plots: AUC vs compression ratio and vs latency (with Pareto fronts), retained energy vs rank per layer.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), so the CLI and a
notebook kernel can both use them; :func:`fig_to_png` gives the bytes a notebook displays. Every function takes the
tables of :mod:`lowrank_ctr.report` and returns ``None`` when the data for its view is absent.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: fixed colours so a method looks the same in every plot and report
METHOD_COLORS: dict[str, str] = {"none": "#555555", "svd": "#1f77b4", "afm": "#d62728", "tt": "#2ca02c",
                                 "int8": "#ff7f0e", "qr": "#9467bd", "mixed_dim": "#8c564b"}
GROUP_COLORS: dict[str, str] = {"embedding": "#1f77b4", "mlp": "#d62728", "other": "#2ca02c"}
_EXTRA_COLORS = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#8c564b"]

_SKIP_REASONS: dict[str, str] = {
    "auc_vs_ratio.png": "no ok run has both test/auc and a compression ratio",
    "auc_vs_latency.png": "no ok run has a batch-4096 latency (bench/base_ms@4096 or bench/compressed_ms@4096): "
                          "the benchmark was off",
    "retained_energy.png": "no compress/layers entry with a rank and a retained_energy (no svd/afm/tt run)",
}


def why_skipped(filename: str) -> str:
    """The reason a plot was not drawn, for the report."""
    return _SKIP_REASONS.get(filename, "no data")


def method_color(method: str) -> str:
    if method not in METHOD_COLORS:
        METHOD_COLORS[method] = _EXTRA_COLORS[len(METHOD_COLORS) % len(_EXTRA_COLORS)]
    return METHOD_COLORS[method]


def pareto_front(x: Sequence[float], y: Sequence[float], x_higher_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both axes, better on one), by x.

    y (AUC) is always higher-better; x is higher-better (compression ratio) or lower-better (latency).
    Non-finite points are never on the front.
    """
    xs = np.asarray(x, dtype=float) * (1.0 if x_higher_better else -1.0)
    ys = np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    front = [i for i in range(len(xs)) if ok[i] and not np.any(
        ok & (xs >= xs[i]) & (ys >= ys[i]) & ((xs > xs[i]) | (ys > ys[i])))]
    return sorted(front, key=lambda i: (float(x[i]), float(y[i])))


def _facets(n: int, width: float = 5.4, height: float = 4.2) -> tuple[Figure, list]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _use_log(values: pd.Series, spread: float) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return len(v) > 1 and v.max() / v.min() > spread


def _tradeoff(runs: pd.DataFrame, x: str, xlabel: str, x_higher_better: bool, base_x: str | None,
              title: str) -> Figure | None:
    """AUC against ``x``: runs as faint dots, seed means with std bars per method, the Pareto front of the means."""
    ok = runs[(runs["status"] == "ok")].copy()
    ok = ok[np.isfinite(ok["auc"].astype(float)) & np.isfinite(ok[x].astype(float))]
    if ok.empty:
        return None
    ok[x] = ok[x].astype(float)
    facets = list(ok.groupby(["data", "model"], sort=True))
    fig, axes = _facets(len(facets))
    for ax, ((data, model), df) in zip(axes, facets):
        means = (df.groupby(["method", "targets", "setting"], sort=False)
                 .agg(x=(x, "mean"), auc=("auc", "mean"), std=("auc", "std"), n=("auc", "size")).reset_index())
        for method, m in means.groupby("method", sort=False):
            color = method_color(method)
            raw = df[df["method"] == method]
            ax.scatter(raw[x], raw["auc"], s=10, color=color, alpha=0.3, linewidths=0)
            ax.errorbar(m["x"], m["auc"], yerr=m["std"].fillna(0.0), fmt="o", ms=5, color=color, capsize=2,
                        label=method)
        points = means[["x", "auc", "setting", "method"]].copy()
        base_auc = df["base_auc"].astype(float)
        if base_x is not None and np.isfinite(base_auc).any():
            bx = 1.0 if base_x == "one" else df[base_x].astype(float).mean()
            if np.isfinite(bx):
                ax.scatter([bx], [base_auc.mean()], marker="*", s=140, color="black", zorder=5,
                           label="base model (mean)")
                points.loc[len(points)] = [bx, base_auc.mean(), "base", "base"]
        front = points.iloc[pareto_front(points["x"], points["auc"], x_higher_better)]
        ax.plot(front["x"], front["auc"], "--", color="black", lw=1, alpha=0.7, label="Pareto front")
        ax.scatter(front["x"], front["auc"], s=90, facecolors="none", edgecolors="black", linewidths=1, zorder=4)
        log_x = _use_log(points["x"], 8)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.margins(x=0.08, y=0.12)
        lo, hi = np.nanmin(points["x"]), np.nanmax(points["x"])
        for row in front.itertuples():
            if row.setting in ("", "base"):
                continue
            pos = (math.log(row.x / lo) / math.log(hi / lo) if log_x else (row.x - lo) / (hi - lo)) if hi > lo else 0
            right = pos > 0.6  # labels of points near the right edge go to their left, inside the axes
            ax.annotate(str(row.setting), (row.x, row.auc), textcoords="offset points", xytext=(-5 if right else 5, 5),
                        ha="right" if right else "left", fontsize=7, color="#333333")
        ax.set_title(f"{data} / {model}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    return fig


def auc_vs_ratio(runs: pd.DataFrame) -> Figure | None:
    """Test AUC vs compression ratio (base bytes / compressed bytes), per data/model facet, coloured by method."""
    return _tradeoff(runs, "ratio", "compression ratio (base bytes / compressed bytes)", True, "one",
                     "AUC vs compression ratio (dots: runs; markers: seed mean ± std; upper right is better)")


def auc_vs_latency(runs: pd.DataFrame) -> Figure | None:
    """Test AUC vs inference latency at batch 4096 (compressed model; the base model as a star)."""
    return _tradeoff(runs, "latency_ms@4096", "latency at batch 4096 (ms)", False, "base_ms@4096",
                     "AUC vs batch-4096 latency (upper left is better)")


def retained_energy(layers: pd.DataFrame, max_layer_legend: int = 8) -> Figure | None:
    """Retained spectral energy vs rank, one line per layer (seed mean), one panel per method, coloured by group."""
    if layers.empty:
        return None
    df = layers.copy()
    for c in ("rank", "retained_energy"):
        df[c] = df[c].astype(float)
    df = df[np.isfinite(df["rank"]) & np.isfinite(df["retained_energy"]) & df["replaced"].astype(bool)]
    if df.empty:
        return None
    several_models = df[["data", "model"]].drop_duplicates().shape[0] > 1
    df["line"] = (df["data"] + "/" + df["model"] + ": " if several_models else "") + df["name"].astype(str)
    methods = sorted(df["method"].unique(), key=lambda m: list(METHOD_COLORS).index(m) if m in METHOD_COLORS
                     else len(METHOD_COLORS))
    fig, axes = _facets(len(methods), width=5.6)
    styles = ["-", "--", ":", "-."]
    for ax, method in zip(axes, methods):
        m = df[df["method"] == method]
        lines = list(m.groupby(["group", "line"], sort=True))
        per_layer_legend = len(lines) <= max_layer_legend
        seen_groups: set[str] = set()
        for i, ((group, line), g) in enumerate(lines):
            curve = g.groupby("rank")["retained_energy"].mean().sort_index()
            color = GROUP_COLORS.get(str(group), "#7f7f7f")
            label = f"{line} ({group})" if per_layer_legend else (str(group) if group not in seen_groups else None)
            seen_groups.add(str(group))
            ax.plot(curve.index, curve.values, styles[i % len(styles)] if per_layer_legend else "-", marker="o",
                    ms=3, lw=1.2, color=color, alpha=0.9 if per_layer_legend else 0.5, label=label)
        if _use_log(m["rank"], 16):
            ax.set_xscale("log", base=2)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(top=1.01)
        ax.set_title(f"method {method}", fontsize=10)
        ax.set_xlabel("rank")
        ax.set_ylabel("retained energy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Retained energy (kept share of the spectrum) vs rank per compressed layer, seed mean",
                 fontsize=11)
    return fig


def fig_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (a notebook shows them with ``IPython.display.Image``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    path.write_bytes(fig_to_png(fig, dpi))
    return path
