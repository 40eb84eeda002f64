"""Cross-cluster duplicates against a brute-force global reference (real and synthetic clips,
duplicates straddling cluster boundaries), the cross tables' schema and order, sweep and
inspect on such an output, and the audit's interval against the true residual."""


import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core import layout
from semdedup_core.backends import CpuBackend
from semdedup_core.config import make_config
from semdedup_core.cli import format_report, main
from semdedup_core.embeddings import normalize
from semdedup_core.inspection import find_clip
from semdedup_core.kmeans import lloyd
from semdedup_core.pipeline import run_pipeline
from semdedup_core.ranking import rank_order
from semdedup_core.storage import Storage

REAL = "/work/shared/data/pypi_minilm_embd_parquet/part-00000.parquet"


def write_clips(folder, ids, emb):
    folder.mkdir(parents=True, exist_ok=True)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    table = pa.table({"id": pa.array(ids),
                      "embedding": pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))})
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def near_copies(rng, emb, count, low=0.95, high=0.99, toward=None):
    """Copies of `count` rows at cosine low..high in random directions. With `toward`
    (centroids of the clips), the copied rows are those nearest a cluster boundary and the
    direction leans toward the second-nearest centroid, so that copies straddle boundaries
    (real text vectors in 384-d seldom do so by chance at test sizes)."""
    noise = rng.standard_normal((len(emb), emb.shape[1])) / np.sqrt(emb.shape[1])
    if toward is None:
        src = rng.choice(len(emb), count, replace=False)
        u = noise[src]
    else:
        d2 = ((emb[:, None, :] - toward[None]) ** 2).sum(-1)
        near2 = np.argsort(d2, axis=1)[:, :2]
        margin = np.diff(np.take_along_axis(d2, near2, axis=1), axis=1)[:, 0]
        src = np.argsort(margin, kind="stable")[:count]
        u = toward[near2[src, 1]] - toward[near2[src, 0]]
        u = u / np.linalg.norm(u, axis=1, keepdims=True) + 0.5 * noise[src]
    cos = rng.uniform(low, high, count)
    u -= (u * emb[src]).sum(1, keepdims=True) * emb[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return normalize((emb[src] * cos[:, None] + u * np.sqrt(1 - cos**2)[:, None])
                     .astype(np.float32))


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """1,500 real MiniLM vectors (a seeded subset) and 500 near-copies of them, made to
    straddle cluster boundaries."""
    rng = np.random.default_rng(12)
    table = pq.read_table(REAL)
    rows = np.sort(rng.choice(table.num_rows, 1500, replace=False))
    table = table.take(pa.array(rows))
    emb = normalize(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
                    .astype(np.float32))
    ids = table.column("id").to_pylist()
    centroids, _ = lloyd(CpuBackend(), emb, 12, 100, 1e-4, 0)
    copies = near_copies(rng, emb, 500, 0.95, 0.995, toward=centroids)
    ids += [f"copy:{i}" for i in range(len(copies))]
    return write_clips(tmp_path_factory.mktemp("real") / "clips", ids,
                       np.concatenate([emb, copies]))


@pytest.fixture(scope="module")
def synthetic_clips(tmp_path_factory):
    """1,200 random 32-d clips and 600 near-copies (cosine 0.95-0.995)."""
    rng = np.random.default_rng(4)
    emb = normalize(rng.standard_normal((1200, 32)).astype(np.float32))
    copies = near_copies(rng, emb, 600, 0.95, 0.995)
    ids = [f"s{i:05d}" for i in range(1800)]
    return write_clips(tmp_path_factory.mktemp("syn") / "clips", ids,
                       np.concatenate([emb, copies]))


def load_output(out_dir, cfg):
    """Every clip of an output: ids, unit rows, cluster, and its global-order position,
    computed here from the shards by the rule in the README (not by the engine's code)."""
    out = Storage(str(out_dir))
    ids, embs, clusters, keys = [], [], [], []
    for name in out.list_dirs(layout.SHARDS):
        c = layout.cluster_of_shard_dir(name)
        shard = pa.concat_tables(pq.read_table(out.path(f)) for f in
                                 out.list_files(layout.shard_dir(c)))
        cid = shard.column("id").combine_chunks()
        cos = shard.column("cosine_dist_to_cent").to_numpy()
        l2 = shard.column("l2_dist_to_cent").to_numpy()
        order = rank_order(cid, l2, cos, cfg.sim_metric, cfg.which_to_keep, cfg.random_state, c)
        dist = (cos if cfg.sim_metric == "cosine" else l2)
        for rank, row in enumerate(order):
            i = cid[int(row)].as_py()
            if cfg.which_to_keep == "random":
                keys.append(((rank + 0.5) / len(order), c))
            else:
                keys.append((float(dist[row]), i))
            ids.append(i)
            clusters.append(c)
        embs.append(np.stack(shard.column("embedding").to_numpy(zero_copy_only=False))[order])
    n = len(ids)
    position = np.empty(n, np.int64)
    reverse = cfg.which_to_keep == "hard"
    position[sorted(range(n), key=lambda j: keys[j], reverse=reverse)] = np.arange(n)
    return ids, np.concatenate(embs).astype(np.float64), np.array(clusters), position


def removed_ids(out_dir, eps):
    folder = out_dir / "extraction" / f"unique_ids_{eps}.parquet"
    return set(pq.read_table(folder).column("id").to_pylist())


def reference(ids, emb, clusters, position):
    """Brute force, in float64: per clip, the best similarity to an earlier clip of another
    cluster (cross) and to any earlier clip (the exact global rule's score)."""
    sims = emb @ emb.T
    earlier = position[:, None] < position[None, :]  # [i, j]: i comes before j
    cross = np.where(earlier & (clusters[:, None] != clusters[None, :]), sims, -np.inf).max(0)
    best = np.where(earlier, sims, -np.inf).max(0)
    return np.clip(cross, 0, 1), np.clip(best, 0, 1), sims


def on_threshold(values, eps, tol=2e-5):
    """Scores so close to 1 - eps that float32 rounding may decide either way."""
    return np.abs(np.asarray(values) - (1 - eps)) < tol


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
@pytest.mark.parametrize("data", ["real_clips", "synthetic_clips"])
def test_exact_search_equals_the_global_rule(which, data, request, tmp_path):
    folder = request.getfixturevalue(data)
    eps_list = [0.01, 0.05]
    cfg = make_config(input_embeddings_path=str(folder), output_path=str(tmp_path / "out"),
                      n_clusters=12, eps_to_extract=eps_list, which_to_keep=which,
                      cross_cluster=True, cross_cluster_max_probes=0, backend="cpu")
    report = run_pipeline(cfg)
    ids, emb, clusters, position = load_output(tmp_path / "out", cfg)
    cross, best, sims = reference(ids, emb, clusters, position)
    got = {}
    for c in np.unique(clusters):
        got.update(zip(*(pq.read_table(tmp_path / "out" / layout.cross_table(int(c)))
                         .column(k).to_pylist() for k in ("id", "cosine_sim_score"))))
    scores = np.array([got[i] for i in ids])
    # Exact wherever a clip could be removed (>= 1 - the largest eps); below that the bound
    # rules clusters out, so a score is the best among the clips searched.
    high = cross >= 1 - max(eps_list) - 1e-3
    np.testing.assert_allclose(scores[high], cross[high], atol=2e-5)
    assert (scores <= cross + 2e-5).all()
    straddling = (sims >= 0.95) & (clusters[:, None] != clusters[None, :])
    assert straddling.sum() // 2 > 20  # duplicates do straddle the boundaries here
    for e in eps_list:
        out_removed = removed_ids(tmp_path / "out", e)
        exact = {ids[j] for j in np.flatnonzero(best >= 1 - e)}
        assert exact  # something to remove
        index = {i: j for j, i in enumerate(ids)}
        assert all(on_threshold(best[index[i]], e) for i in out_removed ^ exact)
        assert report.summary[e]["removed"] == len(out_removed)
        kept = np.array([i not in out_removed for i in ids])
        pair = (sims >= 1 - e) & kept[:, None] & kept[None, :]
        np.fill_diagonal(pair, False)
        assert on_threshold(sims[pair], e).all()  # no kept pair within eps


@pytest.fixture(scope="module")
def capped_output(real_clips, tmp_path_factory):
    """The real clips with cross_cluster at the default cap, and the same run without it."""
    root = tmp_path_factory.mktemp("capped")
    args = {"input_embeddings_path": str(real_clips), "n_clusters": 12, "backend": "cpu",
            "eps_to_extract": [0.01, 0.05]}
    on = run_pipeline(make_config(output_path=str(root / "on"), cross_cluster=True, **args))
    off = run_pipeline(make_config(output_path=str(root / "off"), **args))
    return root, on, off


def test_cross_tables_schema_order_and_union(capped_output):
    root, on, off = capped_output
    assert not (root / "off" / layout.CROSS_TABLES).exists()
    clusters = sorted(int(p.name.split("_")[1].split(".")[0])
                      for p in (root / "on" / layout.PRUNING_TABLES).iterdir())
    assert sorted(p.name for p in (root / "on" / layout.CROSS_TABLES).iterdir()) == \
        sorted(f"cluster_{c}.parquet" for c in clusters)
    cluster_of = {}
    for c in clusters:
        cluster_of.update({i: c for i in pq.read_table(
            root / "on" / layout.pruning_table(c)).column("id").to_pylist()})
    matched = 0
    for c in clusters:
        pruning = pq.read_table(root / "on" / layout.pruning_table(c))
        cross = pq.read_table(root / "on" / layout.cross_table(c))
        assert cross.column_names == ["id", "max_id", "max_cluster", "cosine_sim_score"]
        assert [str(t) for t in cross.schema.types] == ["string", "string", "int64", "float"]
        assert cross.column("id").to_pylist() == pruning.column("id").to_pylist()
        # the pruning tables are those of the run without the option
        assert pruning.equals(pq.read_table(root / "off" / layout.pruning_table(c)))
        for row in cross.to_pylist():
            if row["max_cluster"] == c:  # no earlier clip of another cluster searched
                assert (row["max_id"], row["cosine_sim_score"]) == (row["id"], 0)
            else:
                matched += 1
                assert cluster_of[row["max_id"]] == row["max_cluster"]
        for e in (0.01, 0.05):
            part = pq.read_table(root / "on" / layout.unique_ids_part(e, c))
            union = (pruning.column("cosine_sim_score").to_numpy() >= 1 - e) | \
                (cross.column("cosine_sim_score").to_numpy() >= 1 - e)
            assert part.column("id").to_pylist() == [
                i for i, r in zip(pruning.column("id").to_pylist(), union) if r]
    assert matched > 0
    for e in (0.01, 0.05):
        assert on.summary[e]["removed"] >= off.summary[e]["removed"]
        # what the option adds, as the closing table shows it (same pruning tables both ways)
        assert on.by_cross_only[e] == on.summary[e]["removed"] - off.summary[e]["removed"]
    assert on.summary[0.05]["removed"] > off.summary[0.05]["removed"]
    assert off.by_cross_only is None
    table = format_report(on)
    assert "by cross only" in table.splitlines()[3]
    assert table.splitlines()[5].split()[-1] == f"{on.by_cross_only[0.05]:,}"


def cross_only_clip(out_dir, eps):
    """A clip removed at eps by the cross rule alone: (id, its match, the match's cluster)."""
    for p in sorted((out_dir / layout.CROSS_TABLES).iterdir()):
        cross = pq.read_table(p).to_pylist()
        pruning = pq.read_table(out_dir / layout.PRUNING_TABLES / p.name).to_pylist()
        for row, own in zip(cross, pruning):
            if row["cosine_sim_score"] >= 1 - eps > own["cosine_sim_score"]:
                return row["id"], row["max_id"], row["max_cluster"]
    raise AssertionError("no clip is removed by the cross rule alone")


def test_sweep_and_inspect_use_both_tables(capped_output, capsys, caplog, tmp_path):
    root, on, _ = capped_output
    out = tmp_path / "on"
    shutil.copytree(root / "on", out)
    assert main(["sweep", str(out), "--eps", "0.03", "0.1"]) == 0
    assert "cross-cluster search covered eps up to 0.05" in caplog.text  # 0.1 > 0.05
    # the audit covers the run's eps and the swept ones
    assert list(json.loads((out / layout.AUDIT).read_text())["eps"]) == ["0.01", "0.03", "0.05",
                                                                        "0.1"]
    for e in (0.03, 0.1):
        expected = set()
        for p in (out / layout.CROSS_TABLES).iterdir():
            cross = pq.read_table(p)
            pruning = pq.read_table(out / layout.PRUNING_TABLES / p.name)
            gone = np.maximum(cross.column("cosine_sim_score").to_numpy(),
                              pruning.column("cosine_sim_score").to_numpy()) >= 1 - e
            expected |= {i for i, g in zip(cross.column("id").to_pylist(), gone) if g}
        assert removed_ids(out, e) == expected
    clip, match, match_cluster = cross_only_clip(out, 0.05)
    rep = find_clip(Storage(str(out)), clip)
    assert (rep.cross_max_id, rep.cross_max_cluster) == (match, match_cluster)
    assert rep.removed[0.05] == "cross-cluster"
    capsys.readouterr()
    assert main(["inspect", str(out), "--id", clip]) == 0
    text = capsys.readouterr().out
    assert f"eps 0.05: REMOVED by the cross-cluster rule (matching {match} of cluster " \
           f"{match_cluster})" in text
    assert "and the cross-cluster tables" in text


def test_sweep_of_a_cross_output_requires_every_cross_table(capped_output, tmp_path):
    """The run had cross_cluster (its record says so): a sweep with one cross table gone fails
    naming it, from one listing before it writes anything (it once counted that cluster without
    the cross rule, exit 0, wrong removals)."""
    from semdedup_core.errors import InputError
    from semdedup_core.extraction import sweep

    root, _, _ = capped_output
    out = tmp_path / "on"
    shutil.copytree(root / "on", out)
    gone = out / layout.cross_table(5)
    gone.unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=f"{gone}: not found, and cross_cluster is on"):
        sweep(Storage(str(out)), [0.02])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cap_finds_nearly_what_exact_search_finds(real_clips, capped_output, tmp_path):
    """The default cap against the exact search (max_probes 0) on the same clustering: never
    more removals (the cap only leaves pairs unsearched), and on these copies, made to sit at
    cluster corners, nearly all of them."""
    _, on, _ = capped_output
    exact = run_pipeline(make_config(
        input_embeddings_path=str(real_clips), output_path=str(tmp_path / "exact"),
        n_clusters=12, backend="cpu", eps_to_extract=[0.01, 0.05], cross_cluster=True,
        cross_cluster_max_probes=0))
    for e in (0.01, 0.05):
        assert exact.summary[e]["removed"] * 0.95 <= on.summary[e]["removed"] \
            <= exact.summary[e]["removed"]


