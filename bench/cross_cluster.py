"""Cross-cluster duplicates: the run with `cross_cluster` against the same run without it, and
(up to --exact-max clips) against exact all-pairs search.

    python bench/cross_cluster.py --clusters 100       # the 80k MiniLM set + 25% near-copies
    python bench/cross_cluster.py --rows 20000 --clusters 40    # a quick check
    python bench/cross_cluster.py --synthetic 1000000 --dim 512 --clusters 1000   # 1M x 512

Data: /work/shared/data/pypi_minilm_embd_parquet (80,000 MiniLM-384 vectors of real text) plus
near-copies of a seeded fraction of them at cosine 0.95-0.99 in random directions (so some land
across cluster boundaries); or, with --synthetic N, N synthetic unit clips of --dim around
--clusters random centres, of which a --copies share are near-copies (cosine 0.95-0.99) leaning
toward the nearest other centre, half of them of the clips nearest that boundary, so that they
straddle cluster boundaries. Written in files of
100k clips, so memory stays at a few batches.
Runs `semdedup run` without and with `cross_cluster` on the same clustering (same seed),
--repeats times each, alternating (the best time of each is printed), then, up to --exact-max
clips, an exact blocked all-pairs search, and prints per eps:
- pairs >= 1 - eps found by all-pairs search, and how many end with both clips kept, without and
  with the option (target with it: <= 0.05% of the pairs);
- removals without / with the option / by the exact global rule (every earlier clip of any
  cluster, in the same global order; target: with the option <= 1.02x the exact rule);
- the audit's estimate of kept pairs and its 95% interval, against the true count;
- wall time of the two runs (target: <= 1.3x), their CPU time (all threads: on a loaded
  machine a steadier comparison than wall time), the seconds of each phase, and the audit's
  share of the run's wall and CPU time, without and with the option (target: <= 5%).
Above --exact-max clips (all-pairs search is O(n^2)) only the times and removals are printed.
"""
import argparse
import glob
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_core import layout
from semdedup_core.config import make_config
from semdedup_core.embeddings import normalize
from semdedup_core.pipeline import run_pipeline
from semdedup_core.ranking import rank_order
from semdedup_core.storage import Storage

DATA = "/work/shared/data/pypi_minilm_embd_parquet"


def make_input(folder: str, rows: int | None, copies: float, seed: int) -> int:
    table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(f"{DATA}/*.parquet")))
    rng = np.random.default_rng(seed)
    if rows and rows < table.num_rows:
        table = table.take(pa.array(np.sort(rng.choice(table.num_rows, rows, replace=False))))
    emb = normalize(table.column("embedding").combine_chunks().flatten()
                    .to_numpy(zero_copy_only=False).astype(np.float32).reshape(table.num_rows, -1))
    n_copy = int(copies * len(emb))
    src = rng.choice(len(emb), n_copy, replace=False)
    cos = rng.uniform(0.95, 0.99, n_copy)
    u = rng.standard_normal((n_copy, emb.shape[1])).astype(np.float32)
    u -= (u * emb[src]).sum(1, keepdims=True) * emb[src]
    u = normalize(u)
    near = normalize((emb[src] * cos[:, None] + u * np.sqrt(1 - cos**2)[:, None]).astype(np.float32))
    ids = table.column("id").to_pylist() + [f"copy:{i}" for i in range(n_copy)]
    allemb = np.concatenate([emb, near])
    n, d = allemb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": pa.ListArray.from_arrays(
        offsets, pa.array(allemb.reshape(-1)))}), f"{folder}/part-0.parquet")
    return n


SYNTHETIC_BATCH = 100_000


