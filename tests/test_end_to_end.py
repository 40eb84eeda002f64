"""Whole runs on generated clips with planted near-duplicate groups: exact layout, planted
duplicates found, summaries adding up, byte-identical re-runs."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core import layout
from semdedup_core.backends import CpuBackend
from semdedup_core.config import make_config
from semdedup_core.pipeline import nonempty_clusters, output_storage, prune_all, run_pipeline

EPS = [0.01, 0.005, 0.1]


# What a completion record says about one run (times, host, its paths and settings, the input's
# file names) rather than about the output's content: left out when trees are compared.
RECORD_RUN_FIELDS = ("run_id", "started", "finished", "host", "versions", "swept", "swept_eps",
                     "config", "input")


def tree(root):
    """{relative path: sha256} of every file; the completion record is hashed without its
    run's own fields (times, host, run id, config, input), so identical outputs compare equal."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            data = open(p, "rb").read()
            if f == layout.RUN_RECORD:
                record = {k: v for k, v in json.loads(data).items() if k not in RECORD_RUN_FIELDS}
                data = json.dumps(record, sort_keys=True).encode()
            out[os.path.relpath(p, root)] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_once(planted, tmp_path_factory):
    folder, info = planted
    out = tmp_path_factory.mktemp("e2e") / "out"
    cfg = make_config(input_embeddings_path=str(folder), output_path=str(out), n_clusters=12,
                      eps_to_extract=EPS, backend="cpu")
    return cfg, run_pipeline(cfg), out, info


def test_layout_is_exact(run_once):
    cfg, report, out, _ = run_once
    files = sorted(tree(out))
    clusters = [int(c) for c in np.flatnonzero(report.cluster_sizes)]
    # audit.json: the kept-pairs audit that every run writes (README, "The audit")
    expected = {"clustering_results/kmeans_centroids.npy", "extraction/audit.json"}
    expected |= {f"extraction/semdedup_pruning_tables/cluster_{k}.parquet" for k in clusters}
    for eps in ("0.01", "0.005", "0.1"):
        expected |= {f"extraction/unique_ids_{eps}.parquet/part.{k}.parquet" for k in clusters}
        expected.add(f"extraction/dedup_summary_{eps}.csv")
    expected.add(layout.RUN_RECORD)  # and no lock: the run has ended
    shards = [f for f in files if f.startswith("clustering_results/embs_by_nearest_center/")]
    assert set(files) - set(shards) == expected
    assert len(shards) == len(clusters)
    for f in shards:
        assert re.fullmatch(r"clustering_results/embs_by_nearest_center/nearest_cent=\d+/"
                            r"[0-9a-f]{16}\.parquet", f), f
        sha = f.rsplit("/", 1)[1][:16]
        assert hashlib.sha256((out / f).read_bytes()).hexdigest()[:16] == sha
    assert not any(name.endswith(".tmp") for name in files)


