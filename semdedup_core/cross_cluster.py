"""Cross-cluster duplicates (`cross_cluster`): each clip is also compared with the clips of
neighbouring clusters, and scored against those that come earlier in one global order.

The global order extends every cluster's rank order to all clips (`order_keys`):
hard: (distance to own centroid, id) descending; easy: both ascending; random: a clip's
quantile in its cluster's seeded permutation, (rank + 0.5) / cluster size, ties by cluster index.

Which pairs are compared (`Probes`). Assignment puts a clip y in cluster b when c_b is its
nearest raw centroid (L2), so y lies on b's side of the bisector hyperplane of c_a and c_b. The
signed distance of a point v to that hyperplane, h(v) = (|v-c_a|^2 - |v-c_b|^2) / (2|c_a-c_b|),
changes by at most |v-w| between points v and w, and unit vectors with x.y >= 1 - eps are within
r = sqrt(2 eps) of each other. So a clip x of cluster a can only have such a twin in b when
h(x) >= -r: every other cluster is ruled out exactly. Of the clusters left, each clip probes the
`cross_cluster_max_probes` with the nearest bisectors (0: all of them), and a pair (x in a, y in
b) is compared when b is among x's probes AND a is among y's. A cap therefore misses a pair
when either clip has more than `max_probes` cluster boundaries nearer than the one between them.

One streaming pass over the shards, clusters ascending (`cross_cluster_tables`): at cluster
a's turn, each clip's probes come from its distances to every centroid (`Probes`); a's clips
are compared with the clips of earlier clusters that probe a and that a's clips probe (kept in
memory since those clusters' turns), one block per cluster pair, each pair computed once: both
sides take the similarity to the other side's EARLIER clips (`compare_block`). a's clips that
probe later clusters wait for those turns. Each clip keeps its best match (`CrossBest`): the
earliest clip in the global order within `TIE_TOL` of the best where the score can remove it
(as inside clusters; scored by one float64 dot product), the first best below that.

For a caller with its own rows and candidates (a corpus: new clips against earlier drops'),
`compare_block` plus `CrossBest.offer` is the "score these rows against these earlier
candidates" step.
"""

import json
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.errors import InputError
from semdedup_core.kmeans import ASSIGN_CHUNK, nearest_centroid
from semdedup_core.pairwise import TIE_TOL
from semdedup_core.parquet import (content_sha, footer, read_table, read_table_if_present,
                                   write_table)
from semdedup_core.shards import KeptShards, RankedShard, load_centroids, ranked_shard
from semdedup_core.storage import Storage
from semdedup_core.threads import LATENCY_BOUND_THREADS, host_threads, ordered_map

# Bisector distances come from float32 GEMMs (error ~1e-6 for unit vectors); the exact bound
# is widened by this much so that rounding never rules out a real pair.
BOUND_SLACK = 1e-3
SEARCHED_EPS_KEY = b"semdedup.cross_cluster.searched_eps"
MADE_FROM_KEY = b"semdedup.cross_cluster.made_from"  # `cross_provenance`


def order_keys(which_to_keep: str, rank_dist: np.ndarray, n: int) -> np.ndarray:
    """The global-order key (float64, smaller = earlier) of a cluster's clips in rank order."""
    if which_to_keep == "hard":
        return -np.asarray(rank_dist, np.float64)
    if which_to_keep == "easy":
        return np.asarray(rank_dist, np.float64)
    return (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)


def earlier_on_tie(which_to_keep: str, id_a: str, cluster_a: int, id_b: str,
                   cluster_b: int) -> bool:
    """Whether clip a comes before clip b (of another cluster) when their keys are equal:
    hard: the larger id; easy: the smaller id; random: the lower cluster index."""
    if which_to_keep == "hard":
        return id_a > id_b
    if which_to_keep == "easy":
        return id_a < id_b
    return cluster_a < cluster_b


def probe_radius(eps_list: list[float]) -> float:
    """r = sqrt(2 eps) for the largest eps: the farthest a twin can be, in L2."""
    return math.sqrt(2 * max(eps_list))


# Rows per pass over (rows, k) bisector distances: the temporaries stay in the CPU's cache.
PROBE_ROWS = 1024
SCALE_ROWS = 256  # rows of the (k, k) scale table built at once
# Added to the own-centroid term of a float32 squared-distance difference before it is scaled
# by 1 / (2 |c_a - c_b|): larger than its rounding error (~1e-6 for unit rows), so that the
# bound never rules out a real pair however close two centroids are.
D2_SLACK = 1e-5


