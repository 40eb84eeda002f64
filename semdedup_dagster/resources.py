"""Resources: where the layout is written and how S3 is reached (one place for a deployment's
S3 endpoint, profile, region and keys; keys come from EnvVar and are never shown)."""

import os
from typing import Optional

from dagster import ConfigurableResource, EnvVar

from semdedup_core.config import DedupConfig
from semdedup_core.pipeline import open_source, output_storage
from semdedup_core.storage import S3Options, Storage


class LayoutStorage(ConfigurableResource):
    """S3 access for inputs, outputs and watched prefixes. The run config's own aws_* values,
    when set, take precedence field by field."""

    aws_profile: Optional[str] = None
    aws_endpoint_url: Optional[str] = None
    aws_region: Optional[str] = None
    aws_access_key_id: Optional[str] = None
    aws_secret_access_key: Optional[str] = None
    aws_session_token: Optional[str] = None

    def s3_options(self) -> S3Options:
        return S3Options(self.aws_profile, self.aws_endpoint_url, self.aws_region,
                         self.aws_access_key_id, self.aws_secret_access_key,
                         self.aws_session_token)

    def output(self, cfg: DedupConfig) -> Storage:
        return output_storage(cfg, self.s3_options())

    def open_input(self, cfg: DedupConfig, share: str | None = None, keep: bool = False):
        return open_source(cfg, self.s3_options(), share, keep)

    def location(self, uri: str) -> Storage:
        return Storage(uri, self.s3_options())


def layout_storage_from_env() -> LayoutStorage:
    """The deployment's LayoutStorage: SEMDEDUP_AWS_* variables, secrets as EnvVar so Dagster
    resolves them at run time and never stores or shows their values."""

    def plain(name: str) -> Optional[str]:
        return os.environ.get(name) or None

    def secret(name: str):
        return EnvVar(name) if os.environ.get(name) else None

    return LayoutStorage(
        aws_profile=plain("SEMDEDUP_AWS_PROFILE"),
        aws_endpoint_url=plain("SEMDEDUP_AWS_ENDPOINT_URL"),
        aws_region=plain("SEMDEDUP_AWS_REGION"),
        aws_access_key_id=secret("SEMDEDUP_AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=secret("SEMDEDUP_AWS_SECRET_ACCESS_KEY"),
        aws_session_token=secret("SEMDEDUP_AWS_SESSION_TOKEN"),
    )


OP_OUTPUT_PATH_ENV = "SEMDEDUP_OP_OUTPUT_PATH"


def op_output_io_manager(storage: LayoutStorage):
    """Where the ops of the `semdedup` job pass their small outputs (the run's arguments, the
    cluster batches, removal counts) from step to step.

    SEMDEDUP_OP_OUTPUT_PATH=s3://bucket/prefix: pickles on S3 under that prefix (reached like the
    layout, through `storage`), so steps may run on different machines (one pod per step with
    the k8s executor). Unset: None, i.e. Dagster's default filesystem IO manager under
    DAGSTER_HOME, which only steps on one machine share."""
    uri = os.environ.get(OP_OUTPUT_PATH_ENV)
    if not uri:
        return None
    from dagster_aws.s3 import S3PickleIOManager, S3Resource

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"{OP_OUTPUT_PATH_ENV}={uri!r}: expected s3://bucket/prefix")
    return S3PickleIOManager(
        s3_resource=S3Resource(
            profile_name=storage.aws_profile, endpoint_url=storage.aws_endpoint_url,
            region_name=storage.aws_region, aws_access_key_id=storage.aws_access_key_id,
            aws_secret_access_key=storage.aws_secret_access_key,
            aws_session_token=storage.aws_session_token),
        s3_bucket=bucket, s3_prefix=prefix.strip("/") or "dagster")
