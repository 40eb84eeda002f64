"""Faults, injected for real: runs killed at each phase (a subprocess and SIGKILL) then run
again, two runs into one folder at once, a held or crashed folder, re-runs with other settings,
a full disk, S3 faults through an HTTP fault proxy in front of the S3 API server, bad inputs.
Each must end in a folder that holds exactly one complete run, or in one line naming the path."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from semdedup_core import layout, run_record
from semdedup_core.cli import main as cli_main
from semdedup_core.config import make_config
from semdedup_core.errors import InputError
from semdedup_core.pipeline import run_pipeline
from semdedup_core.storage import Storage
from tests.test_end_to_end import tree

CLI = [sys.executable, "-m", "semdedup_core.cli"]


def cli(*args, env=None, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def cli_here(capsys, *args):
    """The `semdedup` command run in this process (no interpreter start-up: these checks fail
    in a second), as a CompletedProcess-like result."""
    code = cli_main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def one_line_error(proc) -> str:
    """The CLI failed with exit status 1 and exactly one line on stderr after the log lines."""
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("semdedup: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def config(folder, out, **kw):
    return make_config(**{"input_embeddings_path": str(folder), "output_path": str(out),
                          "n_clusters": 12, "eps_to_extract": [0.01, 0.005], **kw})


@pytest.fixture(scope="module")
def clean(planted, tmp_path_factory):
    """A clean run's tree: what every recovered folder must equal."""
    folder, _ = planted
    out = tmp_path_factory.mktemp("clean") / "out"
    report = run_pipeline(config(folder, out))
    return tree(out), report, out


# -- the completion record ------------------------------------------------------------------------
def test_record_is_written_last_and_describes_the_run(planted, clean):
    folder, _ = planted
    _, report, out = clean
    record = json.loads((out / layout.RUN_RECORD).read_text())
    assert record["config"] == config(folder, out).model_dump(mode="json")
    assert record["counts"] == {"clips": 3000, "dim": 64,
                                "nonempty_clusters": int((report.cluster_sizes > 0).sum()),
                                "removed": {"0.01": report.summary[0.01]["removed"],
                                            "0.005": report.summary[0.005]["removed"]}}
    assert len(record["input"]["fingerprint"]) == 64
    assert record["started"] <= record["finished"]
    assert {"python", "numpy", "pyarrow"} <= set(record["versions"])
    assert not (out / layout.RUN_LOCK).exists()
    # The fingerprint follows the input: names, sizes and modification times of its files.
    again = run_record.input_fingerprint([(f, os.path.getsize(folder / f), None)
                                          for f in sorted(os.listdir(folder))])
    assert again != record["input"]["fingerprint"]  # mtimes count for a folder input


def test_rerun_with_fewer_eps_and_clusters_leaves_only_its_own_files(planted, clean, tmp_path):
    folder, _ = planted
    out = tmp_path / "out"
    run_pipeline(config(folder, out))
    (out / "extraction" / ".cluster_1.parquet.0123.tmp").write_bytes(b"half")  # a killed write
    smaller = config(folder, out, n_clusters=5, eps_to_extract=[0.01])
    run_pipeline(smaller)
    fresh = tmp_path / "fresh"
    run_pipeline(config(folder, fresh, n_clusters=5, eps_to_extract=[0.01]))
    assert tree(out) == tree(fresh)
    assert not (out / "extraction/unique_ids_0.005.parquet").exists()


