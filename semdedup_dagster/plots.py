"""Pictures for the Dagster UI, embedded in markdown metadata as data URIs (the UI renders them).

The run's own pictures (the summary's three, each centroid's histogram) are small SVGs written
here: about a millisecond each, where matplotlib took about 1 s to import and 0.3-1 s a figure,
on every run. The corpus's growth plots still use matplotlib, imported when drawn."""

import base64
import io
import math

import numpy as np
from dagster import MetadataValue


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _png_markdown(fig, alt: str) -> MetadataValue:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def score_histogram_svg(scores: np.ndarray, bins: int = 40) -> MetadataValue:
    """A small inline SVG bar chart of scores in [0, 1] (log-scaled counts, with the eps 0.01
    line). SVG rather than matplotlib here: it costs ~0.1 ms against ~60 ms, and a run makes one
    per centroid."""
    counts, _ = np.histogram(scores, bins=bins, range=(0, 1))
    heights = np.log1p(counts) / max(np.log1p(counts).max(), 1e-9) * 80
    width = 4 * bins
    bars = "".join(f'<rect x="{4 * i}" y="{90 - h:.1f}" width="3" height="{h:.1f}" '
                   f'fill="#55a868"/>' for i, h in enumerate(heights) if h > 0)
    cut = 0.99 * width
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="104">'
           f'<rect width="{width}" height="104" fill="white"/>{bars}'
           f'<line x1="{cut:.1f}" y1="5" x2="{cut:.1f}" y2="90" stroke="#c44e52"/>'
           f'<text x="0" y="102" font-size="10">0</text>'
           f'<text x="{width - 8}" y="102" font-size="10">1</text></svg>')
    data = base64.b64encode(svg.encode()).decode()
    return MetadataValue.md(f"![cosine_sim_score histogram (log counts; red: 0.99)]"
                            f"(data:image/svg+xml;base64,{data})")


def _svg_markdown(svg: str, alt: str) -> MetadataValue:
    data = base64.b64encode(svg.encode()).decode()
    return MetadataValue.md(f"![{alt}](data:image/svg+xml;base64,{data})")


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(low)),
                                         math.ceil(math.log10(high)) + 1)]
    step = 10 ** math.floor(math.log10(max(high - low, 1e-12)))
    while (high - low) / step < 3:
        step /= 2
    while (high - low) / step > 6:
        step *= 2
    return [float(t) for t in np.arange(math.ceil(low / step) * step, high + step / 2, step)]


def svg_chart(title: str, xlabel: str, ylabel: str, x: np.ndarray, y: np.ndarray,
              kind: str, color: str, logx: bool = False, logy: bool = False,
              width: int = 400, height: int = 240) -> str:
    """A small chart: `kind` "bars" (x: the n + 1 bin edges, y: n heights) or "line" (points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    left, right, top, bottom = 56, 12, 24, 40
    w, h = width - left - right, height - top - bottom
    fx = np.log10 if logx else (lambda v: v)
    fy = np.log10 if logy else (lambda v: v)
    shown = y[y > 0] if logy else y
    y_low = (shown.min() if len(shown) else 1.0) / 2 if logy else 0.0
    y_high = max(float(shown.max()) if len(shown) else 1.0, y_low * 10 if logy else 1e-9)
    x_low, x_high = float(x.min()), float(x.max())
    xticks, yticks = _ticks(x_low, x_high, logx), _ticks(y_low, y_high, logy)
    x_low, x_high = min(x_low, xticks[0]), max(x_high, xticks[-1])
    y_low, y_high = min(y_low, yticks[0]), max(y_high, yticks[-1])

    def px(v):
        return left + (fx(v) - fx(x_low)) / max(fx(x_high) - fx(x_low), 1e-12) * w

    def py(v):
        v = max(v, y_low)
        return top + h - (fy(v) - fy(y_low)) / max(fy(y_high) - fy(y_low), 1e-12) * h

    parts = [f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left + w / 2}" y="16" font-size="13" text-anchor="middle">{title}</text>',
             f'<text x="{left + w / 2}" y="{height - 6}" font-size="11" '
             f'text-anchor="middle">{xlabel}</text>',
             f'<text x="12" y="{top + h / 2}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 12 {top + h / 2})">{ylabel}</text>']
    for t in xticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{top + h}" x2="{px(t):.1f}" y2="{top + h + 4}" '
                     f'stroke="black"/><text x="{px(t):.1f}" y="{top + h + 15}" font-size="10" '
                     f'text-anchor="middle">{t:g}</text>')
    for t in yticks:
        parts.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left + w}" y2="{py(t):.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{py(t) + 3:.1f}" font-size="10" '
                     f'text-anchor="end">{t:g}</text>')
    if kind == "bars":
        for a, b, v in zip(x[:-1], x[1:], y):
            if v > 0:
                parts.append(f'<rect x="{px(a):.1f}" y="{py(v):.1f}" '
                             f'width="{max(px(b) - px(a) - 0.5, 0.5):.1f}" '
                             f'height="{top + h - py(v):.1f}" fill="{color}"/>')
    else:
        points = " ".join(f"{px(a):.1f},{py(v):.1f}" for a, v in zip(x, y))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5"/>')
        parts += [f'<circle cx="{px(a):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>'
                  for a, v in zip(x, y)]
    parts.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" '
                 f'stroke="black"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif">{"".join(parts)}</svg>')


def summary_plots(score_histogram: np.ndarray, sizes: np.ndarray, eps_grid: list[float],
                  removed_fractions: list[float]) -> dict:
    """Cluster-size histogram, cosine_sim_score distribution (from its histogram over [0, 1]),
    removed fraction against eps."""
    counts, edges = np.histogram(sizes, bins=min(50, max(5, len(sizes) // 4)))
    return {
        "cluster_size_histogram": _svg_markdown(svg_chart(
            "Cluster sizes", "clips per cluster", "clusters", edges, counts, "bars", "#4c72b0"),
            "cluster sizes"),
        "score_distribution": _svg_markdown(svg_chart(
            "Similarity to the best earlier-ranked clip", "cosine_sim_score (best earlier match)",
            "clips", np.linspace(0, 1, len(score_histogram) + 1), score_histogram, "bars",
            "#55a868", logy=True), "score distribution"),
        "removed_vs_eps_plot": _svg_markdown(svg_chart(
            "Removed vs eps", "eps", "removed fraction", np.array(eps_grid),
            np.array(removed_fractions), "line", "#c44e52", logx=True), "removed vs eps"),
    }


def removed_vs_eps_png(eps_grid: list[float], removed_fractions: list[float],
                       title: str = "Removed vs eps") -> MetadataValue:
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    ax.plot(eps_grid, removed_fractions, marker="o", color="#c44e52")
    ax.set(xscale="log", xlabel="eps", ylabel="removed fraction", title=title)
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, "removed vs eps")


def corpus_growth_png(drops: list[str], clips: list[int], kept: list[int],
                      eps: str) -> MetadataValue:
    """Clips in the corpus after each drop, and those kept at one eps."""
    fig, ax = _pyplot().subplots(figsize=(6, 3))
    x = np.arange(1, len(drops) + 1)
    ax.plot(x, np.cumsum(clips), marker="o", color="#4c72b0", label="clips")
    ax.plot(x, np.cumsum(kept), marker="o", color="#55a868", label=f"kept at eps {eps}")
    ax.set(xlabel="drops", ylabel="clips", title="Corpus growth")
    if len(drops) <= 12:
        ax.set_xticks(x, drops, rotation=30, ha="right", fontsize=7)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, "corpus growth")