def make_synthetic(folder: str, rows: int, dim: int, centres: int, copies: float,
                   seed: int) -> int:
    """`rows` unit clips around `centres` random unit centres (cosine to their centre ~0.7),
    a `copies` share of them near-copies of other clips of the same file at cosine
    0.95-0.99, leaning toward the nearest other centre (half of them copies of the clips
    nearest that boundary); files of SYNTHETIC_BATCH clips."""
    rng = np.random.default_rng(seed)
    centre = normalize(rng.standard_normal((centres, dim)).astype(np.float32))
    gram = centre @ centre.T
    np.fill_diagonal(gram, -np.inf)
    nearest = gram.argmax(axis=1)
    os.makedirs(folder, exist_ok=True)
    for part, start in enumerate(range(0, rows, SYNTHETIC_BATCH)):
        m = min(SYNTHETIC_BATCH, rows - start)
        n_copy = int(m * copies / (1 + copies))
        own = rng.integers(0, centres, m - n_copy)
        noise = rng.standard_normal((m - n_copy, dim)).astype(np.float32) / np.sqrt(dim)
        x = normalize(centre[own] + noise)
        # Half the copies are of the clips nearest the boundary with the nearest other centre
        # (they straddle it), half of random clips.
        margin = (x * (centre[nearest[own]] - centre[own])).sum(1)
        edge = np.argsort(-margin, kind="stable")[:n_copy - n_copy // 2]
        src = np.concatenate([edge, rng.integers(0, len(x), n_copy // 2)])
        u = centre[nearest[own[src]]] - centre[own[src]]
        u = normalize(u) + 0.5 * rng.standard_normal((n_copy, dim)).astype(np.float32) / np.sqrt(dim)
        u -= (u * x[src]).sum(1, keepdims=True) * x[src]
        u = normalize(u)
        cos = rng.uniform(0.95, 0.99, n_copy).astype(np.float32)
        near = normalize(x[src] * cos[:, None] + u * np.sqrt(1 - cos**2)[:, None])
        emb = np.concatenate([x, near])
        offsets = pa.array(np.arange(0, (m + 1) * dim, dim, dtype=np.int32))
        pq.write_table(pa.table({
            "id": pa.array([f"s{start + i}" for i in range(m)]),
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))}),
            f"{folder}/part-{part:05d}.parquet")
    return rows


def load_clips(out_dir: str, cfg):
    """ids, unit rows, and each clip's position in the global order (from the run's shards)."""
    out = Storage(out_dir)
    ids, embs, keys, ties = [], [], [], []
    for name in out.list_dirs(layout.SHARDS):
        c = layout.cluster_of_shard_dir(name)
        shard = pa.concat_tables(pq.read_table(out.path(f))
                                 for f in out.list_files(layout.shard_dir(c)))
        cid = shard.column("id").combine_chunks()
        cos = shard.column("cosine_dist_to_cent").to_numpy()
        l2 = shard.column("l2_dist_to_cent").to_numpy()
        order = rank_order(cid, l2, cos, cfg.sim_metric, cfg.which_to_keep, cfg.random_state, c)
        dist = (cos if cfg.sim_metric == "cosine" else l2)[order].astype(np.float64)
        n = len(order)
        keys.append({"hard": -dist, "easy": dist}.get(cfg.which_to_keep, (np.arange(n) + 0.5) / n))
        ties.append(np.full(n, c))
        ids.append(cid.take(pa.array(order)))
        embs.append(np.stack(shard.column("embedding").to_numpy(zero_copy_only=False))[order])
    ids = pa.concat_arrays(ids)
    key = np.concatenate(keys)
    tie = ids if cfg.which_to_keep != "random" else pa.array(np.concatenate(ties))
    direction = "descending" if cfg.which_to_keep == "hard" else "ascending"
    by = pc.sort_indices(pa.table({"k": key, "t": tie}),
                         sort_keys=[("k", "ascending"), ("t", direction)]).to_numpy()
    position = np.empty(len(by), np.int64)
    position[by] = np.arange(len(by))
    return ids.to_pylist(), np.concatenate(embs).astype(np.float32), position


def all_pairs(emb: np.ndarray, threshold: float, block: int = 2048, tile: int = 32768):
    """Every pair i < j with emb_i.emb_j >= threshold, exact (float32 GEMM, blocked)."""
    rows, cols, sims = [], [], []
    n = len(emb)
    for r0 in range(0, n, block):
        x = emb[r0:r0 + block]
        for c0 in range(r0, n, tile):
            s = x @ emb[c0:c0 + tile].T
            i, j = np.nonzero(s >= threshold)
            keep = (j + c0) > (i + r0)
            rows.append(i[keep] + r0)
            cols.append(j[keep] + c0)
            sims.append(s[i[keep], j[keep]])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def removed(out_dir: str, eps: float) -> set:
    return set(pq.read_table(f"{out_dir}/extraction/unique_ids_{eps!r}.parquet")
               .column("id").to_pylist())


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The input's options, shared with bench/audit_cost.py (see `input_from`)."""
    p.add_argument("--rows", type=int, default=None, help="real vectors to use (default: all)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="N synthetic clips instead of the real set")
    p.add_argument("--dim", type=int, default=512, help="dimension of synthetic clips")
    p.add_argument("--copies", type=float, default=0.25, help="near-copies, as a fraction")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.01])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)


