"""Every bad input of SPEC fails before any output is written, with a message naming the file;
every supported encoding reads the same; zips are extracted safely."""

import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core.cli import main as cli_main
from semdedup_core.config import make_config
from semdedup_core.embeddings import EmbeddingSource, piece_rows, row_norms, scan_input
from semdedup_core.errors import InputError
from semdedup_core.pipeline import run_pipeline
from semdedup_core.storage import SHARED_ZIP_DIR, S3Options, Storage, open_input_location
from semdedup_core.threads import host_threads


def write(path, ids, embedding):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding}), path)
    return path


def good_rows(n=20, dim=8, seed=0, prefix="c"):
    rng = np.random.default_rng(seed)
    return [f"{prefix}{i}" for i in range(n)], rng.standard_normal((n, dim)).astype(np.float32)


def as_list(emb, value_type=pa.float32()):
    return pa.array(list(emb.astype(value_type.to_pandas_dtype())), pa.list_(value_type))


def run(tmp_path, n_clusters=2, **kw):
    out = tmp_path / "out"
    cfg = make_config(input_embeddings_path=str(tmp_path / "in"), output_path=str(out),
                      n_clusters=n_clusters, **kw)
    return run_pipeline(cfg), out


def fails(tmp_path, pattern, file=None, n_clusters=2, **kw):
    with pytest.raises(InputError, match=pattern) as exc:
        run(tmp_path, n_clusters, **kw)
    if file is not None:
        assert str(file) in str(exc.value)
    assert not (tmp_path / "out").exists(), "output written before the input was validated"
    return str(exc.value)


def test_missing_column(tmp_path):
    ids, emb = good_rows()
    f = tmp_path / "in" / "a.parquet"
    pq.write_table(pa.table({"id": ids, "vec": as_list(emb)}), f) if f.parent.mkdir() is None \
        else None
    fails(tmp_path, "missing column 'embedding'", f)


def test_renamed_columns_are_accepted(tmp_path):
    ids, emb = good_rows()
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"clip": ids, "vec": as_list(emb)}), tmp_path / "in" / "a.parquet")
    report, _ = run(tmp_path, id_column="clip", embedding_column="vec")
    assert report.n_rows == 20


def test_ragged_embeddings(tmp_path):
    ids, emb = good_rows()
    rows = [list(r) for r in emb]
    rows[5] = rows[5][:7]
    f = write(str(tmp_path / "in" / "a.parquet"), ids, pa.array(rows, pa.list_(pa.float32())))
    fails(tmp_path, "ragged embeddings: id 'c5' has 7 values", f)


def test_mixed_dimensions_across_files(tmp_path):
    ids, emb = good_rows()
    write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    ids2, emb2 = good_rows(dim=9, prefix="d")
    f = write(str(tmp_path / "in" / "b.parquet"), ids2, as_list(emb2))
    fails(tmp_path, "9 dimensions, but earlier files have 8", f)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values(tmp_path, value):
    ids, emb = good_rows()
    emb[3, 2] = value
    f = write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    fails(tmp_path, "id 'c3' contains NaN or inf", f)


@pytest.mark.parametrize("scale", [0.0, 1e-15])
def test_zero_or_vanishing_vector(tmp_path, scale):
    ids, emb = good_rows()
    emb[4] *= scale  # 1e-15: finite and nonzero, but no direction worth comparing
    f = write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    fails(tmp_path, r"id 'c4' is all zeros \(or its norm is below 1e-12\)", f)


def test_large_finite_values_are_not_mistaken_for_inf(tmp_path):
    """Squares of 1e30 overflow float32; norms are summed in float64, so the row is valid."""
    ids, emb = good_rows()
    emb[5] *= 1e30
    write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    cfg = make_config(input_embeddings_path=str(tmp_path / "in"),
                      output_path=str(tmp_path / "out"), n_clusters=2)
    assert run_pipeline(cfg).n_rows == len(ids)


def test_duplicate_ids_across_files(tmp_path):
    ids, emb = good_rows()
    a = write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    ids2, emb2 = good_rows(seed=1, prefix="d")
    ids2[7] = "c11"
    b = write(str(tmp_path / "in" / "b.parquet"), ids2, as_list(emb2))
    msg = fails(tmp_path, "duplicate id 'c11'")
    assert str(a) in msg and str(b) in msg


