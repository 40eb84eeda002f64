"""The audit, on every run: how many near-duplicate pairs are still left among the KEPT clips,
estimated from a seeded sample of kept clips checked exactly against all kept clips.

Each clip is drawn into the sample with probability `rate` by a generator seeded with
(random_state, AUDIT_STREAM, cluster), so the draw does not depend on eps; the drawn clips
that are kept are checked. Clips are ordered by cluster, then rank. A sampled clip u counts
c_u, the clips v after it with u.v >= 1 - eps, u and v both kept at that eps. Every kept pair
is counted once, by its first member, so T / rate, with T the sum of c_u over the sample,
estimates the pairs left without bias (Horvitz-Thompson). The 95% interval is the wider of a
normal interval on that estimator's variance, (1 - rate) / rate^2 * sum c_u^2, and an exact
Poisson (Garwood) interval on T scaled by 1 / rate, which stays honest when the sample finds
few or no pairs. With rate 1 (small runs) every kept clip is checked and the count is exact.

Which clips u is compared with, exactly and at a fraction of "every kept clip":
- none of its own cluster: the ranked rule removes a clip when ANY earlier clip of its cluster
  is within eps, so two kept clips of one cluster are never within eps of each other;
- of the later clusters, only those the bisector bound of `cross_cluster` leaves: a twin of u
  (cluster a) can only lie in cluster b when u is within r = sqrt(2 eps) of b's side of the
  bisector of c_a and c_b (one float64 row of dot products with the centroids per sampled
  clip); the others cannot hold one.

Cost: the sample is sized (`audit_rate`) so that checking it against every kept clip would
take at most AUDIT_FLOP_SHARE of the run's own GEMM work (assignment and pruning, from the
cluster sizes, so every door and backend draws the same sample); the bound makes the real
work a fraction of that (at 100k MiniLM clips, k=100, eps 0.05: about half; on well
separated clusters almost nothing). The pipeline feeds it the clusters it already holds in
memory during pruning, so it reads nothing more.
"""

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammaincinv

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.config import eps_text
from semdedup_core.errors import InputError
from semdedup_core.cross_cluster import BOUND_SLACK, D2_SLACK, probe_radius

AUDIT_FLOP_SHARE = 0.02
AUDIT_MIN_SAMPLE = 100  # below this the interval says little; tiny runs afford it
AUDIT_STREAM = 0xA0D17  # keeps the sample's draws apart from the random ranking's
AUDIT_TILE = 8192  # a cluster's clips per GEMM: (sample x tile) float32 scratch


def audit_rate(sizes, dim: int, n_clusters: int) -> float:
    """The sampling rate for clusters of `sizes`. The run's GEMM work is assignment,
    2 x clips x k x dim, and pruning, about sizes^2 x dim; a sampled clip meets half of the
    clips on average, so a sample of m costs m x clips x dim. The sample takes
    AUDIT_FLOP_SHARE of the run's work, and at least AUDIT_MIN_SAMPLE clips."""
    sizes = np.asarray(sizes, np.float64)
    n_clips = float(sizes.sum())
    if n_clips == 0:
        return 1.0
    run_flops = 2.0 * n_clips * n_clusters * dim + float((sizes**2).sum()) * dim
    sample = max(AUDIT_MIN_SAMPLE, AUDIT_FLOP_SHARE * run_flops / (n_clips * dim))
    return min(1.0, sample / n_clips)


@dataclass
class EpsAudit:
    eps: float
    kept: int
    sampled: int  # sampled clips kept at this eps
    pairs_in_sample: int  # T
    estimated_pairs: float
    low: float
    high: float


