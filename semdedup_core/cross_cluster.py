"""Cross-cluster duplicates (`cross_cluster`): each clip is also compared with the clips of
neighbouring clusters, and scored against those that come earlier in one global order.

The global order extends every cluster's rank order to all clips (`order_keys`):
hard: (distance to own centroid, id) descending; easy: both ascending; random: a clip's
quantile in its cluster's seeded permutation, (rank + 0.5) / cluster size, ties by cluster index.

Which pairs are compared (`probe_targets`). Assignment puts a clip y in cluster b when c_b is its
nearest raw centroid (L2), so y lies on b's side of the bisector hyperplane of c_a and c_b. The
signed distance of a point v to that hyperplane, h(v) = (|v-c_a|^2 - |v-c_b|^2) / (2|c_a-c_b|),
changes by at most |v-w| between points v and w, and unit vectors with x.y >= 1 - eps are within
r = sqrt(2 eps) of each other. So a clip x of cluster a can only have such a twin in b when
h(x) >= -r: every other cluster is ruled out exactly. Of the clusters left, each clip probes the
`cross_cluster_max_probes` with the nearest bisectors (0: all of them), and a pair (x in a, y in
b) is compared when b is among x's probes AND a is among y's. A cap therefore misses a pair
when either clip has more than `max_probes` cluster boundaries nearer than the one between them.

Two streaming passes over the shards. Route: per cluster, x.C (an (n, k) GEMM as in assignment)
gives every clip's probes; each clip is spilled (local scratch, like assignment) to the clusters
it probes. Pull: per cluster b, its clips (rows) against the candidates routed to it (columns,
sorted in the global order), per source cluster a only the rows that probe a, keeping columns
that come earlier than the row. Each clip's score is its best such similarity; its match is the
earliest clip in the global order within `TIE_TOL` of the best (as inside clusters).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.kmeans import ASSIGN_CHUNK
from semdedup_core.pairwise import TIE_TOL
from semdedup_core.parquet import read_table, write_table
from semdedup_core.shards import RankedShard, Spill, load_centroids, ranked_shard
from semdedup_core.storage import Storage
from semdedup_core.threads import host_threads, ordered_map

# Bisector distances come from float32 GEMMs (error ~1e-6 for unit vectors); the exact bound
# is widened by this much so that rounding never rules out a real pair.
BOUND_SLACK = 1e-3
_KEY, _SOURCE = 0, 1  # the meta columns of a routed candidate in the spill


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


def probe_targets(backend: Backend, emb: np.ndarray, cluster: int, centroids: np.ndarray,
                  radius: float, max_probes: int) -> tuple[np.ndarray, np.ndarray]:
    """The clusters each unit row of `emb` (clips of `cluster`) is compared with, as
    (rows, targets) int64 host arrays, rows ascending (see the module's docstring)."""
    xp = backend.xp
    k = centroids.shape[0]
    c64 = centroids.astype(np.float64)
    gap = np.linalg.norm(c64 - c64[cluster], axis=1)
    # Itself, and a centroid equal to its own (one of the two cells is empty), are no target.
    possible = gap > 0
    possible[cluster] = False
    inv = np.where(possible, 0.5 / np.where(possible, gap, 1), 0).astype(np.float32)
    inv_d, possible_d = backend.asarray(inv), backend.asarray(possible)
    C = backend.asarray(centroids.astype(np.float32))
    c_sq = (C * C).sum(axis=1)
    minus_2ct = xp.ascontiguousarray((-2 * C).T)
    bound = -(radius + BOUND_SLACK)
    rows_out, targets_out = [], []
    for s in range(0, emb.shape[0], ASSIGN_CHUNK):
        x = backend.asarray(emb[s:s + ASSIGN_CHUNK])
        d2 = x @ minus_2ct + c_sq  # |x - c|^2 - 1
        h = (d2[:, cluster:cluster + 1] - d2) * inv_d
        h = xp.where(possible_d[None, :], h, -xp.inf)
        if max_probes == 0 or max_probes >= k - 1:  # every cluster the bound leaves
            r, t = np.nonzero(backend.to_numpy(h >= bound))
        else:
            # The nearest bisectors by repeated argmax (first maximum on both backends, so
            # ties resolve alike): max_probes passes over (rows, k), cheaper than a sort.
            tops, oks = [], []
            for _ in range(max_probes):
                top = h.argmax(axis=1)[:, None]
                oks.append(xp.take_along_axis(h, top, axis=1) >= bound)
                tops.append(top)
                h[xp.arange(h.shape[0])[:, None], top] = -xp.inf
            top, ok = (backend.to_numpy(xp.concatenate(v, axis=1)) for v in (tops, oks))
            r, j = np.nonzero(ok)
            t = top[r, j]
        rows_out.append(r.astype(np.int64) + s)
        targets_out.append(t.astype(np.int64))
    if not rows_out:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows, targets = np.concatenate(rows_out), np.concatenate(targets_out)
    order = np.lexsort((targets, rows))
    return rows[order], targets[order]


@dataclass
class Candidates:
    """Clips of other clusters routed to one cluster, in the global order."""

    ids: pa.Array
    emb: np.ndarray  # float32 (m, d)
    key: np.ndarray  # float64 (m,)
    source: np.ndarray  # int64 (m,): their own cluster


def sort_candidates(which_to_keep: str, ids: pa.Array, emb: np.ndarray,
                    meta: np.ndarray) -> Candidates:
    key, source = meta[:, _KEY], meta[:, _SOURCE].astype(np.int64)
    tie = (ids, "descending") if which_to_keep == "hard" else \
        (ids, "ascending") if which_to_keep == "easy" else (pa.array(source), "ascending")
    keys = pa.table({"k": pa.array(key), "t": tie[0]})
    order = pc.sort_indices(keys, sort_keys=[("k", "ascending"), ("t", tie[1])]).to_numpy()
    return Candidates(ids.take(pa.array(order)), emb[order], key[order], source[order])


# Pairs (rows x columns) one more GEMM is worth: source clusters are grouped into one GEMM
# while the pairs that grouping computes in vain stay below this (small GEMMs run far below
# BLAS or device speed: measured 28x below on 73 x 154 x 384 on the busy 2-core machine).
GEMM_OVERHEAD_PAIRS = 1 << 17


def source_groups(source: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
    """The candidates' source clusters, ascending, cut into groups that are compared in one
    GEMM each: a source joins the current group while the group's rows x columns exceed the
    sum of its sources' own blocks by less than GEMM_OVERHEAD_PAIRS per GEMM saved."""
    sources, counts = np.unique(source, return_counts=True)
    order = np.argsort(targets, kind="stable")
    t_sorted = targets[order]
    groups: list[np.ndarray] = []
    start, group_rows, group_cols, own = 0, np.empty(0, np.int64), 0, 0
    for i, (a, n_cols) in enumerate(zip(sources.tolist(), counts.tolist())):
        lo, hi = np.searchsorted(t_sorted, [a, a + 1])
        rows_a = rows[order[lo:hi]]
        merged = np.union1d(group_rows, rows_a)
        saved = i - start  # GEMMs saved by merging the sources start..i into one
        if i > start and len(merged) * (group_cols + n_cols) - (own + len(rows_a) * n_cols) \
                > saved * GEMM_OVERHEAD_PAIRS:
            groups.append(sources[start:i])
            start, merged, group_cols, own = i, rows_a, 0, 0
        group_rows, group_cols, own = merged, group_cols + n_cols, own + len(rows_a) * n_cols
    if start < len(sources):
        groups.append(sources[start:])
    return groups


def cross_scores(cfg: DedupConfig, backend: Backend, ranked: RankedShard, cand: Candidates,
                 rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each clip of `ranked` (rank order): (score float32, match int64 = position in
    `cand`, -1 when none): its best similarity to a candidate that comes earlier in the
    global order, over the pairs that both probe (the clip's probes are `rows`->`targets`)."""
    xp = backend.xp
    n, dim = ranked.emb.shape
    tile = backend.pairwise_tile_size(cfg.pairwise_tile_size, dim)
    key_b = order_keys(cfg.which_to_keep, ranked.rank_dist, n)
    best = xp.full(n, -xp.inf, dtype=xp.float32)
    best_pos = xp.full(n, -1, dtype=xp.int64)
    for group in source_groups(cand.source, rows, targets):
        cols_g = np.flatnonzero(np.isin(cand.source, group))
        local = np.searchsorted(group, cand.source[cols_g])  # the column's source, in group
        mine = np.isin(targets, group)
        rows_g, inverse = np.unique(rows[mine], return_inverse=True)
        probes = np.zeros((len(rows_g), len(group)), bool)  # row y probes the group's source
        probes[inverse, np.searchsorted(group, targets[mine])] = True
        for r0 in range(0, len(rows_g), tile):
            r = rows_g[r0:r0 + tile]
            y = backend.asarray(ranked.emb[r])
            ky = backend.asarray(key_b[r])
            top_r = xp.full(len(r), -xp.inf, dtype=xp.float32)
            pos_r = xp.full(len(r), -1, dtype=xp.int64)
            for c0 in range(0, len(cols_g), tile):
                c = cols_g[c0:c0 + tile]
                sims = y @ backend.asarray(cand.emb[c]).T
                kx = backend.asarray(cand.key[c])
                earlier = kx[None, :] < ky[:, None]
                tied = kx[None, :] == ky[:, None]
                if int(tied.sum()):
                    earlier = _resolve_ties(backend, cfg.which_to_keep, earlier, tied, cand, c,
                                            ranked, r)
                both_probe = backend.asarray(probes[r0:r0 + tile][:, local[c0:c0 + tile]])
                sims = xp.where(earlier & both_probe, sims, -xp.inf)
                top = sims.max(axis=1)
                arg = (sims >= (top - TIE_TOL)[:, None]).argmax(axis=1)  # earliest near-max
                pos = backend.asarray(c)[arg]
                found = top > -xp.inf
                take = found & ((top > top_r + TIE_TOL) | ((top >= top_r - TIE_TOL) & (pos < pos_r)))
                pos_r = xp.where(take, pos, pos_r)
                top_r = xp.maximum(top_r, top)
            # Merge into the clip's best over earlier groups with the same rule.
            r_d = backend.asarray(r)
            b_top, b_pos = best[r_d], best_pos[r_d]
            found = pos_r >= 0
            take = found & ((top_r > b_top + TIE_TOL) |
                            ((top_r >= b_top - TIE_TOL) & ((pos_r < b_pos) | (b_pos < 0))))
            best_pos[r_d] = xp.where(take, pos_r, b_pos)
            best[r_d] = xp.maximum(b_top, top_r)
    match = backend.to_numpy(best_pos).astype(np.int64)
    found = match >= 0
    score = np.zeros(n, np.float32)
    # As inside clusters, the score is one float64 dot product with the chosen clip.
    score[found] = np.einsum("ij,ij->i", ranked.emb[found].astype(np.float64),
                             cand.emb[match[found]].astype(np.float64))
    return np.clip(score, 0, 1), match


def _resolve_ties(backend: Backend, which_to_keep: str, earlier, tied, cand: Candidates,
                  cols: np.ndarray, ranked: RankedShard, rows: np.ndarray):
    """Equal keys (rare: equal float32 distances) are decided by `earlier_on_tie`, on the host."""
    i, j = np.nonzero(backend.to_numpy(tied))
    values = np.array([earlier_on_tie(which_to_keep, cand.ids[int(cols[jj])].as_py(),
                                      int(cand.source[cols[jj]]), ranked.ids[int(rows[ii])].as_py(),
                                      ranked.cluster) for ii, jj in zip(i, j)], dtype=bool)
    earlier = earlier.copy()
    earlier[backend.asarray(i), backend.asarray(j)] = backend.asarray(values)
    return earlier


SEARCHED_EPS_KEY = b"semdedup.cross_cluster.searched_eps"


def cross_table(ranked: RankedShard, cand: Candidates, score: np.ndarray, match: np.ndarray,
                searched_eps: float) -> pa.Table:
    """`id, max_id, max_cluster, cosine_sim_score` in the cluster's rank order; a clip with no
    earlier candidate gets score 0, its own id and its own cluster. The schema metadata
    records the eps the search was bounded by (scores at or above 1 - it are exact)."""
    found = match >= 0
    at = pa.array(np.where(found, match, 0))
    max_id = pc.if_else(pa.array(found), cand.ids.take(at) if len(cand.ids) else ranked.ids,
                        ranked.ids)
    max_cluster = np.where(found, cand.source[match] if len(cand.source) else 0, ranked.cluster)
    table = pa.table({layout.ID: ranked.ids, layout.MAX_ID: max_id,
                      layout.MAX_CLUSTER: pa.array(max_cluster.astype(np.int64)),
                      layout.SCORE: pa.array(score, type=pa.float32())})
    return table.replace_schema_metadata({SEARCHED_EPS_KEY: eps_text(searched_eps).encode()})


def searched_eps(table: pa.Table) -> float | None:
    """The largest eps a cross table's search covered (see `cross_table`)."""
    meta = table.schema.metadata or {}
    return float(meta[SEARCHED_EPS_KEY]) if SEARCHED_EPS_KEY in meta else None


@dataclass
class CrossResult:
    cluster: int
    table: pa.Table
    candidates: int  # clips of other clusters it was compared with
    flops: int


def cross_cluster_tables(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
                         targets: list[int] | None = None,
                         scratch: str | None = None) -> Iterator[CrossResult]:
    """Write `semdedup_cross_cluster_tables/cluster_<k>.parquet` for every cluster in
    `targets` (default: all of `clusters`, the clusters with a shard), yielding results in
    that order. Every cluster's clips are routed, those bound for a target kept. Memory: a few
    clusters, the spill buffer, and each clip's probes (16 bytes per probe)."""
    targets = clusters if targets is None else targets
    centroids = load_centroids(out)
    wanted = np.zeros(centroids.shape[0], bool)  # routes to empty clusters are dropped too
    wanted[targets] = True
    radius = probe_radius(cfg.eps_to_extract)
    workers = host_threads()
    spill = Spill(scratch, centroids.shape[1], int(cfg.spill_buffer_mb * 2**20), meta=2)
    probes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    try:
        # Route: every clip to the clusters it probes.
        for ranked in ordered_map(lambda c: ranked_shard(cfg, out, c), clusters, workers):
            if ranked is None:
                continue
            rows, to = probe_targets(backend, ranked.emb, ranked.cluster, centroids, radius,
                                     cfg.cross_cluster_max_probes)
            if wanted[ranked.cluster]:
                probes[ranked.cluster] = (rows, to)
            rows, to = rows[wanted[to]], to[wanted[to]]
            keys = order_keys(cfg.which_to_keep, ranked.rank_dist, len(ranked.ids))
            meta = np.stack([keys[rows], np.full(len(rows), ranked.cluster, np.float64)], axis=1)
            spill.add(to, ranked.ids.take(pa.array(rows)), ranked.emb[rows], meta)
        spill.finish()

        # Pull: every cluster against the clips routed to it.
        def load(c: int):
            ranked = ranked_shard(cfg, out, c)
            return ranked, sort_candidates(cfg.which_to_keep, *spill.take_with_meta(c))

        def write(result: CrossResult) -> CrossResult:
            write_table(out, layout.cross_table(result.cluster), result.table)
            return result

        def scored() -> Iterator[CrossResult]:
            for ranked, cand in ordered_map(load, targets, workers):
                if ranked is None:
                    continue
                rows, to = probes.pop(ranked.cluster)
                score, match = cross_scores(cfg, backend, ranked, cand, rows, to)
                flops = 2 * ranked.emb.shape[1] * sum(
                    len(np.unique(rows[np.isin(to, g)])) * int(np.isin(cand.source, g).sum())
                    for g in source_groups(cand.source, rows, to))
                table = cross_table(ranked, cand, score, match, max(cfg.eps_to_extract))
                yield CrossResult(ranked.cluster, table, len(cand.ids), flops)

        yield from ordered_map(write, scored(), workers)
    finally:
        spill.close()


def read_cross_table(out: Storage, cluster: int) -> pa.Table | None:
    """A cluster's cross table, or None when the output has none (cross_cluster was off)."""
    rel = layout.cross_table(cluster)
    return read_table(out, rel) if out.exists(rel) else None
