"""How the `semdedup` job runs on Kubernetes, all from the environment that
deploy/helm/values.yaml sets on the code location: the executor (one pod per step), the pods of
the computing steps (e.g. a GPU each) and the run worker's pod. Unset, the job runs as usual."""

import json
import os


def step_k8s_tags() -> dict:
    """Pod settings of the steps that compute (fit, assign, dedup: each runs the run's backend)
    on Kubernetes, e.g. GPU limits, tolerations, node selector, as the `dagster-k8s/config` op
    tag, from SEMDEDUP_STEP_K8S_CONFIG (JSON; set by deploy/helm/values.yaml)."""
    raw = os.environ.get("SEMDEDUP_STEP_K8S_CONFIG")
    return {"dagster-k8s/config": json.loads(raw)} if raw else {}


def run_k8s_tags() -> dict:
    """Pod settings of the run worker on Kubernetes, from SEMDEDUP_RUN_K8S_CONFIG (JSON). A run
    tag, because it is the one place that outranks the code location's own container config
    (which the Helm chart passes to launched runs)."""
    raw = os.environ.get("SEMDEDUP_RUN_K8S_CONFIG")
    return {"dagster-k8s/config": json.dumps(json.loads(raw))} if raw else {}


def job_executor():
    """SEMDEDUP_EXECUTOR=k8s runs each step in its own pod (dagster-k8s). Elsewhere the steps run
    one after the other in the run's own process unless the run config asks for
    `execution: {config: {multiprocess: {}}}`: on one machine a step already uses every core
    (BLAS and host threads) and the device, so parallel step processes only contend for them,
    and each costs seconds to start (imports, definitions, its own instance)."""
    if os.environ.get("SEMDEDUP_EXECUTOR") == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    from dagster import ExecutorDefinition, Field, multi_or_in_process_executor

    both = multi_or_in_process_executor  # Dagster's default, which starts in multiprocess mode
    return ExecutorDefinition(
        name="in_process_or_multiprocess",
        config_schema=Field(both.config_field.config_type, default_value={"in_process": {}}),
        requirements=both.get_requirements, executor_creation_fn=both.executor_creation_fn,
        description="Steps in the run's process (default) or, with `multiprocess`, one process "
                    "each.")
