"""`semdedup sweep` and `semdedup inspect` on finished outputs, local and on S3, and the
`semdedup_sweep` Dagster job."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from semdedup_core import layout
from semdedup_core.config import make_config
from semdedup_core.errors import InputError
from semdedup_core.extraction import sweep
from semdedup_core.inspection import find_clip, score_stats
from semdedup_core.pipeline import run_pipeline
from semdedup_core import run_record
from semdedup_core.run_record import OutputIncomplete
from semdedup_core.storage import S3Options, Storage
from semdedup_dagster.jobs import semdedup_sweep_job
from semdedup_dagster.resources import LayoutStorage
from tests.conftest import upload_folder
from tests.test_end_to_end import tree


@pytest.fixture(scope="module")
def finished(planted, tmp_path_factory):
    folder, info = planted
    base = tmp_path_factory.mktemp("inspect")
    out = base / "out"
    report = run_pipeline(make_config(input_embeddings_path=str(folder), output_path=str(out),
                                      n_clusters=6, eps_to_extract=[0.01]))
    return folder, info, out, report, base


def test_sweep_equals_a_fresh_run_for_those_eps(finished, tmp_path):
    folder, _, out, _, _ = finished
    work = tmp_path / "swept"
    subprocess.run(["cp", "-r", str(out), str(work)], check=True)
    rows = sweep(Storage(str(work)), [0.05, 0.2])
    fresh = tmp_path / "fresh"
    run_pipeline(make_config(input_embeddings_path=str(folder), output_path=str(fresh),
                             n_clusters=6, eps_to_extract=[0.01, 0.05, 0.2]))
    swept, want = tree(work), tree(fresh)
    assert set(swept) == set(want)
    for rel, digest in want.items():
        if rel != layout.RUN_RECORD:  # (its config names the run's own eps)
            # same bytes as if those eps had been asked up front beside the run's own (the
            # audit covers every eps the folder holds)
            assert swept[rel] == digest, rel
    record = json.loads((work / layout.RUN_RECORD).read_text())
    assert record["config"]["eps_to_extract"] == [0.01]
    assert set(record["swept_eps"]) == {"0.05", "0.2"}
    assert "extraction/dedup_summary_0.01.csv" in swept  # earlier eps left in place
    assert rows[0.2]["removed"] >= rows[0.05]["removed"]


def test_sweep_cli_and_bad_eps(finished, tmp_path):
    _, _, out, _, _ = finished
    work = tmp_path / "w"
    subprocess.run(["cp", "-r", str(out), str(work)], check=True)
    ok = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "sweep", str(work), "--eps",
                         "0.03"], capture_output=True, text=True)
    assert ok.returncode == 0 and "0.03" in ok.stdout, ok.stderr
    assert (work / "extraction/unique_ids_0.03.parquet").is_dir()
    bad = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "sweep", str(work), "--eps",
                          "1.5"], capture_output=True, text=True)
    assert bad.returncode == 1 and "outside [0.0001, 1)" in bad.stderr
    with pytest.raises(OutputIncomplete, match="no semdedup output here"):
        sweep(Storage(str(tmp_path / "empty")), [0.1])
    assert not (tmp_path / "empty").exists()


def file_bytes(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("damage", ["shard_missing", "vectors_missing", "audit_damaged",
                                    "pruning_missing"])
def test_a_failed_sweep_leaves_the_folder_as_it_found_it(finished, tmp_path, damage):
    """The sweep fails in its extraction (a cluster's shard is gone: parts of the clusters
    before it are written by then) or in its audit (the shards have no vectors, or the run's
    audit file is damaged: parts and summaries are written by then), or before it writes (a
    cluster with a shard has no pruning table: it once swept the others as if they were the
    whole output). Either way no
    unique_ids_<eps> of the new eps is left without its summary, nothing of the eps the folder
    held changes, and the error names the file."""
    _, _, out, _, _ = finished
    work = tmp_path / "w"
    subprocess.run(["cp", "-r", str(out), str(work)], check=True)
    shards = sorted((work / layout.SHARDS).iterdir())
    if damage == "shard_missing":
        subprocess.run(["rm", "-r", str(shards[3])], check=True)
        error = f"{shards[3]}: no shard"
    elif damage == "vectors_missing":
        for f in work.joinpath(layout.SHARDS).rglob("*.parquet"):
            pq.write_table(pq.read_table(f).drop_columns([layout.EMBEDDING]), f)
        error = "no embedding column"
    elif damage == "audit_damaged":
        (work / layout.AUDIT).write_text('{"sample_rate": 0.0')  # cut short
        error = f"{work / layout.AUDIT}: damaged"
    else:
        (work / layout.pruning_table(3)).unlink()
        error = (f"{work / layout.pruning_table(3)}: not found \\(1 of the clusters with a "
                 "shard have no pruning table\\)")
    before = file_bytes(work)
    with pytest.raises(InputError, match=error):
        sweep(Storage(str(work)), [0.01, 0.2])
    assert file_bytes(work) == before


def test_inspect_finds_a_removed_clip_and_its_match(finished):
    _, info, out, report, _ = finished
    storage = Storage(str(out))
    part = next((out / "extraction/unique_ids_0.01.parquet").glob("part.*.parquet"))
    table = pq.read_table(part)
    assert table.num_rows > 0
    clip = table.column("id")[0].as_py()
    rep = find_clip(storage, clip)
    assert rep.removed[0.01] and rep.score >= 0.99 and rep.rank > 0
    pruning = pq.read_table(out / f"extraction/semdedup_pruning_tables/cluster_{rep.cluster}"
                                  ".parquet").to_pylist()
    assert pruning[rep.rank] == {"id": clip, "max_id": rep.max_id,
                                 "cosine_sim_score": pytest.approx(rep.score)}
    assert find_clip(storage, "no-such-id") is None
    stats = score_stats(storage, examples_eps=0.01)
    assert sorted(stats.sizes.values()) == sorted(int(n) for n in report.cluster_sizes if n)
    assert stats.total == report.n_rows == stats.histogram.sum()
    assert stats.removed[0.01] == report.summary[0.01]["removed"]
    # examples: removed clips only, lowest scores first, at most 2 per cluster
    assert stats.examples and stats.examples == sorted(stats.examples)
    assert all(s >= 0.99 and i != m for s, _, i, m in stats.examples)
    per_cluster = [c for _, c, _, _ in stats.examples]
    assert max(per_cluster.count(c) for c in per_cluster) <= 2

    text = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "inspect", str(out), "--id",
                           clip], capture_output=True, text=True, check=True).stdout
    assert f"id {clip}: cluster {rep.cluster}" in text and "eps 0.01: REMOVED" in text
    assert rep.max_id in text and "largest clusters" in text
    # An id that is in no pruning table is bad input: the report, then one error line, status 1.
    run = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "inspect", str(out), "--id",
                          clip, "--id", "no-such-clip"], capture_output=True, text=True)
    assert run.returncode == 1 and f"id {clip}: cluster {rep.cluster}" in run.stdout
    assert run.stderr.strip().splitlines() == [
        f"semdedup: error: {out}: clip no-such-clip not found in any pruning table"]


def test_inspect_on_s3(finished, s3_client, s3_endpoint, aws_profile):
    _, _, out, report, _ = finished
    s3_client.create_bucket(Bucket="results")
    upload_folder(s3_client, "results", "runs/r1", out)
    storage = Storage("s3://results/runs/r1", S3Options(aws_profile, s3_endpoint))
    assert score_stats(storage).removed[0.01] == \
        report.summary[0.01]["removed"]
    text = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "inspect",
                           "s3://results/runs/r1", "--aws-profile", aws_profile,
                           "--aws-endpoint-url", s3_endpoint], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "removed fraction by eps" in text.stdout
    # A sweep on S3: the record notes it while under way, and lists the eps once done.
    rows = sweep(storage, [0.05])
    record = json.loads(storage.read_bytes(layout.RUN_RECORD))
    assert list(record["swept_eps"]) == ["0.05"] and run_record.SWEEP_UNDER_WAY not in record
    assert record["swept_eps"]["0.05"]["removed"] == rows[0.05]["removed"]
    assert storage.exists(layout.summary_csv(0.05))


def test_sweep_as_a_dagster_job(finished, tmp_path):
    _, _, out, _, _ = finished
    work = tmp_path / "d"
    subprocess.run(["cp", "-r", str(out), str(work)], check=True)
    result = semdedup_sweep_job.execute_in_process(
        run_config={"ops": {"sweep_eps": {"config": {"output_path": str(work),
                                                      "eps_to_extract": [0.07]}}}},
        instance=DagsterInstance.ephemeral(), resources={"layout_storage": LayoutStorage()})
    assert result.success
    assert (work / "extraction/dedup_summary_0.07.csv").read_text().startswith(
        "eps,kept,removed,total\n0.07,")


def test_a_killed_sweep_is_undone_by_the_next(finished, tmp_path, caplog):
    """A sweep SIGKILLed after writing everything for a new eps (parts, summary, audit) but
    before its record: no chance to undo. The record notes the sweep under way; the next
    sweep removes the killed one's eps, puts the audit back, and leaves the folder as a sweep
    of its own eps alone would (the record aside, which lists only what was swept)."""
    _, _, out, _, _ = finished
    killed, alone = tmp_path / "killed", tmp_path / "alone"
    for folder in (killed, alone):
        subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    audit_before = (killed / layout.AUDIT).read_bytes()
    script = (
        "import os, signal, sys\n"
        "from semdedup_core import run_record\n"
        "from semdedup_core.extraction import sweep\n"
        "from semdedup_core.storage import Storage\n"
        "run_record.add_swept_eps = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "sweep(Storage(sys.argv[1]), [0.2])\n")
    died = subprocess.run([sys.executable, "-c", script, str(killed)], capture_output=True)
    assert died.returncode == -9, died.stderr
    assert (killed / layout.summary_csv(0.2)).exists()
    assert (killed / layout.unique_ids_dir(0.2)).is_dir()
    assert (killed / layout.AUDIT).read_bytes() != audit_before
    assert run_record.interrupted_sweep(Storage(str(killed)))["new_eps"] == ["0.2"]
    seen = subprocess.run([sys.executable, "-m", "semdedup_core.cli", "inspect", str(killed)],
                          capture_output=True, text=True)
    assert seen.returncode == 0 and "a sweep of eps 0.2 (run " in seen.stderr
    assert "stopped before it finished: what the report shows for those eps" in seen.stderr

    with caplog.at_level("WARNING", logger="semdedup_core.extraction"):
        sweep(Storage(str(killed)), [0.05])
    assert "stopped before it finished; removing what it wrote for eps 0.2" in caplog.text
    sweep(Storage(str(alone)), [0.05])
    record = json.loads((killed / layout.RUN_RECORD).read_text())
    assert run_record.SWEEP_UNDER_WAY not in record and list(record["swept_eps"]) == ["0.05"]
    same = {k: v for k, v in file_bytes(killed).items() if k != layout.RUN_RECORD}
    assert same == {k: v for k, v in file_bytes(alone).items() if k != layout.RUN_RECORD}
