"""From pruning tables to removals: per eps, the ids to remove per cluster, and the summary."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core import layout, run_record
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.errors import InputError
from semdedup_core.audit import EpsAudit, KeptPairsAudit, read_audit, write_audit
from semdedup_core.backends import Backend, get_backend
from semdedup_core.cross_cluster import (check_cross_table, read_cross_table,
                                         require_cross_tables, searched_eps)
from semdedup_core.parquet import read_table, row_count, write_table
from semdedup_core.shards import (load_centroids, read_shard, read_shard_vectors,
                                  shard_files_by_cluster, take_rows)
from semdedup_core.ranking import rank_order
from semdedup_core.storage import Storage
from semdedup_core.threads import LATENCY_BOUND_THREADS, host_threads, ordered_map

log = logging.getLogger(__name__)


def removed_mask(score: np.ndarray, eps: float) -> np.ndarray:
    """A clip is removed when its score (float32, as written) is >= 1 - eps (in float64)."""
    return np.asarray(score, dtype=np.float64) >= 1.0 - eps


def removed_rows(pruning: pa.Table, cross: pa.Table | None, eps: float) -> np.ndarray:
    """Whether each clip (rank order) is removed at eps: its pruning score, or with
    cross_cluster its cross-cluster score (same rows, same order), is >= 1 - eps."""
    removed = removed_mask(pruning.column(layout.SCORE).to_numpy(), eps)
    if cross is not None:
        removed |= removed_mask(cross.column(layout.SCORE).to_numpy(), eps)
    return removed


def removed_by_cross_only(pruning: pa.Table, cross: pa.Table, eps: float) -> int:
    """The clips only the cross-cluster rule removes at eps (their pruning score keeps them):
    what `cross_cluster` adds to the removals."""
    return int((removed_mask(cross.column(layout.SCORE).to_numpy(), eps)
                & ~removed_mask(pruning.column(layout.SCORE).to_numpy(), eps)).sum())


def removed_table(pruning: pa.Table, cosine_dist: np.ndarray, cluster: int,
                  eps: float, cross: pa.Table | None = None) -> pa.Table:
    """`id, cosine_dist_to_cent, cluster` of the removed clips, in rank order.
    `cosine_dist` is aligned with the pruning table's rows."""
    keep_rows = np.flatnonzero(removed_rows(pruning, cross, eps))
    rows = pa.array(keep_rows, type=pa.int64())
    return pa.table({
        layout.ID: pruning.column(layout.ID).take(rows),
        layout.COSINE_DIST: pa.array(np.asarray(cosine_dist, np.float32)[keep_rows]),
        layout.CLUSTER: pa.array(np.full(len(keep_rows), cluster, dtype=np.int64)),
    })


def write_removed(out: Storage, pruning: pa.Table, cosine_dist: np.ndarray, cluster: int,
                  eps_list: list[float], cross: pa.Table | None = None) -> dict[float, int]:
    """Write `unique_ids_<eps>.parquet/part.<cluster>.parquet` for each eps (zero rows when
    nothing is removed). Returns removed counts per eps."""
    counts = {}
    for eps in eps_list:
        table = removed_table(pruning, cosine_dist, cluster, eps, cross)
        write_table(out, layout.unique_ids_part(eps, cluster), table)
        counts[eps] = table.num_rows
    return counts


def deciding_score(pruning: pa.Table, cross: pa.Table | None) -> np.ndarray:
    """Each clip's deciding score (rank order): the larger of its pruning and cross scores."""
    score = pruning.column(layout.SCORE).to_numpy()
    return score if cross is None else np.maximum(score, cross.column(layout.SCORE).to_numpy())


def check_rank_order(out: Storage, cluster: int, cfg: DedupConfig,
                     pruning_ids: pa.Array | None = None,
                     shard: pa.Table | None = None) -> None:
    """A pruning table read back for removals lists its clips in the rank order `cfg` gives
    them (from the shard's ids and distances); else one InputError naming it: a table pruned
    with other settings would remove the wrong clips. `shard`: its ids and both distances."""
    if pruning_ids is None:
        pruning_ids = read_table(out, layout.pruning_table(cluster), [layout.ID]).column(layout.ID)
    if shard is None:
        shard = read_shard(out, cluster, [layout.ID, layout.COSINE_DIST, layout.L2_DIST])
    if shard is None:
        return  # named by the caller (no shard)
    ids = shard.column(layout.ID).combine_chunks()
    order = rank_order(ids, shard.column(layout.L2_DIST).to_numpy(),
                       shard.column(layout.COSINE_DIST).to_numpy(), cfg.sim_metric,
                       cfg.which_to_keep, cfg.random_state, cluster)
    if not ids.take(pa.array(order)).equals(pruning_ids.combine_chunks()
                                            if isinstance(pruning_ids, pa.ChunkedArray)
                                            else pruning_ids):
        settings = f"which_to_keep {cfg.which_to_keep!r}, sim_metric {cfg.sim_metric!r}" + (
            f", random_state {cfg.random_state}" if cfg.which_to_keep == "random" else "")
        raise InputError(f"{out.display(layout.pruning_table(cluster))} is not in this run's "
                         f"rank order ({settings}) of its shard: it was made by a run with other "
                         "settings; materialise semdedup_pruning_tables for these partitions "
                         "with this run's config (or run the whole job)")