def test_empty_input(tmp_path):
    (tmp_path / "in").mkdir()
    fails(tmp_path, "no parquet files found")
    write(str(tmp_path / "in" / "a.parquet"), [], pa.array([], pa.list_(pa.float32())))
    fails(tmp_path, "hold no rows")


def test_missing_folder(tmp_path):
    fails(tmp_path, "no such folder")


def test_too_many_clusters(tmp_path):
    ids, emb = good_rows(n=5)
    write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    fails(tmp_path, "n_clusters=6 is larger than the number of clips \\(5\\)", n_clusters=6)


def test_null_embedding(tmp_path):
    ids, emb = good_rows()
    rows = [list(r) for r in emb]
    rows[2] = None
    f = write(str(tmp_path / "in" / "a.parquet"), ids, pa.array(rows, pa.list_(pa.float32())))
    fails(tmp_path, "null embedding for id 'c2'", f)


def test_not_parquet(tmp_path):
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "a.parquet"
    f.write_bytes(b"this is not parquet")
    fails(tmp_path, "not a readable parquet file", f)


def test_wrong_embedding_type(tmp_path):
    ids, _ = good_rows()
    f = write(str(tmp_path / "in" / "a.parquet"), ids, pa.array([f"x{i}" for i in range(20)]))
    fails(tmp_path, "expected a list of float16/float32/float64", f)


def test_cli_reports_bad_input_and_exits_nonzero(tmp_path, capsys):
    ids, emb = good_rows()
    emb[0] = np.nan
    f = write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    code = cli_main(["run", "--input-embeddings-path", str(tmp_path / "in"), "--output-path",
                     str(tmp_path / "out"), "--n-clusters", "2"])
    err = capsys.readouterr().err
    assert code == 1 and str(f) in err and "NaN or inf" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_make_sample_refuses_a_folder_that_holds_files(tmp_path, capsys):
    """Into a folder of an earlier sample its files would mix (other dimensions, more files)."""
    folder = str(tmp_path / "clips")
    assert cli_main(["make-sample", folder, "--rows", "400", "--dim", "8", "--files", "4"]) == 0
    before = sorted(os.listdir(folder))
    assert cli_main(["make-sample", folder, "--rows", "100", "--dim", "4", "--files", "2"]) == 1
    assert f"{folder}: not empty" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == before


ENCODINGS = {
    "list<float>": lambda e: as_list(e),
    "list<double>": lambda e: as_list(e, pa.float64()),
    "list<halffloat>": lambda e: as_list(e, pa.float16()),
    "large_list<float>": lambda e: pa.array(list(e), pa.large_list(pa.float32())),
    "fixed_size_list<float>": lambda e: pa.FixedSizeListArray.from_arrays(
        pa.array(e.reshape(-1)), e.shape[1]),
}


def test_every_encoding_gives_the_same_result(tmp_path):
    ids, emb = good_rows(n=200, dim=16)
    emb[100:110] = emb[0:10] + 1e-4  # near-duplicates
    emb = emb.astype(np.float16).astype(np.float32)  # exactly representable in every encoding
    tables = {}
    for name, encode in ENCODINGS.items():
        root = tmp_path / name.replace("<", "_").replace(">", "")
        write(str(root / "in" / "a.parquet"), ids, encode(emb))
        report, out = run(root, n_clusters=4)
        assert report.summary[0.01]["removed"] >= 10
        tables[name] = [pq.read_table(out / "extraction" / "semdedup_pruning_tables" / f)
                        for f in sorted(os.listdir(out / "extraction" / "semdedup_pruning_tables"))]
    first = tables.pop("list<float>")
    for name, t in tables.items():
        assert all(a.equals(b) for a, b in zip(first, t)), name


