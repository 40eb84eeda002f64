"""A corpus: embedding drops deduplicated one by one against everything already curated.

    <corpus>/
      _corpus.json                       the manifest: settings, committed drops in order (the commit)
      _semdedup.lock                     held by the add in progress (run_record's lock)
      _corpus_pending.json               the add in progress, for clean-up after a crash
      clustering_results/kmeans_centroids.npy    fitted on the first drop, never re-fitted
      drops/<name>/...                   a complete standard output layout per drop
      store/<first>-<last>-<token>.seg   every committed clip by cluster, unit embeddings in drop
                                         then rank order (semdedup_core/corpus_store.py)

The rule equals one batch over all drops in commit order: inside a cluster every clip of an
earlier drop ranks before every clip of a later drop, a drop's own clips are ranked as in a run,
and a clip's score is its highest similarity to any earlier clip (earlier drops' clips all count,
removed or not). So an add scores only the new drop's rows of the cluster's pairwise pass over
[store; drop] (`max_similarity_to_earlier(first_row=...)`), which gives those rows bit for bit.

An add reads the store's blocks of the clusters its drop touches, never other drops' files, and
writes one store segment (its drop's clips), merging segments now and then (corpus_store). The
manifest is written last: until then nothing the add wrote is visible (segments carry the add's
token, which only the manifest makes valid), so a crash leaves the corpus as it was and the same
add can simply be retried.
"""

import datetime
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from semdedup_core import layout
from semdedup_core.backends import Backend, get_backend
from semdedup_core.config import DedupConfig, eps_text, make_config
from semdedup_core.corpus_cross import DropCross
from semdedup_core.corpus_store import (Block, Segment, SegmentWriter, committed_segments,
                                        concat_blocks, merge, merge_from, stacked)
from semdedup_core.embeddings import EmbeddingSource, InputFile, scan_input
from semdedup_core.errors import ConfigError, InputError
from semdedup_core.extraction import removed_mask, summarize, write_removed
from semdedup_core.pairwise import max_similarity_to_earlier, pairwise_flops
from semdedup_core.parquet import read_table, write_table
from semdedup_core.pipeline import PhaseTimer, assign, fit_centroids, open_source
from semdedup_core.shards import RankedShard, load_centroids, ranked_shard, save_centroids
from semdedup_core.run_record import OutputLock, new_run_id, take_output
from semdedup_core.storage import S3Options, Storage
from semdedup_core.threads import host_threads, ordered_map, single_threaded_blas

# 2: the store became segments of raw arrays (corpus_store); a format-1 corpus (a parquet file
# per cluster and add) is read by `rebuild` only.
log = logging.getLogger(__name__)

MANIFEST_FORMAT = 2
READABLE_FORMATS = (1, 2)  # by `show` and `rebuild`
# Settings fixed by the fit: every later add uses the corpus's (a rebuild changes them).
FIXED_SETTINGS = ("n_clusters", "sim_metric", "which_to_keep", "random_state", "cross_cluster",
                  "cross_cluster_max_probes")
FIT_SETTINGS = ("max_iter", "kmeans_sample_per_cluster", "kmeans_tol", "gpu_kmeans")
_DROP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")


def check_drop_name(name: str) -> None:
    if not _DROP_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"drop name {name!r}: use letters, digits and . _ = + - (at most 128, "
                          "starting with a letter or digit); it names the folder drops/<name>/")


# -- the manifest --------------------------------------------------------------------------------
def read_manifest(corpus: Storage, formats: tuple[int, ...] = (MANIFEST_FORMAT,)) -> dict | None:
    """The committed state, or None for a corpus without any committed drop (`formats`: the
    manifest formats the caller can use)."""
    try:
        raw = corpus.read_bytes(layout.CORPUS_MANIFEST)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{corpus.display(layout.CORPUS_MANIFEST)}: not a semdedup corpus "
                         f"manifest ({exc})") from None
    if manifest.get("format") not in formats:
        raise InputError(f"{corpus.display(layout.CORPUS_MANIFEST)}: corpus format "
                         f"{manifest.get('format')!r}, this semdedup adds to format "
                         f"{MANIFEST_FORMAT}; make a current one with `semdedup corpus rebuild "
                         f"{corpus.display()} --into NEW`")
    return manifest


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


