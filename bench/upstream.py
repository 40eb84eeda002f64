"""semdedup against upstream SemDeDup (facebookresearch/SemDeDup), on the same clips, same run.

Upstream runs unedited from a local git work tree of a pinned commit, in a venv of its own
(faiss-cpu, CPU torch, numpy, pandas and what its modules import), driven step by step by
bench/upstream_driver.py as its README's templates call the steps. Both run as child processes;
each one's wall seconds and peak RSS (os.wait4) are measured. Upstream reads float32 memmaps, so
the parquet input is first converted (L2-normalised, as upstream's embedding step stores them;
"paths" are row numbers): that preparation is timed apart and cached, and not counted.

Prints: the table (workload, semdedup s / GiB, upstream s / GiB, speed ratio = upstream s /
semdedup s, memory ratio = semdedup GiB / upstream GiB; each the best of the repeats),
upstream's seconds per step, and per eps both tools' removal counts and how far the removed
sets agree (different K-means, so close, not equal).

    python bench/upstream.py                           # 1,000,000 x 512, k=1000 (the target)
    python bench/upstream.py --rows 20000 --clusters 50 --eps 0.01 0.05
    python bench/upstream.py --upstream-git /path/to/SemDeDup.git   # a local mirror
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from semdedup_core.embeddings import EmbeddingSource, normalize
from semdedup_core.run_record import input_fingerprint
from semdedup_core.sample import write_sample
from semdedup_core.storage import Storage

from run_bench import remove_output  # bench/ is this script's folder: on sys.path

UPSTREAM_GIT = "https://github.com/facebookresearch/SemDeDup"
UPSTREAM_COMMIT = "6b4194511202c29b0e1ac8c730996777449ea2a4"  # 2023-10-01, its only commit
# What upstream's modules import (its conda file pins torch 1.11, faiss 1.7.3, numpy 1.23 and
# pandas 1.5 on Python 3.9; these are today's releases for this Python). Torch comes apart.
REQUIREMENTS = ["faiss-cpu==1.15.1", "numpy==2.4.6", "pandas==3.1.1", "pyyaml==6.0.4",
                "tqdm==4.70.1", "submitit==1.5.4"]
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_driver.py")
PATHS_DTYPE = "S24"  # upstream's own default; a row number fits


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr.strip()}")
    return proc.stdout.strip()


def upstream_tree(git_src: str, commit: str, cache: str) -> str:
    """A work tree of `commit` (cloned once into the cache), checked to be unedited."""
    tree = os.path.join(cache, f"SemDeDup-{commit[:12]}")
    if not os.path.isdir(tree):
        tmp = tree + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run(["git", "clone", "--quiet", "--no-checkout", git_src, tmp])
        run(["git", "-C", tmp, "checkout", "--quiet", "--detach", commit])
        os.rename(tmp, tree)
    head = run(["git", "-C", tree, "rev-parse", "HEAD"])
    edited = run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"])
    if not head.startswith(commit) or edited:
        sys.exit(f"{tree}: not an unedited checkout of {commit} (HEAD {head}; {edited!r}); "
                 "delete it to clone again")
    return tree


def torch_requirement() -> str:
    """A CPU build of torch where pip's find-links folders hold one for this Python (this
    machine image ships one); else PyPI's torch, which pulls ~3 GB of CUDA libraries."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            m = re.match(rf"torch-([^-]+\+cpu)-{tag}-", name)
            if m:
                return f"torch=={m.group(1)}"
    return "torch"


def upstream_venv(cache: str, torch_req: str) -> str:
    """The upstream venv's python, built once per requirement set (marked ready last)."""
    reqs = [torch_req, *REQUIREMENTS]
    venv = os.path.join(cache, "venv-" + hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:10])
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".ready")):
        shutil.rmtree(venv, ignore_errors=True)
        print(f"building the upstream venv ({' '.join(reqs)}) ...", flush=True)
        t = time.perf_counter()
        run([sys.executable, "-m", "venv", venv])
        if subprocess.run([python, "-m", "pip", "install", "--quiet", *reqs]).returncode:
            sys.exit(f"{venv}: pip could not install {' '.join(reqs)} (see above)")
        size = int(run(["du", "-sk", venv]).split()[0]) / 2**20
        print(f"upstream venv built in {time.perf_counter() - t:.0f}s, {size:.1f} GiB: {venv}")
        with open(os.path.join(venv, ".ready"), "w") as f:
            f.write("\n".join(reqs) + "\n")
    return python


