"""Finding and streaming the input parquet: schema checks, validation, normalisation.

`scan_input` reads everything once before any output is written: it checks every rule of SPEC's
"bad input" list and draws the K-means fit sample on the way. `iter_batches` then streams the
input again for the assignment; memory is a few batches, never the whole input.
"""

import contextlib
import functools
import itertools
import json
import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_core.errors import InputError, StorageError
from semdedup_core.storage import Storage, describe_fault, storage_faults
from semdedup_core.threads import LATENCY_BOUND_THREADS, chain_ahead, host_threads, ordered_map

NORM_FLOOR = 1e-12
READ_BUFFER_BYTES = 8 << 20
GROUP_FILES = 64  # small files decoded into one batch by one thread
SCAN_AHEAD = 4  # batches decoded ahead per file in the scan: a file of 4 x 16,384 rows whole
READ_PIECE_ROWS = 1024  # rows Arrow decodes at a time (`piece_rows`)
_FLOAT_TYPES = (pa.float16(), pa.float32(), pa.float64())


def row_norms(emb: np.ndarray) -> np.ndarray:
    """Row norms (float64): summed in float64, so no finite float32 row overflows or
    underflows; a row with NaN or inf gets a NaN or inf norm."""
    return np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64))


def normalize(emb: np.ndarray, norms: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """`e / max(||e||, 1e-12)` row-wise, in place for writeable float32 input (or into `out`,
    a float32 array of emb's shape); returns float32. `norms`: the rows' norms when already
    computed."""
    emb = np.asarray(emb, dtype=np.float32)
    norms = row_norms(emb) if norms is None else norms
    scale = np.maximum(norms, NORM_FLOOR).astype(np.float32)[:, None]
    if out is not None:
        return np.divide(emb, scale, out=out)
    if not emb.flags.writeable:  # a zero-copy view of Arrow memory
        emb = emb.copy()
    emb /= scale
    return emb


@dataclass
class Batch:
    """One decoded slice of one input file, or several whole small files in a row; `emb` is
    float32 (rows, dim), not yet normalised."""

    files: list[tuple[int, str]]  # (first row in the batch, user-facing address), for messages
    start_row: int  # global row number of the first row
    ids: pa.Array
    emb: np.ndarray
    norms: np.ndarray  # float64 (rows,): `row_norms(emb)`, computed on the read thread (or kept)

    def where(self, row: int) -> str:
        """The file holding row `row` of the batch."""
        return _file_of(self.files, row)


@dataclass
class InputFile:
    rel: str
    rows: int
    size: int = 0
    mtime: float | None = None  # None where not known or not a property of the data (a zip's)
    meta: pq.FileMetaData | None = field(default=None, repr=False)  # the footer, read once


@dataclass
class EmbeddingSource:
    """The parquet files of one input folder, in a fixed (sorted) order."""

    storage: Storage
    files: list[InputFile]
    id_column: str = "id"
    embedding_column: str = "embedding"
    batch_rows: int = 32768
    dim: int | None = field(default=None)
    # Every row's norm (float64, `row_norms`), kept by `scan_input`: later passes over the same
    # source take them from here instead of computing them again (0.44 CPU-s at 1M x 512).
    norms: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_rows(self) -> int:
        return sum(f.rows for f in self.files)

    @classmethod
    def discover(cls, storage: Storage, id_column: str = "id", embedding_column: str = "embedding",
                 batch_rows: int = 32768) -> "EmbeddingSource":
        """List `*.parquet` under the folder (recursively; hidden and `_`-prefixed names skipped)
        and check each file's schema from its footer. A single `.parquet` file is a one-file
        input."""
        listed: dict[str, tuple[int, float | None]] = {}
        rels = None
        with storage_faults(storage.display(), "read the input"):
            if storage.root.endswith(".parquet") and storage.is_file():
                storage, rels = storage.parent_of_file(), [posixpath.basename(storage.root)]
            else:
                rels = files_from_summary(storage)
        if rels is None:
            with storage_faults(storage.display(), "list the input"):
                if not storage.exists():
                    raise InputError(f"{storage.display()}: no such folder")
                files = storage.list_file_infos()
            from_zip = storage.uri.endswith("!")  # extraction times say nothing of the data
            for rel, size, mtime in files:
                if rel.endswith(".parquet") and not any(p.startswith((".", "_"))
                                                        for p in rel.split("/")):
                    listed[rel] = (size, None if from_zip else mtime)
            rels = sorted(listed)
        if not rels:
            raise InputError(f"{storage.display()}: no parquet files found")
        src = cls(storage, [], id_column, embedding_column, batch_rows)

        checked = threading.local()  # the last schema this thread checked: most inputs share one

        def footer(rel: str) -> InputFile:
            try:
                with storage.open_input(rel) as f:
                    footer_meta, size = pq.read_metadata(f), f.size()
                    known = getattr(checked, "schema", None)
                    if known is None or not footer_meta.schema.equals(known):
                        src._check_schema(storage.display(rel),
                                          footer_meta.schema.to_arrow_schema())
                        checked.schema = footer_meta.schema
            except FileNotFoundError:
                raise InputError(f"{storage.display(rel)}: listed in summary.json but missing") \
                    from None
            except (pa.ArrowException, OSError) as exc:
                if storage.local or isinstance(exc, pa.ArrowInvalid):
                    raise InputError(f"{storage.display(rel)}: not a readable parquet file "
                                     f"({describe_fault(exc)})") from None
                raise StorageError(f"{storage.display(rel)}: cannot read: "
                                   f"{describe_fault(exc)}") from None
            return InputFile(rel, footer_meta.num_rows, size, listed.get(rel, (size, None))[1],
                             footer_meta)

        # Footers are read on threads (on S3 each is a round trip; many small files are
        # mostly footers); errors still come in file order.
        src.files = list(ordered_map(footer, rels, LATENCY_BOUND_THREADS if not storage.local
                                     else host_threads()))
        if src.n_rows == 0:
            raise InputError(f"{storage.display()}: the parquet files hold no rows")
        return src

    def fingerprint_items(self) -> list[tuple[str, int, float | None]]:
        """(path, size, mtime) of every input file, for the completion record's fingerprint."""
        return [(f.rel, f.size, f.mtime) for f in self.files]

    def _check_schema(self, where: str, schema: pa.Schema) -> None:
        names = schema.names
        for col in (self.id_column, self.embedding_column):
            if col not in names:
                raise InputError(f"{where}: missing column {col!r} (columns: {names}); set "
                                 "id_column / embedding_column if it has another name")
        id_type = schema.field(self.id_column).type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise InputError(f"{where}: column {self.id_column!r} is {id_type}, expected a string")
        emb_type = schema.field(self.embedding_column).type
        if not (pa.types.is_list(emb_type) or pa.types.is_large_list(emb_type)
                or pa.types.is_fixed_size_list(emb_type)) or emb_type.value_type not in _FLOAT_TYPES:
            raise InputError(f"{where}: column {self.embedding_column!r} is {emb_type}, expected a "
                             "list of float16/float32/float64")

    def iter_batches(self, ahead: int = 1) -> Iterator[Batch]:
        """Every row, file by file. Later files are decoded ahead on host threads (`ahead`
        batches buffered per file), so decoding overlaps the caller's work. Each of the T
        threads decodes batch_rows / T rows at a time, so about (1 + ahead) x batch_rows rows
        are in memory whatever the thread count. Runs of small files are decoded by one thread
        into one batch, so an input of many tiny files costs little more than one file.
        With one batch ahead, a thread decoding a later file waits once it has one batch: that
        suits a caller slower than decoding (the assignment's GEMMs); a fast caller (the scan)
        keeps every thread decoding with more."""
        start = 0
        threads = host_threads()
        rows = -(-self.batch_rows // threads)
        known = self.norms if self.norms is not None and len(self.norms) == self.n_rows else None
        producers = [functools.partial(self._decode_files, group, rows, known is None)
                     for group in self._groups(rows)]
        for files, ids, emb, norms in chain_ahead(producers, threads, depth=ahead):
            if known is not None:
                norms = known[start:start + len(emb)]
            if self.dim is None and len(emb):
                self.dim = emb.shape[1]
            elif len(emb) and emb.shape[1] != self.dim:
                raise InputError(f"{files[0][1]}: embeddings have {emb.shape[1]} dimensions, but "
                                 f"earlier files have {self.dim}; all files must share one "
                                 "dimension")
            yield Batch(files, start, ids, emb, norms)
            start += len(emb)

    def _groups(self, rows: int) -> Iterator[list[InputFile]]:
        """The files in order, consecutive small ones grouped (together at most `rows` rows
        and GROUP_FILES files, so that several threads still share the work)."""
        group: list[InputFile] = []
        total = 0
        for f in self.files:
            if group and (total + f.rows > rows or len(group) == GROUP_FILES):
                yield group
                group, total = [], 0
            group.append(f)
            total += f.rows
        if group:
            yield group

    def _decode_files(self, group: list[InputFile], batch_rows: int, with_norms: bool = True
                      ) -> Iterator[tuple[list[tuple[int, str]], pa.Array, np.ndarray,
                                          np.ndarray | None]]:
        """A file's batches, or a group of small files as one batch: their columns are joined
        and decoded at once when they share their types (the per-file work is then one read).
        Each with its rows' norms, or None unless `with_norms`."""
        if len(group) == 1:
            yield from self._decode_file(group[0], batch_rows, with_norms)
            return
        raw = [self._read_whole(f) for f in group]
        if any(ids.type != raw[0][1].type or col.type != raw[0][2].type
               for _, ids, col in raw):  # mixed encodings: decode file by file, then join
            parts = [next(self._decode_file(f, batch_rows, False)) for f in group]
            for (_, where), (_, _, emb, _) in zip([p[0][0] for p in parts], parts):
                if len(emb) and emb.shape[1] != parts[0][2].shape[1]:
                    raise InputError(f"{where}: embeddings have {emb.shape[1]} dimensions, but "
                                     f"earlier files have {parts[0][2].shape[1]}; all files "
                                     "must share one dimension")
            raw = [(p[0][0][1], p[1].cast(pa.string()), p[2]) for p in parts]
            files = _file_starts([(where, len(ids)) for where, ids, _ in raw])
            emb = np.concatenate([r[2] for r in raw])
            yield (files, pa.concat_arrays([r[1] for r in raw]), emb,
                   row_norms(emb) if with_norms else None)
            return
        files = _file_starts([(where, len(ids)) for where, ids, _ in raw])
        ids = pa.concat_arrays([r[1] for r in raw])
        emb = self._decode(files, ids, pa.concat_arrays([r[2] for r in raw]))
        yield files, ids, emb, row_norms(emb) if with_norms else None

    def _read_whole(self, f: InputFile) -> tuple[str, pa.Array, pa.Array]:
        """(file, ids, embedding column) of a small file, read at once."""
        where = self.storage.display(f.rel)
        with self._reading(where):
            with self.storage.open_input(f.rel) as handle:
                reader = pq.ParquetFile(handle, metadata=f.meta, pre_buffer=False)
                table = reader.read(columns=[self.id_column, self.embedding_column],
                                    use_threads=False)
        return (where, table.column(self.id_column).combine_chunks(),
                table.column(self.embedding_column).combine_chunks())

    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        try:
            yield
        except (pa.ArrowException, OSError) as exc:  # corrupt pages, or the storage failed
            if self.storage.local or isinstance(exc, pa.ArrowInvalid):
                raise InputError(f"{where}: corrupt parquet data ({describe_fault(exc)})") \
                    from None
            raise StorageError(f"{where}: cannot read: {describe_fault(exc)}") from None

    def _decode_file(self, f: InputFile, batch_rows: int, with_norms: bool = True
                     ) -> Iterator[tuple[list[tuple[int, str]], pa.Array, np.ndarray,
                                         np.ndarray | None]]:
        """([(0, file)], ids, embeddings, row norms) per batch, decoded on the read thread.
        Normalising stays with the consumer: a float32 copy per batch made on read threads cost
        ~0.2 GiB more peak RSS at 1M x 512 (glibc keeps freed blocks in per-thread heaps) and no
        time."""
        where = self.storage.display(f.rel)
        files = [(0, where)]
        if f.rows <= batch_rows:  # one read, no batch iterator (many small files)
            _, ids, col = self._read_whole(f)
            emb = self._decode(files, ids, col)
            yield files, ids, emb, row_norms(emb) if with_norms else None
            return
        columns = [self.id_column, self.embedding_column]
        with self._reading(where), self.storage.open_input(f.rel) as handle:
            # A buffered stream decodes page by page instead of loading whole column chunks,
            # so memory follows batch_rows, not the writer's row-group size.
            reader = pq.ParquetFile(handle, metadata=f.meta, buffer_size=READ_BUFFER_BYTES,
                                    pre_buffer=False)
            # Arrow decodes pieces (`piece_rows`), joined into batches of batch_rows rows.
            piece = piece_rows(batch_rows)
            pieces = reader.iter_batches(batch_size=piece, use_threads=False, columns=columns)
            while run := list(itertools.islice(pieces, batch_rows // piece)):
                table = pa.Table.from_batches(run)
                del run
                ids = table.column(self.id_column).combine_chunks()
                emb = self._decode(files, ids,
                                   table.column(self.embedding_column).combine_chunks())
                del table
                yield files, ids, emb, row_norms(emb) if with_norms else None

    def _decode(self, files: list[tuple[int, str]], ids: pa.Array, col: pa.Array) -> np.ndarray:
        """The embedding column as float32 (rows, dim); checks nulls, empty and ragged lists
        (dimensions across batches are checked in `iter_batches`, in file order). `files`:
        which rows come from which file, for messages."""
        n = len(col)

        def where(row: int) -> str:
            return _file_of(files, row)

        if ids.null_count:
            row = int(pc.index(pc.is_null(ids), True).as_py())
            raise InputError(f"{where(row)}: {ids.null_count} null value(s) in column "
                             f"{self.id_column!r}")
        if col.null_count:
            row = int(pc.index(pc.is_null(col), True).as_py())
            raise InputError(f"{where(row)}: null embedding for id {ids[row].as_py()!r}")
        if pa.types.is_fixed_size_list(col.type):
            dim = col.type.list_size
        else:
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            dim = int(lengths[0]) if n else 0
            if n and (lengths != dim).any():
                row = int(np.flatnonzero(lengths != dim)[0])
                first_of_file = max(start for start, _ in files if start <= row)
                if first_of_file > 0 and lengths[first_of_file] == lengths[row]:
                    raise InputError(f"{where(row)}: embeddings have {lengths[row]} dimensions, "
                                     f"but earlier files have {dim}; all files must share one "
                                     "dimension")
                raise InputError(f"{where(row)}: ragged embeddings: id {ids[row].as_py()!r} has "
                                 f"{lengths[row]} values, id {ids[0].as_py()!r} has {dim}")
        if n and dim == 0:
            raise InputError(f"{where(0)}: embeddings are empty lists")
        values = col.flatten()
        if values.null_count:
            first = int(pc.index(pc.is_null(values), True).as_py())
            if pa.types.is_fixed_size_list(col.type):
                row = first // dim
            else:  # the list whose value range holds it
                offsets = col.offsets.to_numpy(zero_copy_only=False) - col.offsets[0].as_py()
                row = int(np.searchsorted(offsets, first, side="right")) - 1
            raise InputError(f"{where(row)}: null values inside the embedding of id "
                             f"{ids[row].as_py()!r}")
        return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)


def piece_rows(batch_rows: int) -> int:
    """Rows Arrow decodes at a time when streaming a file: the largest divisor of batch_rows
    up to READ_PIECE_ROWS (so joined pieces make the very batches a read of batch_rows would:
    Arrow cuts a file into batches across its row groups), or batch_rows itself when it is
    small or has no divisor of at least a quarter of that.
    Why: Arrow's list reader grows its value and level buffers (8 bytes per float) by doubling
    reallocations as it decodes, so a 16,384-row batch of 512 floats takes over 64 MB of fresh
    memory, which the kernel faults in and zeroes: a third of the scan's CPU at 200k x 512.
    A 1,024-row piece's buffers are reused by the allocator; joining the pieces is one copy."""
    if batch_rows <= 2 * READ_PIECE_ROWS:
        return batch_rows
    piece = next(p for p in range(READ_PIECE_ROWS, 0, -1) if batch_rows % p == 0)
    return piece if 4 * piece >= READ_PIECE_ROWS else batch_rows


def _file_starts(sizes: list[tuple[str, int]]) -> list[tuple[int, str]]:
    """[(first row, file)] of files of these sizes laid end to end."""
    starts, n = [], 0
    for where, rows in sizes:
        starts.append((n, where))
        n += rows
    return starts


def _file_of(files: list[tuple[int, str]], row: int) -> str:
    """The file holding `row`, given each file's first row (ascending)."""
    return files[int(np.searchsorted([s for s, _ in files], row, side="right")) - 1][1]


SUMMARY_JSON = "summary.json"


def _parquet_names(doc) -> list[str]:
    """Every string ending in .parquet anywhere in a JSON document."""
    if isinstance(doc, str):
        return [doc] if doc.endswith(".parquet") else []
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return [name for item in items for name in _parquet_names(item)]


def files_from_summary(storage: Storage) -> list[str] | None:
    """The input files named by a split pipeline's `summary.json`, in the input folder or beside
    it (its parent), so a large prefix need not be listed. Its schema is not fixed, so any
    string ending in `.parquet` that lies inside the input folder counts (relative to the
    summary's folder, or a full path/URI). None when there is no summary or it names no file
    of this folder: the folder is then listed."""
    here = storage.display().rstrip("/")
    candidates = [(storage, "")]
    parent = storage.parent()
    if parent is not None:
        candidates.append((parent, posixpath.basename(storage.root.rstrip("/"))))
    for where, prefix in candidates:
        try:
            raw = where.read_bytes(SUMMARY_JSON)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise InputError(f"{where.display(SUMMARY_JSON)}: not valid JSON ({exc})") from None
        rels = set()
        for name in _parquet_names(doc):
            for base in (here + "/", storage.root.rstrip("/") + "/"):
                if name.startswith(base):
                    name = name[len(base):]
                    break
            else:
                name = posixpath.normpath(name)
                if prefix:
                    if not name.startswith(prefix + "/"):
                        continue
                    name = name[len(prefix) + 1:]
            if name.startswith(("/", "../")) or "://" in name:
                continue
            rels.add(name)
        if rels:
            return sorted(rels)
    return None


@dataclass
class ScanResult:
    n_rows: int
    dim: int
    sample: np.ndarray  # normalised float32 (m, dim), rows in input order


def sample_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """Sorted global row numbers of a seeded uniform sample (all rows when size >= n_rows)."""
    if size >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=size, replace=False)).astype(np.int64)


def scan_input(source: EmbeddingSource, sample_size: int, seed: int,
               progress=None, unique_ids: bool = True) -> ScanResult:
    """Validate every row (NaN/inf, zero vectors, dimensions, duplicate ids unless `unique_ids`
    is off: a corpus re-fit reads drops that may repeat ids) and draw the fit sample. Raises
    InputError naming the file; writes nothing. Keeps every row's norm on `source` (`norms`)
    for the passes after it."""
    n = source.n_rows
    picks = sample_rows(n, sample_size, seed)
    sample = None  # allocated once the dimension is known; filled in place (no concatenation)
    # Duplicate ids: keep a 64-bit fingerprint per clip (8 bytes/clip); a fingerprint collision
    # is confirmed against the real strings in a second, rare pass.
    fingerprints = np.empty(n, dtype=np.int64)
    source.norms = None  # this pass computes them from the data it validates
    norms_read = np.empty(n, dtype=np.float64)
    for batch in source.iter_batches(ahead=SCAN_AHEAD):
        emb, rows, norms = batch.emb, len(batch.emb), batch.norms
        bad_rows = ~np.isfinite(norms)
        if bad_rows.any():
            bad = int(np.flatnonzero(bad_rows)[0])
            raise InputError(f"{batch.where(bad)}: embedding of id {batch.ids[bad].as_py()!r} contains "
                             "NaN or inf")
        if (norms < NORM_FLOOR).any():
            bad = int(np.flatnonzero(norms < NORM_FLOOR)[0])
            raise InputError(f"{batch.where(bad)}: embedding of id {batch.ids[bad].as_py()!r} is all "
                             f"zeros (or its norm is below {NORM_FLOOR:g}); it has no direction "
                             "to compare")
        lo, hi = batch.start_row, batch.start_row + rows
        norms_read[lo:hi] = norms
        fingerprints[lo:hi] = _fingerprints(batch.ids.to_pylist())
        a, b = np.searchsorted(picks, [lo, hi])
        if b > a:
            if sample is None:
                sample = np.empty((len(picks), emb.shape[1]), dtype=np.float32)
            rows_picked = picks[a:b] - lo
            sample[a:b] = normalize(emb[rows_picked], norms[rows_picked])
        if progress is not None:
            progress(rows)
    if unique_ids:
        _check_unique_ids(source, fingerprints)
    source.norms = norms_read
    return ScanResult(n, source.dim, sample)


def _fingerprints(ids: list[str]) -> np.ndarray:
    # Python's str hash is stable within one process, which is all the check needs.
    return np.fromiter((hash(s) for s in ids), dtype=np.int64, count=len(ids))


def _check_unique_ids(source: EmbeddingSource, fingerprints: np.ndarray) -> None:
    ordered = np.sort(fingerprints)
    clashes = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(clashes):
        return
    suspects = set(clashes.tolist())
    seen: dict[str, str] = {}
    for batch in source.iter_batches():
        ids = batch.ids.to_pylist()
        for row, (s, fp) in enumerate(zip(ids, _fingerprints(ids))):
            if fp in suspects:
                here = batch.where(row)
                if s in seen:
                    where = here if seen[s] == here else f"{seen[s]} and {here}"
                    raise InputError(f"{where}: duplicate id {s!r}; ids must be unique across "
                                     "the input")
                seen[s] = here
