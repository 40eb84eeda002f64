"""Synthetic clip embeddings with planted near-duplicate groups, for the demo, tests and
benchmarks. Deterministic for a seed; written file by file, so memory is one file."""

import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The bundled sample the demo and the default Dagster config run on: 4,000 clips x 256-d float16
# (a Cosmos-Embed1-like drop) with planted duplicates. Rebuild with `python -m semdedup_core.sample`.
SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "sample_data", "ce1_embd_parquet")
# The demo run (`semdedup demo`, and the `semdedup` Dagster job's default config).
DEMO_ARGS = {"input_embeddings_path": SAMPLE_DIR, "output_path": "semdedup-demo-output",
             "n_clusters": 20, "eps_to_extract": [0.01, 0.05]}


@dataclass
class SampleInfo:
    rows: int
    dim: int
    files: list[str]
    groups: list[list[str]] = field(default_factory=list)  # planted duplicate groups (ids)


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return [str(uuid.UUID(bytes=bytes(r), version=4)) for r in raw]


def write_sample(folder: str, rows: int, dim: int = 512, n_topics: int = 64,
                 dup_fraction: float = 0.1, files: int = 4, seed: int = 0,
                 dtype: str = "float32", keep_groups: bool = True,
                 variant_fraction: float = 0.0) -> SampleInfo:
    """Write `rows` clips into `files` parquet files under `folder` (columns `id`, `embedding`).

    Clips scatter around `n_topics` topic directions (same-topic clips have cosine ~0.3); about
    `dup_fraction` of the rows are near-copies (cosine > 0.999) of another clip of the same
    file, in groups of 2-4. About `variant_fraction` more are looser variants of other clips
    (cosine spread over ~0.85-0.999: "same scene, another take"), so the removed count grows
    with eps. `dtype` float16 writes `list<halffloat>` like Cosmos-Embed1 drops.
    """
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    os.makedirs(folder, exist_ok=True)
    info = SampleInfo(rows, dim, [])
    per_file = np.full(files, rows // files)
    per_file[: rows % files] += 1
    for f, n in enumerate(per_file):
        n = int(n)
        emb = topics[rng.integers(0, n_topics, n)]
        emb = emb + 1.5 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
        ids = _ids(rng, n)
        # Plant groups: an original followed by 1-3 copies with a little noise.
        n_copies = int(n * dup_fraction)
        pos = 0
        order = rng.permutation(n)
        while n_copies > 0 and pos + 1 < n:
            size = min(int(rng.integers(1, 4)), n_copies, n - pos - 1)
            original = order[pos]
            copies = order[pos + 1: pos + 1 + size]
            noise = rng.standard_normal((size, dim)).astype(np.float32) * (0.02 / np.sqrt(dim))
            emb[copies] = emb[original] + noise
            if keep_groups:
                info.groups.append([ids[original]] + [ids[c] for c in copies])
            n_copies -= size
            pos += size + 1
        # Variants pair up clips outside the groups: the second becomes a looser copy.
        for _ in range(int(n * variant_fraction)):
            if pos + 1 >= n:
                break
            source, variant = order[pos], order[pos + 1]
            scale = 10 ** rng.uniform(-1.5, -0.2)  # relative noise norm ~0.03-0.6
            noise = rng.standard_normal(dim).astype(np.float32)
            noise *= scale * np.linalg.norm(emb[source]) / np.linalg.norm(noise)
            emb[variant] = emb[source] + noise
            pos += 2
        values = pa.array(emb.astype(dtype).reshape(-1))
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        table = pa.table({"id": pa.array(ids), "embedding": pa.ListArray.from_arrays(offsets,
                                                                                     values)})
        path = os.path.join(folder, f"part-{f:05d}.parquet")
        pq.write_table(table, path)
        info.files.append(path)
    return info


if __name__ == "__main__":
    write_sample(SAMPLE_DIR, rows=4000, dim=256, n_topics=16, files=2, seed=7, dtype="float16",
                 keep_groups=False, variant_fraction=0.1)
