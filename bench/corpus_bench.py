"""Corpus cost: adding a drop to a corpus against a full run over the corpus.

Generates one data set (files of `--drop-rows` rows; the last file is the drop), then for each
corpus size in `--base-rows` times, each as a child process:
  1. `semdedup run` over the corpus's clips (what re-running everything would cost),
  2. `semdedup corpus add` of those clips as the corpus's first drop (the fit; printed only),
  3. `semdedup corpus add` of the drop: the figure, as a fraction of 1.
Outputs of a size are deleted before the next (the 1M corpus takes ~8 GB while it exists).

    python bench/corpus_bench.py             # 10k drop into 300k and into 1M, k=1000 (targets
                                             # 0.25x and 0.10x); ~6 GB of data in bench/out
    python bench/corpus_bench.py --base-rows 20000 50000 --drop-rows 1000 --clusters 100  # quick
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

from semdedup_core.sample import write_sample

TARGETS = {300_000: 0.25, 1_000_000: 0.10}  # issue #13: a 10k drop into these corpora


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return time.perf_counter() - t, done.stdout


def link_files(folder: str, data: str, names: list[str]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for n in names:
        os.symlink(os.path.join(data, n), os.path.join(folder, n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-rows", type=int, nargs="+", default=[300_000, 1_000_000],
                   help="corpus sizes (clips before the drop)")
    p.add_argument("--drop-rows", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    a = p.parse_args()

    files = max(a.base_rows) // a.drop_rows + 1
    data = os.path.join(a.workdir, f"corpus_input_{files}x{a.drop_rows}x{a.dim}")
    if not os.path.isdir(data):
        t = time.perf_counter()
        write_sample(data + ".tmp", files * a.drop_rows, a.dim, n_topics=256, files=files,
                     seed=1, keep_groups=False)
        os.rename(data + ".tmp", data)
        print(f"generated {files * a.drop_rows:,} x {a.dim} in {time.perf_counter() - t:.1f}s")
    names = sorted(n for n in os.listdir(data) if n.endswith(".parquet"))
    drop = os.path.join(a.workdir, "corpus_drop")
    link_files(drop, data, names[-1:])
    cli = [sys.executable, "-m", "semdedup_core.cli"]
    common = ["--backend", a.backend]
    rows = []
    for base_rows in a.base_rows:
        n_files = base_rows // a.drop_rows
        base_rows = n_files * a.drop_rows
        base = os.path.join(a.workdir, "corpus_base")
        link_files(base, data, names[:n_files])
        out, corpus = os.path.join(a.workdir, "corpus_full_run"), os.path.join(a.workdir, "corpus")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(corpus, ignore_errors=True)
        full, _ = timed([*cli, "run", "--input-embeddings-path", base, "--output-path", out,
                         "--n-clusters", str(a.clusters), "--quiet", *common])
        shutil.rmtree(out)
        print(f"\nfull run over {base_rows:,} clips: {full:.1f}s")
        first, _ = timed([*cli, "corpus", "add", corpus, "--input-embeddings-path", base,
                          "--drop-name", "base", "--n-clusters", str(a.clusters), *common])
        print(f"corpus add of the {base_rows:,} clips as the first drop (fit): {first:.1f}s")
        add, report = timed([*cli, "corpus", "add", corpus, "--input-embeddings-path", drop,
                             "--drop-name", "drop", *common])
        shutil.rmtree(corpus)
        print(report)
        print(f"corpus add of {a.drop_rows:,} clips into {base_rows:,}: {add:.1f}s = "
              f"{add / full:.3f}x the full run")
        rows.append((base_rows, full, add))
    print(f"\n{a.dim}-d, k={a.clusters}, {a.backend}, {os.cpu_count()} cores; wall times of "
          "child processes, start-up included")
    print(f"{'corpus':>10} {'drop':>8} {'full run':>9} {'add':>7} {'ratio':>7} {'target':>7}")
    for base_rows, full, add in rows:
        target = TARGETS.get(base_rows) if a.drop_rows == 10_000 else None
        print(f"{base_rows:>10,} {a.drop_rows:>8,} {full:>8.1f}s {add:>6.2f}s {add / full:>6.3f}x "
              f"{'<= ' + format(target, '.2f') + 'x' if target else '':>7}")


if __name__ == "__main__":
    main()
