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
    """SEMDEDUP_EXECUTOR=k8s runs each step in its own pod (dagster-k8s); else one process per
    step locally (in-process for execute_in_process). Explicit, because the Definitions' default
    executor (for asset runs, a chain with nothing to run in parallel) is in-process."""
    if os.environ.get("SEMDEDUP_EXECUTOR") == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    from dagster import multiprocess_executor

    return multiprocess_executor