def test_artifact_schemas(run_once):
    cfg, report, out, _ = run_once
    centroids = np.load(out / "clustering_results/kmeans_centroids.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (12, 64)
    shard_dir = out / "clustering_results/embs_by_nearest_center"
    k = int(np.flatnonzero(report.cluster_sizes)[0])
    shard = pq.read_table(next((shard_dir / f"nearest_cent={k}").iterdir()))
    assert shard.column_names == ["id", "embedding", "l2_dist_to_cent", "cosine_dist_to_cent"]
    emb = np.stack(shard.column("embedding").to_pylist()).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    c = centroids[k]
    np.testing.assert_allclose(shard.column("l2_dist_to_cent").to_numpy(),
                               np.linalg.norm(emb - c, axis=1), atol=1e-5)
    np.testing.assert_allclose(shard.column("cosine_dist_to_cent").to_numpy(),
                               1 - emb @ (c / np.linalg.norm(c)), atol=1e-5)
    assert str(shard.schema.field("l2_dist_to_cent").type) == "float"
    # Each clip sits in the shard of its nearest centroid.
    d2 = ((emb[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (d2.argmin(axis=1) == k).all()

    table = pq.read_table(out / f"extraction/semdedup_pruning_tables/cluster_{k}.parquet")
    assert table.column_names == ["id", "max_id", "cosine_sim_score"]
    assert str(table.schema.field("cosine_sim_score").type) == "float"
    assert table.num_rows == report.cluster_sizes[k]
    part = pq.read_table(out / f"extraction/unique_ids_0.01.parquet/part.{k}.parquet")
    assert part.column_names == ["id", "cosine_dist_to_cent", "cluster"]


def test_pruning_tables_follow_the_rule(run_once):
    """Recompute each cluster's pruning table from its shard with a brute-force reference."""
    cfg, report, out, _ = run_once
    for k in np.flatnonzero(report.cluster_sizes)[:4]:
        shard = pq.read_table(next((out / f"clustering_results/embs_by_nearest_center/"
                                           f"nearest_cent={k}").iterdir()))
        table = pq.read_table(out / f"extraction/semdedup_pruning_tables/cluster_{k}.parquet")
        by_id = {i: n for n, i in enumerate(shard.column("id").to_pylist())}
        order = [by_id[i] for i in table.column("id").to_pylist()]
        dist = shard.column("cosine_dist_to_cent").to_numpy()[order]
        ids = table.column("id").to_pylist()
        # hard ranking: (distance, id) descending
        assert all((dist[j], ids[j]) >= (dist[j + 1], ids[j + 1]) for j in range(len(ids) - 1))
        emb = np.stack(shard.column("embedding").to_pylist()).astype(np.float64)[order]
        sims = emb @ emb.T
        score = table.column("cosine_sim_score").to_numpy()
        max_id = table.column("max_id").to_pylist()
        assert score[0] == 0 and max_id[0] == ids[0]
        for j in range(1, len(ids)):
            ref = max(sims[:j, j].max(), 0)
            assert abs(score[j] - min(ref, 1)) < 1e-5
            assert abs(sims[ids.index(max_id[j]), j] - sims[:j, j].max()) < 1e-5


def test_planted_duplicates_are_found_and_summaries_add_up(run_once):
    cfg, report, out, info = run_once
    cluster_of = {}
    for k in np.flatnonzero(report.cluster_sizes):
        t = pq.read_table(out / f"extraction/semdedup_pruning_tables/cluster_{k}.parquet")
        cluster_of.update({i: int(k) for i in t.column("id").to_pylist()})
    for eps in EPS:
        removed = set()
        for f in (out / f"extraction/unique_ids_{eps}.parquet").iterdir():
            t = pq.read_table(f)
            removed |= set(t.column("id").to_pylist())
            assert set(t.column("cluster").to_pylist()) <= {int(f.name.split(".")[1])}
        checked = 0
        for group in info.groups:
            if len({cluster_of[i] for i in group}) == 1:  # the group shares a cluster
                checked += 1
                assert len(set(group) & removed) >= len(group) - 1, group
                assert set(group) - removed, "a whole planted group was removed"
        assert checked > 0.9 * len(info.groups)
        lines = (out / f"extraction/dedup_summary_{eps}.csv").read_text().splitlines()
        assert lines[0] == "eps,kept,removed,total"
        e, kept, rem, total = lines[1].split(",")
        assert e == repr(eps) and int(rem) == len(removed) and int(total) == 3000
        assert int(kept) + int(rem) == 3000
    assert report.summary[0.1]["removed"] >= report.summary[0.01]["removed"] \
        >= report.summary[0.005]["removed"]


def test_rerun_is_byte_identical_and_cleans_stale_files(run_once, tmp_path):
    cfg, _, out, _ = run_once
    before = tree(out)
    run_pipeline(cfg)
    assert tree(out) == before
    # A later run with fewer clusters into the same folder leaves no files of the old clusters.
    smaller = cfg.model_copy(update={"n_clusters": 3})
    report = run_pipeline(smaller)
    after = tree(out)
    shard_dirs = {p.split("/")[2] for p in after if "embs_by_nearest_center" in p}
    assert shard_dirs == {f"nearest_cent={k}" for k in np.flatnonzero(report.cluster_sizes)}
    assert not any("cluster_11." in p or "part.11." in p for p in after)
    # And back: the first config reproduces the first files exactly.
    run_pipeline(cfg)
    assert tree(out) == before


def shard_contents(root) -> dict[str, pa.Table]:
    """{shard folder: all its files' rows, sorted by id}: a shard's content, however many
    files it was written as."""
    base = root / "clustering_results/embs_by_nearest_center"
    return {d.name: pa.concat_tables(pq.read_table(f) for f in sorted(d.iterdir()))
            .sort_by(layout.ID) for d in sorted(base.iterdir())}


def test_results_do_not_depend_on_batch_tile_or_buffer_size(run_once, tmp_path):
    cfg, report, out, _ = run_once
    # A buffer of ~5 clips (a tenth of a batch of 333): every batch flushes, so every shard
    # is written as many files, against one file per shard with the default buffer.
    other = cfg.model_copy(update={"output_path": str(tmp_path / "o2"), "read_batch_rows": 333,
                                   "pairwise_tile_size": 16, "spill_buffer_mb": 0.01})
    run_pipeline(other)
    a, b = tree(out), tree(tmp_path / "o2")
    shards = "clustering_results/embs_by_nearest_center/"
    assert {p: h for p, h in a.items() if not p.startswith(shards)} == \
        {p: h for p, h in b.items() if not p.startswith(shards)}
    whole, split = shard_contents(out), shard_contents(tmp_path / "o2")
    assert list(whole) == list(split)
    assert all(whole[d].equals(split[d]) for d in whole)
    files = {d: sum(1 for p in b if p.startswith(f"{shards}{d}/")) for d in split}
    assert all(sum(1 for p in a if p.startswith(f"{shards}{d}/")) == 1 for d in whole)
    assert all(files[d] >= 2 for d in split if split[d].num_rows > 3 * 333 / 12), files
    # The readers of Dagster's steps take the split shards alike: the checks count their rows,
    # and extraction from the tables rewrites the same parts.
    from semdedup_core.extraction import extract_from_tables
    from semdedup_core.storage import Storage
    from semdedup_dagster.checks import check_tables_per_shard

    o2 = Storage(str(tmp_path / "o2"))
    outcome = check_tables_per_shard(o2)
    assert outcome.passed and outcome.metadata["rows"] == int(report.cluster_sizes.sum())
    for c in np.flatnonzero(report.cluster_sizes):
        extract_from_tables(o2, int(c), EPS)
    assert tree(tmp_path / "o2") == b


class OneThreadCpu(CpuBackend):
    """The CPU fed like a device: one thread runs the pairwise passes cluster after cluster,
    each GEMM on every BLAS thread (the prune phase's path without compute threads)."""

    @contextlib.contextmanager
    def compute_pool(self):
        yield None


def test_prune_on_compute_threads_writes_the_same_bytes(run_once, tmp_path):
    """The CPU's prune phase (clusters side by side, their row blocks on compute threads with one
    BLAS thread each) writes the same pruning tables and parts as one thread feeding the
    GEMMs cluster after cluster."""
    cfg, _, out, _ = run_once
    other = tmp_path / "o"
    shutil.copytree(out, other)
    shutil.rmtree(other / layout.EXTRACTION)
    store = output_storage(cfg.model_copy(update={"output_path": str(other)}))
    clusters = nonempty_clusters(store)
    removed = prune_all(cfg, store, clusters, OneThreadCpu())
    written = {p: h for p, h in tree(other).items() if p.startswith(layout.EXTRACTION)}
    expected = {p: h for p, h in tree(out).items()
                if p.startswith((layout.PRUNING_TABLES, layout.EXTRACTION + "/unique_ids_"))}
    assert written == expected and len(written) == len(clusters) * (1 + len(EPS))
    assert removed == {e: run_once[1].summary[e]["removed"] for e in EPS}


@pytest.mark.parametrize("keep,metric", [("easy", "cosine"), ("random", "cosine"),
                                         ("hard", "l2")])
def test_other_rankings_run_and_are_deterministic(planted, tmp_path, keep, metric):
    folder, _ = planted
    cfgs = [make_config(input_embeddings_path=str(folder), output_path=str(tmp_path / f"o{i}"),
                        n_clusters=5, which_to_keep=keep, sim_metric=metric) for i in (1, 2)]
    r1, r2 = run_pipeline(cfgs[0]), run_pipeline(cfgs[1])
    assert tree(tmp_path / "o1") == tree(tmp_path / "o2")
    assert r1.summary[0.01]["removed"] == r2.summary[0.01]["removed"] > 0


def test_command_line_with_job_spec(planted, tmp_path):
    folder, _ = planted
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"pipeline": "semantic-dedup", "args": {
        "input_embeddings_path": str(folder), "output_path": str(tmp_path / "out"),
        "n_clusters": 6, "eps_to_extract": [0.01, 0.1]}}))
    proc = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "run", "--job-spec",
                           str(spec), "--eps-to-extract", "0.05"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+0.05\s+3,000\s+[\d,]+\s+[\d,]+", proc.stdout, re.M), proc.stdout
    assert "kmeans_fit" in proc.stdout
    assert (tmp_path / "out/extraction/dedup_summary_0.05.csv").exists()
    assert not (tmp_path / "out/extraction/dedup_summary_0.01.csv").exists()


def test_help_explains_every_argument():
    proc = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "run", "--help"],
                          capture_output=True, text=True)
    for flag in ("--input-embeddings-path", "--output-path", "--n-clusters", "--max-iter",
                 "--eps-to-extract", "--sim-metric", "--which-to-keep", "--random-state",
                 "--job-spec", "--backend", "--id-column", "--embedding-column"):
        assert flag in proc.stdout


def test_a_forced_openblas_kernel_family_is_reported(planted, tmp_path, monkeypatch, caplog):
    # (The variable only acts when OpenBLAS loads; here it is set afterwards, for the message.)
    folder, _ = planted
    cfg = make_config(input_embeddings_path=str(folder), output_path=str(tmp_path / "o"),
                      n_clusters=3, backend="cpu")
    with caplog.at_level("WARNING", logger="semdedup_core.pipeline"):
        run_pipeline(cfg)
    assert "OPENBLAS_CORETYPE" not in caplog.text
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    with caplog.at_level("WARNING", logger="semdedup_core.pipeline"):
        run_pipeline(cfg)
    assert "OPENBLAS_CORETYPE=Haswell forces OpenBLAS's kernels" in caplog.text