def kept_pairs_left(out_dir, cfg):
    """Brute force: near-duplicate pairs with both clips kept, per eps."""
    ids, emb, _, _ = load_output(out_dir, cfg)
    sims = np.triu(emb @ emb.T, 1)
    truth = {}
    for e in cfg.eps_to_extract:
        gone = removed_ids(out_dir, e)
        kept = np.array([i not in gone for i in ids])
        truth[e] = int(((sims >= 1 - e) & kept[:, None] & kept[None, :]).sum())
    return truth


def cluster_inputs(out_dir, cfg):
    """(cluster, unit rows in rank order, removed masks per eps) of every cluster, in order."""
    from semdedup_core.extraction import removed_rows
    from semdedup_core.shards import ranked_shard

    out = Storage(str(out_dir))
    rows = []
    for c in sorted(map(layout.cluster_of_shard_dir, out.list_dirs(layout.SHARDS))):
        pruning = pq.read_table(out.path(layout.pruning_table(c)))
        rows.append((c, ranked_shard(cfg, out, c).emb,
                     {e: removed_rows(pruning, None, e) for e in cfg.eps_to_extract}))
    return rows


def feed_audit(clusters, eps_list, rate, seed, centroids):
    from semdedup_core.audit import KeptPairsAudit

    audit = KeptPairsAudit(CpuBackend(), eps_list, rate, seed, centroids)
    for c, emb, removed in clusters:
        audit.add_cluster(c, emb, removed)
    return {a.eps: a for a in audit.result()}


