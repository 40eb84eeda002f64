"""Runs upstream SemDeDup's four documented steps, unedited, in one process.

Run by `bench/upstream.py` with the upstream venv's Python (it imports nothing of semdedup):

    python upstream_driver.py CONFIG.json

CONFIG names the upstream work tree, the float32 embeddings memmap and the paths memmap
(prepared by bench/upstream.py), the settings and the output folder. The steps are called as
upstream's README templates call them: compute_centroids (faiss K-means), assign_and_sort_clusters,
SemDeDupJob (torch pairwise) per cluster, extract_pruned_data per eps. Each step's seconds and the
process's peak RSS after it go to CONFIG["result"] as JSON.
"""

import json
import logging
import os
import pickle
import resource
import sys
import time
from types import SimpleNamespace


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    src = cfg["upstream"]
    # The README imports `clustering.clustering`, `sort_clusters` (from clustering/) and the
    # root modules; clustering/*.py import their sibling `utils` by its bare name.
    sys.path[:0] = [src, os.path.join(src, "clustering")]
    import numpy as np
    import pandas as pd
    import faiss
    from clustering.clustering import compute_centroids
    from extract_dedup_data import extract_pruned_data
    from semdedup import SemDeDupJob
    from sort_clusters import assign_and_sort_clusters

    if not hasattr(faiss, "index_gpu_to_cpu"):
        # Upstream calls it even on the CPU, before pickling the index; only faiss's GPU builds
        # have it, and for a CPU index it returns a copy of that index. faiss-cpu gets the
        # identity (the pickle is the same), so upstream's code runs unedited.
        faiss.index_gpu_to_cpu = lambda index: index
    out = cfg["out"]
    n, d, k, eps_list = cfg["rows"], cfg["dim"], cfg["clusters"], cfg["eps"]
    logger = logging.getLogger("upstream")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler(sys.stdout))
    emb = np.memmap(cfg["emb"], dtype="float32", mode="r", shape=(n, d))
    paths = np.memmap(cfg["paths"], dtype=cfg["paths_dtype"], mode="r", shape=(n,))
    clustering_dir = os.path.join(out, "clustering")
    sorted_dir = os.path.join(out, "sorted_clusters")
    semdedup_dir = os.path.join(out, "semdedup")
    steps = []

    def step(name, fn):
        t = time.perf_counter()
        fn()
        steps.append({"step": name, "seconds": time.perf_counter() - t,
                      "peak_rss_gib": peak_rss_gib()})
        print(f"== {name}: {steps[-1]['seconds']:.2f}s", flush=True)

    # 2) K-means (spherical, as upstream's clustering config ships: Kmeans_with_cos_dist True).
    step("kmeans", lambda: compute_centroids(
        data=emb, ncentroids=k, niter=cfg["max_iter"], seed=cfg["seed"],
        Kmeans_with_cos_dist=True, save_folder=clustering_dir, logger=logger, verbose=False))
    # 3) Rank each cluster by cosine distance to its centroid (keep_hard: descending).
    step("sort_clusters", lambda: assign_and_sort_clusters(
        data=emb, paths_list=paths, sim_metric="cosine", keep_hard=True,
        kmeans_with_cos_dist=True, save_folder=clustering_dir,
        sorted_clusters_file_loc=sorted_dir, cluster_ids=range(k), logger=logger))

    # 4) SemDeDup. Its README's `submit_semdedup_job.py` is not in the repository, so the job
    # object is driven directly, one cluster per call. Upstream's `_process_shard` writes a
    # cluster's table and then fails on its own bookkeeping (`step_time.append_cluster`, a list
    # has no such method; after a 1-clip cluster, the closing average divides by zero): those
    # two known errors are passed over once the table is on disk, anything else stops the run.
    sizes = np.bincount(np.load(os.path.join(clustering_dir, "nearest_cent.npy")), minlength=k)
    args = SimpleNamespace(
        embs_memory_loc=cfg["emb"], dataset_size=n, emd_size=d, save_loc=semdedup_dir,
        sorted_clusters_path=sorted_dir, eps_list=eps_list, which_to_keep=cfg["which_to_keep"],
        device="cpu", seed=cfg["seed"], clusters_per_job=k, num_clusters=k)
    os.makedirs(os.path.join(semdedup_dir, "dataframes"), exist_ok=True)

    def semdedup_all():
        job = SemDeDupJob(args, 0)
        for c in range(k):
            table = os.path.join(semdedup_dir, "dataframes", f"cluster_{c}.pkl")
            if sizes[c] == 0:
                # Upstream indexes an empty cluster's file as 2-D and fails (IndexError in
                # semdedup.py and in extract_dedup_data.py): give it an empty 2-D file and an
                # empty table, and count it.
                np.save(os.path.join(sorted_dir, f"cluster_{c}.npy"), np.empty((0, 4), "<U32"))
                empty = pd.DataFrame({"indices": np.empty(0, np.int64),
                                      **{f"eps={e}": np.empty(0, bool) for e in eps_list}})
                with open(table, "wb") as f:
                    pickle.dump(empty, f)
                continue
            try:
                job._process_shard(c, c + 1)
            except AttributeError as exc:
                if "append_cluster" not in str(exc):
                    raise
            except ZeroDivisionError:
                if sizes[c] != 1:
                    raise
            if not os.path.exists(table):
                raise RuntimeError(f"upstream wrote no table for cluster {c}")

    step("semdedup", semdedup_all)

    # 5) The clips to remove at each eps (retreive_kept_samples=False), as "paths" (row numbers).
    def extract_all():
        for e in eps_list:
            extract_pruned_data(sorted_dir, os.path.join(semdedup_dir, "dataframes"), e, k,
                                os.path.join(out, f"removed_{e}.txt"), retreive_kept_samples=False)

    step("extract", extract_all)
    with open(cfg["result"], "w") as f:
        json.dump({"steps": steps, "empty_clusters": int((sizes == 0).sum()),
                   "cluster_sizes": {"min": int(sizes.min()), "max": int(sizes.max())}}, f)


if __name__ == "__main__":
    main(sys.argv[1])
