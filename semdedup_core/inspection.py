"""Reading a finished output back: summaries, the removed-vs-eps curve (from the pruning
tables, no recomputation), the largest clusters, and what happened to one clip."""

import csv
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core import layout
from semdedup_core.config import eps_text
from semdedup_core.errors import InputError
from semdedup_core.extraction import pruned_clusters, removed_mask
from semdedup_core.parquet import read_table
from semdedup_core.storage import Storage
from semdedup_core.threads import LATENCY_BOUND_THREADS, ordered_map

# The eps grid of removed-vs-eps curves (CLI and Dagster metadata): read from stored scores.
EPS_GRID = [1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2]


def summaries(out: Storage) -> list[dict]:
    """Rows of every `dedup_summary_<eps>.csv`, by eps."""
    rows = []
    for rel in out.list_files(layout.EXTRACTION, recursive=False):
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("dedup_summary_") and name.endswith(".csv"):
            for row in csv.DictReader(io.StringIO(out.read_bytes(rel).decode())):
                rows.append({"eps": float(row["eps"]), **{k: int(row[k])
                                                          for k in layout.SUMMARY_COLUMNS[1:]}})
    return sorted(rows, key=lambda r: r["eps"])


def _clusters(out: Storage) -> list[int]:
    clusters = pruned_clusters(out)
    if not clusters:
        raise InputError(f"{out.display()}: no pruning tables under "
                         f"{layout.PRUNING_TABLES}; is this a semdedup output?")
    return clusters


SCORE_BINS = 100  # histogram of cosine_sim_score over [0, 1]
EXAMPLES_PER_CLUSTER = 2


@dataclass
class ScoreStats:
    """Aggregates of all pruning tables, in memory that grows with clusters, not clips."""

    sizes: dict[int, int]  # cluster -> clips
    removed: dict[float, int]  # eps -> clips removed
    histogram: np.ndarray  # int64 (SCORE_BINS,): clips per score bin over [0, 1]
    # (score, cluster, id, max_id) of the clips just inside `examples_eps`, lowest scores first
    examples: list[tuple[float, int, str, str]]
    # With `keep_scores`: each cluster's deciding scores in rank order (float32: 4 bytes a
    # clip), for a pass that needs every clip's removals after this one (the audit).
    scores: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def has_cross_tables(out: Storage) -> bool:
    """Whether the output was made with cross_cluster (it has cross-cluster tables)."""
    return bool(out.list_files(layout.CROSS_TABLES))


def removal_scores(out: Storage, cluster: int, columns: list[str], cross: bool):
    """A cluster's pruning table (`columns`) and the score that decides its removals: the
    pruning score or, with cross tables, the larger of it and the cross score (a clip is
    removed at eps when either is >= 1 - eps). Returns (table, scores, from_cross mask)."""
    table = read_table(out, layout.pruning_table(cluster), columns)
    scores = table.column(layout.SCORE).to_numpy()
    if not cross:
        return table, scores, np.zeros(len(scores), bool)
    other = read_table(out, layout.cross_table(cluster), columns)
    cross_scores = other.column(layout.SCORE).to_numpy()
    from_cross = cross_scores > scores
    return table.set_column(table.schema.get_field_index(layout.MAX_ID), layout.MAX_ID,
                            pc.if_else(pa.array(from_cross), other.column(layout.MAX_ID),
                                       table.column(layout.MAX_ID))) \
        if layout.MAX_ID in columns else table, np.maximum(scores, cross_scores), from_cross


def score_stats(out: Storage, clusters: list[int] | None = None, eps_grid=EPS_GRID,
                examples_eps: float | None = None, keep_scores: bool = False,
                cross: bool | None = None) -> ScoreStats:
    """One pass over the pruning tables, and the cross tables where the output has them (read
    on I/O threads: on S3 each is a round trip): sizes, removed counts per eps, a histogram of
    the deciding score and, with `examples_eps`, the EXAMPLES_PER_CLUSTER lowest-scoring
    removed clips of each cluster. `cross`: whether to use the cross tables (default: when
    there are any; a run's summary says, as an earlier run's may still be there)."""
    clusters = _clusters(out) if clusters is None else clusters
    columns = [layout.SCORE] + ([layout.ID, layout.MAX_ID] if examples_eps is not None else [])
    cross = has_cross_tables(out) if cross is None else cross

    def one(c: int):
        table, scores, _ = removal_scores(out, c, columns, cross)
        examples = []
        if examples_eps is not None:
            inside = np.flatnonzero(removed_mask(scores, examples_eps))
            for i in inside[np.argsort(scores[inside], kind="stable")][:EXAMPLES_PER_CLUSTER]:
                examples.append((float(scores[i]), c, table.column(layout.ID)[int(i)].as_py(),
                                 table.column(layout.MAX_ID)[int(i)].as_py()))
        return (c, scores, [int(removed_mask(scores, e).sum()) for e in eps_grid],
                np.histogram(scores, bins=SCORE_BINS, range=(0, 1))[0], examples)

    stats = ScoreStats({}, dict.fromkeys(eps_grid, 0), np.zeros(SCORE_BINS, np.int64), [])
    for c, scores, removed, hist, examples in ordered_map(one, clusters, LATENCY_BOUND_THREADS):
        stats.sizes[c] = len(scores)
        if keep_scores:
            stats.scores[c] = scores
        for e, r in zip(eps_grid, removed):
            stats.removed[e] += r
        stats.histogram += hist
        stats.examples += examples
    stats.examples.sort()
    return stats


