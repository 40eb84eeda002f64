"""Corpora on Dagster: a corpus per watched folder, each new drop added by one run.

Configured by `SEMDEDUP_CORPORA`, a JSON list with one object per corpus:
    {"name": "clips", "watch_path": "s3://bucket/incoming", "corpus_path": "s3://bucket/corpus",
     "n_clusters": 1000, "eps_to_extract": [0.01], "settle_seconds": 60, "args": {...},
     "sensor_running": false}
(`args`: any other run argument of `semdedup corpus add`), or in code with
`corpus_definitions(CorpusSpec(...))`. For each corpus `<name>`:

- assets (group `corpus`): `corpus/<name>/drops`, one dynamic partition per drop (materialised
  when the drop is committed; metadata: clips, removed per eps inside the drop and of earlier
  drops, drift, the removed-vs-eps plot); `corpus/<name>/centroids`, one partition per centroid,
  registered and materialised once, at the fit; `corpus/<name>/growth`: the corpus over drops;
- the job `corpus_<name>_add`: materialises one drop partition, i.e. adds that drop;
- the sensor `corpus_<name>_sensor` (stopped unless `sensor_running`): each new complete drop
  under the watched folder (the drop sensor's rules) becomes one run of that job, in path order.
  Its runs carry the tag `semdedup/corpus: <corpus path>`, limited to one run at a time per value
  by the instance's run queue (deploy/dagster.yaml), so the queue holds them; the engine's corpus
  lock waits too.
"""

import json
import os
import re
import time
from dataclasses import dataclass, field

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    Config,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    define_asset_job,
    in_process_executor,
    sensor,
)

from semdedup_core import layout
from semdedup_core.config import eps_text
from semdedup_core.corpus import add_drop, format_add, read_manifest
from semdedup_core.errors import SemdedupError
from semdedup_core.extraction import pruned_clusters
from semdedup_core.inspection import EPS_GRID, score_stats
from semdedup_dagster.plots import corpus_growth_png, removed_vs_eps_png
from semdedup_dagster.resources import LayoutStorage
from semdedup_dagster.sensors import find_drops

CORPORA_ENV = "SEMDEDUP_CORPORA"
CORPUS_TAG = "semdedup/corpus"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class CorpusSpec:
    """One watched folder and the corpus its drops are added to."""

    name: str  # [A-Za-z0-9_]+: asset keys, job and sensor names
    watch_path: str
    corpus_path: str
    n_clusters: int = 1000  # used by the first add (the fit)
    eps_to_extract: tuple[float, ...] = (0.01,)
    settle_seconds: int = 60
    args: dict = field(default_factory=dict, hash=False)
    sensor_running: bool = False  # the sensor's default status (else: start it in the UI)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"{CORPORA_ENV}: corpus name {self.name!r}: use letters, digits, _")


def corpus_specs_from_env(environ) -> list[CorpusSpec]:
    raw = environ.get(CORPORA_ENV, "").strip()
    if not raw:
        return []
    try:
        items = json.loads(raw)
        return [CorpusSpec(**{**item, "eps_to_extract": tuple(item.get("eps_to_extract", [0.01]))})
                for item in items]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{CORPORA_ENV}: expected a JSON list of corpus objects ({exc})") from None


def drop_name(drop_path: str) -> str:
    """A drop's name in the corpus from its path under the watched folder
    (`2026-11-30/iv2_embd_parquet` -> `2026-11-30.iv2_embd_parquet`)."""
    stem = drop_path[:-len(".zip")] if drop_path.lower().endswith(".zip") else drop_path
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", stem.strip("/").replace("/", ".")).strip(".-")[:128]


class CorpusDropConfig(Config):
    """The drop to add; the partition key is its name in the corpus."""

    input_embeddings_path: str
    args_json: str = "{}"  # run arguments for this add beside the corpus's (e.g. eps_to_extract)


def _drop_metadata(storage, spec: CorpusSpec, report) -> dict:
    drop = storage.location(spec.corpus_path).child(layout.drop_dir(report.name))
    stats = score_stats(drop, pruned_clusters(drop), EPS_GRID)
    table = "| eps | removed | inside the drop | of earlier drops |\n|---|---|---|---|\n" + "".join(
        f"| {eps_text(e)} | {r['removed']:,} | {r['inside']:,} | {r['earlier']:,} |\n"
        for e, r in report.removed.items())
    meta = {"clips": report.clips, "drop": report.index + 1,
            "clusters_touched": report.clusters_touched,
            "earlier_clips_compared": report.earlier_clips_read,
            "removed": MetadataValue.md(table),
            "mean_cosine_dist": report.mean_cosine_dist, "drift": report.drift,
            "removed_vs_eps_plot": removed_vs_eps_png(
                EPS_GRID, [stats.removed[e] / max(report.clips, 1) for e in EPS_GRID],
                f"Removed vs eps: {report.name}"),
            "path": MetadataValue.path(drop.display())}
    for e, r in report.removed.items():
        meta.update({f"removed_{eps_text(e)}": r["removed"],
                     f"removed_inside_{eps_text(e)}": r["inside"],
                     f"removed_earlier_{eps_text(e)}": r["earlier"]})
    return meta


