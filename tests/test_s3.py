"""S3 in and out against a real S3 API server (moto_server) started by the tests, with
credentials only in a profile file; zip input from S3."""

import collections
import io
import json
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core import layout
from semdedup_core.config import make_config
from semdedup_core.cross_cluster import read_cross_table
from semdedup_core.errors import InputError, StorageError
from semdedup_core.extraction import sweep
from semdedup_core.parquet import FOOTER_READ, read_table, row_count
from semdedup_core.pipeline import run_pipeline
from semdedup_core.shards import read_shard_file_vectors
from semdedup_core.storage import S3Options, Storage
from tests.conftest import upload_folder


def keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_s3_in_and_out_with_profile(planted, s3_client, s3_endpoint, aws_profile, tmp_path):
    folder, info = planted
    s3_client.create_bucket(Bucket="clips")
    upload_folder(s3_client, "clips", "drops/d1/iv2_embd_parquet", folder)
    cfg = make_config(input_embeddings_path="s3://clips/drops/d1/iv2_embd_parquet",
                      output_path="s3://clips/dedup/d1", n_clusters=8, aws_profile=aws_profile,
                      aws_endpoint_url=s3_endpoint, eps_to_extract=[0.01, 0.1])
    report = run_pipeline(cfg)
    out_keys = keys(s3_client, "clips", "dedup/d1/")
    assert "dedup/d1/clustering_results/kmeans_centroids.npy" in out_keys
    assert "dedup/d1/extraction/dedup_summary_0.01.csv" in out_keys
    parts = [k for k in out_keys if k.startswith("dedup/d1/extraction/unique_ids_0.1.parquet/")]
    assert len(parts) == int((report.cluster_sizes > 0).sum())
    csv = s3_client.get_object(Bucket="clips", Key="dedup/d1/extraction/dedup_summary_0.01.csv")
    assert csv["Body"].read().decode().splitlines()[1].endswith(",3000")

    # The same run on local disk gives the same files, byte for byte.
    local = cfg.model_copy(update={"input_embeddings_path": str(folder),
                                   "output_path": str(tmp_path / "local")})
    run_pipeline(local)
    assert "dedup/d1/_semdedup_run.json" in out_keys and "dedup/d1/_semdedup.lock" not in out_keys
    assert not [k for k in out_keys if k.endswith("/")]  # no zero-byte "folder" keys
    for key in out_keys:
        rel = key[len("dedup/d1/"):]
        if rel == "_semdedup_run.json":  # its config and input fingerprint name the S3 paths
            continue
        body = s3_client.get_object(Bucket="clips", Key=key)["Body"].read()
        assert (tmp_path / "local" / rel).read_bytes() == body, rel


def test_a_shard_on_s3_is_read_in_one_get(planted, s3_client, s3_endpoint, aws_profile,
                                          s3_requests, tmp_path):
    """A shard file is read whole by one GET (its size from the answer, no HEAD), in the run's
    prune phase (whose shard folders are not listed again) and by `read_shard_file_vectors`; a
    file gone is an error naming it. So is a
    small artifact (a pruning table; a cross table, which is looked for by that GET alone)."""
    folder, _ = planted
    s3_client.create_bucket(Bucket="one-get")
    upload_folder(s3_client, "one-get", "in", folder)
    out = Storage("s3://one-get/out", S3Options(aws_profile, s3_endpoint))
    run_pipeline(make_config(input_embeddings_path="s3://one-get/in", output_path=out.uri,
                             n_clusters=4, aws_profile=aws_profile,
                             aws_endpoint_url=s3_endpoint))
    shards = out.list_files(layout.SHARDS)
    requests = s3_requests()
    reads = [(m, p) for m, p in requests if m != "PUT"
             and p.startswith(f"/one-get/out/{layout.SHARDS}/")]  # (not listings: /one-get?...)
    assert sorted(reads) == sorted(("GET", f"/one-get/out/{rel}") for rel in shards)
    # The run knows the files assignment wrote: no shard folder is listed one by one.
    assert not [p for m, p in requests if "prefix=out/clustering_results/embs_by_nearest_center"
                "/nearest_cent" in p]

    (tmp_path / "shard.parquet").write_bytes(
        s3_client.get_object(Bucket="one-get", Key=f"out/{shards[0]}")["Body"].read())
    local, local_emb = read_shard_file_vectors(Storage(str(tmp_path)), "shard.parquet")
    before = len(s3_requests())
    table, emb = read_shard_file_vectors(out, shards[0])
    assert table.equals(local) and emb.tobytes() == local_emb.tobytes()
    assert s3_requests()[before:] == [("GET", f"/one-get/out/{shards[0]}")]

    before = len(s3_requests())
    table = read_table(out, layout.pruning_table(0))
    assert table.column_names == [layout.ID, layout.MAX_ID, layout.SCORE] and table.num_rows
    assert read_cross_table(out, 0) is None  # cross_cluster was off: there is none
    assert s3_requests()[before:] == [("GET", f"/one-get/out/{layout.pruning_table(0)}"),
                                      ("GET", f"/one-get/out/{layout.cross_table(0)}")]
    with pytest.raises(InputError, match=f"s3://one-get/out/{layout.cross_table(0)}: not found, "
                                         "and cross_cluster is on"):
        read_cross_table(out, 0, required=True)

    # A row count reads the footer by one GET of the file's end, two where the footer is
    # longer than that read (here 2,000 row groups).
    many = pa.table({"id": pa.array([str(i) for i in range(20_000)])})
    sink = pa.BufferOutputStream()
    pq.write_table(many, sink, row_group_size=10)
    s3_client.put_object(Bucket="one-get", Key="out/many.parquet", Body=sink.getvalue().to_pybytes())
    assert pq.read_metadata(pa.BufferReader(sink.getvalue())).serialized_size > FOOTER_READ
    before = len(s3_requests())
    assert row_count(out, layout.pruning_table(0)) == table.num_rows
    assert row_count(out, "many.parquet") == 20_000
    assert s3_requests()[before:] == [("GET", f"/one-get/out/{layout.pruning_table(0)}")] + \
        [("GET", "/one-get/out/many.parquet")] * 2

    gone = layout.shard_file(0, "0" * 16)
    with pytest.raises(InputError, match=f"s3://one-get/out/{gone}: not found"):
        read_shard_file_vectors(out, gone)
    nowhere = Storage("s3://no-such-bucket/out", S3Options(aws_profile, s3_endpoint))
    with pytest.raises(StorageError, match=f"s3://no-such-bucket/out/{shards[0]}: cannot read: "
                                           "the bucket does not exist"):
        read_shard_file_vectors(nowhere, shards[0])


