"""Parquet encoding shared by every artifact: fixed writer options, so the same table always
gives the same bytes (and the same content hash); and a fast read of the vectors those options
store (`plain_float_values`)."""

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_core.errors import InputError, StorageError
from semdedup_core.storage import Storage, describe_fault, storage_faults


VECTOR_WRITE_BATCH = 65536
# Artifacts are read one file per cluster (or a few), each a few hundred kB, on semdedup's own
# threads: handing a file's columns to Arrow's thread pool costs more than decoding them
# (a shard file's id and distance columns, ~340 rows: 180-200 us of wall time with Arrow's
# threads, 79 us without, measured).
SMALL_READ_THREADS = False


def table_to_parquet_bytes(table: pa.Table) -> pa.Buffer:
    """The parquet file as an Arrow buffer (bytes-like: hashed and written without a copy)."""
    sink = pa.BufferOutputStream()
    vectors = {f.name for f in table.schema if pa.types.is_list(f.type)
               or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type)}
    # Ids and float vectors gain nothing from dictionaries. Vector columns get neither snappy
    # nor statistics: unit floats shrink 0.3% under snappy, min/max over all vector values
    # prunes no read, and together they cost 16% of a shard's encoding time (measured).
    # Vectors are written in batches of VECTOR_WRITE_BATCH values, not Arrow's 1,024: each
    # batch costs a level-encoding and page-size round of its own (measured: a third less
    # encoding time for 512-d shards). It can move where pages are cut, so only vector tables
    # (the shards) use it; the other artifacts keep their bytes.
    pq.write_table(table, sink, use_dictionary=False,
                   compression={n: "none" if n in vectors else "snappy"
                                for n in table.column_names},
                   write_statistics=[n for n in table.column_names if n not in vectors],
                   write_batch_size=VECTOR_WRITE_BATCH if vectors else None)
    return sink.getvalue()


def content_sha(data) -> str:
    """The `<sha>` of shard names: the first 16 hex digits of the file's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def write_table(out: Storage, rel: str, table: pa.Table) -> None:
    out.write_bytes(rel, table_to_parquet_bytes(table))


# What a missing artifact's error says after "<path>: not found" (`reading`).
NOT_WRITTEN = (": the step that writes it has not run for this output, or did not finish; "
               "run it (or the whole job)")


@contextlib.contextmanager
def reading(out: Storage, rel: str, missing: str | None = NOT_WRITTEN) -> Iterator[None]:
    """Reading the artifact `rel` inside the block: a storage fault, or a file cut short or
    damaged since it was written (Arrow raises ArrowInvalid or OSError, naming no file), is one
    StorageError line naming it; a missing file is one InputError line, "<path>: not found"
    followed by `missing` (None: the FileNotFoundError goes through)."""
    try:
        with storage_faults(out.display(rel), "read"):
            yield
    except FileNotFoundError:
        if missing is None:
            raise
        raise InputError(f"{out.display(rel)}: not found{missing}") from None
    except pa.ArrowInvalid as exc:
        raise StorageError(f"{out.display(rel)}: cannot read: {describe_fault(exc)}") from None


def read_table(out: Storage, rel: str, columns: list[str] | None = None,
               missing: str | None = NOT_WRITTEN, ranged: bool = False) -> pa.Table:
    """A parquet artifact. Small ones (every artifact but the shards) are read whole, in one
    request on S3 (a GET whose answer carries the size: no HEAD, no ranged GETs for the
    footer and then the columns, ~3 round trips less per cluster); locally a memory map.
    `ranged`: a few columns of a large file (a shard's ids without its vectors), by ranges."""
    # ParquetFile.read, not pq.read_table: the latter goes through the dataset machinery,
    # ~0.5 ms more per file (measured), which adds up over one small file per cluster.
    # Without Arrow's threads (SMALL_READ_THREADS): ours read the clusters side by side.
    with reading(out, rel, missing):
        if ranged:
            with out.open_input(rel) as f:
                return pq.ParquetFile(f).read(columns=columns, use_threads=SMALL_READ_THREADS)
        with out.open_mapped(rel) as f:
            data = f.read_buffer()
        return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns,
                                                         use_threads=SMALL_READ_THREADS)


def read_table_if_present(out: Storage, rel: str) -> pa.Table | None:
    """`read_table`, or None where the file is not there (one request either way)."""
    try:
        return read_table(out, rel, missing=None)
    except FileNotFoundError:
        return None


# The last bytes of a file fetched for its footer: the whole of most artifacts.
FOOTER_READ = 1 << 16


def footer(out: Storage, rel: str) -> pq.FileMetaData:
    """A parquet file's footer (rows, schema and its metadata): on S3 one GET of the file's
    last FOOTER_READ bytes (a second, longer one only for a larger footer), not a HEAD and
    then a GET."""
    with reading(out, rel), out.open_mapped(rel) as f:
        if out.local:
            return pq.ParquetFile(f).metadata
        tail = f.read_tail(FOOTER_READ)
        need = 8 + int.from_bytes(tail.to_pybytes()[-8:-4], "little")  # footer + length + magic
        if need > tail.size:
            tail = f.read_tail(need)
        return pq.ParquetFile(pa.BufferReader(tail)).metadata