class Probes:
    """Which clusters each clip is compared with (see the module's docstring), from the
    squared distances to every centroid that assignment computes (`kmeans.nearest_centroid`:
    d2[i, b] = |x_i - c_b|^2 - 1 as float32): for a clip x of cluster a the signed distance to
    the bisector of c_a and c_b is h_b(x) = (d2[a] - d2[b]) / (2 |c_a - c_b|), so the probes
    cost no GEMM of their own where assignment's distances are at hand (`from_d2`), and one
    like assignment's where not (`of_cluster`); both give the same bits.
    Holds a (k, k) float32 table of the 1 / (2 |c_a - c_b|) (-inf where b = a or c_b = c_a:
    no target); k = 5000 takes 100 MB."""

    def __init__(self, centroids: np.ndarray, radius: float, max_probes: int):
        self.centroids, self.radius = centroids, radius
        k = len(centroids)
        self.all = max_probes == 0 or max_probes >= k - 1  # every cluster the bound leaves
        self.max_probes = max_probes
        self.bound = np.float32(-(radius + BOUND_SLACK))
        c64 = centroids.astype(np.float64)
        sq = (c64 * c64).sum(axis=1)
        self.scale = np.empty((k, k), np.float32)
        for s in range(0, k, SCALE_ROWS):  # float64 scratch of SCALE_ROWS x k only
            gap2 = sq[s:s + SCALE_ROWS, None] + sq[None, :] - 2 * (c64[s:s + SCALE_ROWS] @ c64.T)
            # Where the Gram form cancels (centroids close together), the difference itself.
            for i, b in zip(*np.nonzero(gap2 < 1e-4)):
                gap2[i, b] = ((c64[s + i] - c64[b]) ** 2).sum()
            gap2[np.arange(len(gap2)), np.arange(s, s + len(gap2))] = 0  # itself: no target
            with np.errstate(divide="ignore"):
                self.scale[s:s + SCALE_ROWS] = np.where(
                    gap2 > 0, 0.5 / np.sqrt(np.maximum(gap2, 0)), -np.inf)
        self._on_device = {}  # backend name -> the table there
        # Shard file -> its rows' probes as (rows, max_probes) int32, -1 for none, ascending
        # (filled by assignment: `of_distances`; capped search only).
        self.by_file: dict[str, np.ndarray] = {}

    def _scale(self, backend: Backend):
        if backend.name not in self._on_device:
            self._on_device[backend.name] = backend.asarray(self.scale)
        return self._on_device[backend.name]

    def from_d2(self, backend: Backend, d2, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, targets) int64 host arrays, rows ascending, for the rows of `d2` (backend
        (n, k) float32, as `nearest_centroid` computes it) assigned to `labels` (host int64)."""
        xp = backend.xp
        n = d2.shape[0]
        one = n > 0 and bool((labels == labels[0]).all())  # one cluster: one row of scales
        scale_d = self._scale(backend)
        scale_d = scale_d[int(labels[0])][None, :] if one else scale_d
        labels_d = backend.asarray(labels)
        rows_out, targets_out = [], []
        for s in range(0, n, PROBE_ROWS):
            e = min(n, s + PROBE_ROWS)
            part = d2[s:e]
            own = xp.take_along_axis(part, labels_d[s:e, None], axis=1) + D2_SLACK
            # h >= the true distance to the bisector (D2_SLACK); -inf for no target.
            h = (own - part) * (scale_d if one else scale_d[labels_d[s:e]])
            if self.all:
                r, t = np.nonzero(backend.to_numpy(h >= self.bound))
            else:
                # The nearest bisectors by repeated argmax (first maximum on both backends, so
                # ties resolve alike): max_probes passes over (rows, k), cheaper than a sort.
                tops, oks = [], []
                every = xp.arange(e - s)
                for _ in range(self.max_probes):
                    top = h.argmax(axis=1)
                    oks.append(h[every, top] >= self.bound)
                    tops.append(top)
                    h[every, top] = -xp.inf
                top, ok = (np.stack([backend.to_numpy(a) for a in v], axis=1)
                           for v in (tops, oks))
                r, j = np.nonzero(ok)
                t = top[r, j]
            rows_out.append(r.astype(np.int64) + s)
            targets_out.append(t.astype(np.int64))
        if not rows_out:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        rows, targets = np.concatenate(rows_out), np.concatenate(targets_out)
        order = np.lexsort((targets, rows))
        return rows[order], targets[order]

    def of_distances(self, backend: Backend, d2, labels: np.ndarray) -> np.ndarray:
        """`from_d2` as (rows, max_probes) int32, each row's targets ascending, -1 for none:
        what assignment keeps per clip (`shards.assign_to_shards`, capped search only)."""
        rows, targets = self.from_d2(backend, d2, labels)
        probes = np.full((d2.shape[0], self.max_probes), -1, np.int32)
        probes[rows, np.arange(len(rows)) - np.searchsorted(rows, rows)] = targets
        return probes

    def of_ranked(self, backend: Backend, ranked: RankedShard) -> tuple[np.ndarray, np.ndarray]:
        """A ranked cluster's (rows, targets): from assignment's when it kept them for every
        file of the shard (`by_file`), else computed (`of_cluster`)."""
        if ranked.files and all(f in self.by_file for f in ranked.files):
            kept = np.concatenate([self.by_file[f] for f in ranked.files])
            if len(kept) == len(ranked.ids):
                kept = kept[ranked.order]
                rows, j = np.nonzero(kept >= 0)
                return rows.astype(np.int64), kept[rows, j].astype(np.int64)
        return self.of_cluster(backend, ranked.emb, ranked.cluster)

    def of_cluster(self, backend: Backend, emb: np.ndarray,
                   cluster: int) -> tuple[np.ndarray, np.ndarray]:
        """`from_d2` for unit rows `emb`, all of `cluster`, computing their distances to the
        centroids as assignment does."""
        rows_out, targets_out = [], []
        labels = np.full(min(len(emb), ASSIGN_CHUNK), cluster, np.int64)

        def chunk(start: int, d2, _lab) -> None:
            r, t = self.from_d2(backend, d2, labels[:d2.shape[0]])
            rows_out.append(r + start)
            targets_out.append(t)

        nearest_centroid(backend, emb, backend.asarray(self.centroids), on_chunk=chunk)
        if not rows_out:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(rows_out), np.concatenate(targets_out)


# `_earlier_best` cuts a block's rows into at most BANDS bands of at least BAND_ROWS rows: only a
# band's stretch of the staircase is masked (copies of about 1 / BANDS of the block), the rest
# is read in place. Blocks under STAIRCASE_MIN elements are masked whole: there the calls cost
# more than the passes they save (measured: 300 x 300 slower, 400 x 600 and up ~1.8x faster).
BANDS = 8
BAND_ROWS = 64
STAIRCASE_MIN = 1 << 17
# Pairs per task of a turn's blocks on the compute threads (`cross_cluster_tables`).
GROUP_PAIRS = 1 << 16
# Turns whose blocks may be in flight before the oldest is merged (`cross_cluster_tables`).
TURNS_AHEAD = 3


def _earlier_best(sims: np.ndarray, first: np.ndarray, floor: float):
    """Each row's best of `sims[i, :first[i]]` (host arrays; `first` nondecreasing: the
    staircase of earlier columns when both sides are in the global order) and its column: the
    first best, or where the best is >= `floor` the earliest within TIE_TOL of it; -inf and
    column 0 where a row has no earlier column (as an argmax over a fully masked row)."""
    n, m = sims.shape
    top = np.full(n, -np.inf, sims.dtype)
    arg = np.zeros(n, np.int64)
    step = max(BAND_ROWS, -(-n // BANDS))
    for s in range(0, n, step):
        e = min(n, s + step)
        lo, hi = int(first[s]), int(first[e - 1])
        if lo:  # columns every row of the band may take: read in place
            part = sims[s:e, :lo]
            arg[s:e] = part.argmax(axis=1)
            top[s:e] = np.take_along_axis(part, arg[s:e, None], axis=1)[:, 0]
        if hi > lo:  # the staircase's stretch: masked; taken where strictly better (first best)
            band = np.where(np.arange(lo, hi) < first[s:e, None], sims[s:e, lo:hi], -np.inf)
            band_arg = band.argmax(axis=1)
            band_top = np.take_along_axis(band, band_arg[:, None], axis=1)[:, 0]
            better = band_top > top[s:e]
            arg[s:e] = np.where(better, band_arg + lo, arg[s:e])
            top[s:e] = np.where(better, band_top, top[s:e])
    near = np.flatnonzero(top >= floor)
    if len(near):  # the earliest within TIE_TOL of the best: the best itself is one, so the
        # first hit lies in the row's prefix, whatever lies past it
        hit = sims[near, :int(first[near[-1]])] >= (top[near] - TIE_TOL)[:, None]
        arg[near] = hit.argmax(axis=1)
    return top, arg


def _masked_best(sims: np.ndarray, y_first: np.ndarray, floor: float):
    """`compare_block`'s result on the host for a small block without equal keys across the
    sides (`y_first`: column j comes before row i): few calls, as most blocks are a few
    hundred pairs and there the calls, not the passes, cost. `sims` is overwritten."""
    n, m = sims.shape
    rows = np.where(y_first, sims, -np.inf)
    np.copyto(sims, -np.inf, where=y_first)  # what is left: each column's earlier rows
    found = []
    for masked, axis in ((rows, 1), (sims, 0)):
        arg = masked.argmax(axis=axis)
        top = masked[np.arange(n), arg] if axis == 1 else masked[arg, np.arange(m)]
        near = np.flatnonzero(top >= floor)
        if len(near):  # the earliest within TIE_TOL of the best
            lim = top[near] - TIE_TOL
            arg[near] = (masked[near] >= lim[:, None]).argmax(axis=1) if axis == 1 else \
                (masked[:, near] >= lim[None, :]).argmax(axis=0)
        found += [top, arg]
    return tuple(found)


def compare_block(backend: Backend, which_to_keep: str, x_emb: np.ndarray, x_key: np.ndarray,
                  x_tie, y_emb: np.ndarray, y_key: np.ndarray, y_tie, floor: float,
                  tied: bool | None = None):
    """Clips x (rows) of one cluster against clips y (columns) of another, each side in its
    cluster's rank order (so in the global order), every pair compared once for both sides.
    `*_tie(i)`: (id, cluster) of row/column i, asked only on equal keys (`earlier_on_tie`).
    Returns host arrays (row_top, row_arg, col_top, col_arg): each row's best GEMM similarity
    to an EARLIER column (-inf when none) and that column, and the same for each column
    against the earlier rows. Where the best is >= `floor` (it may remove the clip), the
    earliest clip within TIE_TOL of it is taken, as inside clusters; below, the first best
    (no removal depends on it, and it saves two passes over the block). `tied`: whether a
    key of x equals one of y's, where the caller knows (None: checked here)."""
    xp = backend.xp
    sims = backend.asarray(x_emb) @ backend.asarray(y_emb).T
    # Both keys ascend, so a row's earlier columns are a prefix (first_col[i]), and a
    # column's earlier rows too: on the host, no masked copy of the whole block.
    if tied is None:
        first_col = np.searchsorted(y_key, x_key)
        tied = len(y_key) and bool((y_key[np.minimum(first_col, len(y_key) - 1)] == x_key).any())
    if xp is np and not tied:
        if sims.size >= STAIRCASE_MIN:
            row_top, row_arg = _earlier_best(sims, np.searchsorted(y_key, x_key), floor)
            col_top, col_arg = _earlier_best(sims.T, np.searchsorted(x_key, y_key), floor)
            return row_top, row_arg, col_top, col_arg
        return _masked_best(sims, y_key < x_key[:, None], floor)
    y_first = backend.asarray(y_key)[None, :] < backend.asarray(x_key)[:, None]
    if tied:  # equal keys (rare: equal float32 distances)
        i, j = np.nonzero(x_key[:, None] == y_key[None, :])
        values = np.array([earlier_on_tie(which_to_keep, *y_tie(int(jj)), *x_tie(int(ii)))
                           for ii, jj in zip(i, j)], dtype=bool)
        y_first[backend.asarray(i), backend.asarray(j)] = backend.asarray(values)
    found = []
    for axis, masked in ((1, xp.where(y_first, sims, -xp.inf)),
                         (0, xp.where(y_first, -xp.inf, sims))):
        arg = masked.argmax(axis=axis)
        every = xp.arange(len(arg))
        top = masked[every, arg] if axis == 1 else masked[arg, every]
        arg, top = backend.to_numpy(arg), backend.to_numpy(top)
        near = np.flatnonzero(top >= floor)
        if len(near):  # the earliest within TIE_TOL of the best
            part = masked[backend.asarray(near)] if axis == 1 else masked[:, backend.asarray(near)]
            lim = backend.asarray(top[near] - TIE_TOL)
            hit = part >= (lim[:, None] if axis == 1 else lim[None, :])
            arg[near] = backend.to_numpy(hit.argmax(axis=axis))
        found += [top, arg]
    return tuple(found)


