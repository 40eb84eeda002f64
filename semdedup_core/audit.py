"""The audit, on every run: how many near-duplicate pairs are still left among the KEPT clips,
estimated from a seeded sample of kept clips checked exactly against all kept clips.

Clusters are visited in ascending order, clips in rank order. Each clip is drawn into the
sample with probability `rate` by a generator seeded with (random_state, AUDIT_STREAM,
cluster), so the draw does not depend on eps; the drawn clips that are kept are checked. A
sampled clip u counts c_u, the clips v visited after it with u.v >= 1 - eps, u and v both kept
at that eps. Every kept pair is counted once, by its first member, so T / rate, with T the sum
of c_u over the sample, estimates the pairs left without bias (Horvitz-Thompson). The 95%
interval is the wider of a normal interval on that estimator's variance,
(1 - rate) / rate^2 * sum c_u^2, and an exact Poisson (Garwood) interval on T scaled by
1 / rate, which stays honest when the sample finds few or no pairs.
With rate 1 (small runs) every kept clip is checked and the count is exact.

Cost: the sample is sized (`audit_rate`) so that its GEMMs, sample x kept clips, are at most
AUDIT_FLOP_SHARE of the run's own GEMM work (assignment and pruning, from the cluster sizes, so
every door and backend draws the same sample), and the pipeline feeds it the clusters it
already holds in memory during pruning, so it reads nothing more.
"""

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammaincinv

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.config import eps_text

AUDIT_FLOP_SHARE = 0.02
AUDIT_MIN_SAMPLE = 100  # below this the interval says little; tiny runs afford it
AUDIT_STREAM = 0xA0D17  # keeps the sample's draws apart from the random ranking's
AUDIT_TILE = 8192  # kept clips per GEMM: (sample x tile) float32 scratch
AUDIT_DIRECT = 1024  # clusters this large are checked without gathering their kept rows


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
    """Feed clusters in ascending order (`add_cluster`), then read `result`. A cluster of at
    least AUDIT_DIRECT clips is checked as it is (its removed clips masked out of the few hits,
    not copied out of its rows); the kept clips of smaller ones are gathered until AUDIT_TILE
    of them are pending, so the GEMMs are large however small the clusters are."""

    def __init__(self, backend: Backend, eps_list: list[float], rate: float, seed: int):
        self.backend = backend
        self.eps = sorted(eps_list)
        self.rate = rate
        self.seed = seed
        self.kept = np.zeros(len(self.eps), np.int64)
        self._sample = None  # backend (m, d) float32
        self._sample_kept = np.zeros((0, len(self.eps)), bool)
        self._counts = np.zeros((0, len(self.eps)), np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # vecs, kept, drawn
        self._pending_rows = 0

    def add_cluster(self, cluster: int, emb: np.ndarray, removed: dict[float, np.ndarray]) -> None:
        """`emb`: the cluster's unit rows in rank order; `removed[eps]`: which are removed."""
        kept = np.stack([~removed[e] for e in self.eps], axis=1)  # (n, n_eps)
        self.kept += kept.sum(axis=0)
        drawn = np.random.default_rng([self.seed, AUDIT_STREAM, cluster]).random(len(kept)) \
            < self.rate
        if len(emb) >= AUDIT_DIRECT:
            self._flush()
            self._check(emb, kept, drawn)
            return
        rows = np.flatnonzero(kept[:, 0])  # kept at the smallest eps: kept at any
        if len(rows):
            self._pending.append((emb[rows], kept[rows], drawn[rows]))
            self._pending_rows += len(rows)
        if self._pending_rows >= AUDIT_TILE:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._check(*(np.concatenate(p) for p in zip(*self._pending)))
            self._pending, self._pending_rows = [], 0

    def _check(self, vecs: np.ndarray, kept: np.ndarray, drawn: np.ndarray) -> None:
        """Count the clips `vecs` (kept at each eps: `kept`) against the sample so far, then
        their sampled kept clips against the clips after them (in visit order), and add those
        to the sample."""
        xp = self.backend.xp
        if self._sample is not None:
            self._counts += self._count(self._sample, vecs, kept, None)
        picked = np.flatnonzero(drawn & kept[:, 0])
        if len(picked):
            mine = self.backend.asarray(vecs[picked])
            counts = self._count(mine, vecs, kept, picked)
            self._sample = mine if self._sample is None else xp.concatenate([self._sample, mine])
            self._sample_kept = np.concatenate([self._sample_kept, kept[picked]])
            self._counts = np.concatenate([self._counts, counts])

    def _count(self, sample, vecs: np.ndarray, kept: np.ndarray, after) -> np.ndarray:
        """(m, n_eps): per sampled clip, the kept clips of `vecs` within each eps; with `after`
        (the sample's own positions in `vecs`) only those after it. Each GEMM tile is compared
        once, with the largest eps's threshold; the few hits are then counted per eps on the
        host (per-eps passes over the whole tile cost as much as the GEMM itself)."""
        backend = self.backend
        m = sample.shape[0]
        counts = np.zeros((m, len(self.eps)), np.int64)
        thresholds = [np.float32(1 - eps) for eps in self.eps]
        lowest = min(thresholds)
        for s in range(0, len(vecs), AUDIT_TILE):
            sims = sample @ backend.asarray(vecs[s:s + AUDIT_TILE]).T
            flat = backend.xp.flatnonzero(sims >= lowest)
            if not len(flat):
                continue
            values = backend.to_numpy(sims.ravel()[flat])
            i, j = np.divmod(backend.to_numpy(flat), sims.shape[1])
            if after is not None:
                later = j + s > after[i]
                i, j, values = i[later], j[later], values[later]
            for e, threshold in enumerate(thresholds):
                hit = (values >= threshold) & kept[s + j, e]
                counts[:, e] += np.bincount(i[hit], minlength=m)
        return counts

    def result(self) -> list[EpsAudit]:
        self._flush()
        rows = []
        for j, eps in enumerate(self.eps):
            mine = self._sample_kept[:, j]
            c = self._counts[mine, j]
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
    return json.loads(out.read_bytes(layout.AUDIT))


def chi2_ppf(q: float, df: int) -> float:
    """scipy.stats.chi2.ppf(q, df), by the same formula that scipy uses (the same bits),
    without importing scipy.stats: ~2 s of every run's start-up."""
    return 2 * gammaincinv(df / 2, q)
