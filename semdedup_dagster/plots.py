"""Pictures for the Dagster UI: PNGs embedded in markdown metadata (the UI renders data URIs)."""

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dagster import MetadataValue  # noqa: E402



def _png_markdown(fig, alt: str) -> MetadataValue:
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


def summary_plots(score_histogram: np.ndarray, sizes: np.ndarray, eps_grid: list[float],
                  removed_fractions: list[float]) -> dict:
    """Cluster-size histogram, cosine_sim_score distribution (from its histogram over [0, 1]),
    removed fraction against eps."""
    out = {}
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="#4c72b0")
    ax.set(xlabel="clips per cluster", ylabel="clusters", title="Cluster sizes")
    out["cluster_size_histogram"] = _png_markdown(fig, "cluster sizes")

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.stairs(score_histogram, np.linspace(0, 1, len(score_histogram) + 1), fill=True,
              color="#55a868")
    ax.set(xlabel="cosine_sim_score (best earlier match)", ylabel="clips", yscale="log",
           title="Similarity to the best earlier-ranked clip")
    out["score_distribution"] = _png_markdown(fig, "score distribution")

    out["removed_vs_eps_plot"] = removed_vs_eps_png(eps_grid, removed_fractions)
    return out


def removed_vs_eps_png(eps_grid: list[float], removed_fractions: list[float],
                       title: str = "Removed vs eps") -> MetadataValue:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(eps_grid, removed_fractions, marker="o", color="#c44e52")
    ax.set(xscale="log", xlabel="eps", ylabel="removed fraction", title=title)
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, "removed vs eps")


def corpus_growth_png(drops: list[str], clips: list[int], kept: list[int],
                      eps: str) -> MetadataValue:
    """Clips in the corpus after each drop, and those kept at one eps."""
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(1, len(drops) + 1)
    ax.plot(x, np.cumsum(clips), marker="o", color="#4c72b0", label="clips")
    ax.plot(x, np.cumsum(kept), marker="o", color="#55a868", label=f"kept at eps {eps}")
    ax.set(xlabel="drops", ylabel="clips", title="Corpus growth")
    if len(drops) <= 12:
        ax.set_xticks(x, drops, rotation=30, ha="right", fontsize=7)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, "corpus growth")
