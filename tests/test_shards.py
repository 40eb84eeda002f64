"""The shards written straight from the assignment's buffer: several files per cluster, every
clip written once, memory bounded by the buffer, the same bits however a cluster is cut, and
readers that take only whole files."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core import layout
from semdedup_core.embeddings import normalize
from semdedup_core.backends.cpu import CpuBackend
from semdedup_core.kmeans import Scratch, assign_chunk, centroid_distances, nearest_centroid
from semdedup_core.parquet import plain_float_values, table_to_parquet_bytes
from semdedup_core.shards import (ShardWriter, list_column_to_numpy, read_shard,
                                  read_shard_file_vectors, remove_stale_shards, shard_files,
                                  shard_files_by_cluster, shard_table)
from semdedup_core.storage import Storage
from semdedup_core.threads import single_threaded_blas


@pytest.mark.parametrize("dim", [7, 64, 512])
def test_distances_do_not_depend_on_how_a_cluster_is_cut(dim):
    rng = np.random.default_rng(dim)
    emb = normalize(rng.standard_normal((1001, dim)).astype(np.float32))
    centroid = rng.standard_normal(dim).astype(np.float32)
    whole = centroid_distances(emb, centroid)
    for cuts in ([1], [3, 500], [1000], list(range(1, 1001, 97))):
        parts = [centroid_distances(p, centroid) for p in np.split(emb, cuts)]
        for col in (0, 1):
            assert np.concatenate([p[col] for p in parts]).tobytes() == whole[col].tobytes()


def test_assigning_side_by_side_gives_the_bits_of_one_gemm():
    # The assignment's compute threads use one BLAS thread each and, above k=1024, GEMMs of
    # fewer rows (a bounded scratch each): every label and distance must stay the same bits.
    rng = np.random.default_rng(5)
    n, k, dim = 16384 + 77, 3000, 64
    x = normalize(rng.standard_normal((n, dim)).astype(np.float32))
    c = normalize(rng.standard_normal((k, dim)).astype(np.float32))
    labels, dist = nearest_centroid(CpuBackend(), x, c)
    chunk = assign_chunk(n, k)
    assert chunk < n // 2
    with single_threaded_blas():
        side_labels, side_dist = nearest_centroid(CpuBackend(), x, c, chunk)
    assert side_labels.tobytes() == labels.tobytes()
    assert side_dist.tobytes() == dist.tobytes()


def test_distance_buffers_are_reused_across_calls_with_the_same_bits():
    # Assignment and Lloyd hand one Scratch to every call (batch, iteration): its buffers are
    # reused, not mapped afresh, and a call's results do not depend on what it reused.
    rng = np.random.default_rng(6)
    k, dim = 300, 32
    c = normalize(rng.standard_normal((k, dim)).astype(np.float32))
    scratch = Scratch(np)
    seen: list[int] = []
    held = []

    def where(_s, d2, _lab):
        seen.append(d2.__array_interface__["data"][0])

    for rows in (5000, 1200, 5000, 5000):  # a smaller call in between: the buffer is kept
        x = normalize(rng.standard_normal((rows, dim)).astype(np.float32))
        fresh = nearest_centroid(CpuBackend(), x, c)
        reused = nearest_centroid(CpuBackend(), x, c, on_chunk=where, scratch=scratch)
        for a, b in zip(fresh, reused):
            assert a.tobytes() == b.tobytes()
        held.append(np.ones((5000, k), np.float32))  # takes any buffer a call let go
    assert len(set(seen)) == 1


def test_normalizing_into_a_reused_buffer_gives_the_same_bits():
    # The assignment normalises each batch out of Arrow's read-only buffer into a reused one.
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((257, 48)) * 3).astype(np.float32)
    x[5] = 0  # the norm floor
    arrow_view = pa.array(x.reshape(-1)).to_numpy().reshape(x.shape)
    assert not arrow_view.flags.writeable
    out = np.full((300, 48), np.nan, np.float32)[:257]
    assert normalize(arrow_view, out=out) is out
    assert out.tobytes() == normalize(x.copy()).tobytes()


def skewed_batches(rng, k: int, dim: int, batches: int, rows: int):
    """Batches of (labels, ids, unit rows); cluster c is drawn with weight 1/(c+1)."""
    weights = 1 / np.arange(1, k + 1)
    for b in range(batches):
        labels = rng.choice(k, size=rows, p=weights / weights.sum())
        ids = pa.array([f"clip-{b}-{i}" for i in range(rows)])
        yield labels, ids, normalize(rng.standard_normal((rows, dim)).astype(np.float32))


def test_writer_writes_every_clip_once_within_its_buffer(tmp_path):
    rng = np.random.default_rng(0)
    k, dim, rows = 20, 16, 500
    out = Storage(str(tmp_path))
    centroids = normalize(rng.standard_normal((k, dim)).astype(np.float32))
    buffer = 80_000  # ~1,100 clips of 72 bytes: about two batches
    expected: dict[int, list] = {}
    batch_bytes = 0
    with ShardWriter(out, centroids, buffer, workers=2) as writer:
        for labels, ids, emb in skewed_batches(rng, k, dim, batches=12, rows=rows):
            writer.add(labels, ids, emb)
            batch_bytes = max(batch_bytes, emb.nbytes + ids.nbytes)
            for i, c in enumerate(labels.tolist()):
                expected.setdefault(c, []).append((ids[i].as_py(), emb[i]))
        writer.finish()
    assert writer.peak_bytes <= buffer + batch_bytes

    files = shard_files_by_cluster(out)
    assert sorted(files) == sorted(expected)
    assert {c: sorted(v) for c, v in files.items()} == \
        {c: sorted(v) for c, v in writer.written.items()}
    written_rows = 0
    for c, clips in expected.items():
        shard = read_shard(out, c).sort_by(layout.ID)
        clips.sort(key=lambda t: t[0])
        assert shard.column(layout.ID).to_pylist() == [i for i, _ in clips]
        emb = np.stack([e for _, e in clips])
        got = np.stack(shard.column(layout.EMBEDDING).to_numpy(zero_copy_only=False))
        assert got.tobytes() == emb.tobytes()
        l2, cos = centroid_distances(emb, centroids[c])
        assert shard.column(layout.COSINE_DIST).to_numpy().tobytes() == cos.tobytes()
        assert shard.column(layout.L2_DIST).to_numpy().tobytes() == l2.tobytes()
        written_rows += shard.num_rows
    assert written_rows == 12 * rows  # once each
    # Largest first: the big clusters went out as several files, the smallest as one.
    assert len(files[0]) >= 4
    assert len(files[k - 1]) == 1


def test_writer_writes_only_inside_its_block(tmp_path):
    """Its write threads live as long as the `with` block: outside one, a write is refused
    (a failure there would have left the threads running), and nothing is written."""
    rng = np.random.default_rng(2)
    centroids = normalize(rng.standard_normal((3, 8)).astype(np.float32))
    writer = ShardWriter(Storage(str(tmp_path)), centroids, 2_000, workers=1)
    labels, ids, emb = next(skewed_batches(rng, 3, 8, batches=1, rows=60))
    with pytest.raises(RuntimeError, match="inside a `with ShardWriter"):
        writer.add(labels, ids, emb)
        writer.finish()
    assert not list(tmp_path.iterdir())


def test_readers_take_only_whole_files_and_a_rerun_removes_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    out = Storage(str(tmp_path))
    centroids = normalize(rng.standard_normal((3, 8)).astype(np.float32))
    with ShardWriter(out, centroids, 2_000, workers=1) as writer:
        for labels, ids, emb in skewed_batches(rng, 3, 8, batches=4, rows=60):
            writer.add(labels, ids, emb)
        writer.finish()
    rows = {c: read_shard(out, c).num_rows for c in range(3)}
    # What a killed write leaves: a cut-short temporary, and an older run's file.
    folder = tmp_path / layout.shard_dir(0)
    (folder / ".0123456789abcdef.parquet.5f3a.tmp").write_bytes(b"PAR1 cut short")
    (folder / "fedcba9876543210.parquet").write_bytes(b"an earlier run's file")
    (tmp_path / layout.shard_dir(7)).mkdir()
    (tmp_path / layout.shard_file(7, "00000000000000ff")).write_bytes(b"a cluster gone now")
    assert len(shard_files(out, 0)) == len(writer.written[0]) + 1  # the .tmp is never listed
    sizes = np.array([rows[0], rows[1], rows[2]])
    remove_stale_shards(out, sizes, writer.written)
    assert sorted(shard_files(out, 0)) == sorted(writer.written[0])
    assert not (tmp_path / layout.shard_dir(7)).exists()
    assert read_shard(out, 0).num_rows == rows[0]
    # An assignment of some clusters only leaves the others' folders alone.
    (folder / "fedcba9876543210.parquet").write_bytes(b"an earlier run's file")
    remove_stale_shards(out, sizes, {1: writer.written[1]}, only={1})
    assert len(shard_files(out, 0)) == len(writer.written[0]) + 1


def test_shard_vectors_read_from_the_pages_equal_arrows(tmp_path):
    """The embeddings read straight from a shard's pages are Arrow's, bit for bit, for shards as
    the writer writes them (one page, many pages, several row groups); any other encoding of
    the column (compressed, dictionary, data page v2, nulls) is left to Arrow, same result."""
    rng = np.random.default_rng(3)
    out = Storage(str(tmp_path))
    centroid = normalize(rng.standard_normal((1, 48)).astype(np.float32))[0]

    def table(n: int) -> pa.Table:
        ids = pa.array([f"clip-{i}" for i in range(n)])
        return shard_table(ids, normalize(rng.standard_normal((n, 48)).astype(np.float32)),
                           centroid)

    def written(t: pa.Table, **options) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, **options)
        return sink.getvalue().to_pybytes()

    def arrow(data: bytes) -> np.ndarray:
        return list_column_to_numpy(pq.read_table(pa.BufferReader(data)).column(layout.EMBEDDING))

    def leaf(data: bytes) -> tuple:
        return pq.ParquetFile(pa.BufferReader(data)).metadata, 1  # id, then embedding's leaf

    big = table(3000)  # 576 kB of vectors: several 64 kB pages below
    ours = [table_to_parquet_bytes(t).to_pybytes() for t in (table(1), table(700), big)]
    ours.append(written(big, use_dictionary=False, compression="none", data_page_size=64 << 10,
                        row_group_size=1000))
    for data in ours:
        for buffer in (data, pa.py_buffer(data)):  # bytes, or an Arrow buffer (a memory map's)
            values = plain_float_values(buffer, *leaf(data))
            assert values is not None
            assert values.tobytes() == arrow(data).tobytes()
    with_null = big.set_column(1, layout.EMBEDDING, pa.array(
        [None if i == 5 else v for i, v in enumerate(big.column(1).to_pylist())],
        type=pa.list_(pa.float32())))
    others = [written(big), written(big, use_dictionary=False, compression="snappy"),
              written(big, use_dictionary=False, compression="none", data_page_version="2.0"),
              written(with_null, use_dictionary=False, compression="none")]
    for data in others:
        assert plain_float_values(data, *leaf(data)) is None
    assert plain_float_values(ours[1][:len(ours[1]) // 2] + ours[1][-1000:], *leaf(ours[1])) \
        is None  # a damaged file: no values, and no other error

    for i, data in enumerate(ours + others[:3]):
        out.write_bytes(f"f{i}.parquet", data)
        rest, emb = read_shard_file_vectors(out, f"f{i}.parquet")
        assert emb.tobytes() == arrow(data).tobytes() and emb.shape[1] == 48
        assert rest.column_names == [layout.ID, layout.L2_DIST, layout.COSINE_DIST]


def test_taking_rows_from_a_shards_files_equals_joining_them_first():
    """`take_rows` (how a ranked shard is put in rank order without joining its files' vectors
    first) gives `np.concatenate(parts)[rows]` for a permutation, for one file, and for rows
    that are not a permutation (a selection, a repeat), where it joins first."""
    from semdedup_core.shards import take_rows

    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 24)).astype(np.float32) for n in (5, 1, 0, 9)]
    joined = np.concatenate(parts)
    for rows in (rng.permutation(15), np.arange(15)[::-1], rng.choice(15, 6, replace=False),
                 np.array([3, 3, 4]), np.array([], np.int64)):
        got = take_rows(parts, rows)
        assert got.dtype == np.float32 and got.tobytes() == joined[rows].tobytes()
    assert take_rows(parts[:1], np.array([4, 0])).tobytes() == parts[0][[4, 0]].tobytes()