# -- the lock ------------------------------------------------------------------------------------
def lock_corpus(corpus: Storage, wait: bool):
    """One add at a time: the output-folder lock of run_record (`_semdedup.lock` at the corpus
    root; a conditional write locally and on S3, a lease renewed by a heartbeat, a dead or
    expired holder taken over), checked again right before the commit."""
    return take_output(corpus, owner=f"corpus-add-{new_run_id()}", wait=wait,
                       advice="wait for it (--wait) or retry the add later")


# -- one drop ------------------------------------------------------------------------------------
@dataclass
class ClusterAdd:
    """One touched cluster of an add: its drop clips pruned, then extracted."""

    cluster: int
    size: int
    ranked: RankedShard | None  # the drop's clips (until the store has them)
    pruning: pa.Table
    prune_earlier: np.ndarray  # bool (n,): the pruning match is an earlier drop's clip
    flops: int
    earlier: int  # committed clips of the cluster read from the store
    max_drop: pa.Array  # the drop of each one's max_id
    cross_max_drop: pa.Array | None = None  # the drop of each one's cross-cluster max_id
    removed_inside: dict[float, int] = field(default_factory=dict)
    removed_earlier: dict[float, int] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = self.ranked.ids
        self.cosine_dist = self.ranked.cosine_dist
        self.cosine_dist_sum = float(self.cosine_dist.astype(np.float64).sum())

    def extract(self, out: Storage, eps_list: list[float], cross: pa.Table | None = None,
                cross_earlier: np.ndarray | None = None) -> None:
        """Write the unique_ids parts; count removals inside the drop and of earlier drops (a
        clip is of earlier drops when a match that removes it is an earlier drop's clip)."""
        write_removed(out, self.pruning, self.cosine_dist, self.cluster, eps_list, cross)
        score = self.pruning.column(layout.SCORE).to_numpy()
        for eps in eps_list:
            gone = removed_mask(score, eps)
            earlier = gone & self.prune_earlier
            if cross is not None:
                by_cross = removed_mask(cross.column(layout.SCORE).to_numpy(), eps)
                gone |= by_cross
                earlier |= by_cross & cross_earlier
            self.removed_earlier[eps] = int(earlier.sum())
            self.removed_inside[eps] = int(gone.sum()) - self.removed_earlier[eps]


@dataclass
class AddReport:
    corpus: str
    name: str
    index: int  # position in the manifest
    clips: int
    dim: int
    clusters_touched: int
    earlier_clips_read: int
    removed: dict[float, dict]  # eps -> {removed, inside, earlier}
    mean_cosine_dist: float
    fit_mean_cosine_dist: float
    fitted: bool
    cluster_sizes: np.ndarray  # int64 (n_clusters,): the drop's clips per cluster
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def drift(self) -> float:
        """This drop's mean cosine distance to its centroids relative to the first drop's."""
        return self.mean_cosine_dist / self.fit_mean_cosine_dist - 1.0 \
            if self.fit_mean_cosine_dist else 0.0


def holds_run_output(folder: Storage) -> bool:
    """Whether a folder without a corpus manifest holds a run's output (whole or partial)."""
    return folder.exists(layout.RUN_RECORD) or folder.exists(layout.EXTRACTION)


def corpus_config(corpus: Storage, manifest: dict | None, name: str,
                  args: dict[str, Any]) -> DedupConfig:
    """The add's config: the user's run arguments over the corpus's fixed settings; a fixed
    setting given with another value is refused (the corpus would stop being one batch)."""
    args = {k: v for k, v in args.items() if v is not None}
    if "output_path" in args:
        raise ConfigError("output_path: a corpus add writes into the corpus (drops/<name>/); "
                          "do not give an output path")
    if manifest is None:
        if holds_run_output(corpus):  # the corpus's centroids would overwrite the run's
            raise ConfigError(f"{corpus.display()}: holds the output of a semdedup run, not a "
                              "corpus; nothing was changed; give the corpus a folder of its own")
        if "n_clusters" not in args:
            raise ConfigError(f"{corpus.display()}: the first add fits the corpus's centroids; "
                              "give --n-clusters")
    else:
        settings = manifest["settings"]
        for key in FIXED_SETTINGS:
            value = settings.get(key, DedupConfig.model_fields[key].default)
            if key in args and args[key] != value:
                raise ConfigError(f"{corpus.display()}: {key} is {value!r} for this "
                                  f"corpus (fixed by its fit); {args[key]!r} needs a rebuild "
                                  "(semdedup corpus rebuild)")
            args[key] = value
    return make_config(**{**args, "output_path": corpus.display(layout.drop_dir(name))})


