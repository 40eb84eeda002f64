"""The run's arguments in Dagster: one `semdedup` resource, configured per run, that the
`semdedup` job's ops, every asset and the asset checks read. Its fields are generated from the
engine's `DedupConfig` (one source of truth), so the launchpad shows every documented argument
with its default, description and choices, and marks the required ones.

    resources:
      semdedup:
        config: {input_embeddings_path: ..., n_clusters: 1000, eps_to_extract: [0.01]}

Dagster's config schema cannot say "a number or a list", so `eps_to_extract` is a list there;
`semdedup-dagster-config` turns a job spec's scalar eps into a one-element list. Ranges and the
rules across fields (eps in [1e-4, 1), output_path outside the input...) are the engine's: they
are checked at the start of every step, with the command line's one-line message.
"""

import sys
from typing import Any

import pydantic
from dagster import ConfigurableResource

from semdedup_core.config import DedupConfig, make_config, parse_job_spec

RESOURCE_KEY = "semdedup"  # the run config's `resources:` key
ASSIGN_OP = "assign_shards"  # the op whose config says how clusters are split into steps


class _EngineConfigResource(ConfigurableResource):
    def engine(self) -> DedupConfig:
        """The engine's validated config (a ConfigError with the CLI's one line if invalid)."""
        values = {k: getattr(self, k) for k in DedupConfig.model_fields}
        return make_config(**{k: v for k, v in values.items() if v is not None})


def _engine_fields() -> dict[str, Any]:
    fields = {}
    for name, f in DedupConfig.model_fields.items():
        default = ... if f.is_required() else f.default
        fields[name] = (f.annotation, pydantic.Field(default=default, description=f.description))
    return fields


SemdedupResource = pydantic.create_model(
    "SemdedupResource",
    __base__=_EngineConfigResource,
    __doc__="The documented semdedup arguments of a run (see README), read by every step.",
    __module__=__name__,
    **_engine_fields(),
)


def run_config_for(args: dict[str, Any], centroids_per_step: int | None = None,
                   report_partitions: bool | None = None) -> dict[str, Any]:
    """Run config for documented args (a job spec's `args`), normalised as Dagster's schema
    wants them (eps as a list, numbers as numbers). It serves the `semdedup` job and any
    selection of the assets alike; `centroids_per_step` and `report_partitions` are the job's
    own knobs (op config of assign_shards)."""
    values = make_config(**args).model_dump(exclude_unset=True)
    config: dict[str, Any] = {"resources": {RESOURCE_KEY: {"config": values}}}
    knobs = {name: value for name, value in (("centroids_per_step", centroids_per_step),
                                             ("report_partitions", report_partitions))
             if value is not None}
    if knobs:
        config["ops"] = {ASSIGN_OP: {"config": knobs}}
    return config


def job_spec_to_run_config(source: str | dict, overrides: dict[str, Any] | None = None,
                           centroids_per_step: int | None = None) -> dict[str, Any]:
    """`{"pipeline": "semantic-dedup", "args": {...}}` (+ overrides, merged first) -> run config."""
    return run_config_for(parse_job_spec(source, overrides), centroids_per_step)


def main(argv: list[str] | None = None) -> int:
    """`semdedup-dagster-config SPEC.json [--flag VALUE ...]`: print the run config YAML for a
    job spec; flags (those of `semdedup run`) override the spec's args, as on the command line."""
    import argparse

    import yaml

    from semdedup_core.cli import add_config_options, given_config_flags
    from semdedup_core.errors import SemdedupError

    p = argparse.ArgumentParser(
        prog="semdedup-dagster-config",
        description="Print the Dagster run config (YAML) for a JSON job spec. It works for "
                    "`dagster job execute -j semdedup -c` and `dagster asset materialize -c`, "
                    "and can be pasted into the launchpad.")
    p.add_argument("job_spec", help='file with {"pipeline": "semantic-dedup", "args": {...}}')
    p.add_argument("--centroids-per-step", type=int, default=None,
                   help="clusters per parallel step of the `semdedup` job (default: 250)")
    add_config_options(p)
    ns = p.parse_args(argv)
    try:
        config = job_spec_to_run_config(ns.job_spec, given_config_flags(ns),
                                        ns.centroids_per_step)
    except SemdedupError as exc:
        print(f"semdedup-dagster-config: error: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0
