"""Dagster run config, derived from the engine's `DedupConfig` (one source of truth): the
launchpad shows every documented argument with its default, description and choices."""

from typing import Any

import pydantic
from dagster import Config

from semdedup_core.config import DedupConfig, make_config, parse_job_spec

# Ops that take the run's config. The job's first op receives it; the others get it downstream.
FIT_OP = "fit_centroids"


def _engine_fields() -> dict[str, Any]:
    fields = {}
    for name, f in DedupConfig.model_fields.items():
        default = ... if f.is_required() else f.default
        fields[name] = (f.annotation, pydantic.Field(default=default, description=f.description))
    return fields


SemdedupConfig = pydantic.create_model(
    "SemdedupConfig",
    __base__=Config,
    __doc__="The documented semdedup arguments (see README), plus how work is split into steps.",
    centroids_per_step=(int, pydantic.Field(
        default=250, ge=1,
        description="Clusters deduplicated per step of the `semdedup` job; steps run in parallel "
                    "(processes locally, pods on Kubernetes).")),
    **_engine_fields(),
)


def to_engine(config: Config) -> DedupConfig:
    """The engine's validated config (eps range, zip rules...) from Dagster run config."""
    values = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    return make_config(**{k: v for k, v in values.items() if k in DedupConfig.model_fields})


def run_config_for(args: dict[str, Any]) -> dict[str, Any]:
    """Run config of the `semdedup` job for documented args (a job spec's `args`)."""
    return {"ops": {FIT_OP: {"config": dict(args)}}}


def job_spec_to_run_config(source: str | dict) -> dict[str, Any]:
    """`{"pipeline": "semantic-dedup", "args": {...}}` -> run config, 1:1 (checked)."""
    return run_config_for(parse_job_spec(source))


def main(argv: list[str] | None = None) -> int:
    """`semdedup-dagster-config SPEC.json`: print the run config YAML for a job spec."""
    import argparse
    import sys

    import yaml

    from semdedup_core.errors import SemdedupError

    p = argparse.ArgumentParser(prog="semdedup-dagster-config",
                                description="Print the Dagster run config (YAML) of the `semdedup`"
                                            " job for a JSON job spec.")
    p.add_argument("job_spec", help='file with {"pipeline": "semantic-dedup", "args": {...}}')
    ns = p.parse_args(argv)
    try:
        print(yaml.safe_dump(job_spec_to_run_config(ns.job_spec), sort_keys=False), end="")
    except SemdedupError as exc:
        print(f"semdedup-dagster-config: error: {exc}", file=sys.stderr)
        return 1
    return 0

