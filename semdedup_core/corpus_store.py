"""The corpus's store of committed clips, which every add reads for the clusters its drop touches.

    store/<first>-<last>-<token>.seg     the clips of drops first..last, cluster by cluster

A segment holds raw arrays, not parquet: a 10k drop at k=1000 touches nearly every cluster, so an
add reads nearly every earlier clip, and decoding parquet was most of its time. Locally a segment
is memory-mapped and a cluster's block is a view of pages the OS caches; on S3 it is one ranged
GET. Little-endian:

    per non-empty cluster, ascending, a block starting at a multiple of 64 bytes:
        embeddings  float32 (n, dim): unit rows in drop then rank order
        drops       int32 (n): each clip's drop (its position in the manifest)
        id offsets  int32 (n + 1), then the id bytes (utf-8): an Arrow string array's buffers
      and in a corpus with cross_cluster, from the next multiple of 8:
        keys        float64 (n): each clip's global-order key in its drop (`order_keys`)
        probes      int32 (n + 1) offsets, then int32 targets: the clusters each clip probes
    index    int64 (n_clusters, 4): block offset, rows, id bytes, probe targets (rows 0: none)
    header   JSON: format, dim, n_clusters, rows, first, last, cross
    trailer  int64 index offset, int64 header length, MAGIC

Each add writes one segment, of its drop. Segments merge like a binary counter: while the one
before the newest holds no more clips than the newest (merged ones counted together), they are
merged. So a corpus has about log2(clips / drop) + 1 segments, each clip is rewritten about as
often over its life, and the first, largest segment is rarely rewritten.

A segment counts only when the manifest names its token for its last drop, and of segments a
merge covered, only the merge (`committed_segments`): whatever a crashed add wrote is ignored.
"""

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_core import layout
from semdedup_core.errors import InputError
from semdedup_core.storage import Storage
from semdedup_core.threads import LATENCY_BOUND_THREADS, host_threads, ordered_map

FORMAT = 1
MAGIC = b"SDSTORE1"
ALIGN = 64
_TRAILER = 16 + len(MAGIC)


@dataclass
class Block:
    """Clips of one cluster, in drop then rank order."""

    ids: pa.Array  # string
    emb: np.ndarray  # unit float32 (n, dim); a read-only view of a segment when read from one
    drop: np.ndarray  # int32 (n,)
    # With cross_cluster: global-order keys float64 (n,); clip i probes the clusters
    # probes[probe_at[i]:probe_at[i + 1]] (int32).
    key: np.ndarray | None = None
    probe_at: np.ndarray | None = None
    probes: np.ndarray | None = None

    def probing(self, cluster: int) -> np.ndarray:
        """The rows (ascending) whose probes include `cluster`."""
        hit = np.flatnonzero(self.probes == cluster)
        return np.searchsorted(self.probe_at, hit, side="right") - 1


def concat_blocks(blocks: list[Block]) -> Block:
    """One block of several (in their order)."""
    if len(blocks) == 1:
        return blocks[0]
    cross = blocks[0].key is not None
    probe_at = None
    if cross:
        ends = np.cumsum([0] + [len(b.probes) for b in blocks])
        probe_at = np.concatenate([[0]] + [b.probe_at[1:] + e for b, e in zip(blocks, ends)])
    return Block(pa.concat_arrays([b.ids for b in blocks]),
                 np.concatenate([b.emb for b in blocks]),
                 np.concatenate([b.drop for b in blocks]),
                 np.concatenate([b.key for b in blocks]) if cross else None,
                 probe_at.astype(np.int32) if cross else None,
                 np.concatenate([b.probes for b in blocks]) if cross else None)


class Segment:
    """One committed segment, open for reading blocks (from several threads)."""

    def __init__(self, storage: Storage, rel: str):
        self.where = storage.display(rel)
        self.file = storage.open_mapped(rel)
        # A memory map is read as one zero-copy buffer; other files (S3) by positional reads,
        # the first of them the trailer, whose answer also gives the size.
        if isinstance(self.file, pa.MemoryMappedFile):
            self._map = self.file.read_buffer()
            trailer = self._map.slice(max(0, self._map.size - _TRAILER)).to_pybytes()
        else:
            self._map = None
            trailer = self.file.read_tail(_TRAILER).to_pybytes()
        size = self.file.size()
        if trailer[16:] != MAGIC:
            raise InputError(f"{self.where}: not a semdedup store segment (damaged or cut short)")
        index_at, header_len = np.frombuffer(trailer[:16], np.int64)
        header = json.loads(self._read(header_len, size - _TRAILER - header_len).to_pybytes())
        if header.get("format") != FORMAT:
            raise InputError(f"{self.where}: store segment format {header.get('format')!r}, "
                             f"this semdedup reads {FORMAT}")
        self.dim, self.rows = header["dim"], header["rows"]
        self.first, self.last, self.cross = header["first"], header["last"], header["cross"]
        k = header["n_clusters"]
        self.index = np.frombuffer(self._read(k * 32, index_at), np.int64).reshape(k, 4)

    def _read(self, nbytes: int, offset: int) -> pa.Buffer:
        if self._map is not None:
            return self._map.slice(offset, nbytes)
        return pa.py_buffer(self.file.read_at(nbytes, offset))

    def block(self, cluster: int) -> Block | None:
        offset, n, nbytes, n_probes = (int(v) for v in self.index[cluster])
        if n == 0:
            return None
        d = self.dim
        at_ids = n * d * 4 + n * 4
        end = at_ids + (n + 1) * 4 + nbytes
        at_key = end + (-end % 8)
        size = at_key + n * 8 + (n + 1) * 4 + n_probes * 4 if self.cross else end
        buf = self._read(size, offset)
        ids = pa.StringArray.from_buffers(n, buf.slice(at_ids, (n + 1) * 4),
                                          buf.slice(at_ids + (n + 1) * 4, nbytes))
        block = Block(ids, np.frombuffer(buf, np.float32, n * d).reshape(n, d),
                      np.frombuffer(buf, np.int32, n, offset=n * d * 4))
        if self.cross:
            block.key = np.frombuffer(buf, np.float64, n, offset=at_key)
            block.probe_at = np.frombuffer(buf, np.int32, n + 1, offset=at_key + n * 8)
            block.probes = np.frombuffer(buf, np.int32, n_probes,
                                         offset=at_key + n * 8 + (n + 1) * 4)
        return block

    def close(self) -> None:
        self._map = None
        self.file.close()