# GEMM similarities are within ~1e-6 of the float64 dot product; from this far below the
# largest eps's threshold up, a match's score is recomputed exactly.
RESCORE_MARGIN = 1e-3


def exact_scores(top: np.ndarray, emb: np.ndarray, others: np.ndarray, match: np.ndarray,
                 floor: np.float32) -> np.ndarray:
    """The scores to record for best GEMM similarities `top` (float32) of clips `emb` to the
    clips `others[match]`: as inside clusters, one float64 dot product with the chosen clip
    where it could decide a removal (`top >= floor`); below, where no eps of the run removes
    anything, the GEMM value."""
    if not len(top) or top.max() < floor:  # nothing to rescore (most blocks)
        return top.astype(np.float32, copy=False)
    score = top.astype(np.float32, copy=True)
    near = np.flatnonzero(top >= floor)
    if len(near):
        score[near] = np.einsum("ij,ij->i", emb[near].astype(np.float64),
                                others[match[near]].astype(np.float64))
    return score


class CrossBest:
    """Every clip's best match so far among earlier clips of other clusters, merged block by
    block by the rule of the pairwise pass: a new best must beat the old by more than TIE_TOL;
    within TIE_TOL the clip earlier in the global order wins. Clips are numbered in the order
    their clusters are added, rank order within each (`at`); all clips' ids are kept (max_id)."""

    def __init__(self, which_to_keep: str):
        self.which_to_keep = which_to_keep
        self.ids_of: dict[int, pa.Array] = {}
        self.base: dict[int, int] = {}
        self.size = 0
        self.best = np.empty(0, np.float32)  # GEMM value, compared with TIE_TOL
        self.score = np.empty(0, np.float32)  # float64 dot product with the chosen clip
        self.match_cluster = np.empty(0, np.int64)  # -1: none yet
        self.match_row = np.empty(0, np.int64)
        self.match_key = np.empty(0, np.float64)
        # (every clip's id in `at`'s numbering, cluster -> its first number): see `all_added`
        self.every: tuple[pa.Array, np.ndarray] | None = None

    def add_cluster(self, cluster: int, ids: pa.Array) -> None:
        assert self.every is None, "no cluster is added after `all_added`"
        self.ids_of[cluster], self.base[cluster] = ids, self.size
        self.size += len(ids)
        if self.size > len(self.best):  # grown by doubling: amortised O(1) per clip
            grow = max(self.size, 2 * len(self.best)) - len(self.best)
            for name, fill in (("best", -np.inf), ("score", 0), ("match_cluster", -1),
                               ("match_row", 0), ("match_key", np.inf)):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.full(grow, fill, old.dtype)]))

    def all_added(self) -> None:
        """No cluster is added from now on: the tables then take max_id from one array of
        every clip's id (each table built before took from its own and its matches' ids, a
        copy of those per table; at the end of a pass most tables are still to build)."""
        base_of = np.zeros(max(self.base, default=0) + 1, np.int64)
        base_of[list(self.base)] = list(self.base.values())
        self.every = (pa.concat_arrays(list(self.ids_of.values())) if self.ids_of else
                      pa.array([], pa.string()), base_of)

    def at(self, cluster: int, rows: np.ndarray) -> np.ndarray:
        return rows + self.base[cluster]

    def offer(self, at: np.ndarray, top: np.ndarray, score: np.ndarray, cluster: np.ndarray,
              match_row: np.ndarray, match_key: np.ndarray) -> None:
        """Candidates for the clips `at` (distinct): best GEMM similarity `top` (-inf: none)
        to the clip `match_row` of `cluster`, with its key, and the score to record."""
        found = top > -np.inf
        at, top, score, cluster, match_row, match_key = (
            v[found] for v in (at, top, score, cluster, match_row, match_key))
        if not len(at):
            return
        best, key = self.best[at], self.match_key[at]
        earlier = match_key < key
        for t in np.flatnonzero(match_key == key).tolist():  # equal keys (rare)
            old, new = int(self.match_cluster[at[t]]), int(cluster[t])
            earlier[t] = earlier_on_tie(
                self.which_to_keep, self.ids_of[new][int(match_row[t])].as_py(), new,
                self.ids_of[old][int(self.match_row[at[t]])].as_py(), old)
        take = (top > best + TIE_TOL) | ((top >= best - TIE_TOL) & earlier)
        self.best[at] = np.maximum(best, top)
        at = at[take]
        self.match_cluster[at] = cluster[take]
        self.match_row[at] = match_row[take]
        self.match_key[at] = match_key[take]
        self.score[at] = score[take]

    def table(self, cluster: int, searched_eps: float, made_from: str | None = None) -> pa.Table:
        """`id, max_id, max_cluster, cosine_sim_score` in the cluster's rank order; a clip with
        no earlier candidate gets score 0, its own id and its own cluster. The schema metadata
        records the eps the search was bounded by (scores at or above 1 - it are exact) and
        what else the table depends on (`made_from`: `cross_provenance`)."""
        ids = self.ids_of[cluster]
        span = slice(self.base[cluster], self.base[cluster] + len(ids))
        match_cluster, match_row = self.match_cluster[span], self.match_row[span]
        found = match_cluster >= 0
        if self.every is not None:  # one take from every clip's id (`at`'s numbering)
            every_id, base_of = self.every
            at = np.arange(span.start, span.stop, dtype=np.int64)
            at[found] = base_of[match_cluster[found]] + match_row[found]
            max_id = every_id.take(pa.array(at))
        else:  # one take from the own ids followed by those of the matched clusters
            matched = np.unique(match_cluster[found])
            start = np.cumsum([len(ids)] + [len(self.ids_of[c]) for c in matched.tolist()])
            at = np.arange(len(ids), dtype=np.int64)
            at[found] = start[np.searchsorted(matched, match_cluster[found])] + match_row[found]
            max_id = pa.concat_arrays([ids] + [self.ids_of[c] for c in matched.tolist()]).take(
                pa.array(at)) if len(matched) else ids
        table = pa.table({layout.ID: ids, layout.MAX_ID: max_id,
                          layout.MAX_CLUSTER: pa.array(np.where(found, match_cluster, cluster)
                                                       .astype(np.int64)),
                          layout.SCORE: pa.array(np.clip(self.score[span], 0, 1),
                                                 type=pa.float32())})
        meta = {SEARCHED_EPS_KEY: eps_text(searched_eps).encode()}
        if made_from is not None:
            meta[MADE_FROM_KEY] = made_from.encode()
        return table.replace_schema_metadata(meta)


