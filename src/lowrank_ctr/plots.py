"""Report plots: AUC vs compression ratio and vs latency (with Pareto fronts), retained energy vs rank per layer.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), so the CLI and a
notebook kernel can both use them; :func:`fig_to_png` gives the bytes a notebook displays. Every function takes the
tables of :mod:`lowrank_ctr.report` and returns ``None`` when the data for its view is absent.

Readability rules kept here: a title is wrapped to the figure's width (never cut), one legend per figure sits
outside the panels (never over the data), and point labels are placed where they overlap no marker, no other label
and stay inside their panel (:func:`place_labels`).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Iterator, Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

# method order, labels and colours come from the compression-method registry, through the report
from lowrank_ctr.report import method_color, method_label, method_rank

GROUP_COLORS: dict[str, str] = {"embedding": "#1f77b4", "mlp": "#d62728", "other": "#2ca02c"}
DPI = 110

_SKIP_REASONS: dict[str, str] = {
    "auc_vs_ratio.png": "no ok run has both a defined test/auc and a compression ratio",
    "delta_vs_ratio.png": "no ok run has a control (compression.control=true) and a compression ratio",
    "auc_vs_latency.png": "no ok run has a batch-4096 latency (bench/base_ms@4096 or bench/compressed_ms@4096): "
                          "the benchmark was off",
    "retained_energy.png": "no compress/layers entry with a rank and a retained_energy (no svd/afm/tt run)",
}


def why_skipped(filename: str) -> str:
    """The reason a plot was not drawn, for the report."""
    return _SKIP_REASONS.get(filename, "no data")


def _method_key(method: str) -> tuple[int, str]:
    return method_rank(method), method


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


# ----------------------------------------------------------------------------------------------- layout helpers

def _facets(n: int, width: float = 5.4, height: float = 4.2) -> tuple[Figure, list]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def wrapped_title(fig: Figure, text: str, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure is narrow: a long title would be cut)."""
    width_pt = fig.get_figwidth() * 72 * 0.92
    chars = max(20, int(width_pt / (0.55 * fontsize)))  # a conservative average glyph width of the UI font
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def figure_legend(fig: Figure, axes: Sequence[Any], max_cols: int = 4) -> None:
    """One legend for the whole figure, below the panels: it never hides a point, and colours are shared."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label and not label.startswith("_"):
                seen.setdefault(label, handle)
    if seen:
        ncols = min(max_cols, len(seen), max(1, int(fig.get_figwidth() / 1.6)))
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=ncols, fontsize=8,
                   frameon=False)


def _use_log(values: pd.Series | Sequence[float], spread: float) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() > spread


def _renderer(fig: Figure) -> Any:
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def marker_boxes(ax: Any, pad_px: float = 1.0) -> list[Bbox]:
    """Display-space boxes of every marker drawn in ``ax`` (scatter points and line markers), and of error bars."""
    boxes: list[Bbox] = []
    scale = ax.figure.dpi / 72.0
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        offsets = coll.get_offsets()
        if len(offsets) == 0:
            continue
        pts = coll.get_offset_transform().transform(np.asarray(offsets, dtype=float))
        if isinstance(coll, PathCollection):
            sizes = coll.get_sizes() if len(coll.get_sizes()) else np.array([36.0])
            radii = np.sqrt(np.resize(sizes, len(pts))) / 2 * scale + pad_px
            boxes += [Bbox.from_extents(x - r, y - r, x + r, y + r) for (x, y), r in zip(pts, radii)
                      if np.isfinite(x) and np.isfinite(y)]
        else:  # error-bar segments (LineCollection): thin boxes along each segment
            for seg in coll.get_segments():
                seg = coll.get_transform().transform(np.asarray(seg, dtype=float))
                if len(seg) and np.isfinite(seg).all():
                    (x0, y0), (x1, y1) = seg.min(0), seg.max(0)
                    boxes.append(Bbox.from_extents(x0 - pad_px, y0 - pad_px, x1 + pad_px, y1 + pad_px))
    for line in ax.lines:
        marker = line.get_marker()
        if not line.get_visible() or marker in (None, "None", "", " "):
            continue
        pts = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        r = line.get_markersize() / 2 * scale + pad_px
        boxes += [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in pts if np.isfinite(x) and np.isfinite(y)]
    return boxes


def _line_boxes(ax: Any, step_px: float = 3.0) -> list[Bbox]:
    """Small boxes along every drawn line of ``ax`` (e.g. the Pareto front), which a label should not cross."""
    boxes: list[Bbox] = []
    for line in ax.lines:
        if not line.get_visible() or line.get_linestyle() in ("None", "", " "):
            continue
        pts = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        pts = pts[np.isfinite(pts).all(1)]
        for a, b in zip(pts[:-1], pts[1:]):
            n = max(2, int(np.hypot(*(b - a)) / step_px))
            boxes += [Bbox.from_extents(x - 1, y - 1, x + 1, y + 1) for x, y in np.linspace(a, b, n)]
    return boxes


#: (dx, dy) directions tried for a label, in order of preference; offsets grow if all are taken
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]


def _text_box(ann: Annotation, renderer: Any) -> Bbox:
    """The box of a label's text alone (an Annotation's own extent includes its leader line, which may cross
    markers: it points at one)."""
    ann.update_positions(renderer)  # what Annotation.get_window_extent does before measuring
    return Text.get_window_extent(ann, renderer)


def _merge_coincident(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                      radius_px: float) -> list[tuple[float, float, str]]:
    """Points drawn within ``radius_px`` of each other share one label (their texts one per line, in order): two
    labels for one visible marker would push each other far from it."""
    pts = ax.transData.transform(np.column_stack([xs, ys]).astype(float)) if len(xs) else np.zeros((0, 2))
    groups: list[list[int]] = []
    for i, p in enumerate(pts):
        for g in groups:
            if np.hypot(*(pts[g[0]] - p)) <= radius_px:
                g.append(i)
                break
        else:
            groups.append([i])
    return [(float(xs[g[0]]), float(ys[g[0]]), "\n".join(dict.fromkeys(labels[i] for i in g))) for g in groups]


def place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 7, merge_px: float = 8.0) -> list[Annotation]:
    """Label points so that no label overlaps a marker, another label or the panel's edge.

    The figure's layout is drawn and frozen first (constrained layout would move the panels afterwards); points
    within ``merge_px`` of each other on screen get one multi-line label; then each label tries 8 directions at
    growing distances and takes the first free spot, or the least-overlapping one; a label placed away from its
    point gets a thin leader line to it.
    """
    fig = ax.figure
    renderer = _renderer(fig)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # freeze: later layout passes must not move points under placed labels
    inside = ax.get_window_extent(renderer)
    obstacles = marker_boxes(ax) + _line_boxes(ax)
    placed: list[Annotation] = []
    taken: list[Bbox] = []
    for x, y, text in _merge_coincident(ax, xs, ys, labels, merge_px):
        best: tuple[float, Annotation] | None = None
        for dx, dy, ha, va in _candidate_offsets(ax, x, y, inside):
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                              fontsize=fontsize, color="#333333")
            box = ann.get_window_extent(renderer).padded(1)
            overlap = sum(_area(box, o) for o in (*obstacles, *taken))
            outside = box.width * box.height - _area(box, inside)
            cost = overlap + 10 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        dx, dy = best[1].xyann
        if np.hypot(dx, dy) > 10:  # beyond the nearest ring: draw where it belongs
            best[1].remove()
            best = (best[0], ax.annotate(best[1].get_text(), (x, y), textcoords="offset points", xytext=(dx, dy),
                                         ha=best[1].get_ha(), va=best[1].get_va(), fontsize=fontsize,
                                         color="#333333", arrowprops=dict(arrowstyle="-", lw=0.5, color="#777777",
                                                                          shrinkA=0, shrinkB=2)))
        placed.append(best[1])
        taken.append(_text_box(best[1], renderer).padded(1))
    return placed


def _candidate_offsets(ax: Any, x: float, y: float, inside: Bbox) -> Iterator[tuple[float, float, str, str]]:
    """Label positions (offset in points from the point, alignment) in order of preference: 8 directions at
    growing distances, then a grid over the whole panel (a crowded corner: the label goes where there is room,
    with a leader line)."""
    for dist in (5, 9, 14, 20, 28, 40):
        for dx, dy in _DIRECTIONS:
            yield (dx * dist, dy * dist, {1: "left", -1: "right", 0: "center"}[dx],
                   {1: "bottom", -1: "top", 0: "center"}[dy])
    px, py = ax.transData.transform((x, y))
    to_pt = 72.0 / ax.figure.dpi
    spots = [(inside.x0 + inside.width * fx, inside.y0 + inside.height * fy)
             for fx in np.linspace(0.05, 0.95, 7) for fy in np.linspace(0.05, 0.95, 7)]
    for sx, sy in sorted(spots, key=lambda s: np.hypot(s[0] - px, s[1] - py)):
        yield ((sx - px) * to_pt, (sy - py) * to_pt, "left" if sx >= px else "right", "bottom" if sy >= py else "top")


def _area(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


# ----------------------------------------------------------------------------------------------- trade-off plots

def _from_scratch(settings: pd.Series) -> pd.Series:
    """Whether each row's setting trained the compressed structure from scratch (``from_scratch=true``)."""
    return settings.astype(str).str.contains("from_scratch=true", regex=False)