def test_audit_interval_covers_the_pairs_left(capped_output):
    """Without cross_cluster, near-duplicate pairs across clusters are left among the kept
    clips; the audit's interval (written on every run) covers the true count, and a full
    sample (rate 1) counts it exactly."""
    root, on, off = capped_output
    cfg = make_config(input_embeddings_path="-", output_path=str(root / "off"), n_clusters=12,
                      eps_to_extract=[0.01, 0.05])
    truth = kept_pairs_left(root / "off", cfg)
    assert truth[0.05] > 50
    doc = json.loads((root / "off" / layout.AUDIT).read_text())
    assert doc["cross_cluster"] is False and 0 < doc["sample_rate"] < 1
    for e in (0.01, 0.05):
        row = doc["eps"][str(e)]
        assert row["low"] <= truth[e] <= row["high"], (e, truth[e], row)
        assert row["kept"] == off.summary[e]["kept"]
        assert {a.eps: a for a in off.audit}[e].estimated_pairs == row["estimated_pairs"]
    clusters = cluster_inputs(root / "off", cfg)
    centroids = np.load(root / "off" / layout.CENTROIDS)
    full = feed_audit(clusters, cfg.eps_to_extract, 1.0, 0, centroids)
    assert {e: full[e].estimated_pairs for e in truth} == truth
    # Over independent seeds the 95% interval covers the truth nearly always.
    covered = [a.low <= truth[0.05] <= a.high
               for a in (feed_audit(clusters, [0.05], 0.1, s, centroids)[0.05]
                         for s in range(20))]
    assert sum(covered) >= 17
    # With cross_cluster the exact pairs left are few, and the audit says so.
    left = kept_pairs_left(root / "on", cfg.model_copy(update={"output_path": str(root / "on")}))
    row = json.loads((root / "on" / layout.AUDIT).read_text())["eps"]["0.05"]
    assert left[0.05] < truth[0.05] / 5 and row["low"] <= left[0.05] <= row["high"]