def searched_eps(table: pa.Table) -> float | None:
    """The largest eps a cross table's search covered (see `cross_table`)."""
    meta = table.schema.metadata or {}
    return float(meta[SEARCHED_EPS_KEY]) if SEARCHED_EPS_KEY in meta else None


def cross_provenance(cfg: DedupConfig, centroids_sha: str) -> str:
    """What a cluster's cross table depends on beyond its own clips, as text: the clustering
    (the centroids file's content hash), the global order's settings and the search's cap.
    Recorded in each table (`MADE_FROM_KEY`) and checked by every step that uses one
    (`check_cross_table`): a table from a run with other settings is never combined with
    this run's pruning tables."""
    made = {"centroids": centroids_sha, "which_to_keep": cfg.which_to_keep,
            "sim_metric": cfg.sim_metric,
            "cross_cluster_max_probes": cfg.cross_cluster_max_probes}
    if cfg.which_to_keep == "random":
        made["random_state"] = cfg.random_state
    return json.dumps(made, sort_keys=True)


def run_provenance(cfg: DedupConfig, out: Storage) -> str:
    """`cross_provenance` of this config on the centroids in `out`."""
    return cross_provenance(cfg, content_sha(out.read_bytes(layout.CENTROIDS)))


STALE_CROSS = ("materialise semdedup_cross_cluster_tables for these partitions with this run's "
               "config (or run the whole job)")