def _tradeoff(runs: pd.DataFrame, x: str, xlabel: str, x_higher_better: bool, base_x: str | None,
              title: str, y: str = "auc", ylabel: str = "test AUC", reference: str = "base_auc",
              reference_label: str = "base model (mean)") -> Figure | None:
    """``y`` (test AUC) against ``x``: runs as faint dots, seed means with std bars per method, the Pareto front of
    the means; the uncompressed reference (``reference`` column's mean) as a star."""
    ok = runs[(runs["status"] == "ok")].copy()
    ok = ok[np.isfinite(ok[y].astype(float)) & np.isfinite(ok[x].astype(float))]
    ok["auc"] = ok[y].astype(float)  # the plotted quantity, whatever it is
    ok["base_auc"] = ok[reference].astype(float)
    if ok.empty:
        return None
    ok[x] = ok[x].astype(float)
    facets = list(ok.groupby(["data", "model"], sort=True))
    fig, axes = _facets(len(facets))
    to_label = []
    for ax, ((data, model), df) in zip(axes, facets):
        means = (df.groupby(["method", "targets", "setting"], sort=False)
                 .agg(x=(x, "mean"), auc=("auc", "mean"), std=("auc", "std"), n=("auc", "size")).reset_index())
        for method in sorted(means["method"].unique(), key=_method_key):
            color = method_color(method)
            for scratch in (False, True):  # one colour per family; squares: the structure trained from scratch
                m = means[(means["method"] == method) & (_from_scratch(means["setting"]) == scratch)]
                if m.empty:
                    continue
                raw = df[(df["method"] == method) & (_from_scratch(df["setting"]) == scratch)]
                ax.scatter(raw[x], raw["auc"], s=10, color=color, alpha=0.3, linewidths=0,
                           marker="s" if scratch else "o")
                ax.errorbar(m["x"], m["auc"], yerr=m["std"].fillna(0.0), fmt="s" if scratch else "o", ms=5,
                            color=color, capsize=2,
                            label=method_label(method) + (", trained from scratch" if scratch else ""))
        points = means[["x", "auc", "setting", "method"]].copy()
        base_auc = df["base_auc"].astype(float)
        if base_x is not None and np.isfinite(base_auc).any():
            bx = 1.0 if base_x == "one" else df[base_x].astype(float).mean()
            if np.isfinite(bx):
                ax.scatter([bx], [base_auc.mean()], marker="*", s=140, color="black", zorder=5,
                           label=reference_label)
                points.loc[len(points)] = [bx, base_auc.mean(), "base", "base"]
        front = points.iloc[pareto_front(points["x"], points["auc"], x_higher_better)]
        ax.plot(front["x"], front["auc"], "--", color="black", lw=1, alpha=0.7, label="Pareto front")
        ax.scatter(front["x"], front["auc"], s=90, facecolors="none", edgecolors="black", linewidths=1, zorder=4)
        if _use_log(points["x"], 8):
            ax.set_xscale("log", base=2)
        ax.margins(x=0.15, y=0.2)  # room for labels inside the panel
        ax.set_title(f"{data} / {model}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        labelled = front[~front["setting"].isin(["", "base"])]
        to_label.append((ax, labelled))
    wrapped_title(fig, title)
    figure_legend(fig, axes)
    for ax, labelled in to_label:
        texts = (labelled["method"].astype(str).map(method_label) + " " + labelled["setting"].astype(str)).tolist()
        place_labels(ax, labelled["x"].tolist(), labelled["auc"].tolist(), texts)
    return fig


def auc_vs_ratio(runs: pd.DataFrame) -> Figure | None:
    """Test AUC vs compression ratio (base bytes / compressed bytes), per data/model facet, coloured by method."""
    return _tradeoff(runs, "ratio", "compression ratio (base bytes / compressed bytes)", True, "one",
                     "AUC vs compression ratio (dots: runs; markers: seed mean ± std; labels: the Pareto front's "
                     "settings; upper right is better)")


def delta_vs_ratio(runs: pd.DataFrame) -> Figure | None:
    """Test AUC minus the "base + same fine-tune" control's, against the compression ratio: the seed-to-seed spread
    of the bases cancels, what is left is what compression costs."""
    runs = runs.assign(_control=np.where(np.isfinite(runs["delta_auc_vs_control"].astype(float)), 0.0, np.nan))
    return _tradeoff(runs, "ratio", "compression ratio (base bytes / compressed bytes)", True, "one",
                     "AUC difference to the base + same fine-tune vs compression ratio (dots: runs; markers: seed "
                     "mean ± std; above 0: better than the control)", y="delta_auc_vs_control",
                     ylabel="test AUC − control's", reference="_control",
                     reference_label="base + same fine-tune (0)")


def auc_vs_latency(runs: pd.DataFrame) -> Figure | None:
    """Test AUC vs inference latency at batch 4096 (compressed model; the base model as a star)."""
    return _tradeoff(runs, "latency_ms@4096", "latency at batch 4096 (ms)", False, "base_ms@4096",
                     "AUC vs batch-4096 latency (dots: runs; markers: seed mean ± std; upper left is better)")


# ----------------------------------------------------------------------------------------------- retained energy

def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, int]:
    """Elementwise mean of the curves of the most common length (one layer's shape), and how many were averaged."""
    lengths = pd.Series([len(c) for c in curves])
    length = int(lengths.mode().iloc[0])
    same = np.array([c for c in curves if len(c) == length], dtype=float)
    return same.mean(0), len(same)