class SegmentWriter:
    """Writes a segment to an open binary file, cluster by cluster in ascending order."""

    def __init__(self, f, dim: int, n_clusters: int, first: int, last: int, cross: bool):
        self.f, self.dim, self.first, self.last, self.cross = f, dim, first, last, cross
        self.index = np.zeros((n_clusters, 4), np.int64)
        self.pos, self.rows, self.last_cluster = 0, 0, -1

    def _pad(self, align: int = ALIGN) -> None:
        gap = -self.pos % align
        self.f.write(b"\0" * gap)
        self.pos += gap

    def _write(self, *parts) -> None:
        for part in parts:
            self.f.write(part.data if isinstance(part, np.ndarray) else part)
            self.pos += part.nbytes

    def add(self, cluster: int, block: Block) -> None:
        assert cluster > self.last_cluster, "clusters must come in ascending order"
        n = len(block.ids)
        if n == 0:
            return
        self._pad()
        ids = block.ids.cast(pa.string())
        offsets = np.frombuffer(ids.buffers()[1], np.int32, n + 1, ids.offset * 4)
        data = memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]]
        start = self.pos
        self._write(np.ascontiguousarray(block.emb, np.float32),
                    np.ascontiguousarray(block.drop, np.int32),
                    (offsets - offsets[0]).astype(np.int32), data)
        n_probes = 0
        if self.cross:
            self._pad(8)
            n_probes = len(block.probes)
            self._write(np.ascontiguousarray(block.key, np.float64),
                        np.ascontiguousarray(block.probe_at, np.int32),
                        np.ascontiguousarray(block.probes, np.int32))
        self.index[cluster] = (start, n, len(data), n_probes)
        self.rows += n
        self.last_cluster = cluster

    def finish(self) -> None:
        self._pad()
        index_at = self.pos
        header = json.dumps({"format": FORMAT, "dim": self.dim, "n_clusters": len(self.index),
                             "rows": self.rows, "first": self.first, "last": self.last,
                             "cross": self.cross}).encode()
        self.f.write(self.index.data)
        self.f.write(header)
        self.f.write(np.array([index_at, len(header)], np.int64).data)
        self.f.write(MAGIC)


def committed_segments(corpus: Storage, drops: list[dict]) -> tuple[list[str], list[str]]:
    """(the segments holding every committed clip, in drop order; the other files of the store:
    covered by a merge, or written by an add that never committed), from one listing."""
    valid, garbage = [], []
    for rel in corpus.list_files(layout.STORE, recursive=False):
        parsed = layout.parse_store_segment(rel.rsplit("/", 1)[-1])
        if parsed is not None and parsed[1] < len(drops) and drops[parsed[1]]["token"] == parsed[2]:
            valid.append((parsed[0], -parsed[1], rel))
        else:
            garbage.append(rel)
    read, covered = [], -1
    for first, neg_last, rel in sorted(valid):
        if first > covered:
            read.append(rel)
            covered = -neg_last
        else:
            garbage.append(rel)
    return read, garbage


def stacked(segments: list[Segment], cluster: int, after: np.ndarray) -> tuple[Block, np.ndarray]:
    """The cluster's committed clips (a Block), and one array [their embeddings; `after`] (one
    copy of the earlier clips, for the pairwise pass)."""
    blocks = [b for s in segments if (b := s.block(cluster)) is not None]
    m = sum(len(b.ids) for b in blocks)
    emb = np.empty((m + len(after), after.shape[1]), np.float32)
    at = 0
    for b in blocks:
        emb[at:at + len(b.ids)] = b.emb
        at += len(b.ids)
    emb[m:] = after
    if not blocks:
        return Block(pa.array([], pa.string()), emb[:0], np.zeros(0, np.int32)), emb
    return concat_blocks(blocks), emb


def merge_from(rows: list[int]) -> int:
    """Segments (clips each, oldest first) merge from the returned position on (the last one:
    no merge): the one before the newest joins while it holds no more than those after it."""
    j, total = len(rows) - 1, rows[-1]
    while j > 0 and rows[j - 1] <= total:
        j -= 1
        total += rows[j]
    return j


def merge(corpus: Storage, segments: list[Segment], rel: str, n_clusters: int) -> None:
    """Write the segments' clips as one segment `rel`, cluster by cluster (memory: a few
    clusters); reads run ahead on threads (ranged GETs on S3)."""
    workers = host_threads() if corpus.local else LATENCY_BOUND_THREADS

    def read(cluster: int) -> list[Block]:
        return [b for s in segments if (b := s.block(cluster)) is not None]

    with corpus.writing_file(rel) as f:
        writer = SegmentWriter(f, segments[0].dim, n_clusters, segments[0].first,
                               segments[-1].last, segments[0].cross)
        for cluster, blocks in zip(range(n_clusters),
                                   ordered_map(read, range(n_clusters), workers)):
            if blocks:
                writer.add(cluster, concat_blocks(blocks))
        writer.finish()
