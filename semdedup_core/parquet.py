"""Parquet encoding shared by every artifact: fixed writer options, so the same table always
gives the same bytes (and the same content hash)."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_core.storage import Storage


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # Ids and float vectors gain nothing from dictionaries; snappy is cheap on the way out.
    pq.write_table(table, sink, compression="snappy", use_dictionary=False)
    return sink.getvalue().to_pybytes()


def content_sha(data: bytes) -> str:
    """The `<sha>` of shard names: the first 16 hex digits of the file's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def write_table(out: Storage, rel: str, table: pa.Table) -> None:
    out.write_bytes(rel, table_to_parquet_bytes(table))


def read_table(out: Storage, rel: str, columns: list[str] | None = None) -> pa.Table:
    with out.open_input(rel) as f:
        return pq.read_table(f, columns=columns)


def row_count(out: Storage, rel: str) -> int:
    with out.open_input(rel) as f:
        return pq.ParquetFile(f).metadata.num_rows