def retained_energy(layers: pd.DataFrame, max_layer_legend: int = 8) -> Figure | None:
    """Cumulative retained energy vs rank per compressed layer, from each layer's STORED spectrum.

    One line per layer and panel (data/model/method), the mean over the runs that stored it (seeds; settings of the
    same trained model share its spectrum), so every line is monotone by construction. Hollow markers: the rank
    each run chose and the energy it kept (tables with per-field ranks: the mean field rank). Runs whose
    results.json stores no spectrum show their chosen points only: joining points of different runs would draw a
    curve that no model has.
    """
    if layers.empty:
        return None
    df = layers.copy()
    for c in ("rank", "retained_energy", "chosen_rank"):
        if c in df.columns:
            df[c] = df[c].astype(float)
    if "chosen_rank" not in df.columns:
        df["chosen_rank"] = df["rank"]
    if "energy_curve" not in df.columns:
        df["energy_curve"] = None
    df = df[np.isfinite(df["rank"]) & np.isfinite(df["retained_energy"]) & df["replaced"].astype(bool)]
    if df.empty:
        return None
    df["has_curve"] = df["energy_curve"].map(lambda c: isinstance(c, (list, tuple, np.ndarray)) and len(c) > 0)
    facets = sorted(df.groupby(["data", "model", "method"]).groups,
                    key=lambda k: (str(k[0]), str(k[1]), _method_key(str(k[2]))))
    several_models = len({(d, m) for d, m, _ in facets}) > 1
    fig, axes = _facets(len(facets), width=5.6)
    styles = ["-", "--", ":", "-."]
    any_curve = bool(df["has_curve"].any())
    # one legend entry per layer while that stays short, else one per layer group for the whole figure
    per_layer_legend = int(df.groupby(["data", "model", "method"])["name"].nunique().max()) <= max_layer_legend
    for ax, (data, model, method) in zip(axes, facets):
        m = df[(df["data"] == data) & (df["model"] == model) & (df["method"] == method)]
        lines = list(m.groupby(["group", "name"], sort=True))
        seen_groups: set[str] = set()
        xs_all: list[float] = []
        for i, ((group, name), g) in enumerate(lines):
            color = GROUP_COLORS.get(str(group), "#7f7f7f")
            if per_layer_legend:
                label = f"{name} ({group})"
            else:
                label = str(group) if group not in seen_groups else None
            seen_groups.add(str(group))
            curves = [list(c) for c in g.loc[g["has_curve"], "energy_curve"]]
            if curves:
                curve, n = _mean_curve(curves)
                ranks = np.arange(1, len(curve) + 1)
                ax.plot(ranks, curve, styles[i % len(styles)] if per_layer_legend else "-", lw=1.3, color=color,
                        alpha=0.9 if per_layer_legend else 0.6, label=label)
                xs_all += [1, len(curve)]
                label = None
            chosen = g[["chosen_rank", "retained_energy"]].round(6).drop_duplicates()
            ax.scatter(chosen["chosen_rank"], chosen["retained_energy"], s=28, facecolors="none", edgecolors=color,
                       linewidths=1.2, zorder=4, label=label)
            xs_all += chosen["chosen_rank"].tolist()
        if _use_log(xs_all, 16):
            ax.set_xscale("log", base=2)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(top=1.02)
        ax.set_title(f"{data} / {model}: {method_label(method)}" if several_models else method_label(method),
                     fontsize=10)
        ax.set_xlabel("rank (components kept)")
        ax.set_ylabel("retained energy (share of spectrum)")
        ax.grid(alpha=0.3)
        if per_layer_legend:  # curves rise from the lower left: the lower right is free
            ax.legend(fontsize=7, loc="lower right")
    if not per_layer_legend:
        figure_legend(fig, axes)
    marker_note = "hollow markers: each run's chosen rank and kept energy (tables: mean field rank)"
    if any_curve:
        title = ("Retained energy vs rank per compressed layer: cumulative share of the stored spectrum, mean over "
                 f"runs; {marker_note}")
    else:
        title = (f"Retained energy at the chosen rank per compressed layer ({marker_note}); these results store no "
                 "spectrum (compress/layers[].spectrum), so no curves are drawn")
    wrapped_title(fig, title)
    return fig