def extract_from_tables(out: Storage, cluster: int, eps_list: list[float],
                        cross_cluster: bool = False,
                        scores: dict[int, np.ndarray] | None = None,
                        made_from: str | None = None,
                        ranked_by: DedupConfig | None = None,
                        files: list[str] | None = None) -> dict[float, int]:
    """Write one cluster's `unique_ids_<eps>` parts from its pruning table and shard on storage
    (no embeddings read, no ranking redone: the shard only supplies cosine_dist_to_cent), and
    its cross table where there is one (`cross_cluster`: there must be). `scores`: where to
    put the cluster's deciding scores (`deciding_score`), for the audit that follows.
    `made_from` (`run_provenance`): the cross table must have been made for it
    (`check_cross_table`), and `ranked_by` (the run's config): the pruning table must be in
    its rank order (`check_rank_order`); both for a Dagster step of a run, not for a sweep of
    a finished output. `files`: the cluster's shard files where the caller listed them."""
    pruning = read_table(out, layout.pruning_table(cluster))
    cross = read_cross_table(out, cluster, required=cross_cluster)
    if cross is not None:
        check_cross_table(out, cluster, cross, pruning.column(layout.ID), made_from,
                          max(eps_list))
    if scores is not None:
        scores[cluster] = deciding_score(pruning, cross)
    shard = read_shard(out, cluster, [layout.ID, layout.COSINE_DIST] +
                       ([layout.L2_DIST] if ranked_by is not None else []), files)
    if shard is None:
        raise InputError(f"{out.display(layout.shard_dir(cluster))}: no shard for the pruning "
                         f"table of cluster {cluster}; re-run assignment")
    if ranked_by is not None:
        check_rank_order(out, cluster, ranked_by, pruning.column(layout.ID), shard)
    ids = pruning.column(layout.ID).combine_chunks()
    where = pc.index_in(ids, value_set=shard.column(layout.ID).combine_chunks())
    if where.null_count:
        raise InputError(f"{out.display(layout.pruning_table(cluster))} lists ids missing from the "
                         f"shard of cluster {cluster}; re-materialise its pruning table")
    cosine = shard.column(layout.COSINE_DIST).combine_chunks().take(where).to_numpy()
    return write_removed(out, pruning, cosine, cluster, eps_list, cross)


def audit_output(out: Storage, clusters: list[int], eps_list: list[float], backend: Backend,
                 rate: float, seed: int, cross_cluster: bool,
                 scores: dict[int, np.ndarray] | None = None,
                 files_of: dict[int, list[str]] | None = None) -> list[EpsAudit]:
    """The audit as a pass of its own over a finished output (Dagster's summary step,
    `sweep`); writes `extraction/audit.json`. Every cluster's kept clips come from its tables
    (or `scores`: each cluster's deciding score, the larger of its pruning and cross scores,
    as `inspection.score_stats` keeps them); only the shards of the clusters that hold sampled
    clips, then of the others that sampled clips can reach, are read, each once (see
    `KeptPairsAudit`)."""
    audit = KeptPairsAudit(backend, eps_list, rate, seed, load_centroids(out))

    def deciding(c: int) -> np.ndarray:
        pruning = read_table(out, layout.pruning_table(c), [layout.SCORE])
        return deciding_score(pruning, read_cross_table(out, c) if cross_cluster else None)

    if files_of is None:
        files_of = shard_files_by_cluster(out)  # one listing, not one per cluster read

    def ranked_emb(c: int) -> np.ndarray:
        """The cluster's unit rows in its pruning table's (rank) order."""
        pruning = read_table(out, layout.pruning_table(c), [layout.ID])
        files = files_of.get(c, [])
        if not files:
            raise InputError(f"{out.display(layout.shard_dir(c))}: no shard for the pruning "
                             f"table of cluster {c}; re-run assignment")
        shard, parts = read_shard_vectors(out, files)
        where = pc.index_in(pruning.column(layout.ID).combine_chunks(),
                            value_set=shard.column(layout.ID).combine_chunks())
        return take_rows(parts, where.to_numpy())

    if scores is None:
        scores = dict(zip(clusters, ordered_map(deciding, clusters, host_threads())))
    kept = {c: audit.add_kept({e: removed_mask(scores[c], e) for e in eps_list})
            for c in clusters}
    sampled = [c for c in sorted(kept) if len(audit.drawn(c, kept[c]))]
    for c, emb in zip(sampled, ordered_map(ranked_emb, sampled, host_threads())):
        audit.visit(c, emb, kept[c])
    reached = [c for c in audit.wanted() if c in kept]  # none of them sampled
    for c, emb in zip(reached, ordered_map(ranked_emb, reached, host_threads())):
        audit.check(c, emb, kept[c])
    rows = audit.result()
    write_audit(out, rate, seed, cross_cluster, rows)
    return rows