def test_streamed_batches_are_the_rows_of_one_arrow_read_of_each_batch(tmp_path):
    # Arrow decodes a streamed file in pieces joined into batches (`piece_rows`): the batches
    # must be the rows, ids, bits and norms of reading batch_rows at a time, across row groups.
    threads = host_threads()
    rows = 3000  # each thread's share of batch_rows: pieces of 1,000
    assert piece_rows(rows) == 1000
    ids, emb = good_rows(n=10_000, dim=6)
    path = tmp_path / "in" / "a.parquet"
    os.makedirs(path.parent)
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": as_list(emb)}), path,
                   row_group_size=3333)  # row groups that cut batches and pieces
    source = EmbeddingSource.discover(Storage(str(tmp_path / "in")), batch_rows=threads * rows)
    got = list(source.iter_batches())
    whole = list(pq.ParquetFile(path).iter_batches(batch_size=rows))
    assert [len(b.ids) for b in got] == [len(rb) for rb in whole] == [3000, 3000, 3000, 1000]
    for batch, rb in zip(got, whole):
        expected = np.stack(rb.column("embedding").to_numpy(zero_copy_only=False))
        assert batch.ids.to_pylist() == rb.column("id").to_pylist()
        assert batch.emb.tobytes() == expected.astype(np.float32).tobytes()
        assert batch.norms.tobytes() == row_norms(expected).tobytes()


def test_later_passes_take_the_norms_the_scan_computed(tmp_path):
    # The scan keeps every row's norm; the assignment's pass takes them instead of computing
    # them again: the same bits as computed from the rows.
    ids, emb = good_rows(n=3000, dim=6)
    for i, rows in enumerate((slice(0, 1800), slice(1800, 3000))):
        write(str(tmp_path / "in" / f"{i}.parquet"), ids[rows], as_list(emb[rows]))
    source = EmbeddingSource.discover(Storage(str(tmp_path / "in")), batch_rows=500)
    scan_input(source, 100, 0)
    assert source.norms is not None and len(source.norms) == 3000
    for batch in source.iter_batches():
        assert np.shares_memory(batch.norms, source.norms)
        assert batch.norms.tobytes() == row_norms(batch.emb).tobytes()


def test_piece_rows_divide_the_batch():
    assert piece_rows(16384) == 1024
    assert piece_rows(2000) == 2000  # small: read at once
    assert piece_rows(3000) == 1000
    assert piece_rows(4099) == 4099  # prime: no piece divides it


# -- zip inputs ---------------------------------------------------------------------------------
def make_zip(path, members: dict, top=None):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(f"{top}/{name}" if top else name, data)
    return path


def parquet_bytes(ids, emb):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": as_list(emb)}), sink)
    return sink.getvalue().to_pybytes()


def test_zip_with_one_top_folder_and_default_output(tmp_path):
    ids, emb = good_rows(n=50)
    z = make_zip(tmp_path / "drop.zip", {"a.parquet": parquet_bytes(ids, emb),
                                          "nested/b.parquet": parquet_bytes(*good_rows(50, 8, 1,
                                                                                       "x"))},
                 top="ce1_embd_parquet")
    cfg = make_config(input_embeddings_path=str(z), n_clusters=3)
    report = run_pipeline(cfg)
    assert report.n_rows == 100
    assert (tmp_path / "drop_semdedup" / "extraction" / "dedup_summary_0.01.csv").exists()


def test_zip_extraction_is_shared_by_the_steps_of_one_run(tmp_path):
    """A run's fit step keeps its extraction for the assign step, which reuses it without the
    zip and removes it; failed bodies and unkept extractions leave nothing; stale ones go."""
    ids, emb = good_rows(n=50)
    members = {"a.parquet": parquet_bytes(ids, emb)}
    z = make_zip(tmp_path / "drop.zip", members, top="ce1_embd_parquet")
    scratch = tmp_path / "scratch"
    shared = scratch / SHARED_ZIP_DIR

    def open_zip(**kw):
        return open_input_location(str(z), S3Options(), 1 << 30, scratch=str(scratch), **kw)

    with open_zip(share="run-1", keep=True) as first:
        files, root = first.list_files(), first.root
    assert files == ["a.parquet"]
    os.unlink(z)  # the later step must not need the zip again
    with open_zip(share="run-1") as second:
        assert (second.root, second.list_files()) == (root, files)
        assert second.display("a.parquet") == f"{z}!/a.parquet"
    assert os.listdir(shared) == []
    with pytest.raises(InputError, match="no such zip"):  # gone from the cache: fetched again
        with open_zip(share="run-1"):
            pass

    make_zip(z, members, top="ce1_embd_parquet")
    with pytest.raises(RuntimeError):
        with open_zip(share="run-2", keep=True):
            raise RuntimeError("the step failed")
    with open_zip(share="run-3"):  # not kept
        pass
    assert os.listdir(shared) == []

    stale = shared / "left-by-a-killed-run"
    stale.mkdir()
    os.utime(stale, (0, 0))
    with open_zip(share="run-4"):
        pass
    assert not stale.exists()


