"""`cross_cluster` in a corpus: a new drop's clips are also compared with clips of other clusters
that come earlier in the batch's global order, which is drop-major (every clip of an earlier
drop first, then the drop's own clips in their global order, `cross_cluster.order_keys`).

- Against the drop's own clips: the standard pass (`cross_cluster_tables`) over the drop's
  layout, with the corpus's search radius.
- Against earlier drops' clips: for each cluster a that the drop's clips probe, the store's
  clips of a that probe the clip's cluster b (their probes are kept in the store, computed at
  their own add with the same radius and cap) are compared with the drop's clips of b that
  probe a (`compare_block`), and each drop clip keeps its best (`CrossBest`). Earlier clips'
  keys are shifted by 10 per drop back (keys lie in [-2, 2]), so they all come first and keep
  the drop-major order among themselves.
- A drop clip's final match: the earlier drops' best unless the drop's own best beats it by
  more than TIE_TOL (earlier clips come first in the global order, as in one pass).

Search radius and cap are the corpus's (fixed at its fit: `cross_cluster_eps` is the largest
eps of the first add), so every add searches the pairs a batch over all drops would.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.corpus_store import Block
from semdedup_core.cross_cluster import (RESCORE_MARGIN, SEARCHED_EPS_KEY, CrossBest,
                                         compare_block, cross_cluster_tables, order_keys,
                                         Probes, probe_radius)
from semdedup_core.pairwise import TIE_TOL
from semdedup_core.shards import RankedShard, ranked_shard
from semdedup_core.storage import Storage
from semdedup_core.threads import host_threads, ordered_map

DROP_KEY_SHIFT = 10.0  # per drop back: keys lie in [-2, 2], so earlier drops come first


def _tie(ids: pa.Array, rows: np.ndarray, cluster: int):
    """(id, cluster) of the i-th of `rows`, for `compare_block` on equal keys."""
    return lambda i: (ids[int(rows[i])].as_py(), cluster)


class DropCross:
    """The cross-cluster side of one add: the drop's clips (held in memory, ranked), their
    probes, and their best matches among earlier drops' clips."""

    def __init__(self, cfg: DedupConfig, backend: Backend, out: Storage, centroids: np.ndarray,
                 clusters: list[int], index: int, cross_eps: float):
        self.cfg, self.backend, self.index, self.cross_eps = cfg, backend, index, cross_eps
        self.n_clusters = len(centroids)
        self.floor = np.float32(1 - cross_eps - RESCORE_MARGIN)
        self.flops = 0  # the GEMMs' multiply-adds
        # Against the drop's own clips: the standard pass, with the corpus's radius.
        inside_cfg = cfg.model_copy(update={"eps_to_extract": [cross_eps]})
        self.inside = {}
        for result in cross_cluster_tables(inside_cfg, out, clusters, backend):
            self.inside[result.cluster] = result.table
            self.flops += result.flops
        probes = Probes(centroids, probe_radius([cross_eps]), cfg.cross_cluster_max_probes)
        self.ranked: dict[int, RankedShard] = {}
        self.key: dict[int, np.ndarray] = {}
        self.probes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # b -> (rows, targets)
        self.wanted_by: dict[int, list[tuple[int, np.ndarray]]] = {}  # a -> [(b, rows of b)]
        self.state = CrossBest(cfg.which_to_keep)
        for ranked in ordered_map(lambda c: ranked_shard(cfg, out, c), clusters, host_threads()):
            b = ranked.cluster
            rows, targets = probes.of_cluster(backend, ranked.emb, b)
            self.ranked[b], self.probes[b] = ranked, (rows, targets)
            self.key[b] = order_keys(cfg.which_to_keep, ranked.rank_dist, len(ranked.ids))
            for a in np.unique(targets).tolist():
                self.wanted_by.setdefault(a, []).append((b, rows[targets == a]))
            self.state.add_cluster(b, ranked.ids)
        self.earlier_drop: dict[int, np.ndarray] = {}  # pseudo cluster -> drops of its rows

    def sources(self) -> list[int]:
        """The clusters the drop's clips probe."""
        return sorted(self.wanted_by)

    def store_block(self, b: int, drop: np.ndarray) -> Block:
        """The drop's clips of b as the store keeps them (with keys and probes)."""
        ranked = self.ranked[b]
        rows, targets = self.probes[b]
        probe_at = np.zeros(len(ranked.ids) + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=len(ranked.ids)), out=probe_at[1:])
        return Block(ranked.ids, ranked.emb, drop, self.key[b], probe_at,
                     targets.astype(np.int32))

    def compare(self, a: int, earlier: Block) -> tuple[list[tuple], int]:
        """The drop's clips that probe a against a's earlier clips that probe theirs (on a
        host thread): (offers for `offer`, FLOPs)."""
        if not len(earlier.ids):
            return [], 0
        shifted = earlier.key - DROP_KEY_SHIFT * (self.index - earlier.drop)
        pseudo = self.n_clusters + a  # earlier clips of a, as a cluster of their own
        offers, flops = [], 0
        for b, rows in self.wanted_by.get(a, []):
            y_rows = earlier.probing(b)
            if not len(y_rows):
                continue
            ranked = self.ranked[b]
            x_emb, y_emb = ranked.emb[rows], earlier.emb[y_rows]
            row_top, row_arg, _, _ = compare_block(
                self.backend, self.cfg.which_to_keep, x_emb, self.key[b][rows],
                _tie(ranked.ids, rows, b), y_emb, shifted[y_rows],
                _tie(earlier.ids, y_rows, pseudo), self.floor)
            flops += 2 * len(rows) * len(y_rows) * x_emb.shape[1]
            score = row_top.astype(np.float32, copy=True)
            near = np.flatnonzero(row_top >= self.floor)  # exact where it can remove
            score[near] = np.einsum("ij,ij->i", x_emb[near].astype(np.float64),
                                    y_emb[row_arg[near]].astype(np.float64))
            offers.append((self.state.at(b, rows), row_top, score, np.full(len(rows), pseudo),
                           y_rows[row_arg], shifted[y_rows][row_arg]))
        return offers, flops

    def offer(self, a: int, earlier: Block, compared: tuple[list[tuple], int]) -> None:
        """Merge `compare`'s offers (on the calling thread, in cluster order)."""
        offers, flops = compared
        self.flops += flops
        if not offers:
            return
        pseudo = self.n_clusters + a
        self.state.add_cluster(pseudo, earlier.ids)
        self.earlier_drop[pseudo] = earlier.drop
        self.state.offer(*(np.concatenate(v) for v in zip(*offers)))

    def table(self, b: int, names: np.ndarray) -> tuple[pa.Table, pa.Array, np.ndarray]:
        """b's cross table (rank order), the drop name of each clip's cross match, and
        whether that match is in an earlier drop."""
        inside = self.inside[b]
        n = inside.num_rows
        span = slice(self.state.base[b], self.state.base[b] + n)
        before = self.state.table(b, self.cross_eps)
        e_cluster = self.state.match_cluster[span]
        e_found = e_cluster >= 0
        w_found = inside.column(layout.MAX_CLUSTER).to_numpy() != b
        w_score = inside.column(layout.SCORE).to_numpy()
        use_inside = w_found & (~e_found | (w_score > self.state.best[span] + TIE_TOL))
        earlier = e_found & ~use_inside
        pick = pa.array(use_inside)
        table = pa.table({
            layout.ID: inside.column(layout.ID),
            layout.MAX_ID: pc.if_else(pick, inside.column(layout.MAX_ID),
                                      before.column(layout.MAX_ID)),
            layout.MAX_CLUSTER: pa.array(np.where(
                use_inside, inside.column(layout.MAX_CLUSTER).to_numpy(),
                np.where(e_found, e_cluster - self.n_clusters, b)).astype(np.int64)),
            layout.SCORE: pc.if_else(pick, inside.column(layout.SCORE),
                                     before.column(layout.SCORE)),
        }).replace_schema_metadata({SEARCHED_EPS_KEY: eps_text(self.cross_eps).encode()})
        drop = np.full(n, self.index, np.int64)
        for pseudo in np.unique(e_cluster[earlier]).tolist():
            mine = earlier & (e_cluster == pseudo)
            drop[mine] = self.earlier_drop[pseudo][self.state.match_row[span][mine]]
        return table, pa.array(names[drop].tolist(), pa.string()), earlier