@pytest.mark.parametrize("which, expected", [("hard", "c"), ("easy", "a")])
def test_equal_keys_across_clusters_are_ordered_by_id(which, expected):
    """Clips of different clusters with the same distance key: hard puts the larger id first,
    easy the smaller (the ranking's own tie rule, extended to all clips)."""
    from semdedup_core.cross_cluster import CrossBest, compare_block

    e0 = np.eye(4, dtype=np.float32)[0]
    c = normalize(np.array([[0.9, 0.3, 0.3, 0.0]], np.float32))[0]
    key = np.array([-0.4 if which == "hard" else 0.4] * 2)
    # cluster 0 in its rank order ((distance, id) descending for hard), clip b of cluster 1
    order = ["c", "a"] if which == "hard" else ["a", "c"]
    y_emb = np.stack([{"a": e0, "c": c}[i] for i in order])
    row_top, row_arg, _, _ = compare_block(CpuBackend(), which, e0[None, :], key[:1],
                                           lambda i: ("b", 1), y_emb, key,
                                           lambda j: (order[j], 0), 0.5)
    best = CrossBest(which)
    best.add_cluster(0, pa.array(order))
    best.add_cluster(1, pa.array(["b"]))
    best.offer(best.at(1, np.array([0])), row_top, row_top, np.array([0]), row_arg,
               key[row_arg])
    table = best.table(1, 0.05).to_pylist()[0]
    assert (table["max_id"], table["max_cluster"]) == (expected, 0)
    score = [table["cosine_sim_score"]]
    assert score[0] == pytest.approx(1.0 if expected == "a" else float(c @ e0), abs=1e-6)