def test_zip_without_parquet(tmp_path):
    z = make_zip(tmp_path / "drop.zip", {"readme.txt": b"hello"})
    with pytest.raises(InputError, match="no parquet files found"):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["../evil.parquet", "/abs/evil.parquet", "a/../../evil.parquet"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    z = tmp_path / "drop.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.parquet", parquet_bytes(*good_rows()))
        info = zipfile.ZipInfo(name)
        zf.writestr(info, b"x")
    with pytest.raises(InputError, match="outside the extraction folder"):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1))
    assert not (tmp_path / "evil.parquet").exists() and not (tmp_path / "o").exists()


def test_zip_symlink_is_refused(tmp_path):
    z = tmp_path / "drop.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link.parquet")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputError, match="symbolic link"):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1))


def test_zip_bomb_is_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.parquet", b"\0" * (4 << 20))
    assert z.stat().st_size < 100_000
    with pytest.raises(InputError, match="zip_max_bytes"):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1, zip_max_bytes=1 << 20))


def test_zip_lying_about_its_sizes_is_stopped(tmp_path):
    """Declared sizes can be forged; the bytes actually extracted are counted too."""
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.parquet", b"\0" * (4 << 20))
    data = bytearray(z.read_bytes())
    # Patch the declared uncompressed size (local header offset 22, central directory +24).
    size = (4 << 20).to_bytes(4, "little")
    small = (100).to_bytes(4, "little")
    data = data.replace(size, small)
    z.write_bytes(bytes(data))
    with pytest.raises(InputError):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1, zip_max_bytes=1 << 20))
    assert not (tmp_path / "o").exists()


def test_not_a_zip(tmp_path):
    z = tmp_path / "drop.zip"
    z.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a valid zip"):
        run_pipeline(make_config(input_embeddings_path=str(z), output_path=str(tmp_path / "o"),
                                 n_clusters=1))


# -- summary.json ------------------------------------------------------------------------------
def test_summary_json_beside_the_folder_names_the_files(tmp_path):
    """The split pipeline's summary.json (one level up) lists the files: only those are read,
    even if the folder holds others, and a listed file that is missing is a clear error."""
    import json

    ids, emb = good_rows(n=30)
    write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    ids2, emb2 = good_rows(n=30, seed=1, prefix="x")
    write(str(tmp_path / "in" / "sub" / "b.parquet"), ids2, as_list(emb2))
    write(str(tmp_path / "in" / "stray.parquet"), ids2, as_list(emb2))  # dup ids if read
    (tmp_path / "summary.json").write_text(json.dumps({
        "num_clips": 60, "outputs": {"iv2": ["in/a.parquet", "in/sub/b.parquet"]},
        "other": "videos/x.mp4"}))
    report, _ = run(tmp_path, n_clusters=2)
    assert report.n_rows == 60
    (tmp_path / "summary.json").write_text(json.dumps({"files": ["in/a.parquet",
                                                                 "in/gone.parquet"]}))
    with pytest.raises(InputError, match="gone.parquet: listed in summary.json but missing"):
        run_pipeline(make_config(input_embeddings_path=str(tmp_path / "in"),
                                 output_path=str(tmp_path / "out2"), n_clusters=2))
    assert not (tmp_path / "out2").exists()


def test_summary_json_inside_the_folder_with_full_paths(tmp_path):
    import json

    ids, emb = good_rows(n=30)
    f = write(str(tmp_path / "in" / "a.parquet"), ids, as_list(emb))
    write(str(tmp_path / "in" / "ignored.parquet"), *good_rows(n=5, prefix="z")[:1],
          as_list(good_rows(n=5)[1]))
    (tmp_path / "in" / "summary.json").write_text(json.dumps({"embeddings": [f]}))
    report, _ = run(tmp_path, n_clusters=2)
    assert report.n_rows == 30
    (tmp_path / "in" / "summary.json").write_text("{broken")
    with pytest.raises(InputError, match="summary.json: not valid JSON"):
        run(tmp_path, n_clusters=2)