def pruned_clusters(out: Storage) -> list[int]:
    """The clusters that have a pruning table on storage, ascending."""
    names = (rel.rsplit("/", 1)[-1] for rel in out.list_files(layout.PRUNING_TABLES))
    return sorted(c for c in map(layout.cluster_of_pruning_table, names) if c is not None)


def sweep(out: Storage, eps_list: list[float], progress=None, owner: str | None = None,
          wait: bool = False, backend: Backend | None = None) -> dict[float, dict]:
    """New eps from existing pruning (and cross-cluster) tables: writes `unique_ids_<eps>`, the
    summaries and the audit, recomputing nothing else. Only a finished output is swept (it has
    a completion record, which then lists the swept eps); the folder is held for the sweep like
    for a run. A sweep that fails leaves the folder as it found it: the files of eps it did
    not hold before are deleted and the audit put back (the eps it held are rewritten with the
    same bytes). A sweep killed half-way cannot undo its writes: the record notes what it adds
    before it writes (`run_record.begin_sweep`), and the next sweep undoes them first."""
    with run_record.take_output(out, owner, wait) as lock:
        record = run_record.require_complete(out, lock)
        _undo_interrupted_sweep(out, lock)
        clusters = pruned_clusters(out)
        if not clusters:
            raise InputError(f"{out.display(layout.PRUNING_TABLES)}: no pruning tables; run the "
                             "pipeline first")
        # Every cluster with a shard has its pruning table (a sweep of the others would read
        # as the whole output's), checked before anything is written.
        files_of = shard_files_by_cluster(out)  # one listing for the whole sweep
        lacking = sorted(set(files_of) - set(clusters))
        if lacking:
            raise InputError(f"{out.display(layout.pruning_table(lacking[0]))}: not found ("
                             f"{len(lacking)} of the clusters with a shard have no pruning "
                             "table); re-run the pipeline into this folder")
        # The run's cross_cluster: then every cluster's cross table is required (one listing).
        cross_cluster = bool((record or {}).get("config", {}).get("cross_cluster", False))
        if cross_cluster:
            require_cross_tables(out, clusters)
        new_eps = [e for e in eps_list if not out.exists(layout.summary_csv(e))]
        previous_audit = out.read_bytes(layout.AUDIT) if out.exists(layout.AUDIT) else None
        record_before = run_record.begin_sweep(out, lock, new_eps, previous_audit)
        try:
            rows = _sweep_held(out, lock, eps_list, clusters, progress, backend, cross_cluster,
                               files_of)
        except BaseException:
            _undo_sweep(out, new_eps, previous_audit, record_before)
            raise
    drop = run_record.committed_corpus_drop(out)
    if drop is not None:  # the corpus's manifest counts the drop's removals per eps too
        from semdedup_core.corpus import record_sweep  # (corpus imports this module)

        record_sweep(*drop, eps_list, rows)
    return rows