def row_count(out: Storage, rel: str) -> int:
    return footer(out, rel).num_rows


def plain_float_values(data, meta, column: int) -> np.ndarray | None:
    """Every value of the float list column at index `column` (all row groups, in order) as
    float32, read from the file's own bytes `data` without Arrow: when the column is stored as
    `table_to_parquet_bytes` stores vectors (uncompressed PLAIN data pages, v1, no dictionary)
    and holds no null. None for any other file (the caller then reads it with Arrow).
    Why: Arrow rebuilds a list column from its repetition and definition levels at ~4 ns a
    value (0.14 of the 1 CPU-s the 80k MiniLM set's prune phase takes); here the values are
    one copy of the pages' value sections."""
    try:
        chunks = [meta.row_group(g).column(column) for g in range(meta.num_row_groups)]
        if any(c.physical_type != "FLOAT" or c.compression != "UNCOMPRESSED"
               or c.has_dictionary_page or not set(c.encodings) <= {"PLAIN", "RLE"}
               for c in chunks):
            return None
        values = np.empty(sum(c.num_values for c in chunks), dtype=np.float32)
        view, filled = memoryview(data).cast("B"), 0  # unsigned bytes (an Arrow buffer's are signed)
        for c in chunks:
            at, end = c.data_page_offset, c.data_page_offset + c.total_compressed_size
            while at < end:
                header, at = _thrift_struct(view, at, _PAGE_HEADER_FIELDS)
                if header[3] < 0:
                    return None
                body = view[at:at + header[3]]
                at += header[3]
                page = header.get(5)  # a v1 data page's header; v2 and other pages: no
                if header[1] != 0 or page is None or page[2] != 0 or page[3] != _RLE \
                        or page[4] != _RLE:
                    return None
                rep = 4 + int.from_bytes(body[:4], "little")  # length-prefixed levels
                level_bytes = rep + 4 + int.from_bytes(body[rep:rep + 4], "little")
                count = page[1]
                if len(body) - level_bytes != 4 * count or filled + count > len(values):
                    return None  # a null element (levels without a value) or a short file
                values[filled:filled + count] = np.frombuffer(body[level_bytes:], "<f4")
                filled += count
        return values if filled == len(values) else None
    except (IndexError, KeyError, ValueError, RecursionError):  # damaged: Arrow says how
        return None


_RLE = 3  # parquet's Encoding.RLE
# PageHeader fields read: 1 type, 3 compressed_page_size, 5 DataPageHeader (1 num_values,
# 2 encoding (0 PLAIN), 3 definition_level_encoding, 4 repetition_level_encoding).
_PAGE_HEADER_FIELDS = {1: None, 3: None, 5: {1: None, 2: None, 3: None, 4: None}}


def _varint(b, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = b[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _thrift_struct(b, at: int, fields: dict) -> tuple[dict, int]:
    """A Thrift compact-protocol struct at `at`: the integer fields in `fields` (a nested
    dict: a struct field, read the same way), the rest skipped. Returns (values, end)."""
    values, field = {}, 0
    while True:
        head = b[at]
        at += 1
        if head == 0:  # stop
            return values, at
        kind, delta = head & 0x0F, head >> 4
        if delta:
            field += delta
        else:
            raw, at = _varint(b, at)
            field = (raw >> 1) ^ -(raw & 1)
        if field in fields and kind in (5, 6):  # i32, i64: zigzag varints
            raw, at = _varint(b, at)
            values[field] = (raw >> 1) ^ -(raw & 1)
        elif field in fields and kind == 12 and fields[field] is not None:
            values[field], at = _thrift_struct(b, at, fields[field])
        else:
            at = _thrift_skip(b, at, kind)


def _thrift_skip(b, at: int, kind: int) -> int:
    if kind in (1, 2):  # booleans live in the field header
        return at
    if kind == 3:
        return at + 1
    if kind in (4, 5, 6):
        return _varint(b, at)[1]
    if kind == 7:
        return at + 8
    if kind == 8:
        size, at = _varint(b, at)
        return at + size
    if kind in (9, 10):  # list, set
        head = b[at]
        at += 1
        size, element = head >> 4, head & 0x0F
        if size == 15:
            size, at = _varint(b, at)
        for _ in range(size):
            at = at + 1 if element in (1, 2) else _thrift_skip(b, at, element)
        return at
    if kind == 11:  # map
        size, at = _varint(b, at)
        if size:
            types = b[at]
            at += 1
            for _ in range(size):
                at = _thrift_skip(b, _thrift_skip(b, at, types >> 4), types & 0x0F)
        return at
    if kind == 12:
        return _thrift_struct(b, at, {})[1]
    raise ValueError(f"unknown Thrift type {kind}")
