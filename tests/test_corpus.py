"""A corpus of drops: adding drops one by one equals one batch over all of them in drop-major
order (bit for bit), re-delivered data is removed whole, commits are atomic (a kill mid-add
leaves the corpus as it was; the retry gives the uninterrupted result), adds are serialised,
and an S3 corpus gives the local one's files."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core import corpus as corpus_mod
from semdedup_core import corpus_store
from semdedup_core import layout
from semdedup_core.backends import CpuBackend
from semdedup_core.config import eps_text
from semdedup_core.corpus import add_drop, format_show, lock_corpus, read_manifest
from semdedup_core.embeddings import normalize
from semdedup_core.errors import ConfigError, InputError
from semdedup_core.extraction import removed_mask
from semdedup_core.kmeans import centroid_distances, nearest_centroid
from semdedup_core.pairwise import max_similarity_to_earlier
from semdedup_core.ranking import rank_order
from semdedup_core.run_record import LOCK, OutputBusy
from semdedup_core.storage import S3Options, Storage

CPU = CpuBackend()
DATA = "/work/shared/data/pypi_minilm_embd_parquet"
EPS = [0.01, 0.05]
K = 12


@pytest.fixture(scope="module")
def drops(tmp_path_factory):
    """Three drops of a seeded subset of real MiniLM embeddings (natural near-duplicates fall in
    different drops), and d3: d0 re-delivered (the same files) under another name."""
    base = tmp_path_factory.mktemp("drops")
    table = pq.read_table(os.path.join(DATA, "part-00001.parquet"))
    rows = np.random.default_rng(7).permutation(table.num_rows)[:2400]
    folders = {}
    for i in range(3):
        folder = base / f"d{i}"
        folder.mkdir()
        part = np.sort(rows[i * 800:(i + 1) * 800])
        pq.write_table(table.take(pa.array(part[:500])), folder / "a.parquet")
        pq.write_table(table.take(pa.array(part[500:])), folder / "b.parquet")
        folders[f"d{i}"] = str(folder)
    shutil.copytree(folders["d0"], base / "d3")
    folders["d3"] = str(base / "d3")
    return folders


def add_all(corpus: str, folders: dict, names, **args):
    for name in names:
        add_drop(corpus, name, {"input_embeddings_path": folders[name], "n_clusters": K,
                                "eps_to_extract": EPS, **args})


def read_drop_input(folder: str):
    t = pq.read_table(folder)
    emb = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return t.column("id").combine_chunks().cast(pa.string()), \
        normalize(emb.astype(np.float32).reshape(t.num_rows, -1))


def batch_reference(folders: list[tuple[str, str]], centroids: np.ndarray, tile: int = 2048):
    """One batch over all drops in drop-major order, independent of the corpus code: each
    drop's clips assigned and ranked as a run does, every cluster's drops concatenated in
    order, one pairwise pass over the whole cluster. Returns {(drop, cluster): (ids, max_id,
    max_drop, score)} for the rows of each drop, and the float64 brute-force scores."""
    by_cluster: dict[int, list] = {}
    for name, folder in folders:
        ids, emb = read_drop_input(folder)
        labels, _ = nearest_centroid(CPU, emb, centroids)
        for k in np.unique(labels):
            rows = np.flatnonzero(labels == k)
            l2, cos = centroid_distances(emb[rows], centroids[k])
            k_ids = ids.take(pa.array(rows))
            order = rank_order(k_ids, l2, cos, "cosine", "hard", 42, int(k))
            by_cluster.setdefault(int(k), []).append((name, k_ids.take(pa.array(order)),
                                                      emb[rows][order]))
    result, brute = {}, {}
    for k, parts in by_cluster.items():
        emb = np.concatenate([p[2] for p in parts])
        all_ids = pa.concat_arrays([p[1] for p in parts])
        owner = np.concatenate([[p[0]] * len(p[1]) for p in parts])
        score, match = max_similarity_to_earlier(CPU, emb, tile)
        e64 = emb.astype(np.float64)
        sims = e64 @ e64.T
        full = np.array([0.0] + [max(sims[:j, j].max(), 0.0) for j in range(1, len(emb))])
        at = 0
        for name, ids, part in parts:
            rows = slice(at, at + len(ids))
            result[(name, k)] = (ids.to_pylist(), all_ids.take(pa.array(match[rows])).to_pylist(),
                                 owner[match[rows]].tolist(), score[rows])
            brute[(name, k)] = np.minimum(full[rows], 1)
            at += len(ids)
    return result, brute


def assert_equals_batch(corpus: str, folders: dict):
    out = Storage(corpus)
    manifest = read_manifest(out)
    names = [d["name"] for d in manifest["drops"]]
    centroids = np.load(out.path(layout.CENTROIDS))
    ref, brute = batch_reference([(n, folders[n]) for n in names], centroids)
    seen = set()
    for name in names:
        drop = out.child(layout.drop_dir(name))
        assert np.array_equal(np.load(drop.path(layout.CENTROIDS)), centroids)
        owners = pq.read_table(drop.path(layout.MAX_DROP_TABLE))
        clusters = sorted(layout.cluster_of_pruning_table(rel.rsplit("/", 1)[-1])
                          for rel in drop.list_files(layout.PRUNING_TABLES))
        assert owners.column("cluster").to_pylist() == [
            k for k in clusters for _ in range(len(ref[(name, k)][0]))]
        at = 0
        for k in clusters:
            table = pq.read_table(drop.path(layout.pruning_table(k)))
            ids, max_id, owner, score = ref[(name, k)]
            assert table.column("id").to_pylist() == ids
            assert table.column("max_id").to_pylist() == max_id
            assert owners.column("id").to_pylist()[at:at + len(ids)] == ids
            assert owners.column("max_drop").to_pylist()[at:at + len(ids)] == owner
            at += len(ids)
            got = table.column("cosine_sim_score").to_numpy()
            assert got.tobytes() == score.tobytes()  # bit for bit
            np.testing.assert_allclose(got, brute[(name, k)], atol=1e-5)
            for eps in manifest["drops"][names.index(name)]["eps"]:
                part = pq.read_table(drop.path(layout.unique_ids_part(float(eps), k)))
                want = np.asarray(ids, dtype=object)[removed_mask(brute[(name, k)], float(eps))]
                assert part.column("id").to_pylist() == want.tolist()
            seen.add((name, k))
    assert seen == set(ref)


def test_first_row_equals_the_full_pass():
    rng = np.random.default_rng(1)
    base = normalize(rng.standard_normal((40, 16)).astype(np.float32))
    emb = np.concatenate([base, base[rng.integers(0, 40, 30)],
                          normalize(rng.standard_normal((50, 16)).astype(np.float32))])
    for tile in (7, 16, 64):
        score, match = max_similarity_to_earlier(CPU, emb, tile)
        for first in (0, 1, 39, 40, 119):
            s, m = max_similarity_to_earlier(CPU, emb, tile, first_row=first)
            assert s.tobytes() == score[first:].tobytes() and (m == match[first:]).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 60), st.integers(1, 40), st.integers(0, 2**31))
def test_first_row_property(n, first, tile, seed):
    rng = np.random.default_rng(seed)
    pool = normalize(rng.standard_normal((5, 8)).astype(np.float32))
    emb = pool[rng.integers(0, 5, n)]
    first = min(first, n)
    score, match = max_similarity_to_earlier(CPU, emb, tile)
    s, m = max_similarity_to_earlier(CPU, emb, tile, first_row=first)
    assert s.tobytes() == score[first:].tobytes() and (m == match[first:]).all()


def test_drops_one_by_one_equal_one_batch(drops, tmp_path):
    corpus = str(tmp_path / "corpus")
    add_all(corpus, drops, ["d0", "d1", "d2"])
    assert_equals_batch(corpus, drops)
    manifest = read_manifest(Storage(corpus))
    earlier = [d["eps"]["0.05"]["earlier"] for d in manifest["drops"]]
    assert earlier[0] == 0 and earlier[1] > 0 and earlier[2] > 0  # real cross-drop duplicates
    for d in manifest["drops"]:
        drop = Storage(corpus).child(layout.drop_dir(d["name"]))
        for eps, counts in d["eps"].items():
            assert counts["removed"] == counts["inside"] + counts["earlier"]
            csv = drop.read_bytes(layout.summary_csv(float(eps))).decode().splitlines()
            assert csv == ["eps,kept,removed,total",
                           f"{eps},{d['clips'] - counts['removed']},{counts['removed']},{d['clips']}"]
    # Segments merged like a binary counter: drops of 800 clips give [d0..d1] after d1, then
    # [d0..d1], [d2] after d2; every clip once, blocks readable.
    store = Storage(corpus)
    segments, garbage = corpus_store.committed_segments(store, manifest["drops"])
    assert [s.rsplit("/", 1)[-1][:17] for s in segments] == ["00000000-00000001",
                                                            "00000002-00000002"]
    assert garbage == [] and len(store.list_files(layout.STORE)) == 2
    opened = [corpus_store.Segment(store, s) for s in segments]
    assert sum(s.rows for s in opened) == 2400


def test_redelivered_drop_is_removed_whole(drops, tmp_path):
    corpus = str(tmp_path / "corpus")
    add_all(corpus, drops, ["d0", "d1", "d3"])  # d3 = d0's files under another name
    manifest = read_manifest(Storage(corpus))
    d3 = manifest["drops"][2]
    assert d3["clips"] == 800
    for eps in EPS:
        assert d3["eps"][eps_text(eps)] == {"removed": 800, "inside": 0, "earlier": 800}
        part_ids = pq.read_table(os.path.join(corpus, "drops", "d3",
                                              layout.unique_ids_dir(eps))).column("id")
        assert sorted(part_ids.to_pylist()) == sorted(read_drop_input(drops["d3"])[0].to_pylist())
    owners = pq.read_table(os.path.join(corpus, "drops", "d3", layout.MAX_DROP_TABLE))
    assert set(owners.column("max_drop").to_pylist()) == {"d0"}
    # A sweep of a drop at new eps: the manifest follows, split like an add's.
    from semdedup_core.cli import main

    added = read_manifest(Storage(corpus))["drops"][1]["eps"]["0.05"]
    assert main(["sweep", os.path.join(corpus, "drops", "d1"), "--eps", "0.1", "0.05"]) == 0
    assert main(["sweep", os.path.join(corpus, "drops", "d3"), "--eps", "0.1"]) == 0
    manifest = read_manifest(Storage(corpus))
    d1 = manifest["drops"][1]["eps"]
    assert list(d1) == ["0.01", "0.05", "0.1"] and d1["0.05"] == added
    assert d1["0.1"]["removed"] == d1["0.1"]["inside"] + d1["0.1"]["earlier"]
    assert d1["0.1"]["removed"] > d1["0.05"]["removed"] and d1["0.1"]["earlier"] > 0
    assert manifest["drops"][2]["eps"]["0.1"] == {"removed": 800, "inside": 0, "earlier": 800}
    assert_equals_batch(corpus, drops)  # the swept parts too, against the brute force


def tree_digest(folder) -> dict:
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "semdedup_core.cli", *args], capture_output=True,
                          text=True, env=env, **kw)


def run_cli(capsys, *args):
    """The `semdedup` command in-process: (exit status, stdout, stderr)."""
    from semdedup_core.cli import main

    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_cli_add_show_and_name_reuse_refused(drops, tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    code, out, err = run_cli(capsys, "corpus", "add", corpus, "--input-embeddings-path",
                             drops["d0"], "--drop-name", "d0", "--n-clusters", str(K),
                             "--eps-to-extract", "0.01")
    assert code == 0, err
    assert "committed as drop 1" in out
    code, _, err = run_cli(capsys, "corpus", "add", str(tmp_path / "other"),
                           "--input-embeddings-path", drops["d0"], "--drop-name", "d0")
    assert code == 1 and "give --n-clusters" in err
    # A run's output folder is not made a corpus (its centroids would be overwritten).
    run_out = str(tmp_path / "run")
    assert run_cli(capsys, "run", "--input-embeddings-path", drops["d1"], "--output-path",
                   run_out, "--n-clusters", "3")[0] == 0
    run_before = tree_digest(run_out)
    code, _, err = run_cli(capsys, "corpus", "add", run_out, "--input-embeddings-path",
                           drops["d0"], "--drop-name", "d0", "--n-clusters", str(K))
    assert code == 1 and err.strip().splitlines() == [
        f"semdedup: error: {run_out}: holds the output of a semdedup run, not a corpus; nothing "
        "was changed; give the corpus a folder of its own"]
    assert tree_digest(run_out) == run_before
    code, out, err = run_cli(capsys, "corpus", "show", run_out)  # says what the folder is
    assert code == 1 and out == "" and err.strip().splitlines() == [
        f"semdedup: error: {run_out}: holds the output of a semdedup run, not a corpus "
        "(`semdedup inspect` reads a run's output)"]
    # Nor is a run written into a corpus (the run's centroids would replace the corpus's).
    corpus_before = tree_digest(corpus)
    code, _, err = run_cli(capsys, "run", "--input-embeddings-path", drops["d1"],
                           "--output-path", corpus, "--n-clusters", "3")
    assert code == 1 and err.strip().splitlines() == [
        f"semdedup: error: {corpus}: holds a semdedup corpus, not a run's output; nothing was "
        "changed; give the run another output path"]
    assert tree_digest(corpus) == corpus_before
    before = tree_digest(corpus)
    code, _, err = run_cli(capsys, "corpus", "add", corpus, "--input-embeddings-path",
                           drops["d1"], "--drop-name", "d0")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"semdedup: error: {corpus}: drop 'd0' is already committed (drop 1 of 1); nothing was "
        "changed; give the new drop another --drop-name")
    code, _, err = run_cli(capsys, "corpus", "add", corpus, "--input-embeddings-path",
                           drops["d1"], "--drop-name", "d1", "--n-clusters", "7")
    assert code == 1 and "n_clusters is 12 for this corpus" in err
    assert tree_digest(corpus) == before
    code, _, err = run_cli(capsys, "corpus", "add", corpus, "--input-embeddings-path",
                           drops["d1"], "--drop-name", "d1",
                           "--eps-to-extract", "0.05", "0.01")  # eps may differ per add
    assert code == 0, err
    code, out, _ = run_cli(capsys, "corpus", "show", corpus)
    assert code == 0
    counts = read_manifest(Storage(corpus))["drops"][1]["eps"]["0.05"]
    row = next(line.split() for line in out.splitlines() if " d1 " in line)
    assert row[:7] == ["2", "d1", "800", "0.05", str(counts["removed"]), str(counts["inside"]),
                       str(counts["earlier"])]
    assert "2 drops, 1,600 clips" in out
    # A mistyped corpus path is an error naming it, not an empty corpus.
    code, out, err = run_cli(capsys, "corpus", "show", corpus + "-typo")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"semdedup: error: {corpus}-typo: no such folder"]


def test_show_aligns_long_drop_names(drops, tmp_path):
    """Names as the corpus sensor makes them (`2026-11-30.iv2_embd_parquet`) outgrow the drop
    column: the columns still line up."""
    corpus = str(tmp_path / "corpus")
    long = "2026-11-30.iv2_embd_parquet_from_the_night_run"
    add_drop(corpus, "d0", {"input_embeddings_path": drops["d0"], "n_clusters": K,
                            "eps_to_extract": EPS})
    add_drop(corpus, long, {"input_embeddings_path": drops["d1"], "eps_to_extract": EPS})
    lines = format_show(Storage(corpus)).splitlines()
    table = lines[lines.index("") + 1:lines.index("", lines.index("") + 1)]
    assert len(table) == 5 and long in table[3]
    # Every row ends its eps column at the same place as the header's "eps".
    ends = {line.index(eps) + len(eps) for line in table[1:] for eps in ("0.01", "0.05")
            if eps in line.split()}
    assert ends == {table[0].index(" eps ") + 4}


def test_kill_mid_add_then_retry(drops, tmp_path):
    """SIGKILL while the add is writing its drop and store files: the corpus is as it was
    (manifest and every committed file), and the retry gives exactly the uninterrupted
    result."""
    corpus = tmp_path / "corpus"
    add_all(str(corpus), drops, ["d0"])
    clean = tmp_path / "clean"
    shutil.copytree(corpus, clean)
    add_all(str(clean), drops, ["d1"])
    before = tree_digest(corpus)
    proc = subprocess.Popen([sys.executable, "-m", "semdedup_core.cli", "corpus", "add",
                             str(corpus), "--input-embeddings-path", drops["d1"], "--drop-name",
                             "d1", "--eps-to-extract", *map(str, EPS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pruning = corpus / "drops" / "d1" / layout.PRUNING_TABLES
    deadline = time.time() + 60
    while not (pruning.exists() and any(pruning.iterdir())) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the add finished before it could be killed"
    after = tree_digest(corpus)
    for rel, digest in before.items():
        if rel != LOCK:
            assert after.get(rel) == digest, rel  # every committed file as it was
    assert read_manifest(Storage(str(corpus))) == read_manifest(Storage(str(clean))) | {
        "drops": read_manifest(Storage(str(clean)))["drops"][:1]}
    assert (corpus / layout.CORPUS_PENDING).exists()  # the crashed add's trace
    retry = cli("corpus", "add", str(corpus), "--input-embeddings-path", drops["d1"],
                "--drop-name", "d1", "--eps-to-extract", *map(str, EPS))
    assert retry.returncode == 0, retry.stderr
    assert not (corpus / layout.CORPUS_PENDING).exists()
    got, want = tree_digest(corpus / "drops"), tree_digest(clean / "drops")
    assert got == want  # the drop layouts, byte for byte
    assert store_contents(corpus) == store_contents(clean)
    assert len(os.listdir(corpus / layout.STORE)) == len(os.listdir(clean / layout.STORE))


def store_contents(corpus) -> dict:
    """The store's clips by cluster (segment names carry add tokens)."""
    store = corpus if isinstance(corpus, Storage) else Storage(str(corpus))
    rels, _ = corpus_store.committed_segments(store, read_manifest(store)["drops"])
    segments = [corpus_store.Segment(store, rel) for rel in rels]
    out = {}
    for k in range(K):
        blocks = [b for s in segments if (b := s.block(k)) is not None]
        out[k] = [(b.ids.to_pylist(), b.emb.tobytes(), b.drop.tolist()) for b in blocks]
    return out