def _sweep_held(out: Storage, lock, eps_list: list[float], clusters: list[int], progress,
                backend: Backend | None, cross_cluster: bool,
                files_of: dict[int, list[str]]) -> dict[float, dict]:
    """The sweep's writes, the folder held: parts, summaries, the audit, the record."""
    cross = read_cross_table(out, clusters[0], required=cross_cluster)
    covered = searched_eps(cross) if cross is not None else None
    if covered is not None and max(eps_list) > covered:
        remedy = ("rebuild the corpus" if out.exists(layout.MAX_DROP_TABLE) else
                  "re-run with cross_cluster at the larger eps")  # a corpus's drop or a run
        log.warning("%s: the cross-cluster search covered eps up to %s; near-duplicates "
                    "across clusters between that and eps %s are not searched (%s to "
                    "search them)", out.display(layout.CROSS_TABLES), eps_text(covered),
                    eps_text(max(eps_list)), remedy)
    removed = dict.fromkeys(eps_list, 0)
    scores: dict[int, np.ndarray] = {}  # read once here, for the summary and the audit
    for counts in ordered_map(lambda c: extract_from_tables(out, c, eps_list, cross_cluster,
                                                            scores=scores,
                                                            files=files_of.get(c, [])),
                              clusters, host_threads()):
        for eps, n in counts.items():
            removed[eps] += n
        if progress is not None:
            progress(1)
    rows = summarize(out, eps_list, clusters, total=sum(len(v) for v in scores.values()),
                     removed_by_eps=removed)
    # The audit again, with the run's sample rate and seed, for every eps the folder holds
    # (those it had, then these: as a fresh run with all of them would write it); outputs from
    # before the audit have none to follow.
    previous = read_audit(out)
    if previous is not None:
        held = [float(e) for e in previous.get("eps", {})]
        audit_output(out, clusters, held + [e for e in eps_list if e not in held],
                     backend or get_backend("auto"), previous["sample_rate"], previous["seed"],
                     previous["cross_cluster"], scores, files_of)
    run_record.add_swept_eps(out, lock, eps_list, rows)
    return rows


def _delete_sweep_writes(out: Storage, new_eps: list[float], previous_audit: bytes | None) -> None:
    """What a sweep wrote for eps the folder did not hold goes, and the audit is put back."""
    for eps in new_eps:
        out.delete_file(layout.summary_csv(eps))  # first: a summary marks a whole eps
        out.delete_dir(layout.unique_ids_dir(eps))
    if previous_audit is not None:
        out.write_bytes(layout.AUDIT, previous_audit)


def _undo_sweep(out: Storage, new_eps: list[float], previous_audit: bytes | None,
                record_before: bytes | None) -> None:
    """After a failed sweep: its writes go (`_delete_sweep_writes`) and the record is put back.
    Best effort: the sweep's own error is the one to report (a sweep that could not be undone
    stays noted in the record, and the next sweep undoes it)."""
    try:
        _delete_sweep_writes(out, new_eps, previous_audit)
        run_record.put_back(out, record_before)
    except Exception:  # noqa: BLE001
        log.warning("%s: could not undo the failed sweep; sweep again", out.display(),
                    exc_info=True)


def _undo_interrupted_sweep(out: Storage, lock) -> None:
    """A sweep that stopped before it ended (killed: the record still notes it) is undone
    before anything else is written."""
    note = run_record.interrupted_sweep(out)
    if note is None:
        return
    log.warning("%s: a sweep (run %s, started %s) stopped before it finished; removing what it "
                "wrote for eps %s and putting the audit back", out.display(), note["run_id"],
                note["started"], ", ".join(note["new_eps"]) or "(none new)")
    audit = note["audit_before"]
    _delete_sweep_writes(out, [float(e) for e in note["new_eps"]],
                         None if audit is None else audit.encode())
    run_record.forget_sweep(out, lock)


def summarize(out: Storage, eps_list: list[float], clusters: list[int], total: int | None = None,
              removed_by_eps: dict[float, int] | None = None) -> dict[float, dict]:
    """Write `dedup_summary_<eps>.csv` from the parts and pruning tables on storage. Returns
    the rows.
    `total` (clips) and `removed_by_eps`, when the caller already knows them (it has just
    written the tables and parts), spare reading a footer per cluster and eps."""
    def rows_in(rels) -> int:  # parquet footers, read on I/O threads (S3 round trips)
        return sum(ordered_map(lambda rel: row_count(out, rel), rels, LATENCY_BOUND_THREADS))

    if total is None:
        total = rows_in(layout.pruning_table(c) for c in clusters)
    rows = {}
    for eps in eps_list:
        if removed_by_eps is not None:
            removed = removed_by_eps[eps]
        else:
            removed = rows_in(layout.unique_ids_part(eps, c) for c in clusters)
        rows[eps] = {"eps": eps, "kept": total - removed, "removed": removed, "total": total}
        csv = f"{','.join(layout.SUMMARY_COLUMNS)}\n{eps_text(eps)},{total - removed},{removed},{total}\n"
        out.write_bytes(layout.summary_csv(eps), csv.encode())
    return rows