def _clean_pending(corpus: Storage, manifest: dict | None) -> None:
    """Remove what a crashed add left: its drop folder and its store files (they are invisible
    already, since the manifest never named their token; this only frees the space)."""
    try:
        pending = json.loads(corpus.read_bytes(layout.CORPUS_PENDING))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return
    drops = manifest["drops"] if manifest else []
    if any(d["token"] == pending.get("token") for d in drops):
        corpus.delete_file(layout.CORPUS_PENDING)  # committed; its clean-up was cut short
        return
    name = pending.get("name", "")
    if name and name not in {d["name"] for d in drops}:
        corpus.child(layout.drop_dir(name)).delete_dir("")
    for rel in corpus.list_files(layout.STORE, recursive=False):
        parsed = layout.parse_store_segment(rel.rsplit("/", 1)[-1])
        if parsed is not None and parsed[2] == pending.get("token"):
            corpus.delete_file(rel)
    corpus.delete_file(layout.CORPUS_PENDING)


def add_source(corpus: Storage, manifest: dict | None, name: str, cfg: DedupConfig,
               source: EmbeddingSource, backend: Backend, lock: OutputLock,
               timer: PhaseTimer | None = None, fit_source: EmbeddingSource | None = None,
               input_label: str | None = None, fit_on: list[str] | None = None,
               search_eps: float | None = None) -> AddReport:
    """Add one drop (the corpus is locked and `name` is not committed). The first add fits the
    centroids on `fit_source` (default: the drop itself), the clips of the drops `fit_on`, and
    fixes the cross-cluster search radius at `search_eps` (default: its largest eps)."""
    timer = timer or PhaseTimer()
    start = time.perf_counter()
    drops = manifest["drops"] if manifest else []
    index, token = len(drops), uuid.uuid4().hex[:12]
    # The cross-cluster search radius: the largest eps of the first add, for every add.
    cross_eps = manifest["settings"].get("cross_cluster_eps") if manifest else None
    cross_eps = cross_eps or search_eps or max(cfg.eps_to_extract)
    _clean_pending(corpus, manifest)
    out = corpus.child(layout.drop_dir(name))
    out.delete_dir("")  # a crashed attempt's files (the name is not committed)
    fit = None
    if manifest is None:
        fit = fit_centroids(cfg, fit_source or source, backend, timer,
                            unique_ids=fit_source is None)
        centroids, dim = fit.centroids, fit.dim
        if fit_source is not None:
            with timer.phase("scan"):
                scan_input(source, 0, cfg.random_state, unique_ids=True)
    else:
        centroids = load_centroids(corpus)
        dim = manifest["settings"]["dim"]
        with timer.phase("scan"):
            scan = scan_input(source, 0, cfg.random_state)
        if scan.dim != dim:
            raise InputError(f"{source.storage.display()}: embeddings have {scan.dim} dimensions,"
                             f" the corpus {corpus.display()} has {dim}")
    # Nothing is written before the drop has been validated.
    corpus.write_bytes(layout.CORPUS_PENDING, _json_bytes({"name": name, "index": index,
                                                           "token": token}))
    if fit is not None:
        save_centroids(corpus, centroids)
    save_centroids(out, centroids)
    sizes = assign(cfg, source, centroids, out, backend, timer)
    clusters = [int(c) for c in np.flatnonzero(sizes)]
    names = np.array([d["name"] for d in drops] + [name], dtype=object)
    tile = backend.pairwise_tile_size(cfg.pairwise_tile_size, dim)
    n_clusters = len(centroids)
    segment_rels, garbage = committed_segments(corpus, drops)
    segments = [Segment(corpus, rel) for rel in segment_rels]
    cross = None
    if cfg.cross_cluster:
        if max(cfg.eps_to_extract) > cross_eps:
            log.warning("%s: the corpus's cross-cluster search covers eps up to %s (fixed at its "
                        "fit); near-duplicates across clusters between that and eps %s are not "
                        "searched (rebuild the corpus to search them)", corpus.display(),
                        eps_text(cross_eps), eps_text(max(cfg.eps_to_extract)))
        with timer.phase("cross"):
            cross = DropCross(cfg, backend, out, centroids, clusters, index, cross_eps)
    touched = set(clusters)
    visits = sorted(touched | set(cross.sources())) if cross else clusters

    def visit(cluster: int) -> tuple[int, ClusterAdd | None, Block, Any]:
        """One cluster, on a host thread: a touched one's drop clips pruned against the store's
        clips of the cluster (and extracted, without cross_cluster); with it, the drop's clips
        probing the cluster compared with the store's."""
        result = None
        if cluster in touched:
            ranked = cross.ranked[cluster] if cross else ranked_shard(cfg, out, cluster)
            earlier, emb = stacked(segments, cluster, ranked.emb)
            m, n = len(earlier.ids), len(ranked.ids)
            on_device = backend.asarray(emb) if backend.fits_on_device(emb.nbytes) else emb
            s, match = max_similarity_to_earlier(backend, on_device, tile, first_row=m)
            s, match = backend.to_numpy(s), backend.to_numpy(match)
            all_ids = pa.concat_arrays([earlier.ids, ranked.ids.cast(pa.string())])
            all_drops = np.concatenate([earlier.drop, np.full(n, index, np.int32)])
            pruning = pa.table({layout.ID: ranked.ids,
                                layout.MAX_ID: all_ids.take(pa.array(match)),
                                layout.SCORE: pa.array(s, type=pa.float32())})
            write_table(out, layout.pruning_table(cluster), pruning)
            result = ClusterAdd(cluster, n, ranked, pruning, match < m,
                                pairwise_flops(len(emb), tile, dim, m), m,
                                pa.array(names[all_drops[match]].tolist(), pa.string()))
            if cross is None:
                result.extract(out, cfg.eps_to_extract)
        else:
            blocks = [b for seg in segments if (b := seg.block(cluster)) is not None]
            earlier = concat_blocks(blocks) if blocks else None
        return cluster, result, earlier, \
            cross.compare(cluster, earlier) if cross and earlier is not None else None

    removed_inside = dict.fromkeys(cfg.eps_to_extract, 0)
    removed_earlier = dict.fromkeys(cfg.eps_to_extract, 0)
    cos_sum, flops, earlier_read = 0.0, 0, 0
    owners: dict[str, list] = {layout.CLUSTER: [], layout.ID: [], layout.MAX_DROP: [],
                               layout.CROSS_MAX_DROP: []}
    results: list[ClusterAdd] = []
    segment_rel = layout.store_segment(index, index, token)
    done_with = list(garbage)  # deleted once the drop is committed
    try:
        # Touched clusters are small GEMMs side by side: one BLAS thread each, many host threads.
        with timer.phase("prune"), single_threaded_blas(), \
                corpus.writing_file(segment_rel) as segment_file:
            store = SegmentWriter(segment_file, dim, n_clusters, index, index, cfg.cross_cluster)
            for cluster, result, earlier, compared in ordered_map(visit, visits, host_threads()):
                if compared is not None:
                    cross.offer(cluster, earlier, compared)
                if result is None:
                    continue
                drop = np.full(result.size, index, np.int32)
                store.add(cluster, cross.store_block(cluster, drop) if cross else
                          Block(result.ranked.ids, result.ranked.emb, drop))
                result.ranked = None  # (the store has its embeddings now)
                results.append(result)
            store.finish()

            def finish(result: ClusterAdd) -> ClusterAdd:
                table, result.cross_max_drop, cross_earlier = cross.table(result.cluster, names)
                write_table(out, layout.cross_table(result.cluster), table)
                result.extract(out, cfg.eps_to_extract, table, cross_earlier)
                return result

            if cross is not None:  # cross scores are final once every cluster was visited
                results = list(ordered_map(finish, results, host_threads()))
                timer.flops["cross"] = float(cross.flops)
            for result in results:
                for eps in cfg.eps_to_extract:
                    removed_inside[eps] += result.removed_inside[eps]
                    removed_earlier[eps] += result.removed_earlier[eps]
                cos_sum += result.cosine_dist_sum
                flops += result.flops
                earlier_read += result.earlier
                owners[layout.CLUSTER].append(np.full(result.size, result.cluster, np.int64))
                owners[layout.ID].append(result.ids)
                owners[layout.MAX_DROP].append(result.max_drop)
                owners[layout.CROSS_MAX_DROP].append(result.cross_max_drop)
            if cross is None:
                del owners[layout.CROSS_MAX_DROP]
            write_table(out, layout.MAX_DROP_TABLE, pa.table({
                layout.CLUSTER: pa.array(np.concatenate(owners.pop(layout.CLUSTER))),
                layout.ID: pa.concat_arrays([a.cast(pa.string()) for a in owners.pop(layout.ID)]),
                **{col: pa.concat_arrays(parts) for col, parts in owners.items()}}))
        j = merge_from([seg.rows for seg in segments] + [int(sizes.sum())])
        if j < len(segments):
            with timer.phase("store_merge"):
                segments.append(Segment(corpus, segment_rel))
                merge(corpus, segments[j:], layout.store_segment(segments[j].first, index, token),
                      n_clusters)
                done_with += segment_rels[j:] + [segment_rel]
    finally:
        for seg in segments:
            seg.close()
    timer.flops["prune"] = float(flops)
    n = int(sizes.sum())
    removed = {e: removed_inside[e] + removed_earlier[e] for e in cfg.eps_to_extract}
    with timer.phase("summary"):
        summarize(out, cfg.eps_to_extract, clusters, n, removed)
    mean_cos = cos_sum / n
    entry = {
        "name": name, "token": token, "input": input_label or cfg.input_embeddings_path,
        "clips": n, "clusters": len(clusters),
        "eps": {eps_text(e): {"removed": removed[e], "inside": removed_inside[e],
                              "earlier": removed_earlier[e]} for e in cfg.eps_to_extract},
        "mean_cosine_dist": mean_cos,
        "added": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if manifest is None:
        settings = {key: getattr(cfg, key) for key in FIXED_SETTINGS + FIT_SETTINGS}
        if cfg.cross_cluster:
            settings["cross_cluster_eps"] = cross_eps
        settings.update(dim=dim, fit_on=fit_on or [name], fit_sample_rows=fit.sample_rows,
                        kmeans_iterations=fit.iterations)
        manifest = {"format": MANIFEST_FORMAT, "settings": settings, "drops": []}
    new_manifest = {**manifest, "drops": drops + [entry]}
    with timer.phase("commit"):
        lock.check()
        corpus.write_bytes(layout.CORPUS_MANIFEST, _json_bytes(new_manifest))  # the commit
        for rel in done_with:  # covered by a merge, or never committed
            corpus.delete_file(rel)
        corpus.delete_file(layout.CORPUS_PENDING)
    return AddReport(corpus.display(), name, index, n, dim, len(clusters), earlier_read,
                     {e: entry["eps"][eps_text(e)] for e in cfg.eps_to_extract}, mean_cos,
                     new_manifest["drops"][0]["mean_cosine_dist"], fit is not None, sizes, timer)


def open_corpus(uri: str, args: dict[str, Any], s3: S3Options | None = None) -> Storage:
    cfg_s3 = S3Options(args.get("aws_profile"), args.get("aws_endpoint_url"),
                       args.get("aws_region"))
    base = s3 or S3Options()
    return Storage(uri, S3Options(cfg_s3.profile or base.profile,
                                  cfg_s3.endpoint_url or base.endpoint_url,
                                  cfg_s3.region or base.region, base.access_key_id,
                                  base.secret_access_key, base.session_token))


def add_drop(corpus_uri: str, name: str, args: dict[str, Any], s3: S3Options | None = None,
             wait: bool = False) -> AddReport:
    """`semdedup corpus add`: validate, lock, add, commit. `args`: run arguments (no
    output_path); the first add needs n_clusters."""
    check_drop_name(name)
    corpus = open_corpus(corpus_uri, args, s3)
    with lock_corpus(corpus, wait) as lock:
        manifest = read_manifest(corpus)
        drops = manifest["drops"] if manifest else []
        for i, d in enumerate(drops):
            if d["name"] == name:
                raise ConfigError(f"{corpus.display()}: drop {name!r} is already committed "
                                  f"(drop {i + 1} of {len(drops)}); nothing was changed; give the "
                                  "new drop another --drop-name")
        cfg = corpus_config(corpus, manifest, name, args)
        backend = get_backend(cfg.backend)
        with open_source(cfg, s3) as source:
            return add_source(corpus, manifest, name, cfg, source, backend, lock)


# -- rebuild -------------------------------------------------------------------------------------
def rebuild(corpus_uri: str, into_uri: str, args: dict[str, Any],
            s3: S3Options | None = None) -> list[AddReport]:
    """A new corpus at `into_uri` from the committed drops of `corpus_uri` (left untouched):
    centroids re-fitted on all drops' clips (the drops' shards are the input, so the original
    drop folders need not exist any more), then every drop re-added in the same order with its
    eps. `args` may change the fixed settings (n_clusters, ...)."""
    old, new = open_corpus(corpus_uri, args, s3), open_corpus(into_uri, args, s3)
    manifest = read_manifest(old, READABLE_FORMATS)
    if manifest is None or not manifest["drops"]:
        raise InputError(f"{old.display()}: no committed drops to rebuild from")
    fixed = {k: v for k, v in manifest["settings"].items() if k in FIXED_SETTINGS + FIT_SETTINGS}
    first_args = {**fixed, **{k: v for k, v in args.items() if v is not None}}
    later_args = {k: v for k, v in first_args.items() if k not in FIXED_SETTINGS + FIT_SETTINGS}
    cfg0 = make_config(**{**first_args, "input_embeddings_path": old.display(),
                          "output_path": new.display()})
    sources = [EmbeddingSource.discover(old.child(f"{layout.drop_dir(d['name'])}/{layout.SHARDS}"),
                                        batch_rows=cfg0.read_batch_rows)
               for d in manifest["drops"]]
    everything = EmbeddingSource(old, [InputFile(f"{layout.drop_dir(d['name'])}/{layout.SHARDS}/"
                                                 f"{f.rel}", f.rows)
                                       for d, src in zip(manifest["drops"], sources)
                                       for f in src.files], batch_rows=cfg0.read_batch_rows)
    backend = get_backend(cfg0.backend)
    # The new corpus's cross-cluster radius covers every drop's eps (swept ones too), so the
    # pairs a later add or sweep could not search are searched now.
    search_eps = max(float(e) for d in manifest["drops"] for e in d["eps"])
    reports = []
    with lock_corpus(new, wait=False) as lock:
        current = read_manifest(new)
        if current is not None:
            raise ConfigError(f"{new.display()}: already holds a corpus; rebuild into a new folder")
        for d, source in zip(manifest["drops"], sources):
            eps = [float(e) for e in d["eps"]]
            cfg = corpus_config(new, current, d["name"],
                                {**(first_args if current is None else later_args),
                                 "input_embeddings_path": source.storage.display(),
                                 "eps_to_extract": eps})
            reports.append(add_source(new, current, d["name"], cfg, source, backend, lock,
                                      fit_source=everything if current is None else None,
                                      input_label=d["input"],
                                      fit_on=[d["name"] for d in manifest["drops"]],
                                      search_eps=search_eps))
            current = read_manifest(new)
    return reports


# -- sweep ---------------------------------------------------------------------------------------
def record_sweep(corpus: Storage, name: str, eps_list: list[float], rows: dict) -> None:
    """After `semdedup sweep` of a committed drop (`extraction.sweep` calls this): the manifest
    lists the swept eps for the drop like an add's, removed split into inside the drop and of
    earlier drops, so `corpus show` and the Dagster assets follow. Under the corpus lock
    (waiting for an add in progress), since an add rewrites the manifest at its commit."""
    drop = corpus.child(layout.drop_dir(name))
    owners = read_table(drop, layout.MAX_DROP_TABLE)
    clusters = sorted(set(owners.column(layout.CLUSTER).to_numpy().tolist()))
    # The max-drop rows are the pruning (and cross) tables' rows, cluster by cluster.
    tables = [layout.pruning_table]
    if layout.CROSS_MAX_DROP in owners.column_names:
        tables.append(layout.cross_table)
    scores = [np.concatenate([read_table(drop, rel(c), [layout.SCORE]).column(layout.SCORE)
                              .to_numpy() for c in clusters]) for rel in tables]
    earlier = [np.asarray(owners.column(col).to_pylist(), dtype=object) != name
               for col in (layout.MAX_DROP, layout.CROSS_MAX_DROP)[:len(tables)]]
    with lock_corpus(corpus, wait=True) as lock:
        manifest = read_manifest(corpus)
        entry = next(d for d in manifest["drops"] if d["name"] == name)
        for eps in eps_list:
            gone = [removed_mask(score, eps) for score in scores]
            n_earlier = int(np.logical_or.reduce([g & e for g, e in zip(gone, earlier)]).sum())
            entry["eps"][eps_text(eps)] = {"removed": rows[eps]["removed"],
                                           "inside": rows[eps]["removed"] - n_earlier,
                                           "earlier": n_earlier}
        lock.check()
        corpus.write_bytes(layout.CORPUS_MANIFEST, _json_bytes(manifest))


# -- reports -------------------------------------------------------------------------------------
# A rule of thumb, not a measurement: when a drop's clips sit this much farther from their
# centroids than the first drop's did, its content is not what the centroids were fitted on.
DRIFT_REBUILD = 0.15


def format_add(report: AddReport) -> str:
    lines = [f"corpus: {report.corpus}",
             f"drop {report.name!r} committed as drop {report.index + 1}: {report.clips:,} clips "
             f"in {report.clusters_touched} clusters, compared with {report.earlier_clips_read:,} "
             "earlier clips" + (" (centroids fitted on this drop)" if report.fitted else ""),
             "",
             f"{'eps':>8} {'clips':>10} {'removed':>10} {'inside':>10} {'earlier':>10}"]
    for eps, r in report.removed.items():
        lines.append(f"{eps_text(eps):>8} {report.clips:>10,} {r['removed']:>10,} "
                     f"{r['inside']:>10,} {r['earlier']:>10,}")
    lines += ["", f"drift: mean cosine distance to centroids {report.mean_cosine_dist:.4f}, "
                  f"first drop {report.fit_mean_cosine_dist:.4f} ({report.drift:+.1%})"]
    if report.drift > DRIFT_REBUILD:
        lines.append(f"  over +{DRIFT_REBUILD:.0%}: consider `semdedup corpus rebuild` "
                     "(see README, Corpus)")
    lines += ["", f"{'phase':<12} {'seconds':>9}"]
    lines += [f"{name:<12} {secs:>9.2f}" for name, secs in report.timer.seconds.items()]
    return "\n".join(lines)


def format_show(corpus: Storage) -> str:
    manifest = read_manifest(corpus, READABLE_FORMATS)
    if manifest is None:
        if not corpus.exists():  # a mistyped path is not an empty corpus
            raise InputError(f"{corpus.display()}: no such folder")
        if holds_run_output(corpus):
            raise InputError(f"{corpus.display()}: holds the output of a semdedup run, not a "
                             "corpus (`semdedup inspect` reads a run's output)")
        return f"corpus: {corpus.display()}\nno committed drops"
    s, drops = manifest["settings"], manifest["drops"]
    base = drops[0]["mean_cosine_dist"]
    w = max(24, *(len(d["name"]) for d in drops))  # the drop column fits the longest name
    lines = [f"corpus: {corpus.display()}",
             f"centroids: {s['n_clusters']} x {s['dim']}-d, fitted on "
             f"{'drop' if len(s['fit_on']) == 1 else 'drops'} {', '.join(s['fit_on'])} "
             f"({s['which_to_keep']}, {s['sim_metric']}, random_state {s['random_state']})",
             "",
             f"{'#':>3}  {'drop':<{w}} {'clips':>10} {'eps':>7} {'removed':>9} {'inside':>9} "
             f"{'earlier':>9} {'drift':>7}"]
    for i, d in enumerate(drops):
        drift = "fit" if i == 0 else f"{d['mean_cosine_dist'] / base - 1:+.1%}"
        for j, (eps, r) in enumerate(d["eps"].items()):
            head = f"{i + 1:>3}  {d['name']:<{w}} {d['clips']:>10,}" if j == 0 else " " * (w + 16)
            lines.append(f"{head} {eps:>7} {r['removed']:>9,} {r['inside']:>9,} "
                         f"{r['earlier']:>9,} {drift if j == 0 else '':>7}")
    lines += ["", f"{len(drops)} drops, {sum(d['clips'] for d in drops):,} clips"]
    return "\n".join(lines)
