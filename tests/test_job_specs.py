"""Job specs through every door, replayed VERBATIM from the README: `semdedup run --job-spec`
(flags beside it override), `semdedup-dagster-config` then `dagster job execute` and `dagster
asset materialize` (with a partition range), and the schedule. Plus the small command-line
items: one-line errors, required flags marked, both eps spellings, output apart from input."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from dagster import DagsterInstance, build_schedule_context

from semdedup_core.cli import main as semdedup_main
from semdedup_core.config import make_config, parse_job_spec
from semdedup_core.errors import ConfigError
from semdedup_core.pipeline import run_pipeline
from semdedup_dagster.config import job_spec_to_run_config
from semdedup_dagster.definitions import defs
from tests.conftest import REPO
from tests.test_end_to_end import tree

BIN = os.path.dirname(sys.executable)
README = open(os.path.join(REPO, "README.md")).read()


def readme_block(after: str, lang: str = "bash") -> str:
    """The first ```lang block of the README after the text `after`."""
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    return match.group(1)


CLI_BLOCK = readme_block("### Job specs")
DAGSTER_BLOCK = readme_block("**Run config: the arguments, given once.**")
RUN_YAML = readme_block("`run.yaml` then reads:", "yaml")


def spec_from_readme(name: str) -> str:
    return re.search(rf"cat > {re.escape(name)} <<'EOF'\n(.*?)\nEOF", CLI_BLOCK, re.S).group(1)


MAKE_CLIPS = re.search(r"this command made the clips they name:\n`([^`]*)`", README).group(1)


@pytest.fixture
def workdir(tmp_path):
    """The folder the README's commands run in: clips/iv2_embd_parquet and clips.zip, made by
    the README's own command."""
    made = bash(MAKE_CLIPS, tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "clips.zip").is_file()
    return tmp_path


def bash(script: str, cwd, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], **env}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=900)


def test_readme_job_specs_verbatim_through_cli_job_and_assets(workdir):
    cli = bash(CLI_BLOCK, workdir)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "clips_dedup" in cli.stdout and "clips_semdedup" in cli.stdout
    by_cli = {name: tree(workdir / name) for name in ("clips_dedup", "clips_semdedup")}
    assert (workdir / "clips_semdedup/extraction/dedup_summary_0.01.csv").exists()
    # Flags beside the spec override it: 5 clusters into nightly5, both eps of the spec.
    centroids = workdir / "nightly5/clustering_results/kmeans_centroids.npy"
    import numpy as np
    assert np.load(centroids).shape[0] == 5
    assert (workdir / "nightly5/extraction/dedup_summary_0.05.csv").exists()

    home = workdir / "dagster_home"
    home.mkdir()
    dg = bash(DAGSTER_BLOCK, workdir, DAGSTER_HOME=str(home))
    assert dg.returncode == 0, (dg.stdout + dg.stderr)[-4000:]
    assert yaml.safe_load((workdir / "run.yaml").read_text()) == yaml.safe_load(RUN_YAML)
    # The job, and the assets one by one over a partition range, wrote the CLI's bytes.
    assert tree(workdir / "clips_dedup") == by_cli["clips_dedup"]
    assert tree(workdir / "clips_semdedup") == by_cli["clips_semdedup"]
    # No warning lines from our definitions (Dagster's CLI itself flags its commands as
    # superseded by `dg launch`, before it loads any code).
    assert "BetaWarning" not in dg.stderr
    assert {line.split(": ")[1] for line in dg.stderr.splitlines() if "Warning: " in line} \
        <= {"SupersessionWarning"}

    instance = DagsterInstance.from_config(str(home))
    runs = instance.get_runs()
    assert len(runs) == 3 and all(r.is_success for r in runs)
    job_run = next(r for r in runs if r.job_name == "semdedup")
    steps = {s.step_key for s in instance.get_run_step_stats(job_run.run_id)}
    assert sum(1 for s in steps if s.startswith("dedup_clusters[")) == 2  # 4 clusters, 2 a step
    ranged = next(r for r in runs if r.tags.get("dagster/asset_partition_range_end") == "3")
    assert len(instance.get_run_step_stats(ranged.run_id)) == 3  # a step per asset op
    assert instance.get_dynamic_partitions("centroids") == ["0", "1", "2", "3"]
    from dagster import AssetCheckKey, AssetKey
    for asset, check in (("kmeans_centroids", "partitions_match_n_clusters"),
                         ("dedup_summary", "one_pruning_table_per_shard"),
                         ("dedup_summary", "kept_plus_removed_is_total")):
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(AssetKey(asset), check)])[AssetCheckKey(AssetKey(asset), check)]
        evaluation = record.event.dagster_event.event_specific_data
        assert evaluation.passed, (asset, check, evaluation.description)


def test_readme_dedup_spec_through_the_schedule(workdir, monkeypatch):
    """`"pipeline": "dedup"`, verbatim, named by SEMDEDUP_SCHEDULE_JOB_SPEC; the request runs."""
    from semdedup_dagster.schedules import semdedup_schedule

    (workdir / "nightly.json").write_text(spec_from_readme("nightly.json"))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SEMDEDUP_SCHEDULE_JOB_SPEC", "nightly.json")
    import datetime

    request = semdedup_schedule(build_schedule_context(
        scheduled_execution_time=datetime.datetime(2026, 11, 26, 2, tzinfo=datetime.timezone.utc)))
    result = defs.resolve_job_def("semdedup").execute_in_process(
        run_config=request.run_config, instance=DagsterInstance.ephemeral())
    assert result.success
    args = json.loads(spec_from_readme("nightly.json"))["args"]
    run_pipeline(make_config(**{**args, "output_path": "engine"}))
    assert tree(workdir / "nightly_dedup") == tree(workdir / "engine")