def test_bench_synthetic_mode(tmp_path):
    """bench/cross_cluster.py --synthetic (the 1M x 512 mode) at a small size: with the exact
    reference below --exact-max (the option leaves fewer kept pairs, never more removals than
    the exact rule) and with times and removals only above it."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "cross_cluster.py"
    for exact_max in (10_000, 100):
        text = subprocess.run(
            [sys.executable, str(bench), "--synthetic", "3000", "--dim", "32", "--clusters", "6",
             "--exact-max", str(exact_max), "--workdir", str(tmp_path / str(exact_max))],
            capture_output=True, text=True, check=True).stdout
        assert "clips 3,000 x 32  clusters 6" in text and "ratio" in text, text
        row = next(line.split() for line in text.splitlines() if line.startswith("  0.05"))
        rm_off, rm_on = (int(v.replace(",", "")) for v in row[5:7])
        assert rm_on >= rm_off
        if exact_max > 3000:
            assert "exact all-pairs search" in text
            kept_off, kept_on = int(row[2].replace(",", "")), int(row[3].replace(",", ""))
            assert kept_on < kept_off and float(row[8]) <= 1.0
        else:
            assert "no exact search" in text and row[1] == "-"


def test_probes_kept_by_assignment_equal_those_computed_from_the_shards(real_clips, tmp_path):
    """A run keeps each clip's probes from assignment's distances (`pipeline.assign_probes`);
    a step without them (Dagster's) computes them from the shard. Both give the same
    (rows, targets) for every cluster, here with clusters written in several files."""
    from semdedup_core.cross_cluster import Probes
    from semdedup_core.pipeline import (assign, assign_probes, nonempty_clusters, open_source,
                                        output_storage)
    from semdedup_core.shards import ranked_shard, save_centroids, shard_files

    cfg = make_config(input_embeddings_path=str(real_clips), output_path=str(tmp_path / "out"),
                      n_clusters=12, cross_cluster=True, eps_to_extract=[0.05, 0.01],
                      read_batch_rows=300, spill_buffer_mb=0.5)
    backend, out = CpuBackend(), output_storage(cfg)
    with open_source(cfg) as source:
        emb = np.concatenate([normalize(b.emb, b.norms) for b in source.iter_batches()])
        centroids, _ = lloyd(backend, emb, 12, 100, 1e-4, 0)
        save_centroids(out, centroids)
        probes = assign_probes(cfg, centroids)
        assign(cfg, source, centroids, out, backend, probes=probes)
    computed = Probes(centroids, probes.radius, cfg.cross_cluster_max_probes)
    several = 0
    for c in nonempty_clusters(out):
        files = shard_files(out, c)
        assert set(files) <= set(probes.by_file)
        several += len(files) > 1
        ranked = ranked_shard(cfg, out, c)
        kept, fresh = probes.of_ranked(backend, ranked), computed.of_ranked(backend, ranked)
        assert len(kept[0]) > 0
        np.testing.assert_array_equal(kept[0], fresh[0])
        np.testing.assert_array_equal(kept[1], fresh[1])
    assert several
    assert assign_probes(cfg.model_copy(update={"cross_cluster_max_probes": 0}), centroids) is None
    # Keeping the probes does not move clips between files: the shards are those of a step
    # that keeps none (Dagster's assign step, a run without cross_cluster), name for name.
    bare = output_storage(cfg.model_copy(update={"output_path": str(tmp_path / "bare")}))
    with open_source(cfg) as source:
        assign(cfg, source, centroids, bare, backend)
    for c in nonempty_clusters(out):
        assert shard_files(bare, c) == shard_files(out, c)


def test_audit_compares_only_what_the_bound_leaves_and_counts_exactly():
    """Clips around well-apart centres, with near-copies of the clips nearest a boundary
    leaning across it; each cluster ranked in a seeded order and pruned by the ranked rule.
    With every clip sampled (rate 1), the audit counts exactly the kept pairs that a
    brute force over all pairs finds, while computing a fraction of the pairs: none inside a
    cluster (the rule leaves no kept pair there) and none with clusters out of the bound's
    reach."""
    from semdedup_core.audit import KeptPairsAudit

    rng = np.random.default_rng(7)
    centres = normalize(rng.standard_normal((16, 24)).astype(np.float32))
    base = normalize(centres[rng.integers(0, 16, 1500)]
                     + 0.2 * rng.standard_normal((1500, 24)).astype(np.float32))
    emb = np.concatenate([base, near_copies(rng, base, 300, 0.95, 0.995, toward=centres)])
    labels = ((emb[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1).argmin(1)
    eps_list = [0.02, 0.05]
    audit = KeptPairsAudit(CpuBackend(), eps_list, 1.0, 0, centres)
    kept = np.ones((len(emb), len(eps_list)), bool)
    for c in range(len(centres)):
        rows = rng.permutation(np.flatnonzero(labels == c))  # its rank order
        e = emb[rows].astype(np.float64)
        earlier = np.tril(e @ e.T, -1).max(axis=1, initial=-1)
        removed = {eps: earlier >= 1 - eps for eps in eps_list}
        kept[rows] = np.stack([~removed[eps] for eps in eps_list], axis=1)
        audit.add_cluster(c, emb[rows], removed)
    sims = np.triu(emb.astype(np.float64) @ emb.T.astype(np.float64), 1)
    found = {a.eps: a.estimated_pairs for a in audit.result()}
    for j, eps in enumerate(eps_list):
        truth = int(((sims >= 1 - eps) & kept[:, j][:, None] & kept[:, j][None, :]).sum())
        assert truth > 10 and found[eps] == truth, (eps, truth, found[eps])
    n = len(emb)
    assert audit.compared < 0.2 * n * (n - 1) / 2  # all pairs: 1


def test_summary_audit_and_curve_leave_out_an_earlier_runs_cross_tables(capped_output, tmp_path):
    """A run without cross_cluster into a folder where an earlier run left cross tables (they
    go at the end of the run): the summary step's score curve and audit use its pruning tables
    alone, so they equal those of the same run into a clean folder."""
    from semdedup_core.extraction import audit_output
    from semdedup_core.inspection import EPS_GRID, score_stats

    root, _, _ = capped_output
    shutil.copytree(root / "on", tmp_path / "out")
    out, clean = Storage(str(tmp_path / "out")), Storage(str(root / "off"))
    clusters = sorted(map(layout.cluster_of_shard_dir, out.list_dirs(layout.SHARDS)))
    stats = score_stats(out, clusters, EPS_GRID, keep_scores=True, cross=False)
    assert stats.removed == score_stats(clean, clusters, EPS_GRID).removed
    ran = json.loads((root / "off" / layout.AUDIT).read_text())
    for scores in (stats.scores, None):
        (tmp_path / "out" / layout.AUDIT).unlink()
        audit_output(out, clusters, [0.01, 0.05], CpuBackend(), ran["sample_rate"], ran["seed"],
                     False, scores)
        assert (tmp_path / "out" / layout.AUDIT).read_text() == \
            (root / "off" / layout.AUDIT).read_text()


@pytest.mark.parametrize("tied", [False, True])
def test_compare_block_follows_the_rule_pair_by_pair(tied):
    """A block big enough for the banded staircase (and, with keys equal across the sides, the
    masked path) on real clips with near-copies and exact repeats: each row's and column's
    best earlier clip and its choice within TIE_TOL, against the rule applied pair by pair."""
    from semdedup_core import cross_cluster
    from semdedup_core.pairwise import TIE_TOL

    rng = np.random.default_rng(7)
    table = pq.read_table(REAL).slice(0, 700)
    emb = normalize(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
                    .astype(np.float32))
    emb = np.concatenate([emb, near_copies(rng, emb, 200)])
    emb[rng.choice(len(emb), 40, replace=False)] = emb[rng.choice(len(emb), 40, replace=False)]
    pick = rng.permutation(len(emb))
    x, y = emb[pick[:400]], emb[pick[400:]]
    assert x.shape[0] * y.shape[0] >= cross_cluster.STAIRCASE_MIN
    # Ascending keys with runs of equal keys on each side; across the sides only when `tied`.
    x_key = np.sort(rng.integers(0, 300, len(x))) * 2.0
    y_key = np.sort(rng.integers(0, 300, len(y))) * 2.0 + (0 if tied else 1)
    floor = np.float32(0.9)
    got = cross_cluster.compare_block(CpuBackend(), "random", x, x_key, lambda i: ("x", 1),
                                      y, y_key, lambda j: ("y", 0), floor)
    sims = x @ y.T
    # y (cluster 0) comes first on equal keys under random's tie rule.
    y_first = (y_key[None, :] < x_key[:, None]) | (y_key[None, :] == x_key[:, None])
    want = []
    for s, earlier in ((sims, y_first), (sims.T, ~y_first.T)):
        top, arg = np.full(len(s), -np.inf, np.float32), np.zeros(len(s), np.int64)
        for i in range(len(s)):
            cand = np.flatnonzero(earlier[i])
            if len(cand):
                top[i] = s[i, cand].max()
                lim = top[i] - TIE_TOL if top[i] >= floor else top[i]
                arg[i] = cand[np.flatnonzero(s[i, cand] >= lim)[0]]
        want += [top, arg]
    assert (want[0] >= floor).sum() > 20 and (want[2] >= floor).sum() > 20
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)


def test_shards_kept_by_the_cross_step_prune_to_the_same_bytes(capped_output, tmp_path):
    """The cross step keeps the ranked shards it read, in cluster order up to its budget, for
    the prune loop, and with them their cross tables as written: kept ones equal a fresh read,
    are given up when taken, and the outputs are the bytes of reading every shard and cross
    table again."""
    from semdedup_core.backends import get_backend
    from semdedup_core.cross_cluster import read_cross_table
    from semdedup_core.pipeline import cross_all, prune_all
    from semdedup_core.shards import KeptShards, ranked_shard

    root, _, _ = capped_output
    cfg = make_config(input_embeddings_path="unused-in", output_path="unused-out",
                      n_clusters=12, eps_to_extract=[0.01, 0.05], cross_cluster=True)
    written = {}
    for name, budget in (("kept", None), ("read", 0)):
        shutil.copytree(root / "on", tmp_path / name)
        out = Storage(str(tmp_path / name))
        clusters = sorted(map(layout.cluster_of_shard_dir, out.list_dirs(layout.SHARDS)))
        if budget is None:  # room for about half the clusters' vectors
            sizes = [ranked_shard(cfg, out, c).emb.nbytes for c in clusters]
            budget = sum(sizes) // 2
        kept = KeptShards(budget)
        cross_all(cfg, out, clusters, get_backend("cpu"), keep=kept)
        if name == "kept":
            assert 0 < len(kept.kept) < len(clusters) and kept.budget >= 0
            fits, left = [], budget
            for c, size in zip(clusters, sizes):
                if size <= left:
                    fits.append(c)
                    left -= size
            assert sorted(kept.kept) == fits
            assert sorted(kept.tables) == fits  # the cross tables of the kept shards only
            for k in fits:
                assert kept.tables[k].equals(read_cross_table(out, k))
            c = fits[0]
            fresh, taken = ranked_shard(cfg, out, c), kept.ranked_shard(cfg, out, c)
            assert np.array_equal(taken.emb, fresh.emb) and taken.ids.equals(fresh.ids)
            assert c not in kept.kept
            kept.kept[c] = taken
        prune_all(cfg, out, clusters, get_backend("cpu"), kept=kept)
        assert not kept.kept and not kept.tables
        written[name] = {p.relative_to(tmp_path / name): p.read_bytes()
                         for p in (tmp_path / name / "extraction").rglob("*") if p.is_file()}
    assert written["kept"] == written["read"] and len(written["kept"]) > 12