# -- ownership ------------------------------------------------------------------------------------
def test_held_folder_is_refused_naming_the_holder_or_waited_for(planted, clean, tmp_path):
    folder, _ = planted
    out = tmp_path / "out"
    holder = run_record.acquire(Storage(str(out)), "the-other-run", pid=os.getpid())
    try:
        with pytest.raises(run_record.OutputBusy, match="the-other-run"):
            run_pipeline(config(folder, out))
        line = one_line_error(cli("run", "--input-embeddings-path", folder, "--output-path", out,
                                  "--n-clusters", 12, "--eps-to-extract", 0.01, 0.005))
        assert "the-other-run" in line and f"pid {os.getpid()}" in line and "started 20" in line
        assert os.listdir(out) == [layout.RUN_LOCK]  # nothing written by the refused runs
        waiting = subprocess.Popen([*CLI, "run", "--input-embeddings-path", str(folder),
                                    "--output-path", str(out), "--n-clusters", "12",
                                    "--eps-to-extract", "0.01", "0.005", "--wait"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None and os.listdir(out) == [layout.RUN_LOCK]
    finally:
        holder.release(ok=True)
    assert waiting.wait(timeout=120) == 0, waiting.stderr.read()
    assert tree(out) == clean[0]


def test_two_runs_at_once_never_mix(planted, tmp_path):
    """A run (k=6) is frozen part-way (SIGSTOP) while a second one (k=9) starts into the same
    folder: the second stops at once naming the first; the first, resumed, finishes a clean
    folder of its own."""
    folder, _ = planted
    out = tmp_path / "out"
    args = ["run", "--input-embeddings-path", folder, "--output-path", out, "--quiet"]
    first = subprocess.Popen([*CLI, *map(str, args), "--n-clusters", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stderr:
        if "assign: started" in line:
            first.send_signal(signal.SIGSTOP)
            break
    try:
        second = cli(*args, "--n-clusters", 9)
    finally:
        first.send_signal(signal.SIGCONT)
    line = one_line_error(second)
    assert "another run is writing this output folder" in line
    assert f"pid {first.pid}" in line, line
    assert first.wait(timeout=120) == 0, first.stderr.read()
    fresh = tmp_path / "fresh"
    run_pipeline(make_config(input_embeddings_path=str(folder), output_path=str(fresh),
                             n_clusters=6))
    assert tree(out) == tree(fresh)


def test_stale_lock_of_a_dead_process_is_taken_over(planted, clean, tmp_path):
    folder, _ = planted
    out = tmp_path / "out"
    out.mkdir()
    import socket

    stale = run_record.Holder("crashed", socket.gethostname(), dead_pid(), "2026-01-01T00:00:00",
                              time.time() + 3600)
    (out / layout.RUN_LOCK).write_text(json.dumps(stale.__dict__))
    run_pipeline(config(folder, out))
    assert tree(out) == clean[0]


# -- kills at each phase --------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["scan", "assign", "prune", "summary"])
def test_killed_run_is_flagged_then_a_rerun_is_identical(planted, clean, tmp_path, phase,
                                                          monkeypatch):
    folder, _ = planted
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    run_pipeline(config(folder, out))  # a complete folder, then a re-run killed part-way
    env = {**os.environ, "TMPDIR": str(scratch)}
    # A tiny buffer and batches of 10 clips: assignment writes thousands of small shard files
    # over seconds, so the kill at "assign" lands while the shards are half written.
    proc = subprocess.Popen([*CLI, "run", "--input-embeddings-path", str(folder),
                             "--output-path", str(out), "--n-clusters", "12", "--eps-to-extract",
                             "0.01", "0.005", "--spill-buffer-mb", "0.01", "--quiet",
                             *(["--read-batch-rows", "10"] if phase == "assign" else [])],
                            stderr=subprocess.PIPE, text=True, env=env)
    shards = out / layout.SHARDS
    for line in proc.stderr:
        if f"{phase}: started" in line:
            while phase == "assign" and proc.poll() is None and \
                    len(list(shards.glob("*/*.parquet"))) < 3 * len(list(shards.iterdir())):
                time.sleep(0.01)  # until the clusters hold more files than the clean run's
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if phase != "scan":  # it had begun writing: the folder says it is unfinished
        line = one_line_error(cli("inspect", out))
        assert "incomplete: a run started at 20" in line and "did not finish" in line, line
        assert "incomplete" in one_line_error(cli("sweep", out, "--eps", "0.1"))
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    run_pipeline(config(folder, out))  # takes over the dead run's lock at once
    assert tree(out) == clean[0]
    assert os.listdir(scratch) == []  # the killed run's spill folder went too


# -- bad or unusual inputs ------------------------------------------------------------------------
def test_a_single_parquet_file_is_a_one_file_input(planted, tmp_path):
    folder, _ = planted
    first = sorted(folder.iterdir())[0]
    report = run_pipeline(make_config(input_embeddings_path=str(first),
                                      output_path=str(tmp_path / "out"), n_clusters=4))
    import pyarrow.parquet as pq

    assert report.n_rows == pq.ParquetFile(first).metadata.num_rows


def test_null_inside_an_embedding_names_the_clip(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    emb = pa.array([[1.0, 2.0], [3.0, None], [5.0, 6.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "embedding": emb}), tmp_path / "in/x.parquet")
    line = one_line_error(cli_here(capsys, "run", "--input-embeddings-path", tmp_path / "in",
                                   "--output-path", tmp_path / "out", "--n-clusters", 1))
    assert "x.parquet" in line and "id 'b'" in line, line


def test_corrupt_parquet_pages_name_the_file(planted, tmp_path, capsys):
    folder, _ = planted
    bad = tmp_path / "in"
    bad.mkdir()
    for f in sorted(folder.iterdir()):
        (bad / f.name).write_bytes(f.read_bytes())
    victim = sorted(bad.iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[200:4000] = os.urandom(3800)  # the data pages; the footer stays readable
    victim.write_bytes(bytes(data))
    line = one_line_error(cli_here(capsys, "run", "--input-embeddings-path", bad, "--output-path",
                                   tmp_path / "out", "--n-clusters", 4))
    assert str(victim) in line and "corrupt parquet data" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["cut short", "page header"])
def test_damaged_shard_names_the_file_then_a_rewritten_one_reads(clean, tmp_path, capsys,
                                                                damage):
    """A shard damaged after assignment: the pass that reads the shards' vectors (here the
    sweep's audit, as in Dagster's summary step and the prune loop) fails in one line naming
    the shard, whichever part is damaged; with the shard back, the same sweep completes."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    shutil.copytree(clean[2], out)
    victim = sorted((out / layout.shard_dir(3)).glob("*.parquet"))[0]
    good = victim.read_bytes()
    data = bytearray(good)
    if damage == "cut short":
        del data[len(data) // 2:]
    else:  # the embedding column's first page header: the footer stays readable
        meta = pq.ParquetFile(victim).metadata
        at = next(meta.row_group(0).column(i).data_page_offset for i in range(meta.num_columns)
                  if meta.schema.column(i).path.startswith(layout.EMBEDDING))
        data[at:at + 12] = b"\xff" * 12
    victim.write_bytes(bytes(data))
    line = one_line_error(cli_here(capsys, "sweep", out, "--eps", 0.02))
    assert str(victim) in line and "cannot read" in line, line
    victim.write_bytes(good)
    assert cli_here(capsys, "sweep", out, "--eps", 0.02).returncode == 0


def test_full_disk_is_one_line_and_leaves_no_partial_files(planted, clean, tmp_path):
    """A small tmpfs (needs root to mount) for the output, then for the scratch files."""
    folder, _ = planted
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs",
                                            str(disk)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "out"
        line = one_line_error(cli("run", "--input-embeddings-path", folder, "--output-path", out,
                                  "--n-clusters", 12))
        assert str(out) in line and "no space left on the device" in line, line
        assert not [f for f in tree(out) if f.endswith(".tmp")]
        assert "did not finish" in one_line_error(cli("inspect", out))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        # Scratch files: a zip input is extracted under $TMPDIR (no run spills any more).
        archive = shutil.make_archive(str(tmp_path / "drop"), "zip", folder.parent, folder.name)
        line = one_line_error(cli("run", "--input-embeddings-path", archive, "--output-path",
                                  tmp_path / "out2", "--n-clusters", 12,
                                  env={**os.environ, "TMPDIR": str(disk)}))
        assert "no space left on the device" in line, line
        assert os.listdir(disk) == []  # the extraction folder went with the failed run
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- S3 faults ------------------------------------------------------------------------------------
class FaultProxy:
    """An HTTP proxy in front of the S3 API server that breaks requests on purpose: `plan(n,
    method)` says what to do with the n-th request: None (forward it), "500" (an S3
    InternalError), "403" (AccessDenied), "drop" (close the connection unanswered) or "cut"
    (forward it, then close after half the response body)."""

    def __init__(self, target: str, plan):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlparse

        self.plan, self.count, self.faults = plan, 0, []
        lock = threading.Lock()
        host = urlparse(target).netloc
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str) -> None:
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected {code}</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                with lock:
                    proxy.count += 1
                    fault = proxy.plan(proxy.count, self.command)
                if fault:
                    proxy.faults.append(fault)
                if fault == "500":
                    return self._error(500, "InternalError")
                if fault == "403":
                    return self._error(403, "AccessDenied")
                if fault == "drop":
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = b"" if self.command == "HEAD" else resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" \
                    else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                conn.close()
                if fault == "cut" and len(data) > 64:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for p in pages for o in p.get("Contents", [])}


def test_s3_faults_are_retried_to_the_same_output(planted, clean, s3_client, s3_endpoint,
                                                  aws_profile):
    """500s, dropped connections and cut bodies through the whole pipeline, input and output on
    S3, plus a stale multipart upload left by a killed run and an earlier run with other
    settings: the output is a clean run's, with no folder keys and no unfinished uploads."""
    from tests.conftest import upload_folder

    folder, _ = planted
    s3_client.create_bucket(Bucket="faulty")
    upload_folder(s3_client, "faulty", "in", folder)
    stale = s3_client.create_multipart_upload(Bucket="faulty", Key="out/clustering_results/x")
    s3_client.upload_part(Bucket="faulty", Key="out/clustering_results/x", PartNumber=1,
                          UploadId=stale["UploadId"], Body=b"x" * 100)
    base = dict(input_embeddings_path="s3://faulty/in", output_path="s3://faulty/out",
                n_clusters=12, eps_to_extract=[0.01, 0.005], aws_profile=aws_profile)
    run_pipeline(make_config(**{**base, "n_clusters": 5, "eps_to_extract": [0.1]},
                             aws_endpoint_url=s3_endpoint))

    gets = itertools.count()

    def plan(n, method):  # about one request in seven fails
        if n % 17 == 3:
            return "500"
        if n % 19 == 5:
            return "drop"
        # Every 13th GET that gets this far, counted apart: which request numbers the GETs
        # get depends on thread timing, and a run with few GETs could miss n % 13 == 8.
        if method == "GET" and next(gets) % 13 == 8:
            return "cut"
        return None

    proxy = FaultProxy(s3_endpoint, plan)
    try:
        run_pipeline(make_config(**base, aws_endpoint_url=proxy.url))
    finally:
        proxy.close()
    assert {"500", "drop", "cut"} <= set(proxy.faults)
    keys = s3_keys(s3_client, "faulty", "out/")
    assert not [k for k in keys if k.endswith("/")]  # no zero-byte "folder" keys
    assert s3_client.list_multipart_uploads(Bucket="faulty").get("Uploads", []) == []
    want = {rel: digest for rel, digest in clean[0].items() if rel != layout.RUN_RECORD}
    got = {k[len("out/"):] for k in keys} - {layout.RUN_RECORD}
    assert got == set(want)
    for rel in ("clustering_results/kmeans_centroids.npy", "extraction/dedup_summary_0.005.csv"):
        body = s3_client.get_object(Bucket="faulty", Key="out/" + rel)["Body"].read()
        assert body == (clean[2] / rel).read_bytes()


def test_s3_faults_that_do_not_pass_are_one_line(planted, s3_client, s3_endpoint, aws_profile,
                                                capsys, caplog, monkeypatch):
    from tests.conftest import free_port

    folder, _ = planted
    s3_client.create_bucket(Bucket="in1")
    from tests.conftest import upload_folder

    upload_folder(s3_client, "in1", "d", folder)
    common = ["--n-clusters", 4, "--aws-profile", aws_profile]

    def run(inp, out, endpoint=s3_endpoint, *extra):
        return cli_here(capsys, "run", "--input-embeddings-path", inp, "--output-path", out,
                        "--aws-endpoint-url", endpoint, *common, *extra)

    # A missing output bucket fails before the scan.
    caplog.set_level("INFO")
    line = one_line_error(run("s3://in1/d", "s3://no-such-bucket/out"))
    assert "s3://no-such-bucket/out" in line and "bucket does not exist" in line, line
    assert "scan: started" not in caplog.text
    # Access denied, on the output and on the input.
    proxy = FaultProxy(s3_endpoint, lambda n, method: "403")
    try:
        line = one_line_error(run("s3://in1/d", "s3://in1/out", proxy.url))
        assert "s3://in1/out" in line and "access denied" in line, line
        line = one_line_error(cli_here(capsys, "run", "--input-embeddings-path", "s3://in1/d",
                                  "--output-path", "/nonexistent-out", "--aws-endpoint-url",
                                  proxy.url, *common))
        assert "s3://in1/d" in line and "access denied" in line, line
    finally:
        proxy.close()
    # Retries exhausted: every request fails (two attempts each, to keep the test short).
    proxy = FaultProxy(s3_endpoint, lambda n, method: "500")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    try:
        line = one_line_error(run("s3://in1/d", "s3://in1/out", proxy.url))
        assert "s3://in1/out" in line and "gave up after retries" in line, line
    finally:
        proxy.close()
    # An endpoint nobody listens on.
    line = one_line_error(run("s3://in1/d", "s3://in1/out", f"http://127.0.0.1:{free_port()}"))
    assert "s3://in1/out" in line and "cannot reach the storage endpoint" in line, line
    # An unknown profile.
    line = one_line_error(cli_here(capsys, "run", "--input-embeddings-path", "s3://in1/d",
                                   "--output-path", "s3://in1/out", "--n-clusters", 4,
                                   "--aws-profile", "nobody"))
    assert "aws_profile 'nobody'" in line, line
    assert not [k for k in s3_keys(s3_client, "in1") if not k.startswith("d/")]


def test_many_small_files_read_like_one_file_and_errors_name_the_file(tmp_path):
    """300 files of two rows are decoded in groups (one batch per group): same output as one
    file with the same rows, and a bad clip is still traced to its own file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((600, 16)).astype(np.float32)
    ids = [f"c{i:04d}" for i in range(600)]

    def table(rows):
        return pa.table({"id": [ids[i] for i in rows],
                         "embedding": pa.array(list(emb[rows]), pa.list_(pa.float32()))})

    many, one = tmp_path / "many", tmp_path / "one"
    many.mkdir(), one.mkdir()
    for f in range(300):
        pq.write_table(table([2 * f, 2 * f + 1]), many / f"part-{f:04d}.parquet")
    pq.write_table(table(list(range(600))), one / "all.parquet")
    for name in ("many", "one"):
        run_pipeline(make_config(input_embeddings_path=str(tmp_path / name),
                                 output_path=str(tmp_path / f"out-{name}"), n_clusters=5))
    assert tree(tmp_path / "out-many") == tree(tmp_path / "out-one")

    emb[301] = np.nan  # clip c0301, in part-0150
    pq.write_table(table([300, 301]), many / "part-0150.parquet")
    with pytest.raises(InputError, match=r"part-0150\.parquet: embedding of id 'c0301'"):
        run_pipeline(make_config(input_embeddings_path=str(many),
                                 output_path=str(tmp_path / "o"), n_clusters=5))
    pq.write_table(table([1, 300]), many / "part-0150.parquet")  # c0001 again (as in part-0000)
    with pytest.raises(InputError, match=r"part-0000\.parquet and .*part-0150\.parquet: "
                                         r"duplicate id 'c0001'"):
        run_pipeline(make_config(input_embeddings_path=str(many),
                                 output_path=str(tmp_path / "o"), n_clusters=5))


def test_inspect_reads_a_committed_corpus_drop(tmp_path, capsys, planted):
    """A corpus drop's layout is complete once the corpus manifest lists it (its commit)."""
    folder, _ = planted
    corpus = tmp_path / "corpus"
    assert cli_here(capsys, "corpus", "add", corpus, "--input-embeddings-path", folder,
                    "--drop-name", "d0", "--n-clusters", 4).returncode == 0
    assert cli_here(capsys, "inspect", corpus / "drops/d0").returncode == 0
    line = one_line_error(cli_here(capsys, "inspect", corpus / "drops/nope"))
    assert "no semdedup output here" in line