class KeptPairsAudit:
    """Feed every cluster once, ascending (`add_cluster`), then read `result`.

    A pass that reads the clusters itself (`extraction.audit_output`) can read fewer: every
    cluster's `add_kept` (from its tables alone), then `visit` the clusters whose sample
    (`drawn`) is not empty, ascending, then `check` the clusters in `wanted()`. The counts
    are the same: a cluster is checked after every sampled clip before it was added."""

    def __init__(self, backend: Backend, eps_list: list[float], rate: float, seed: int,
                 centroids: np.ndarray):
        self.backend = backend
        self.eps = sorted(eps_list)
        self.rate = rate
        self.seed = seed
        self.kept = np.zeros(len(self.eps), np.int64)
        self._centroids = np.asarray(centroids, np.float64)
        self._sq = (self._centroids**2).sum(axis=1)
        self._reach = probe_radius(self.eps) + BOUND_SLACK
        # Per cluster that was sampled: its sampled clips' vectors, kept masks and counts.
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._waiting: dict[int, list[tuple[int, np.ndarray]]] = {}  # cluster -> [(block, rows)]
        self.compared = 0  # (sampled clip, clip) pairs computed

    def add_cluster(self, cluster: int, emb: np.ndarray, removed: dict[float, np.ndarray]) -> None:
        """`emb`: the cluster's unit rows in rank order; `removed[eps]`: which are removed."""
        self.visit(cluster, emb, self.add_kept(removed))

    def visit(self, cluster: int, emb: np.ndarray, kept: np.ndarray) -> None:
        """Check the sampled clips that wait for `cluster`, then add its own sampled clips."""
        self.check(cluster, emb, kept)
        picked = self.drawn(cluster, kept)
        self._add_sample(cluster, emb[picked], kept[picked])

    def add_kept(self, removed: dict[float, np.ndarray]) -> np.ndarray:
        """Count a cluster's kept clips; returns which are kept, (n, n_eps) in rank order."""
        kept = np.stack([~removed[e] for e in self.eps], axis=1)
        self.kept += kept.sum(axis=0)
        return kept

    def drawn(self, cluster: int, kept: np.ndarray) -> np.ndarray:
        """The rows of the cluster's sampled clips that are kept (at the smallest eps: kept at
        any). The draw does not depend on eps nor on the order clusters are fed in."""
        rng = np.random.default_rng([self.seed, AUDIT_STREAM, cluster])
        return np.flatnonzero((rng.random(len(kept)) < self.rate) & kept[:, 0])

    def _add_sample(self, cluster: int, vecs: np.ndarray, kept: np.ndarray) -> None:
        """Sampled clips of `cluster` (unit rows, their kept masks): each will be checked
        against the later clusters the bisector bound leaves it (`check`)."""
        if not len(vecs):
            return
        block = len(self._blocks)
        self._blocks.append((np.asarray(vecs, np.float32), kept,
                             np.zeros((len(vecs), len(self.eps)), np.int64)))
        rows, targets = self._targets(cluster, vecs)
        for b in np.unique(targets).tolist():
            self._waiting.setdefault(b, []).append((block, rows[targets == b]))

    def _targets(self, cluster: int, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, clusters): the clusters after `cluster` that may hold a clip within the
        largest eps of each row: h_b(x) = (x.c_b - x.c_a + (|c_a|^2 - |c_b|^2) / 2) / g >= -r,
        g = |c_a - c_b| (the bound of `cross_cluster`), in float64 for these few rows, widened
        by the same slacks for the float32 assignment (BOUND_SLACK, and D2_SLACK / 2g for
        centroids close together)."""
        own, c, sq = self._centroids[cluster], self._centroids[cluster + 1:], self._sq[cluster + 1:]
        gap2 = self._sq[cluster] + sq - 2 * (c @ own)
        close = np.flatnonzero(gap2 < 1e-4)  # where the Gram form cancels, the difference itself
        gap2[close] = ((c[close] - own) ** 2).sum(axis=1)
        gap = np.sqrt(np.maximum(gap2, 1e-300))
        x = np.asarray(vecs, np.float64)
        h = (x @ c.T - (x @ own)[:, None] + (self._sq[cluster] - sq) / 2) / gap
        rows, j = np.nonzero(h >= -(self._reach + D2_SLACK / (2 * gap)))
        return rows, j + cluster + 1

    def wanted(self) -> list[int]:
        """The clusters that sampled clips still wait for, ascending."""
        return sorted(self._waiting)

    def check(self, cluster: int, emb: np.ndarray, kept: np.ndarray) -> None:
        """Count, for each sampled clip that waits for `cluster`, its kept clips within each
        eps: `emb` in rank order, `kept` (n, n_eps) as `add_kept` returned it."""
        waiting = self._waiting.pop(cluster, None)
        if not waiting:
            return
        sample = np.concatenate([self._blocks[b][0][rows] for b, rows in waiting])
        self.compared += len(sample) * len(emb)
        counts = self._count(self.backend.asarray(sample), emb, kept)
        at = 0
        for b, rows in waiting:
            self._blocks[b][2][rows] += counts[at:at + len(rows)]
            at += len(rows)

    def _count(self, sample, vecs: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """(m, n_eps): per sampled clip, the kept clips of `vecs` within each eps. Each GEMM
        tile (clips x sample: with a thin sample, faster than sample x clips) is compared
        once, with the largest eps's threshold; the few hits are then counted per eps on the
        host (per-eps passes over the whole tile cost as much as the GEMM itself)."""
        backend = self.backend
        m = sample.shape[0]
        counts = np.zeros((m, len(self.eps)), np.int64)
        thresholds = [np.float32(1 - eps) for eps in self.eps]
        lowest = min(thresholds)
        for s in range(0, len(vecs), AUDIT_TILE):
            sims = backend.asarray(vecs[s:s + AUDIT_TILE]) @ sample.T
            flat = backend.xp.flatnonzero(sims >= lowest)
            if not len(flat):
                continue
            values = backend.to_numpy(sims.ravel()[flat])
            j, i = np.divmod(backend.to_numpy(flat), m)
            for e, threshold in enumerate(thresholds):
                hit = (values >= threshold) & kept[s + j, e]
                counts[:, e] += np.bincount(i[hit], minlength=m)
        return counts

    def result(self) -> list[EpsAudit]:
        blocks = self._blocks or [(None, np.zeros((0, len(self.eps)), bool),
                                   np.zeros((0, len(self.eps)), np.int64))]
        sample_kept = np.concatenate([b[1] for b in blocks])
        all_counts = np.concatenate([b[2] for b in blocks])
        rows = []
        for j, eps in enumerate(self.eps):
            mine = sample_kept[:, j]
            c = all_counts[mine, j]
            t = int(c.sum())
            if self.rate >= 1:
                low = high = est = float(t)
            else:
                est = t / self.rate
                half = 1.96 * float(np.sqrt((1 - self.rate) * float((c.astype(float) ** 2).sum()))) \
                    / self.rate
                p_low = chi2_ppf(0.025, 2 * t) / 2 if t else 0.0
                p_high = chi2_ppf(0.975, 2 * t + 2) / 2
                low = max(0.0, min(est - half, p_low / self.rate))
                high = max(est + half, p_high / self.rate)
            rows.append(EpsAudit(eps, int(self.kept[j]), int(mine.sum()), t, est, low, high))
        return rows


def audit_json(rate: float, seed: int, cross_cluster: bool, rows: list[EpsAudit]) -> bytes:
    doc = {"what": "near-duplicate pairs (cosine >= 1 - eps) with both clips kept, estimated "
                   "from a seeded sample of kept clips checked against all kept clips",
           "sample_rate": rate, "seed": seed, "cross_cluster": cross_cluster,
           "eps": {eps_text(r.eps): asdict(r) for r in rows}}
    return (json.dumps(doc, indent=2) + "\n").encode()


def write_audit(out, rate: float, seed: int, cross_cluster: bool, rows: list[EpsAudit]) -> None:
    out.write_bytes(layout.AUDIT, audit_json(rate, seed, cross_cluster, rows))


def read_audit(out) -> dict | None:
    """The audit file of an output, or None when it has none (outputs from before the audit)."""
    if not out.exists(layout.AUDIT):
        return None
    try:
        audit = json.loads(out.read_bytes(layout.AUDIT))
        if not all(k in audit for k in ("sample_rate", "seed", "cross_cluster")):
            raise ValueError
    except (ValueError, TypeError):
        raise InputError(f"{out.display(layout.AUDIT)}: damaged (not the audit a run writes); "
                         "re-run the pipeline") from None
    return audit


def chi2_ppf(q: float, df: int) -> float:
    """scipy.stats.chi2.ppf(q, df), by the same formula that scipy uses (the same bits),
    without importing scipy.stats: ~2 s of every run's start-up."""
    return 2 * gammaincinv(df / 2, q)
