"""The documented arguments as one pydantic model, and job-spec parsing.

Every other surface (the `semdedup` command, Dagster run config, JSON job specs) is derived
from `DedupConfig`, so a default or a choice is written down exactly once.
"""

import json
import os
import posixpath
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semdedup_core.errors import ConfigError

EPS_MIN = 1e-4

PIPELINE_NAMES = ("semantic-dedup", "dedup")


def eps_text(eps: float) -> str:
    """The spelling of an eps in artifact names: Python's shortest float text (`0.01`)."""
    return repr(float(eps))


class DedupConfig(BaseModel):
    """Arguments of one semantic-dedup run (CLI `--kebab-case`, job specs and Dagster `snake_case`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The documented arguments (SPEC.md).
    input_embeddings_path: str = Field(
        description="Parquet folder or .zip of one, local or s3://bucket/prefix.")
    output_path: str | None = Field(
        default=None,
        description="Where the artifacts go, local or s3://. Required unless the input is a .zip "
                    "(then it defaults to <zip name>_semdedup beside the zip).")
    n_clusters: int = Field(ge=1, description="Number of K-means clusters.")
    max_iter: int = Field(default=100, ge=1, description="Maximum K-means iterations.")
    eps_to_extract: list[float] = Field(
        default=[0.01],
        description="Epsilon(s) in [1e-4, 1): a clip is removed when its similarity to an "
                    "earlier-ranked clip is >= 1 - eps. Each eps gets its own outputs.")
    sim_metric: Literal["cosine", "l2"] = Field(
        default="cosine", description="Distance to the centroid used to rank clips in a cluster.")
    which_to_keep: Literal["hard", "easy", "random"] = Field(
        default="hard",
        description="hard: keep the clip farthest from the centroid; easy: the nearest; "
                    "random: a seeded random one.")
    random_state: int = Field(
        default=42, ge=0, lt=2**32,
        description="Seed for K-means and the random ranking, in [0, 2**32) (a 32-bit seed, "
                    "as cuML and numpy's generators take).")

    # Extensions (SPEC.md "Extensions beyond the seed"; off by default, layout unchanged).
    cross_cluster: bool = Field(
        default=False,
        description="Also remove a clip when a clip of another cluster that comes earlier in "
                    "the global order is within eps of it (writes "
                    "extraction/semdedup_cross_cluster_tables).")
    cross_cluster_max_probes: int = Field(
        default=3, ge=0,
        description="With cross_cluster: how many neighbouring clusters each clip is compared "
                    "with, nearest bisector first (0: every cluster that the distance bound "
                    "cannot rule out, i.e. exact, and slow).")

    # Engine settings (documented in the README; not in SPEC's table).
    backend: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Compute backend: auto picks the GPU when CuPy runs a kernel "
                                    "and a matmul on a CUDA device, else the CPU.")
    gpu_kmeans: Literal["lloyd", "cuml"] = Field(
        default="lloyd",
        description="K-means fit on the GPU backend: lloyd (the project's, same rule as the CPU, "
                    "identical centroids on every run) or cuml (cuML's KMeans when installed: "
                    "faster at large n_clusters, not reproducible run to run). The CPU ignores it.")
    id_column: str = Field(default="id", description="Input column holding the clip id.")
    embedding_column: str = Field(default="embedding",
                                  description="Input column holding the embedding.")
    kmeans_sample_per_cluster: int = Field(
        default=256, ge=1,
        description="K-means fits on at most this many clips per cluster (a seeded uniform "
                    "sample); all clips are then assigned.")
    kmeans_tol: float = Field(
        default=1e-4, gt=0,
        description="Stop K-means early when inertia improves by less than this fraction; > 0 "
                    "(cuML refuses 0; 1e-12 stops only once inertia stops improving).")
    read_batch_rows: int = Field(default=32768, ge=1,
                                 description="Rows decoded per input batch (bounds memory).")
    spill_buffer_mb: float | None = Field(
        default=None, gt=0,
        description="Host memory (MiB) holding assigned clips by cluster until they are written "
                    "as shard files; when full, the largest clusters are written until half is "
                    "free. Unset: the size of the K-means fit sample, at least 128 MiB, so a shard "
                    "file holds a few hundred clips whatever n_clusters. Smaller means more, "
                    "smaller files per cluster.")
    pairwise_tile_size: int = Field(
        default=2048, ge=16,
        description="Columns per tile of the pairwise similarity; rows per block are a "
                    "quarter of it (memory ~ tile^2 bytes).")
    aws_profile: str | None = Field(default=None,
                                    description="AWS profile for s3:// paths (else the default chain).")
    aws_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL, else AWS).")
    aws_region: str | None = Field(default=None, description="AWS region for s3:// paths.")
    zip_max_bytes: int = Field(default=64 * 2**30, ge=1,
                               description="Largest total uncompressed size a .zip may extract to, "
                                           "in bytes (64 GiB = 68719476736 by default).")

    def fit_sample_rows(self, n_rows: int) -> int:
        """The K-means fit sample: min(all clips, kmeans_sample_per_cluster * n_clusters)."""
        return min(n_rows, self.kmeans_sample_per_cluster * self.n_clusters)

    def buffer_bytes(self, n_rows: int, dim: int) -> int:
        """The assignment buffer: `spill_buffer_mb` in bytes; unset, the float32 fit sample's
        size for `n_rows` clips of `dim`, at least 128 MiB (the fit has freed that memory by
        the time the assignment fills this buffer, so it does not raise the peak)."""
        if self.spill_buffer_mb is not None:
            return int(self.spill_buffer_mb * 2**20)
        return max(128 << 20, self.fit_sample_rows(n_rows) * dim * 4)

    @field_validator("eps_to_extract", mode="before")
    @classmethod
    def _eps_as_list(cls, value: Any) -> Any:
        if isinstance(value, (int, float, str)):
            value = [value]
        return value

    @field_validator("eps_to_extract")
    @classmethod
    def _eps_in_range(cls, value: list[float]) -> list[float]:
        return _checked_eps(value)

    @model_validator(mode="after")
    def _output_needed(self) -> "DedupConfig":
        if self.output_path is None and not is_zip_path(self.input_embeddings_path):
            raise ValueError("output_path is required unless input_embeddings_path is a .zip")
        return self

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> "DedupConfig":
        # An output inside the input would be read back as input by the next run (its shards
        # are parquet with the same columns); an input inside the output would be swept by the
        # clean-up of stale files. Checked on the paths alone, before anything is written.
        inp = _comparable(self.input_embeddings_path)
        out = _comparable(self.resolved_output_path)
        if inp == out or out.startswith(inp + "/") or inp.startswith(out + "/"):
            raise ValueError(
                f"output_path {self.resolved_output_path} must lie outside "
                f"input_embeddings_path {self.input_embeddings_path} (and not contain it)")
        return self

    @property
    def resolved_output_path(self) -> str:
        """`output_path`, or in zip mode `<zip stem>_semdedup` beside the zip."""
        if self.output_path is not None:
            return self.output_path.rstrip("/") or "/"
        parent, name = posixpath.split(self.input_embeddings_path.rstrip("/"))
        return posixpath.join(parent, name[: -len(".zip")] + "_semdedup")


def _checked_eps(values: list[float]) -> list[float]:
    if not values:
        raise ValueError("give at least one eps")
    for eps in values:
        if not (EPS_MIN <= eps < 1):
            raise ValueError(f"eps {eps} is outside [{EPS_MIN}, 1)")
    # Keep the user's order, drop repeats: each eps names one set of files.
    return list(dict.fromkeys(float(e) for e in values))


def checked_eps(values: list[float]) -> list[float]:
    """eps values (for a sweep) under the rules of a run's `eps_to_extract`."""
    try:
        return _checked_eps(list(values))
    except ValueError as exc:
        raise ConfigError(f"invalid arguments: eps_to_extract: {exc}") from None