def test_zip_from_s3_with_endpoint_from_environment(planted, s3_client, s3_endpoint, aws_profile,
                                                    monkeypatch):
    folder, _ = planted
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), f"ce1_embd_parquet/{name}")
    s3_client.create_bucket(Bucket="zips")
    s3_client.put_object(Bucket="zips", Key="in/drop-7.zip", Body=buf.getvalue())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_PROFILE", aws_profile)
    report = run_pipeline(make_config(input_embeddings_path="s3://zips/in/drop-7.zip",
                                      n_clusters=4))
    assert report.n_rows == 3000
    assert report.output_path == "s3://zips/in/drop-7_semdedup"
    out = keys(s3_client, "zips", "in/drop-7_semdedup/")
    assert "in/drop-7_semdedup/extraction/dedup_summary_0.01.csv" in out
    table = s3_client.get_object(
        Bucket="zips", Key=next(k for k in out if "semdedup_pruning_tables" in k))["Body"].read()
    assert pq.read_table(io.BytesIO(table)).column_names == ["id", "max_id", "cosine_sim_score"]


def test_missing_s3_input_is_a_clear_error(s3_client, s3_endpoint, aws_profile):
    import pytest

    from semdedup_core.errors import InputError

    s3_client.create_bucket(Bucket="empty")
    with pytest.raises(InputError, match="s3://empty/nothing"):
        run_pipeline(make_config(input_embeddings_path="s3://empty/nothing",
                                 output_path="s3://empty/out", n_clusters=2,
                                 aws_profile=aws_profile, aws_endpoint_url=s3_endpoint))
    assert keys(s3_client, "empty") == []


def test_a_sweep_on_s3_reads_each_table_once_or_twice(planted, s3_client, s3_endpoint,
                                                      aws_profile, s3_requests):
    """A sweep of a cross_cluster output on S3 reads each cross table once (cluster 0's twice:
    the eps its search covered) and each pruning table at most twice (extraction, then the
    ids of the clusters the audit reaches): the scores extraction read feed the summary and
    the audit, and every read is one GET. The eps it adds are those of a fresh run."""
    folder, _ = planted
    s3_client.create_bucket(Bucket="sweep")
    upload_folder(s3_client, "sweep", "in", folder)
    out = Storage("s3://sweep/out", S3Options(aws_profile, s3_endpoint))
    args = dict(input_embeddings_path="s3://sweep/in", n_clusters=6, aws_profile=aws_profile,
                aws_endpoint_url=s3_endpoint, cross_cluster=True)
    run_pipeline(make_config(output_path=out.uri, eps_to_extract=[0.01, 0.05], **args))
    before = len(s3_requests())
    sweep(out, [0.03])
    reads = collections.Counter(p for m, p in s3_requests()[before:]  # (not the listings)
                                if m in ("GET", "HEAD") and p.startswith("/sweep/out/extraction/"))
    cross = {p: n for p, n in reads.items() if layout.CROSS_TABLES in p}
    pruning = {p: n for p, n in reads.items() if layout.PRUNING_TABLES in p}
    assert len(cross) == len(pruning) == 6 and sum(cross.values()) == 7
    assert max(pruning.values()) <= 2 and not [m for m, p in s3_requests()[before:]
                                               if m == "HEAD" and "/extraction/semdedup_" in p]
    # The shards folder is listed once for the whole sweep, not once per cluster.
    assert not [p for m, p in s3_requests()[before:]
                if "prefix=out/clustering_results/embs_by_nearest_center/nearest_cent" in p]
    fresh = Storage("s3://sweep/fresh", S3Options(aws_profile, s3_endpoint))
    run_pipeline(make_config(output_path=fresh.uri, eps_to_extract=[0.01, 0.05, 0.03], **args))
    parts = out.list_files(layout.unique_ids_dir(0.03))
    assert parts == fresh.list_files(layout.unique_ids_dir(0.03)) and len(parts) == 6
    for rel in parts + [layout.summary_csv(0.03)]:
        assert out.read_bytes(rel) == fresh.read_bytes(rel)
    # The audit covers every eps the folder holds now, as a fresh run with all of them.
    assert out.read_bytes(layout.AUDIT) == fresh.read_bytes(layout.AUDIT)