def test_two_adds_at_once(drops, tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    add_all(corpus, drops, ["d0"])
    # A held lock refuses an add at once, naming the holder, and changes nothing.
    before = tree_digest(corpus)
    with lock_corpus(Storage(corpus), wait=False) as lock:
        code, _, err = run_cli(capsys, "corpus", "add", corpus, "--input-embeddings-path",
                               drops["d1"], "--drop-name", "d1")
        assert code == 1
        assert f"run {lock.owner} (host" in err and "retry the add later" in err
        assert err.count("semdedup: error:") == 1
    assert tree_digest(corpus) == before
    # Two adds started together with --wait: one after the other, each against the other's
    # committed state, so the corpus still equals one batch in commit order.
    procs = [subprocess.Popen([sys.executable, "-m", "semdedup_core.cli", "corpus", "add", corpus,
                               "--input-embeddings-path", drops[name], "--drop-name", name,
                               "--eps-to-extract", *map(str, EPS), "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("d1", "d2")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    names = [d["name"] for d in read_manifest(Storage(corpus))["drops"]]
    assert names[0] == "d0" and sorted(names[1:]) == ["d1", "d2"]
    assert_equals_batch(corpus, drops)


def test_later_add_keeps_the_corpus_settings(drops, tmp_path):
    corpus = str(tmp_path / "corpus")
    add_all(corpus, drops, ["d0"])
    with pytest.raises(ConfigError, match="which_to_keep is 'hard' for this corpus"):
        add_drop(corpus, "d1", {"input_embeddings_path": drops["d1"], "which_to_keep": "easy"})
    with pytest.raises(ConfigError, match="cross_cluster is False for this corpus"):
        add_drop(corpus, "d1", {"input_embeddings_path": drops["d1"], "cross_cluster": True})
    with pytest.raises(ConfigError, match="drop name"):
        add_drop(corpus, "../x", {"input_embeddings_path": drops["d1"]})


def test_rebuild_refits_on_all_drops(drops, tmp_path, capsys):
    corpus, into = str(tmp_path / "corpus"), str(tmp_path / "rebuilt")
    add_all(corpus, drops, ["d0", "d1", "d3"])
    code, _, err = run_cli(capsys, "corpus", "rebuild", corpus, "--into", into, "--n-clusters", "6")
    assert code == 0, err
    old, new = read_manifest(Storage(corpus)), read_manifest(Storage(into))
    assert new["settings"]["n_clusters"] == 6 and new["settings"]["fit_on"] == ["d0", "d1", "d3"]
    assert [d["name"] for d in new["drops"]] == ["d0", "d1", "d3"]
    assert [d["clips"] for d in new["drops"]] == [d["clips"] for d in old["drops"]]
    assert new["drops"][2]["eps"]["0.01"]["earlier"] == 800  # still removed whole
    assert new["drops"][0]["input"] == drops["d0"]


def test_rebuild_searches_across_clusters_up_to_every_drops_eps(drops, tmp_path, caplog,
                                                                capsys):
    """A later add's larger eps is beyond the corpus's cross-cluster radius (the first add's
    largest eps); the add says a rebuild searches those pairs, and the rebuild does."""
    corpus, into = str(tmp_path / "corpus"), str(tmp_path / "rebuilt")
    add_drop(corpus, "d0", {"input_embeddings_path": drops["d0"], "n_clusters": K,
                            "eps_to_extract": [0.01], "cross_cluster": True})
    add_drop(corpus, "d1", {"input_embeddings_path": drops["d1"], "eps_to_extract": [0.05]})
    assert "rebuild the corpus to search them" in caplog.text
    assert read_manifest(Storage(corpus))["settings"]["cross_cluster_eps"] == 0.01
    caplog.clear()  # a sweep of a drop says the same, and the rebuild covers its eps too
    assert run_cli(capsys, "sweep", os.path.join(corpus, "drops/d0"), "--eps", "0.07")[0] == 0
    assert "(rebuild the corpus to search them)" in caplog.text
    corpus_mod.rebuild(corpus, into, {})
    assert read_manifest(Storage(into))["settings"]["cross_cluster_eps"] == 0.07
    table = pq.read_table(os.path.join(into, "drops/d1", layout.CROSS_TABLES))
    assert table.schema.metadata[b"semdedup.cross_cluster.searched_eps"] == b"0.07"


def test_s3_corpus_equals_local(drops, tmp_path, s3_client, s3_endpoint, aws_profile,
                                s3_requests):
    s3_client.create_bucket(Bucket="corpus")
    local = str(tmp_path / "corpus")
    add_all(local, drops, ["d0", "d1"])
    uri = "s3://corpus/curated"
    args = {"aws_profile": aws_profile, "aws_endpoint_url": s3_endpoint}
    add_all(uri, drops, ["d0", "d1"], **args)
    store = Storage(uri, S3Options(aws_profile, s3_endpoint))
    assert store.list_files(layout.DROPS) == Storage(local).list_files(layout.DROPS)
    for rel in store.list_files(layout.DROPS):
        assert store.read_bytes(rel) == Storage(local).read_bytes(rel), rel
    s3_drops = read_manifest(store)["drops"]
    assert [d["eps"] for d in s3_drops] == [d["eps"] for d in read_manifest(Storage(local))["drops"]]
    assert not store.exists(LOCK)  # released
    # The S3 lock: a held lock refuses a second add with the holder's name.
    with lock_corpus(store, wait=False) as lock:
        with pytest.raises(OutputBusy, match=lock.owner):
            add_drop(uri, "d2", {"input_embeddings_path": drops["d2"], **args})
    assert [d["name"] for d in read_manifest(store)["drops"]] == ["d0", "d1"]
    assert json.loads(store.read_bytes(layout.CORPUS_MANIFEST))["format"] == 2
    assert store_contents(store) == store_contents(local)  # the segments, read by ranged GETs
    # Segments are read by GETs alone: opening one costs no HEAD (its trailer's GET says the size).
    read = [m for m, p in s3_requests() if p.startswith(f"/corpus/curated/{layout.STORE}/")]
    assert "GET" in read and "HEAD" not in read
    # A rebuild from and into S3 (its inputs: the drops' shards there) equals the local one.
    corpus_mod.rebuild(uri, "s3://corpus/rebuilt", {"n_clusters": 6, **args})
    corpus_mod.rebuild(local, str(tmp_path / "rebuilt"), {"n_clusters": 6})
    rebuilt, rebuilt_local = Storage("s3://corpus/rebuilt", S3Options(aws_profile, s3_endpoint)), \
        Storage(str(tmp_path / "rebuilt"))
    assert rebuilt.list_files(layout.DROPS) == rebuilt_local.list_files(layout.DROPS)
    for rel in rebuilt.list_files(layout.DROPS):
        assert rebuilt.read_bytes(rel) == rebuilt_local.read_bytes(rel), rel
    new = read_manifest(rebuilt)
    assert new["settings"]["n_clusters"] == 6 and [d["name"] for d in new["drops"]] == ["d0", "d1"]
    assert [d["eps"] for d in new["drops"]] == [d["eps"] for d in read_manifest(rebuilt_local)["drops"]]
    assert new["drops"][0]["input"] == drops["d0"]


def test_store_segments_merge_like_a_binary_counter(tmp_path):
    assert corpus_store.merge_from([300]) == 0  # one segment: nothing to merge with
    assert corpus_store.merge_from([300, 10]) == 1  # no merge
    assert corpus_store.merge_from([300, 10, 10]) == 1  # the two drops
    assert corpus_store.merge_from([300, 20, 10, 10]) == 1  # 10+10, then 20 joins
    assert corpus_store.merge_from([300, 20, 10]) == 2
    assert corpus_store.merge_from([100, 60, 40]) == 2
    assert corpus_store.merge_from([100, 40, 60]) == 0  # 40 <= 60, then 100 <= 40 + 60
    # A damaged segment is refused in one line naming it.
    store = Storage(str(tmp_path))
    rel = layout.store_segment(0, 0, "abc")
    with store.writing_file(rel) as f:
        writer = corpus_store.SegmentWriter(f, 4, 3, 0, 0, cross=False)
        writer.add(1, corpus_store.Block(pa.array(["a", "bb"]), np.eye(2, 4, dtype=np.float32),
                                         np.zeros(2)))
        writer.finish()
    # A write that fails leaves nothing behind (the add's segment appears whole or not at all).
    with pytest.raises(RuntimeError):
        with store.writing_file(layout.store_segment(0, 1, "abc")) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert store.list_files(layout.STORE) == [rel]
    segment = corpus_store.Segment(store, rel)
    block = segment.block(1)
    assert segment.block(0) is None and block.ids.to_pylist() == ["a", "bb"]
    assert block.emb.tobytes() == np.eye(2, 4, dtype=np.float32).tobytes()
    segment.close()
    data = store.read_bytes(rel)
    store.write_bytes(rel, data[:-3])
    with pytest.raises(InputError, match=f"^{store.display(rel)}: not a semdedup store segment"):
        corpus_store.Segment(store, rel)


def test_cross_cluster_drops_one_by_one_equal_the_brute_force_batch(drops, tmp_path):
    """With cross_cluster, each drop's removals are those of one batch over all drops in the
    drop-major global order: a clip is also scored against clips of other clusters earlier in
    that order (earlier drops' and its own drop's) where both probe each other's cluster, here
    by float64 brute force over every pair."""
    from semdedup_core.cross_cluster import Probes, order_keys, probe_radius

    corpus, names = str(tmp_path / "corpus"), ["d0", "d1", "d3"]  # d3: d0 re-delivered
    add_all(corpus, drops, names, cross_cluster=True)
    store = Storage(corpus)
    manifest = read_manifest(store)
    assert manifest["settings"]["cross_cluster_eps"] == max(EPS)
    centroids = np.load(store.path(layout.CENTROIDS))
    probes_of = Probes(centroids, probe_radius(EPS), 3)
    # Every clip of every drop: embedding, cluster, drop, key in its drop's global order, id.
    emb, cluster, drop, key, ids, probes = [], [], [], [], [], []
    for j, name in enumerate(names):
        d_ids, d_emb = read_drop_input(drops[name])
        labels, _ = nearest_centroid(CPU, d_emb, centroids)
        for k in np.unique(labels).tolist():
            rows = np.flatnonzero(labels == k)
            l2, cos = centroid_distances(d_emb[rows], centroids[k])
            order = rank_order(d_ids.take(pa.array(rows)), l2, cos, "cosine", "hard", 42, k)
            rows = rows[order]
            emb.append(d_emb[rows])
            key.append(order_keys("hard", cos[order], len(rows)))
            ids += d_ids.take(pa.array(rows)).to_pylist()
            cluster += [k] * len(rows)
            drop += [j] * len(rows)
            p = np.zeros((len(rows), K), bool)
            p[probes_of.of_cluster(CPU, d_emb[rows], k)] = True
            probes.append(p)
    emb, key, probes = np.concatenate(emb), np.concatenate(key), np.concatenate(probes)
    cluster, drop, ids = np.array(cluster), np.array(drop), np.array(ids, dtype=object)
    e64 = emb.astype(np.float64)
    sims = e64 @ e64.T
    earlier = (drop[:, None] < drop[None, :]) | ((drop[:, None] == drop[None, :]) & (
        (key[:, None] < key[None, :]) | ((key[:, None] == key[None, :]) &
                                        (ids[:, None] > ids[None, :]))))  # [i, j]: i before j
    pairs = earlier & (cluster[:, None] != cluster[None, :]) & probes[:, cluster].T & \
        probes[:, cluster]  # i probes j's cluster and j probes i's
    cross_brute = np.where(pairs, sims, -np.inf).max(axis=0)
    same = earlier & (cluster[:, None] == cluster[None, :])
    prune_brute = np.where(same, sims, -np.inf).max(axis=0)
    found_cross = 0
    for j, name in enumerate(names):
        out = store.child(layout.drop_dir(name))
        for k in range(K):
            mine = np.flatnonzero((drop == j) & (cluster == k))
            if not len(mine):
                continue
            table = pq.read_table(out.path(layout.cross_table(k)))
            assert table.column("id").to_pylist() == ids[mine].tolist()
            got = table.column("cosine_sim_score").to_numpy()
            want = np.clip(np.maximum(cross_brute[mine], 0), 0, 1)
            np.testing.assert_allclose(got, want, atol=1e-5)
            found_cross += int((want >= 1 - max(EPS)).sum())
            both = np.maximum(np.maximum(prune_brute[mine], cross_brute[mine]), 0)
            for eps in EPS:
                part = pq.read_table(out.path(layout.unique_ids_part(eps, k)))
                gone = removed_mask(np.minimum(both, 1).astype(np.float32), eps)
                assert part.column("id").to_pylist() == ids[mine][gone].tolist(), (name, k, eps)
    assert found_cross > 0  # real near-duplicates across clusters
    assert manifest["drops"][2]["eps"]["0.05"] == {"removed": 800, "inside": 0, "earlier": 800}
    from semdedup_core.cli import main  # a sweep splits inside / earlier as the add did

    assert main(["sweep", store.path(layout.drop_dir("d1")), "--eps", "0.05"]) == 0
    assert read_manifest(store)["drops"][1]["eps"] == manifest["drops"][1]["eps"]
    owners = pq.read_table(store.child(layout.drop_dir("d1")).path(layout.MAX_DROP_TABLE))
    assert set(owners.column("cross_max_drop").to_pylist()) <= {"d0", "d1"}
