"""Corpus cost: adding a drop to a corpus against a full run over the corpus.

Generates base + drop clips from one distribution (files of `--drop-rows` rows; the last file is
the drop), then times, each as a child process:
  1. `semdedup run` over the base (what re-running everything would cost),
  2. `semdedup corpus add` of the base as the corpus's first drop (the fit; printed, not compared),
  3. `semdedup corpus add` of the drop: the figure, as a fraction of 1.

    python bench/corpus_bench.py                                   # 10k drop into 300k, k=1000
    python bench/corpus_bench.py --base-rows 30000 --drop-rows 1000 --clusters 100   # quick check
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

from semdedup_core.sample import write_sample


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-rows", type=int, default=300_000)
    p.add_argument("--drop-rows", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    a = p.parse_args()

    files = a.base_rows // a.drop_rows + 1
    data = os.path.join(a.workdir, f"corpus_input_{files}x{a.drop_rows}x{a.dim}")
    if not os.path.isdir(data):
        t = time.perf_counter()
        write_sample(data + ".tmp", files * a.drop_rows, a.dim, n_topics=256, files=files,
                     seed=1, keep_groups=False)
        os.rename(data + ".tmp", data)
        print(f"generated {files * a.drop_rows:,} x {a.dim} in {time.perf_counter() - t:.1f}s")
    names = sorted(n for n in os.listdir(data) if n.endswith(".parquet"))
    base, drop = os.path.join(a.workdir, "corpus_base"), os.path.join(a.workdir, "corpus_drop")
    for folder, members in ((base, names[:-1]), (drop, names[-1:])):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for n in members:
            os.symlink(os.path.join(data, n), os.path.join(folder, n))
    out, corpus = os.path.join(a.workdir, "corpus_full_run"), os.path.join(a.workdir, "corpus")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(corpus, ignore_errors=True)
    cli = [sys.executable, "-m", "semdedup_core.cli"]
    common = ["--backend", a.backend]
    base_rows = (files - 1) * a.drop_rows

    full, _ = timed([*cli, "run", "--input-embeddings-path", base, "--output-path", out,
                     "--n-clusters", str(a.clusters), "--quiet", *common])
    print(f"full run over {base_rows:,} clips: {full:.1f}s")
    first, _ = timed([*cli, "corpus", "add", corpus, "--input-embeddings-path", base,
                      "--drop-name", "base", "--n-clusters", str(a.clusters), *common])
    print(f"corpus add of the {base_rows:,} clips as the first drop (fit): {first:.1f}s")
    add, report = timed([*cli, "corpus", "add", corpus, "--input-embeddings-path", drop,
                         "--drop-name", "drop", *common])
    print(report)
    print(f"\ncorpus add of {a.drop_rows:,} clips into {base_rows:,}: {add:.1f}s = "
          f"{add / full:.3f}x the full run ({a.dim}-d, k={a.clusters}, {os.cpu_count()} cores; "
          "wall times of child processes, start-up included)")


if __name__ == "__main__":
    main()
