"""A schedule that re-runs one configured input (a JSON job spec) on a cadence. Stopped by
default; `SEMDEDUP_SCHEDULE_JOB_SPEC` names the spec, `SEMDEDUP_SCHEDULE_CRON` the cadence."""

import os

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, SkipReason, \
    schedule

from semdedup_dagster.config import job_spec_to_run_config
from semdedup_core.config import parse_job_spec
from semdedup_dagster.jobs import output_tag, semdedup_job


@schedule(job=semdedup_job, cron_schedule=os.environ.get("SEMDEDUP_SCHEDULE_CRON", "0 2 * * *"),
          default_status=DefaultScheduleStatus.STOPPED,
          description="Re-run the job spec named by SEMDEDUP_SCHEDULE_JOB_SPEC.")
def semdedup_schedule(context: ScheduleEvaluationContext):
    spec = os.environ.get("SEMDEDUP_SCHEDULE_JOB_SPEC")
    if not spec:
        return SkipReason("set SEMDEDUP_SCHEDULE_JOB_SPEC to a job spec file")
    return RunRequest(run_key=context.scheduled_execution_time.isoformat(),
                      run_config=job_spec_to_run_config(spec),
                      tags=output_tag(parse_job_spec(spec)))