def test_zip_spec_merges_flags_before_validating(tmp_path):
    zip_spec = json.loads(spec_from_readme("zip-spec.json"))
    assert zip_spec == {"pipeline": "semantic-dedup",
                        "args": {"n_clusters": 4, "max_iter": 100, "eps_to_extract": 0.01}}
    args = parse_job_spec(zip_spec, {"input_embeddings_path": "clips.zip"})
    assert make_config(**args).resolved_output_path == "clips_semdedup"
    with pytest.raises(ConfigError, match="input_embeddings_path: required"):
        parse_job_spec(zip_spec)
    # A bad value given by a flag beside the spec is named as the flag's, not the spec's.
    with pytest.raises(ConfigError, match=r"^--cross-cluster-max-probes: invalid arguments: "
                                          r"cross_cluster_max_probes: "):
        parse_job_spec(zip_spec, {"input_embeddings_path": "clips.zip",
                                  "cross_cluster_max_probes": -1})
    with pytest.raises(ConfigError, match=r"^job spec and --n-clusters: invalid arguments: "):
        parse_job_spec({**zip_spec, "args": {**zip_spec["args"], "max_iter": 0}},
                       {"input_embeddings_path": "clips.zip", "n_clusters": 0})
    config = job_spec_to_run_config(zip_spec, {"input_embeddings_path": "clips.zip"})
    assert config["resources"]["semdedup"]["config"]["eps_to_extract"] == [0.01]
    # The printed config is valid for the job and for the assets (Dagster's own validation).
    from dagster._core.execution.api import create_execution_plan  # noqa: F401
    from dagster._core.system_config.objects import ResolvedRunConfig

    for job in (defs.resolve_job_def("semdedup"), defs.resolve_implicit_global_asset_job_def()):
        ResolvedRunConfig.build(job, config)
    path = tmp_path / "zip-spec.json"
    path.write_text(spec_from_readme("zip-spec.json"))
    bad = subprocess.run([os.path.join(BIN, "semdedup-dagster-config"), str(path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"semdedup-dagster-config: error: job spec {path}: invalid arguments: "
        "input_embeddings_path: required"]


def test_readme_job_overrides_validate_against_the_job():
    """The run config the README gives inline for the `semdedup` job (step processes, partition
    reports) is accepted by Dagster's own validation of the job, added to run.yaml."""
    from dagster._core.system_config.objects import ResolvedRunConfig

    execution = re.search(r"`(execution: \{config: \{multiprocess: \{max_concurrent: N\}\}\})`",
                          README).group(1)
    assert "`report_partitions: true` (or `false`) under `assign_shards`" in README
    config = yaml.safe_load(RUN_YAML)
    config.update(yaml.safe_load(execution.replace("N", "2")))
    config["ops"]["assign_shards"]["config"]["report_partitions"] = True
    job = defs.resolve_job_def("semdedup")
    default = ResolvedRunConfig.build(job, yaml.safe_load(RUN_YAML))
    assert list(default.execution.execution_engine_config) == ["in_process"]
    resolved = ResolvedRunConfig.build(job, config)
    assert resolved.execution.execution_engine_config["multiprocess"]["max_concurrent"] == 2
    assert resolved.ops["assign_shards"].config["report_partitions"] is True


@pytest.mark.parametrize("output", ["in", "in/out", "."])
def test_output_equal_to_inside_or_around_the_input_is_refused(tmp_path, capsys, output):
    (tmp_path / "in").mkdir()
    code = semdedup_main(["run", "--input-embeddings-path", str(tmp_path / "in"),
                          "--output-path", str(tmp_path / output), "--n-clusters", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "must lie outside input_embeddings_path" in err[0]
    assert "Value error" not in err[0]
    assert os.listdir(tmp_path / "in") == []  # nothing written
    with pytest.raises(ConfigError, match="must lie outside"):
        make_config(input_embeddings_path="s3://b/drop", output_path="s3://b/drop/out",
                    n_clusters=2)
    make_config(input_embeddings_path="s3://b/drop", output_path="s3://b/drop_out", n_clusters=2)


def test_help_marks_required_flags_and_both_eps_spellings(capsys, tmp_path):
    with pytest.raises(SystemExit):
        semdedup_main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "s3://bucket/prefix. (required, here or in --job-spec)" in text
    assert "Number of K-means clusters. (required, here or in --job-spec)" in text
    assert "64 GiB" in text and "68719476736)" not in text.replace("= 68719476736", "")
    from semdedup_core.cli import build_parser

    ns = build_parser().parse_args(["run", "--eps", "0.02", "--eps-to-extract", "0.05"])
    assert ns.eps_to_extract == [0.02, 0.05]
    ns = build_parser().parse_args(["sweep", "out", "--eps-to-extract", "0.02"])
    assert ns.eps == [0.02]