def _growth_metadata(manifest: dict) -> dict:
    drops = manifest["drops"]
    eps = next(iter(drops[-1]["eps"]))
    kept = [d["clips"] - d["eps"].get(eps, {"removed": 0})["removed"] for d in drops]
    return {"drops": len(drops), "clips": sum(d["clips"] for d in drops),
            f"kept_{eps}": sum(kept),
            "growth_plot": corpus_growth_png([d["name"] for d in drops],
                                             [d["clips"] for d in drops], kept, eps)}


def corpus_definitions(spec: CorpusSpec) -> dict:
    """The assets, job and sensor of one corpus, as {"assets", "jobs", "sensors"} lists."""
    drops = DynamicPartitionsDefinition(name=f"corpus_{spec.name}_drops")
    centroids = DynamicPartitionsDefinition(name=f"corpus_{spec.name}_centroids")
    prefix = ["corpus", spec.name]
    centroids_key, growth_key = AssetKey([*prefix, "centroids"]), AssetKey([*prefix, "growth"])
    centroid_spec = AssetSpec(centroids_key, partitions_def=centroids, group_name="corpus",
                              description=f"The centroids of {spec.corpus_path}, one partition "
                                          "per centroid, fixed at the corpus's fit.")
    growth_spec = AssetSpec(growth_key, group_name="corpus",
                            description=f"{spec.corpus_path} over its drops.")

    @asset(key=AssetKey([*prefix, "drops"]), partitions_def=drops, group_name="corpus",
           description=f"Drops of {spec.watch_path} added to the corpus {spec.corpus_path}: "
                       "each partition is one drop, deduplicated against every earlier drop.")
    def corpus_drop(context: AssetExecutionContext, config: CorpusDropConfig,
                    layout_storage: LayoutStorage) -> MaterializeResult:
        args = {"n_clusters": spec.n_clusters, "eps_to_extract": list(spec.eps_to_extract),
                **spec.args, **json.loads(config.args_json or "{}"),
                "input_embeddings_path": config.input_embeddings_path}
        manifest = read_manifest(layout_storage.location(spec.corpus_path))
        if manifest is not None:  # later adds: the corpus's own settings
            args.pop("n_clusters")
        try:
            report = add_drop(spec.corpus_path, context.partition_key, args,
                              s3=layout_storage.s3_options(), wait=True)
        except SemdedupError as exc:
            raise Failure(description=str(exc)) from None
        context.log.info(format_add(report))
        if report.fitted:
            keys = [str(k) for k in range(len(report.cluster_sizes))]
            context.instance.add_dynamic_partitions(centroids.name, keys)
            for k in keys:
                context.log_event(AssetMaterialization(
                    centroids_key, partition=k,
                    metadata={"clips_of_first_drop": int(report.cluster_sizes[int(k)])}))
        manifest = read_manifest(layout_storage.location(spec.corpus_path))
        context.log_event(AssetMaterialization(growth_key, metadata=_growth_metadata(manifest)))
        return MaterializeResult(metadata=_drop_metadata(layout_storage, spec, report))

    # One step: in process, sparing a step process start per drop.
    job = define_asset_job(f"corpus_{spec.name}_add", selection=[corpus_drop.key],
                           tags={CORPUS_TAG: spec.corpus_path},
                           executor_def=in_process_executor,
                           description=f"Add one drop to {spec.corpus_path}.")

    @sensor(name=f"corpus_{spec.name}_sensor", job=job,
            default_status=DefaultSensorStatus.RUNNING if spec.sensor_running
            else DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=int(os.environ.get("SEMDEDUP_SENSOR_INTERVAL_SECONDS", "30")),
            description=f"Each new drop under {spec.watch_path} becomes one run adding it to "
                        f"{spec.corpus_path}.")
    def corpus_sensor(context: SensorEvaluationContext, layout_storage: LayoutStorage):
        watch = layout_storage.location(spec.watch_path)
        corpus_root = layout_storage.location(spec.corpus_path).display().rstrip("/")
        base = watch.display().rstrip("/")
        skip = corpus_root[len(base) + 1:] if corpus_root.startswith(base + "/") else None
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        found = find_drops(watch, time.time(), spec.settle_seconds, skip=skip)
        names, requests = [], []
        for path, fingerprint in sorted(found.items()):
            if seen.get(path) == fingerprint:
                continue
            name = drop_name(path)
            if path in seen:  # rewritten: new data under a new name
                name = f"{name}+{fingerprint[:8]}"
            names.append(name)
            requests.append(RunRequest(
                run_key=f"{path}@{fingerprint}", partition_key=name,
                run_config={"ops": {corpus_drop.op.name: {"config": {
                    "input_embeddings_path": watch.display(path)}}}},
                tags={CORPUS_TAG: spec.corpus_path}))
            seen[path] = fingerprint
        context.update_cursor(json.dumps(seen, sort_keys=True))
        if not requests:
            return SkipReason(f"no new drops under {watch.display()}")
        return SensorResult(run_requests=requests,
                            dynamic_partitions_requests=[drops.build_add_request(names)])

    return {"assets": [corpus_drop, centroid_spec, growth_spec], "jobs": [job],
            "sensors": [corpus_sensor]}


def corpora_definitions(specs: list[CorpusSpec]) -> dict:
    merged: dict[str, list] = {"assets": [], "jobs": [], "sensors": []}
    for spec in specs:
        for key, items in corpus_definitions(spec).items():
            merged[key] += items
    return merged

