"""Pictures for the Dagster UI: PNGs embedded in markdown metadata (the UI renders data URIs)."""

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dagster import MetadataValue  # noqa: E402

from semdedup_core.extraction import removed_mask  # noqa: E402


def _png_markdown(fig, alt: str) -> MetadataValue:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def summary_plots(scores: np.ndarray, sizes: np.ndarray, eps_grid: list[float]) -> dict:
    """Cluster-size histogram, cosine_sim_score distribution, removed fraction against eps."""
    out = {}
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="#4c72b0")
    ax.set(xlabel="clips per cluster", ylabel="clusters", title="Cluster sizes")
    out["cluster_size_histogram"] = _png_markdown(fig, "cluster sizes")

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=100, range=(0, 1), color="#55a868")
    ax.set(xlabel="cosine_sim_score (best earlier match)", ylabel="clips", yscale="log",
           title="Similarity to the best earlier-ranked clip")
    out["score_distribution"] = _png_markdown(fig, "score distribution")

    total = max(len(scores), 1)
    fractions = [removed_mask(scores, e).sum() / total for e in eps_grid]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(eps_grid, fractions, marker="o", color="#c44e52")
    ax.set(xscale="log", xlabel="eps", ylabel="removed fraction", title="Removed vs eps")
    ax.grid(True, alpha=0.3)
    out["removed_vs_eps_plot"] = _png_markdown(fig, "removed vs eps")
    return out
