"""How the CPU K-means was chosen: the same sample, k, iteration count and thread count through
semdedup's Lloyd (numpy GEMM), faiss-cpu and scikit-learn. Prints seconds per iteration (init
included), GFLOP/s and the final inertia on the sample (lower is better).

    pip install -e '.[bench]'
    python bench/kmeans_compare.py --rows 200000 --dim 512 --clusters 1000 --iters 10
"""

import argparse
import time

import numpy as np

from semdedup_core.backends import CpuBackend
from semdedup_core.embeddings import normalize
from semdedup_core.kmeans import lloyd, nearest_centroid


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    _, d2 = nearest_centroid(CpuBackend(), x, c.astype(np.float32))
    return float(d2.sum(dtype=np.float64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    topics = normalize(rng.standard_normal((256, a.dim)).astype(np.float32))
    x = normalize(topics[rng.integers(0, 256, a.rows)]
                  + 1.5 * rng.standard_normal((a.rows, a.dim)).astype(np.float32) / a.dim**0.5)
    flops = 2.0 * a.rows * a.clusters * a.dim
    results = []

    def record(name, fn):
        t = time.perf_counter()
        centroids, iters = fn()
        secs = time.perf_counter() - t
        results.append((name, secs / iters, flops * iters / secs / 1e9, inertia(x, centroids)))

    record("semdedup Lloyd (numpy)",
           lambda: lloyd(CpuBackend(), x, a.clusters, a.iters, 0.0, 42))
    try:
        import faiss

        def run_faiss():
            km = faiss.Kmeans(a.dim, a.clusters, niter=a.iters, seed=42,
                              max_points_per_centroid=a.rows, verbose=False)
            km.train(x)
            return km.centroids, a.iters

        record(f"faiss-cpu {faiss.__version__}", run_faiss)
    except ImportError:
        print("faiss-cpu not installed: skipped")
    try:
        import sklearn
        from sklearn.cluster import KMeans

        def run_sklearn():
            km = KMeans(a.clusters, init="random", n_init=1, max_iter=a.iters, tol=0.0,
                        random_state=42, algorithm="lloyd").fit(x)
            return km.cluster_centers_, km.n_iter_

        record(f"scikit-learn {sklearn.__version__}", run_sklearn)
    except ImportError:
        print("scikit-learn not installed: skipped")

    print(f"{a.rows:,} x {a.dim}, k={a.clusters}, {a.iters} iterations")
    print(f"{'implementation':<28} {'s/iter':>8} {'GFLOP/s':>8} {'inertia':>12}")
    for name, per_iter, gf, inert in results:
        print(f"{name:<28} {per_iter:>8.3f} {gf:>8.1f} {inert:>12.1f}")


if __name__ == "__main__":
    main()