def check_made_for(where: str, meta: dict | None, made_from: str, max_eps: float) -> None:
    """A cross table's schema metadata `meta` says it was made for `made_from` (this run's
    `cross_provenance`) by a search at least as wide as `max_eps`; else one InputError naming
    the table (`where`) and what differs. A table that does not say (written before the
    record existed, or rewritten by another tool) is refused too: it cannot be vouched for."""
    meta = meta or {}
    if MADE_FROM_KEY not in meta or SEARCHED_EPS_KEY not in meta:
        raise InputError(f"{where} does not record what it was made from (written by an older "
                         f"semdedup, or rewritten since); {STALE_CROSS}")
    made, want = json.loads(meta[MADE_FROM_KEY]), json.loads(made_from)
    differ = [f"{k} {made.get(k)!r} (this run: {want.get(k)!r})"
              for k in sorted(set(made) | set(want)) if made.get(k) != want.get(k)]
    if differ:
        raise InputError(f"{where} was made by a run with other settings: {', '.join(differ)}; "
                         f"{STALE_CROSS}")
    searched = float(meta[SEARCHED_EPS_KEY])
    if searched < max_eps:
        raise InputError(f"{where} was searched up to eps {eps_text(searched)}, this run's "
                         f"largest eps is {eps_text(max_eps)}; {STALE_CROSS}")