@dataclass
class ClipReport:
    id: str
    cluster: int
    rank: int
    cluster_size: int
    max_id: str
    score: float
    removed: dict[float, str | None]  # per eps with outputs: the rule that removes it, or None
    # With cross_cluster: the closest earlier clip of another cluster, its cluster and score.
    cross_max_id: str | None = None
    cross_max_cluster: int | None = None
    cross_score: float | None = None


def find_clip(out: Storage, clip_id: str) -> ClipReport | None:
    """Where a clip landed, the clips it duplicates (if any) and which rule, if any, removes it
    at each eps ("in-cluster", "cross-cluster", or both)."""
    eps_list = [r["eps"] for r in summaries(out)]
    cross = has_cross_tables(out)

    def look(c: int):
        table = read_table(out, layout.pruning_table(c))
        return c, table, pc.index(table.column(layout.ID), clip_id).as_py()

    def rules(score: float, cross_score: float | None, eps: float) -> str | None:
        hit = [name for name, s in (("in-cluster", score), ("cross-cluster", cross_score))
               if s is not None and removed_mask(np.array([s], np.float32), eps)[0]]
        return " and ".join(hit) or None

    # Tables are searched on I/O threads, in cluster order; the first hit stops the search.
    for c, table, pos in ordered_map(look, _clusters(out), LATENCY_BOUND_THREADS):
        if pos is not None and pos >= 0:
            score = float(table.column(layout.SCORE)[pos].as_py())
            report = ClipReport(clip_id, c, pos, table.num_rows,
                                table.column(layout.MAX_ID)[pos].as_py(), score, {})
            if cross:
                row = read_table(out, layout.cross_table(c)).slice(pos, 1).to_pylist()[0]
                report.cross_max_id, report.cross_max_cluster = row[layout.MAX_ID], \
                    row[layout.MAX_CLUSTER]
                report.cross_score = row[layout.SCORE]
            report.removed = {e: rules(score, report.cross_score, e) for e in eps_list}
            return report
    return None


def format_inspection(out: Storage, ids: list[str], top: int = 10,
                      incomplete: str | None = None) -> tuple[str, list[str]]:
    """The `semdedup inspect` report, and the ids found in no pruning table; `incomplete`: why
    the folder is not a finished run, shown first when it is read anyway."""
    missing = []
    lines = [f"output: {out.display()}", ""]
    if incomplete:
        lines[1:1] = [f"WARNING: {incomplete}"]
    rows = summaries(out)
    if rows:
        lines.append(f"{'eps':>8} {'total':>12} {'kept':>12} {'removed':>12}")
        lines += [f"{eps_text(r['eps']):>8} {r['total']:>12,} {r['kept']:>12,} "
                  f"{r['removed']:>12,}" for r in rows]
        lines.append("")
    stats = score_stats(out)  # one pass for the curve and the cluster sizes
    lines.append("removed fraction by eps (from the pruning tables"
                 + (" and the cross-cluster tables):" if has_cross_tables(out) else "):"))
    lines.append(f"{'eps':>8} {'removed':>12} {'fraction':>9}")
    for e, removed in stats.removed.items():
        lines.append(f"{eps_text(e):>8} {removed:>12,} {removed / max(stats.total, 1):>9.4f}")
    lines += ["", f"largest clusters (of {len(stats.sizes)}):"]
    largest = sorted(stats.sizes.items(), key=lambda cs: (-cs[1], cs[0]))[:top]
    lines += [f"  cluster {c}: {n:,} clips" for c, n in largest]
    for clip_id in ids:
        lines.append("")
        rep = find_clip(out, clip_id)
        if rep is None:
            lines.append(f"id {clip_id}: not found in any pruning table")
            missing.append(clip_id)
            continue
        lines.append(f"id {rep.id}: cluster {rep.cluster}, rank {rep.rank} of {rep.cluster_size}")
        if rep.rank == 0:
            lines.append("  ranked first in its cluster: no earlier clip in its cluster")
        else:
            lines.append(f"  closest earlier clip in its cluster: {rep.max_id} "
                         f"(cosine similarity {rep.score:.6f})")
        if rep.cross_score is not None:
            if rep.cross_max_cluster == rep.cluster:
                lines.append("  no earlier clip of another cluster among those searched")
            else:
                lines.append(f"  closest earlier clip of another cluster: {rep.cross_max_id} in "
                             f"cluster {rep.cross_max_cluster} (cosine similarity "
                             f"{rep.cross_score:.6f})")
        for e, rule in rep.removed.items():
            both = rule is not None and " and " in rule
            match = "" if rule is None else f" by the {rule} rule{'s' if both else ''}" + (
                f" (matching {rep.cross_max_id} of cluster {rep.cross_max_cluster})"
                if rule == "cross-cluster" else f" (matching {rep.max_id})"
                if rule == "in-cluster" else "")
            lines.append(f"  eps {eps_text(e)}: {'REMOVED' + match if rule else 'kept'}")
    return "\n".join(lines), missing