def input_from(ns: argparse.Namespace, prefix: str) -> tuple[str, int]:
    """(work folder, clips): the input that `add_input_arguments`' options ask for, written
    under `work`/in (the work folder is --workdir or a new temporary one)."""
    work = ns.workdir or tempfile.mkdtemp(prefix=prefix)
    if ns.synthetic:
        return work, make_synthetic(f"{work}/in", ns.synthetic, ns.dim, ns.clusters, ns.copies,
                                    ns.seed)
    return work, make_input(f"{work}/in", ns.rows, ns.copies, ns.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(p)
    p.add_argument("--which-to-keep", default="hard")
    p.add_argument("--max-probes", type=int, default=None, help="cross_cluster_max_probes")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    p.add_argument("--exact-max", type=int, default=200_000,
                   help="largest clip count to run the exact all-pairs search on")
    ns = p.parse_args()
    work, n = input_from(ns, "semdedup-bench-cross-")
    args = {"input_embeddings_path": f"{work}/in", "n_clusters": ns.clusters, "backend": "cpu",
            "eps_to_extract": ns.eps, "which_to_keep": ns.which_to_keep}
    extra = {} if ns.max_probes is None else {"cross_cluster_max_probes": ns.max_probes}
    reports, seconds, cpu = {}, {"off": [], "on": []}, {"off": [], "on": []}
    # Every run writes a new folder, as a first run does, and the earlier runs' folders are
    # removed only at the end: a run over the folder of the run before replaces its files, and
    # ext4 here then makes each new file cost ~10x (1 ms against 0.09 ms of CPU, measured)
    # while it skips the inodes freed in the last minute (`run_bench.remove_output`).
    for repeat in range(ns.repeats):
        for name, on in (("off", False), ("on", True)):
            folder = f"{work}/{name}" if repeat == ns.repeats - 1 else f"{work}/{name}.{repeat}"
            shutil.rmtree(folder, ignore_errors=True)
            cfg = make_config(output_path=folder, cross_cluster=on, **args,
                              **(extra if on else {}))
            t, c = time.perf_counter(), time.process_time()
            report = run_pipeline(cfg)
            seconds[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if seconds[name][-1] == min(seconds[name]):
                reports[name] = report
    for repeat in range(ns.repeats - 1):
        for name in ("off", "on"):
            shutil.rmtree(f"{work}/{name}.{repeat}")
    best = {k: min(v) for k, v in seconds.items()}
    dim = reports["on"].dim
    exact_search = n <= ns.exact_max
    if exact_search:
        ids, emb, position = load_clips(f"{work}/on", cfg)
        t = time.perf_counter()
        i, j, s = all_pairs(emb, 1 - max(ns.eps))
        search = f"exact all-pairs search {time.perf_counter() - t:.1f} s"
    else:
        search = f"no exact search (more than --exact-max {ns.exact_max:,} clips)"
    print(f"clips {n:,} x {dim}  clusters {ns.clusters}  which_to_keep {ns.which_to_keep}  "
          f"max_probes {cfg.cross_cluster_max_probes}  {search}")
    print(f"{'eps':>6} {'pairs':>9} {'kept off':>9} {'kept on':>8} {'on %':>7} {'rm off':>8} "
          f"{'rm on':>8} {'rm exact':>9} {'on/exact':>8} {'audit on [95%]':>22}")
    for eps in sorted(ns.eps, reverse=True):
        rm = {k: reports[k].summary[eps]["removed"] for k in ("off", "on")}
        audit = next(x for x in reports["on"].audit if x.eps == eps)
        pairs = kept_off = kept_on = share = exact = ratio = "-"
        if exact_search:
            hit = s >= np.float32(1 - eps)
            a, b = i[hit], j[hit]
            later = np.where(position[a] > position[b], a, b)
            kept = {}
            for name in ("off", "on"):
                gone = removed(f"{work}/{name}", eps)
                alive = np.array([x not in gone for x in ids])
                kept[name] = int((alive[a] & alive[b]).sum())
            exact_n = len(np.unique(later))
            pairs, kept_off, kept_on = f"{len(a):,}", f"{kept['off']:,}", f"{kept['on']:,}"
            share = f"{100 * kept['on'] / max(len(a), 1):.3f}%"
            exact, ratio = f"{exact_n:,}", f"{rm['on'] / max(exact_n, 1):.4f}"
        print(f"{eps:>6} {pairs:>9} {kept_off:>9} {kept_on:>8} {share:>7} {rm['off']:>8,} "
              f"{rm['on']:>8,} {exact:>9} {ratio:>8} "
              f"{audit.estimated_pairs:>7,.0f} [{audit.low:,.0f}, {audit.high:,.0f}]")
    print(f"wall time (best of {ns.repeats}): off {best['off']:.2f} s, on {best['on']:.2f} s, "
          f"ratio {best['on'] / best['off']:.3f}")
    fewest = {k: min(v) for k, v in cpu.items()}
    print(f"CPU time (least of {ns.repeats}; all threads, less sensitive to other load): "
          f"off {fewest['off']:.2f} s, on {fewest['on']:.2f} s, ratio "
          f"{fewest['on'] / fewest['off']:.3f}")
    for name in ("off", "on"):
        phases = ", ".join(f"{k} {v:.2f}" for k, v in reports[name].timer.seconds.items())
        print(f"  {name}: {phases}")
    # The audit's phase is its CPU time (it runs beside the prune loop): at most what it
    # takes from the run's wall time, and its share of the run's CPU time.
    for name, label in (("off", "without"), ("on", "with")):
        audit_s = reports[name].timer.seconds.get("audit", 0.0)
        print(f"audit {label} cross_cluster: {audit_s:.3f} CPU-s = "
              f"{100 * audit_s / best[name]:.1f}% of the run's wall time, "
              f"{100 * audit_s / fewest[name]:.1f}% of its CPU time")
    print(f"(outputs under {work})")


if __name__ == "__main__":
    main()