def check_cross_table(out: Storage, cluster: int, cross: pa.Table, pruning_ids: pa.Array | None,
                      made_from: str | None, max_eps: float) -> None:
    """Before a cross table's scores are combined with a pruning table's: the cross table was
    made for this run's clustering and settings (`made_from`: `cross_provenance`; None, a
    sweep of a finished output: not checked) by a search at least as wide as its largest eps,
    and lists the clips of `pruning_ids` (None: not checked) in their order; else one
    InputError naming the table and what differs."""
    where = out.display(layout.cross_table(cluster))
    if made_from is not None:
        check_made_for(where, cross.schema.metadata, made_from, max_eps)

    def whole(a):  # a table's column is chunked, a ranked shard's ids are not
        return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a

    if pruning_ids is not None and not whole(cross.column(layout.ID)).equals(whole(pruning_ids)):
        raise InputError(f"{where} does not list the clips of "
                         f"{out.display(layout.pruning_table(cluster))} in its order: it was "
                         f"made by a run with other settings; {STALE_CROSS}")


@dataclass
class CrossResult:
    cluster: int
    table: pa.Table
    candidates: int  # clips of other clusters it was compared with
    flops: int


def cross_cluster_tables(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
                         targets: list[int] | None = None, probes: "Probes | None" = None,
                         keep: KeptShards | None = None,
                         files_of: dict[int, list[str]] | None = None) -> Iterator[CrossResult]:
    """Write `semdedup_cross_cluster_tables/cluster_<k>.parquet` for every cluster in
    `targets` (default: all of `clusters`, the clusters with a shard), yielding each result
    once its table is final, in one pass over the shards (ascending).

    At cluster a's turn, a's clips are compared with the clips of each earlier cluster b that
    probe a (kept since b's turn) where they probe b: one block per (b, a), each pair once,
    and each side takes the similarity to the other side's earlier clips. Then a's clips that
    probe later clusters are kept for those clusters' turns. A cluster's table is final after
    the turn of the last cluster its clips probe. Memory: a few clusters, every clip's id and
    best match, and the clips waiting for a later cluster (at the peak about half of
    clips x probes x d floats). A block only depends on its two clusters and a clip's offers
    come in the same order either way, so a subset of `targets` (Dagster partitions) gets
    the same tables as the whole run. `keep`: where to keep the ranked shards read (up to its
    budget) for the prune loop that follows. `files_of`: every cluster's shard files as
    assignment wrote them (none listed again)."""
    targets = set(clusters if targets is None else targets)
    present = set(clusters)
    centroids = load_centroids(out)
    probes = probes or Probes(centroids, probe_radius(cfg.eps_to_extract),
                              cfg.cross_cluster_max_probes)
    has_shard = np.zeros(len(centroids), bool)
    has_shard[sorted(present)] = True
    is_target = np.zeros(len(centroids), bool)
    is_target[sorted(targets)] = True
    floor = np.float32(1 - max(cfg.eps_to_extract) - RESCORE_MARGIN)
    which = cfg.which_to_keep
    dim = centroids.shape[1]
    state = CrossBest(which)
    candidates: dict[int, int] = {}
    flops: dict[int, int] = {}
    final_after: dict[int, list[int]] = {}  # turn -> clusters whose tables are final then
    # cluster -> [(earlier cluster, its rows that probe this one, their vectors, their keys)]
    waiting: dict[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}

    def tie_of(cluster: int, rows: np.ndarray):
        return lambda i: (state.ids_of[cluster][int(rows[i])].as_py(), cluster)

    def load(cluster: int):
        """A cluster in rank order with its keys, and its clips that probe other clusters
        grouped by target and gathered (on a host thread, off the turns' critical path):
        (ranked, key, {target: (start, end)} into the grouped rows, the grouped rows, the
        vectors of those that probe earlier clusters, [(later target, rows, vectors)])."""
        ranked = ranked_shard(cfg, out, cluster,
                              None if files_of is None else files_of.get(cluster, []))
        if ranked is None:
            return None
        rows, to = probes.of_ranked(backend, ranked)
        known = has_shard[to]
        rows, to = rows[known], to[known]
        key = order_keys(which, ranked.rank_dist, len(ranked.ids))
        # Grouped by target (stable: each group's rows stay ascending); targets never equal
        # the own cluster, so the earlier targets' groups come first.
        by_target = np.argsort(to, kind="stable")
        grouped_to, grouped_rows = to[by_target], rows[by_target]
        targets_of = np.unique(grouped_to)
        bounds = np.searchsorted(grouped_to, np.append(targets_of, np.iinfo(np.int64).max))
        span = {b: (int(bounds[g]), int(bounds[g + 1])) for g, b in enumerate(targets_of.tolist())}
        n_earlier = int(np.searchsorted(grouped_to, cluster))
        later = [(b, grouped_rows[s:e], ranked.emb[grouped_rows[s:e]])
                 for b, (s, e) in span.items() if b > cluster and (cluster in targets or b in targets)]
        return ranked, key, span, grouped_rows, ranked.emb[grouped_rows[:n_earlier]], later

    def block(a: int, x_rows, x_emb, x_key, b: int, y_rows, y_emb, y_key, tied):
        """One (b, a) block: each row's and column's best earlier match (`compare_block`)
        with the score to record (`exact_scores`)."""
        row_top, row_arg, col_top, col_arg = compare_block(
            backend, which, x_emb, x_key, tie_of(a, x_rows), y_emb, y_key, tie_of(b, y_rows),
            floor, tied)
        return (row_top, row_arg, exact_scores(row_top, x_emb, y_emb, row_arg, floor),
                col_top, col_arg, exact_scores(col_top, y_emb, x_emb, col_arg, floor))

    def blocks(jobs: list) -> list:
        return [block(*j) for j in jobs]

    def start_turn(ranked: RankedShard, key: np.ndarray, span: dict, grouped_rows: np.ndarray,
                   x_all: np.ndarray, later: list, pool) -> tuple[int, list, list]:
        """Cluster a's blocks (`load`'s groups), started on the pool (computed here without
        one); a's clips that probe later clusters wait for those turns."""
        a = ranked.cluster
        state.add_cluster(a, ranked.ids)
        candidates[a] = flops[a] = 0
        incoming = [w for w in waiting.pop(a, []) if w[0] in span]
        # Keys equal across clusters are rare: one check for the turn (a's keys ascend),
        # else one per block.
        tied = False
        if incoming:
            y_keys = np.concatenate([w[3] for w in incoming])
            tied = None if (key[np.minimum(np.searchsorted(key, y_keys), len(key) - 1)]
                            == y_keys).any() else False
        jobs = []
        for b, y_rows, y_emb, y_key in incoming:
            start, end = span[b]
            x_rows = grouped_rows[start:end]
            flops[a] += 2 * len(x_rows) * len(y_rows) * dim
            candidates[a] += len(y_rows) if a in targets else 0
            candidates[b] += len(x_rows) if b in targets else 0
            jobs.append((a, x_rows, x_all[start:end], key[x_rows], b, y_rows, y_emb, y_key,
                         tied))
        # Blocks are independent: side by side on the CPU's compute threads, consecutive
        # blocks in tasks of about GROUP_PAIRS pairs (most blocks are tiny: a task each cost
        # more in hand-offs than their work).
        groups, pairs = [], GROUP_PAIRS
        for j in jobs:
            if pairs >= GROUP_PAIRS:
                groups.append([])
                pairs = 0
            groups[-1].append(j)
            pairs += len(j[1]) * len(j[5])
        done = [blocks(g) for g in groups] if pool is None else \
            [pool.submit(blocks, g) for g in groups]
        for b, sel, emb in later:
            waiting.setdefault(b, []).append((a, sel, emb, key[sel]))
        if a in targets:
            last = max(span) if span and max(span) > a else a
            final_after.setdefault(last, []).append(a)
        return a, jobs, done

    def end_turn(a: int, jobs: list, done: list) -> list[int]:
        """Merge cluster a's blocks (turn after turn, in block order: the same offers in the
        same order however the blocks ran), all of the turn's at once; the clusters whose
        tables are final now."""
        if jobs:
            found = [one for d in done for one in (d if isinstance(d, list) else d.result())]
            row_top, row_arg, row_score, col_top, col_arg, col_score = (
                np.concatenate(v) for v in zip(*found))
            b_of = np.array([j[4] for j in jobs])
            n_x, n_y = np.array([len(j[1]) for j in jobs]), np.array([len(j[5]) for j in jobs])
            x_rows, x_key = np.concatenate([j[1] for j in jobs]), np.concatenate([j[3] for j in jobs])
            y_rows, y_key = np.concatenate([j[5] for j in jobs]), np.concatenate([j[7] for j in jobs])
            # Each block's args index its own rows / columns: shifted to the concatenations.
            col_of = row_arg + np.repeat(np.cumsum(n_y) - n_y, n_x)
            row_of = col_arg + np.repeat(np.cumsum(n_x) - n_x, n_y)
            theirs = np.repeat(is_target[b_of], n_y)
            if theirs.any():  # to earlier clusters' clips, distinct (one block per cluster)
                base = np.repeat(np.array([state.base[b] for b in b_of.tolist()]), n_y)
                state.offer(*(v[theirs] for v in (
                    y_rows + base, col_top, col_score, np.full(len(y_rows), a), x_rows[row_of],
                    x_key[row_of])))
            if a in targets:  # a clip of a is in up to max_probes blocks: merged in block order
                offers = (state.at(a, x_rows), row_top, row_score, np.repeat(b_of, n_x),
                          y_rows[col_of], y_key[col_of])
                order = np.argsort(offers[0], kind="stable")
                first = np.r_[True, offers[0][order][1:] != offers[0][order][:-1]]
                layer = np.empty(len(order), np.int64)
                layer[order] = np.arange(len(order)) - np.maximum.accumulate(
                    np.where(first, np.arange(len(order)), 0))
                for n in range(int(layer.max()) + 1):
                    state.offer(*(v[layer == n] for v in offers))
        return final_after.pop(a, [])

    made_from = run_provenance(cfg, out)

    def write(cluster: int) -> CrossResult:
        table = state.table(cluster, max(cfg.eps_to_extract), made_from)
        write_table(out, layout.cross_table(cluster), table)
        return CrossResult(cluster, table, candidates[cluster], flops[cluster])

    def finished() -> Iterator[int]:
        with backend.compute_pool() as pool:
            # A turn's blocks are merged once TURNS_AHEAD later turns' are started (in turn
            # order): the compute threads do not wait at a turn's last block, which may be
            # one of the few large ones.
            started = deque()
            for loaded in ordered_map(load, sorted(present), host_threads()):
                if loaded is not None:
                    if keep is not None:
                        keep.keep(loaded[0])
                    started.append(start_turn(*loaded, pool))
                    if len(started) > TURNS_AHEAD:
                        yield from end_turn(*started.popleft())
            state.all_added()
            while started:
                yield from end_turn(*started.popleft())
        # Clusters whose last probe went to a cluster that had no shard after all end here.
        for c in sorted(final_after):
            yield from final_after.pop(c)

    yield from ordered_map(write, finished(), host_threads())


