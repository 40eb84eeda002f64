"""The new-drop sensor: watches a local folder or an S3 prefix and starts one `semdedup` run
per embedding drop (a `*_embd*_parquet/` folder or a `.zip`) once the drop has stopped changing.

A drop's fingerprint is the hash of its files' names, sizes and modification times; the cursor
keeps the fingerprint of every drop already started, and each RunRequest's run_key is
`<drop>@<fingerprint>`, so a drop starts exactly one run, and a rewritten drop starts another.
"""

import hashlib
import json
import os
import posixpath
import re
import time
from typing import Optional

from dagster import (
    ConfigurableResource,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from semdedup_core.storage import Storage
from semdedup_dagster.config import run_config_for
from semdedup_dagster.jobs import output_tag, semdedup_job
from semdedup_dagster.resources import LayoutStorage

DROP_DIR = re.compile(r"^.+_embd(_[^/]+)?_parquet$")
OUTPUT_SUFFIX = "_semdedup"  # a drop's outputs default to `<drop>_semdedup` beside it


def located(path: str) -> str:
    """A local path made absolute (a relative one is the daemon's working folder's: the runs
    it starts may start elsewhere); S3 URIs as they are."""
    return path if "://" in path else os.path.abspath(path)


class DropWatch(ConfigurableResource):
    """What the sensor watches and how it configures the runs it starts."""

    watch_path: str = ""  # local folder or s3://bucket/prefix; empty: the sensor skips
    output_root: str = ""  # empty: `<drop>_semdedup` beside each drop
    n_clusters: int = 1000
    eps_to_extract: list[float] = [0.01]
    settle_seconds: int = 60  # a drop is complete when unchanged this long
    extra_args_json: str = "{}"  # any other documented argument, as JSON

    def output_root_inside(self, watch: Storage) -> str | None:
        """`output_root` relative to the watched folder, when it lies inside it."""
        root = self.output_root.rstrip("/")
        if root:
            root = located(root)
        base = watch.display().rstrip("/")
        if root.startswith(base + "/"):
            return root[len(base) + 1:]
        return None

    def args_for(self, watch: Storage, drop: str) -> dict:
        """The run's arguments for `drop`, local paths absolute (`located`)."""
        stem = drop[:-len(".zip")] if drop.lower().endswith(".zip") else drop
        if self.output_root:
            output = posixpath.join(self.output_root.rstrip("/"), stem)
        else:
            output = watch.display(stem) + OUTPUT_SUFFIX
        args = {"input_embeddings_path": located(watch.display(drop)), "output_path": located(output),
                "n_clusters": self.n_clusters, "eps_to_extract": list(self.eps_to_extract)}
        args.update(json.loads(self.extra_args_json or "{}"))
        return args


def candidate_files(watch: Storage, skip: str | None = None) -> list[tuple[str, int, float]]:
    """(path, size, mtime) of the files that can belong to a drop. The walk lists each drop
    folder whole but does not descend into output folders (`*_semdedup`, or `skip`: an output
    root inside the watched folder): each run adds thousands of files there, and listing them
    every tick would grow without end (and output folders named after drops would look like
    drops)."""
    files, pending = [], [""]
    while pending:
        rel = pending.pop()
        level_files, level_dirs = watch.list_level(rel)
        files += [f for f in level_files if f[0].lower().endswith(".zip")]
        for name in level_dirs:
            sub = posixpath.join(rel, name) if rel else name
            if name.endswith(OUTPUT_SUFFIX) or sub == skip:
                continue
            if DROP_DIR.match(name):
                files += watch.list_file_infos(sub)
            else:
                pending.append(sub)
    return sorted(files)


def find_drops(watch: Storage, now: float, settle_seconds: float,
               skip: str | None = None, settling: dict[str, float] | None = None) -> dict[str, str]:
    """{drop path relative to the watched folder: fingerprint} of every complete drop; with
    `settling`, also {drop: seconds since its last change} of those still being written."""
    groups: dict[str, list] = {}
    for rel, size, mtime in candidate_files(watch, skip):
        parts = rel.split("/")
        if rel.lower().endswith(".zip"):
            groups[rel] = [(rel, size, mtime)]
            continue
        for depth in range(len(parts) - 1, 0, -1):  # the deepest *_embd*_parquet folder
            if DROP_DIR.match(parts[depth - 1]):
                groups.setdefault("/".join(parts[:depth]), []).append((rel, size, mtime))
                break
    drops = {}
    for drop, files in groups.items():
        if not drop.lower().endswith(".zip") and not any(f[0].endswith(".parquet")
                                                          for f in files):
            continue
        age = now - max(f[2] for f in files)
        if age < settle_seconds:  # still being written
            if settling is not None:
                settling[drop] = age
            continue
        digest = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]
        drops[drop] = digest
    return drops


@sensor(job=semdedup_job, default_status=DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=int(os.environ.get("SEMDEDUP_SENSOR_INTERVAL_SECONDS", "30")),
        description="One `semdedup` run per new or rewritten embedding drop under the watched "
                    "folder or S3 prefix (drop_watch resource).")
def embedding_drop_sensor(context: SensorEvaluationContext, drop_watch: DropWatch,
                          layout_storage: LayoutStorage):
    if not drop_watch.watch_path:
        return SkipReason("no watch_path configured (set SEMDEDUP_WATCH_PATH)")
    watch = layout_storage.location(drop_watch.watch_path)
    started: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    settling: dict[str, float] = {}
    drops = find_drops(watch, time.time(), drop_watch.settle_seconds,
                       skip=drop_watch.output_root_inside(watch), settling=settling)
    requests = []
    for drop, fingerprint in sorted(drops.items()):
        if started.get(drop) == fingerprint:
            continue
        args = drop_watch.args_for(watch, drop)
        # SEMDEDUP_EXTRA_ARGS may also set the job's own knobs, beside the documented arguments.
        knobs = (args.pop("centroids_per_step", None), args.pop("report_partitions", None))
        requests.append(RunRequest(run_key=f"{drop}@{fingerprint}",
                                   run_config=run_config_for(args, *knobs),
                                   tags={"semdedup/drop": args["input_embeddings_path"],
                                         "semdedup/backend": str(args.get("backend", "auto")),
                                         **output_tag(args)}))
        started[drop] = fingerprint
    context.update_cursor(json.dumps(started, sort_keys=True))
    if requests:
        return requests
    # A drop seen but not yet settled is named, so that its user knows it was found.
    waiting = "; ".join(f"{d} changed {age:.0f} s ago, starts once unchanged for "
                        f"{drop_watch.settle_seconds} s" for d, age in sorted(settling.items()))
    if waiting:
        return SkipReason(f"no drop ready under {watch.display()}; still being written: {waiting}")
    return SkipReason(f"no new drops under {watch.display()}")


def drop_watch_from_env(environ) -> DropWatch:
    def get(name: str, default: Optional[str] = None):
        return environ.get(name) or default

    return DropWatch(
        watch_path=get("SEMDEDUP_WATCH_PATH", ""),
        output_root=get("SEMDEDUP_OUTPUT_ROOT", ""),
        n_clusters=int(get("SEMDEDUP_N_CLUSTERS", "1000")),
        eps_to_extract=[float(e) for e in get("SEMDEDUP_EPS", "0.01").split(",")],
        settle_seconds=int(get("SEMDEDUP_SETTLE_SECONDS", "60")),
        extra_args_json=get("SEMDEDUP_EXTRA_ARGS", "{}"),
    )