# ----------------------------------------------------------------------------------------------- output

def fig_to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """PNG bytes of a figure (a notebook shows them with ``IPython.display.Image``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    path.write_bytes(fig_to_png(fig, dpi))
    return path


def label_overlaps(fig: Figure) -> list[str]:
    """Every point label that overlaps a marker, another label or leaves its panel (empty: readable). For tests."""
    renderer = _renderer(fig)
    fig.draw_without_rendering()
    problems = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        inside = ax.get_window_extent(renderer)
        boxes = marker_boxes(ax, pad_px=0.0)
        texts = [t for t in ax.texts if isinstance(t, Annotation)]
        extents = [_text_box(t, renderer) for t in texts]
        for i, (t, box) in enumerate(zip(texts, extents)):
            if any(_area(box, b) > 0 for b in boxes):
                problems.append(f"{t.get_text()!r} overlaps a marker")
            if any(_area(box, other) > 0 for other in extents[:i]):
                problems.append(f"{t.get_text()!r} overlaps another label")
            if _area(box, inside) < box.width * box.height - 1e-6:
                problems.append(f"{t.get_text()!r} leaves its panel")
    return problems


def title_fits(fig: Figure) -> bool:
    """Whether the figure's title lies entirely inside the figure (a cut title reads wrong). For tests."""
    renderer = _renderer(fig)
    fig.draw_without_rendering()
    title = fig._suptitle
    if title is None:
        return True
    box = title.get_window_extent(renderer)
    page = fig.bbox
    return box.x0 >= page.x0 - 0.5 and box.x1 <= page.x1 + 0.5 and box.y0 >= page.y0 - 0.5 and box.y1 <= page.y1 + 0.5