def is_zip_path(path: str) -> bool:
    return path.lower().rstrip("/").endswith(".zip")


def _comparable(path: str) -> str:
    """A path in one spelling for comparisons: absolute and normalised locally, as given on S3."""
    if "://" in path:
        return path.rstrip("/")
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def make_config(**args: Any) -> DedupConfig:
    """Build a config, turning pydantic's errors into one readable ConfigError."""
    try:
        return DedupConfig(**args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `invalid arguments: n_clusters: ...; eps_to_extract: ...`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown argument (check the spelling; see `semdedup run --help`)"
        elif err["type"] == "missing":
            msg = "required"
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid arguments: " + "; ".join(parts)


class JobSpec(BaseModel):
    """`{"pipeline": "semantic-dedup", "args": {...}}`."""

    model_config = ConfigDict(extra="forbid")
    pipeline: Literal["semantic-dedup", "dedup"]
    args: dict[str, Any]


def parse_job_spec(source: str | Path | dict, overrides: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The `args` of a JSON job spec (a path, a JSON string or a dict) with `overrides` (flags
    given beside it) merged over them, then checked as a whole: a spec may leave out what the
    flags give (e.g. the input path of an uploaded zip)."""
    where = "job spec"
    if isinstance(source, dict):
        raw = source
    else:
        text = str(source)
        if not text.lstrip().startswith("{"):
            where = f"job spec {text}"
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + format_validation_error(exc)) from None
    args = {**spec.args, **(overrides or {})}
    try:
        DedupConfig(**args)
    except ValidationError as exc:
        # Named where each bad value came from: the spec, or a flag given beside it.
        failed = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        flags = sorted(failed & set(overrides or {}))
        origin = where if not flags else ", ".join(f"--{f.replace('_', '-')}" for f in flags)
        if flags and failed - set(flags):
            origin = f"{where} and {origin}"
        elif overrides and any(not e["loc"] for e in exc.errors()):  # two arguments together
            origin = f"{where} with the flags given beside it"
        raise ConfigError(f"{origin}: " + format_validation_error(exc)) from None
    return args