def prepare_memmaps(input_dir: str, cache: str) -> dict:
    """Upstream's inputs from the parquet folder, in semdedup's read order: the normalised
    float32 embeddings memmap, the paths memmap (row numbers) and the ids (for the comparison).
    Cached by the input's fingerprint."""
    source = EmbeddingSource.discover(Storage(os.path.abspath(input_dir)))
    key = input_fingerprint([(os.path.abspath(input_dir), 0, None), *source.fingerprint_items()])
    folder = os.path.join(cache, f"memmap-{key[:12]}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return {**json.load(f), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    t = time.perf_counter()
    ids = []
    meta = {"emb": os.path.join(folder, "embeddings.f32"), "paths": os.path.join(folder, "paths.s24"),
            "ids": os.path.join(folder, "ids.npy"), "rows": source.n_rows}
    with open(meta["emb"], "wb") as emb, open(meta["paths"], "wb") as paths:
        for batch in source.iter_batches():
            emb.write(normalize(batch.emb, batch.norms).tobytes())
            rows = np.arange(batch.start_row, batch.start_row + len(batch.emb))
            paths.write(rows.astype(PATHS_DTYPE).tobytes())
            ids.extend(batch.ids.to_pylist())
    np.save(meta["ids"], np.array(ids))
    meta.update(dim=source.dim, seconds=time.perf_counter() - t)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return {**meta, "reused": False}


def environment_without(names: list[str]) -> dict:
    """This process's environment less `names` (each program's BLAS setting, `--*-unset`)."""
    return {k: v for k, v in os.environ.items() if k not in names}


def measured(cmd: list[str], log: str, **kw) -> tuple[float, float]:
    """Run `cmd` (output to `log`); its wall seconds and peak RSS in GiB (of the process and
    the children it waited for, as wait4 reports)."""
    with open(log, "w") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{tail}\n{cmd[0]} ... failed (exit {proc.returncode}); log: {log}")
    return wall, usage.ru_maxrss / 2**20


def run_semdedup(a, data: str, out: str) -> tuple[float, float]:
    remove_output(out)  # settled: see remove_output
    cmd = [sys.executable, "-m", "semdedup_core.cli", "run", "--input-embeddings-path", data,
           "--output-path", out, "--n-clusters", str(a.clusters), "--max-iter", str(a.max_iter),
           "--eps-to-extract", *map(str, a.eps), "--which-to-keep", a.which_to_keep,
           "--random-state", str(a.seed), "--backend", "cpu", "--quiet"]
    return measured(cmd, out + ".log", env=environment_without(a.semdedup_unset))


def run_upstream(a, python: str, tree: str, mm: dict, out: str) -> tuple[float, float, dict]:
    remove_output(out)  # settled: see remove_output
    os.makedirs(out)
    cfg = {"upstream": tree, "emb": mm["emb"], "paths": mm["paths"], "paths_dtype": PATHS_DTYPE,
           "rows": mm["rows"], "dim": mm["dim"], "clusters": a.clusters, "max_iter": a.max_iter,
           "seed": a.seed, "eps": a.eps, "which_to_keep": a.which_to_keep, "out": out,
           "result": os.path.join(out, "result.json")}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    wall, peak = measured([python, DRIVER, os.path.join(out, "config.json")],
                          os.path.join(out, "driver.log"), cwd=out,
                          env=environment_without(a.upstream_unset))
    with open(cfg["result"]) as f:
        return wall, peak, json.load(f)


def removed_sets(a, semdedup_out: str, upstream_out: str, ids: np.ndarray) -> list[tuple]:
    rows = []
    for e in a.eps:
        ours = set(pq.read_table(os.path.join(semdedup_out, "extraction", f"unique_ids_{e!r}.parquet"),
                                 columns=["id"]).column("id").to_pylist())
        with open(os.path.join(upstream_out, f"removed_{e!r}.txt")) as f:
            theirs = set(ids[[int(r) for r in f.read().split()]].tolist())
        rows.append((e, ours, theirs))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", help="parquet folder to run on (default: generated clips, as "
                                   "bench/run_bench.py makes them)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rows-per-file", type=int, default=62500)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--eps", type=float, nargs="+", default=[0.01])
    p.add_argument("--which-to-keep", choices=["hard", "easy", "random"], default="hard")
    p.add_argument("--seed", type=int, default=42, help="semdedup's random_state, faiss's seed")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    # Each side runs with its best BLAS setting on this machine image, which forces
    # OPENBLAS_CORETYPE=Haswell on AVX-512 hosts: numpy's OpenBLAS picks SkylakeX kernels on its
    # own (twice the GEMM speed), while faiss's bundled OpenBLAS 0.3.15 is 2.2x slower at
    # k-means without the variable (README: OpenBLAS kernels).
    p.add_argument("--semdedup-unset", nargs="*", default=["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"],
                   help="environment variables semdedup runs without")
    p.add_argument("--upstream-unset", nargs="*", default=[],
                   help="environment variables upstream runs without")
    p.add_argument("--upstream-git", default=UPSTREAM_GIT, help="URL or path of its git repository")
    p.add_argument("--upstream-commit", default=UPSTREAM_COMMIT, help="a full commit hash")
    p.add_argument("--torch", default=None, help="pip requirement for torch in the upstream venv "
                                                 "(default: a local CPU build, else PyPI's)")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    a = p.parse_args()

    cache = os.path.join(os.path.abspath(a.workdir), "upstream")
    os.makedirs(cache, exist_ok=True)
    tree = upstream_tree(a.upstream_git, a.upstream_commit, cache)
    python = upstream_venv(cache, a.torch or torch_requirement())
    data = a.input
    if data is None:
        files = max(1, round(a.rows / a.rows_per_file))
        data = os.path.join(os.path.abspath(a.workdir), f"input_{a.rows}x{a.dim}_{files}files")
        if not os.path.isdir(data):
            write_sample(data + ".tmp", a.rows, a.dim, n_topics=256, files=files, seed=1,
                         keep_groups=False)
            os.rename(data + ".tmp", data)
    mm = prepare_memmaps(data, cache)
    print(f"upstream {a.upstream_commit[:12]} at {tree}\ninput {data}: {mm['rows']:,} x {mm['dim']}; "
          f"memmaps for upstream " + ("reused" if mm["reused"] else f"written in {mm['seconds']:.1f}s")
          + " (not counted)", flush=True)

    ours_out, theirs_out = os.path.join(cache, "semdedup_out"), os.path.join(cache, "upstream_out")
    ours, theirs = [], []
    for r in range(a.repeats):
        ours.append(run_semdedup(a, data, ours_out))
        wall, peak, result = run_upstream(a, python, tree, mm, theirs_out)
        theirs.append((wall, peak))
        steps = "  ".join(f"{s['step']} {s['seconds']:.1f}s (peak {s['peak_rss_gib']:.2f})"
                          for s in result["steps"])
        print(f"run {r + 1}: semdedup {ours[-1][0]:.1f}s {ours[-1][1]:.2f} GiB | upstream "
              f"{wall:.1f}s {peak:.2f} GiB ({steps}; empty clusters {result['empty_clusters']})",
              flush=True)

    s_s, s_gb = min(w for w, _ in ours), min(g for _, g in ours)
    u_s, u_gb = min(w for w, _ in theirs), min(g for _, g in theirs)
    workload = f"{mm['rows']:,} x {mm['dim']}, k={a.clusters}, max_iter {a.max_iter}"
    unset = {"semdedup": a.semdedup_unset, "upstream": a.upstream_unset}
    print(f"\n{os.cpu_count()} cores; best of {a.repeats}; eps {a.eps}, {a.which_to_keep}; "
          f"unset: {unset}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}; "
          "targets: speed ratio >= 2, memory ratio <= 0.5\n"
          "| workload | semdedup s / GiB | upstream s / GiB | speed ratio | memory ratio |\n"
          "|---|---|---|---|---|\n"
          f"| {workload} | {s_s:.1f} s / {s_gb:.2f} GiB | {u_s:.1f} s / {u_gb:.2f} GiB | "
          f"{u_s / s_s:.2f}x | {s_gb / u_gb:.2f}x |")

    print("\n| eps | semdedup removed | upstream removed | upstream / semdedup | removed by both "
          "| Jaccard |\n|---|---|---|---|---|---|")
    for e, o, t in removed_sets(a, ours_out, theirs_out, np.load(mm["ids"])):
        both = len(o & t)
        print(f"| {e!r} | {len(o):,} | {len(t):,} | {len(t) / max(len(o), 1):.4f} | {both:,} | "
              f"{both / max(len(o | t), 1):.4f} |")


if __name__ == "__main__":
    main()