# After "<path>: not found" (`parquet.reading`): removals without a cross table would silently
# leave the cross-cluster duplicates in.
CROSS_TABLE_MISSING = (", and cross_cluster is on: the cross tables come before the removals "
                       "(in Dagster: materialise semdedup_cross_cluster_tables for these "
                       "partitions first, or run the whole job)")


def require_cross_tables(out: Storage, clusters: list[int], made_from: str | None = None,
                         max_eps: float = 0.0) -> None:
    """With cross_cluster, before removals are written for `clusters` (those with a shard):
    every one of them has its cross table (one listing), else the first missing is named; and
    with `made_from` (a run's step, not a sweep of a finished output) each was made for this
    run (`check_made_for`, from the tables' footers: one request each on S3), all before
    anything is written. Each is checked again when it is used."""
    present = set(out.list_files(layout.CROSS_TABLES, recursive=False))
    missing = [c for c in clusters if layout.cross_table(c) not in present]
    if missing:
        raise InputError(f"{out.display(layout.cross_table(missing[0]))}: not found"
                         f"{CROSS_TABLE_MISSING}")

    if made_from is None:
        return

    def check(cluster: int) -> None:
        meta = footer(out, layout.cross_table(cluster)).schema.to_arrow_schema().metadata
        check_made_for(out.display(layout.cross_table(cluster)), meta, made_from, max_eps)

    for _ in ordered_map(check, clusters, LATENCY_BOUND_THREADS):
        pass


def read_cross_table(out: Storage, cluster: int, required: bool = False) -> pa.Table | None:
    """A cluster's cross table (one request on S3). `required` (cross_cluster is on): a
    missing one is an error; else None when the output has none (cross_cluster was off)."""
    rel = layout.cross_table(cluster)
    if required:
        return read_table(out, rel, missing=CROSS_TABLE_MISSING)
    return read_table_if_present(out, rel)
