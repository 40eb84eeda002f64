"""One output folder, one whole run: the folder's ownership lock and its completion record.

`_semdedup.lock` (the lock) says who is writing the folder: owner (a run id), host, pid, start
time and a lease expiry, which a heartbeat thread renews while the run lives. It is taken with a
compare-and-swap (`Storage.write_if`: a conditional PUT on S3, an flock-guarded write locally)
before anything is written; a second run fails at once naming the holder, or waits. A lock whose
lease ran out, or whose pid is dead on this host, belonged to a crashed run and is taken over.
The lease (not a process lifetime) lets the steps of one Dagster run, separate processes, hold
the folder together under the run id.

`_semdedup_run.json` (the record) is written last: the config, an input fingerprint, the counts,
the versions, start and finish time. A run deletes it before its first write, and before writing
it removes whatever an earlier run left that this run did not write, so a folder with a record
holds exactly one complete run. Both names start with `_`, so dataset readers skip them.
"""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from semdedup_core import layout
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.errors import ConfigError, SemdedupError
from semdedup_core.storage import Storage, storage_faults

log = logging.getLogger(__name__)

LOCK = layout.RUN_LOCK
RECORD = layout.RUN_RECORD
RECORD_FORMAT = 1
LEASE_S = 60.0  # a crashed CLI run's lock is taken over this long after its last heartbeat
WAIT_POLL_S = 2.0


class OutputBusy(SemdedupError):
    """Another live run holds the output folder."""


class OutputIncomplete(SemdedupError):
    """The output folder has no completion record: a run did not finish (or is running)."""


def _now_text(t: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(t if t is not None else time.time(),
                                           datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Holder:
    """The content of the lock."""

    owner: str  # a run id (a fresh one per CLI run; the Dagster run id)
    host: str
    pid: int | None  # None: held by a run, not a process (Dagster steps come and go)
    started: str  # UTC, ISO 8601
    expires: float  # epoch seconds; 0 once the run has ended without finishing
    state: str = "running"  # or "failed": the run stopped after it began writing
    fingerprint: str | None = None  # of the input, once known: carried to the run's last step

    def describe(self) -> str:
        who = f"host {self.host}" + (f", pid {self.pid}" if self.pid else "")
        return f"run {self.owner} ({who}), started {self.started}"

    def is_stale(self) -> bool:
        if self.state != "running" or time.time() > self.expires:
            return True
        return (self.pid is not None and self.host == socket.gethostname()
                and not pid_alive(self.pid))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host (pid namespace) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_holder(out: Storage) -> Holder | None:
    got = out.read_versioned(LOCK)
    return None if got is None else read_holder_bytes(got[0])


def read_holder_bytes(data: bytes) -> Holder:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):  # not ours, or written by another version: treat as stale
        return Holder("unknown", "unknown", None, "unknown", 0.0, "failed")


class OutputLock:
    """The lock on one output folder, held by `owner`. Use `take_output` (a context manager)."""

    def __init__(self, out: Storage, owner: str, pid: int | None, lease_s: float):
        self.out, self.owner, self.pid, self.lease_s = out, owner, pid, lease_s
        self.started = _now_text()
        self._version: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lock was lost (a slow heartbeat, taken over)
        self.began_writing = False
        self.fingerprint: str | None = None

    def _content(self, state: str = "running", expires: float | None = None) -> bytes:
        holder = Holder(self.owner, socket.gethostname(), self.pid, self.started,
                        time.time() + self.lease_s if expires is None else expires, state,
                        self.fingerprint)
        return json.dumps(asdict(holder), indent=1).encode()

    def try_take(self) -> Holder | None:
        """Take the lock if it is free, stale or already ours; else return its holder."""
        while True:
            got = self.out.read_versioned(LOCK)
            if got is None:
                version = self.out.write_if(LOCK, self._content(), None)
            else:
                holder = read_holder_bytes(got[0])
                if holder.owner != self.owner and not holder.is_stale():
                    return holder
                if holder.owner == self.owner and holder.state == "running":
                    # A later (or parallel) step of the same run: the run's start and input.
                    self.started, self.fingerprint = holder.started, holder.fingerprint
                    self.began_writing = True
                version = self.out.write_if(LOCK, self._content(), got[1])
            if version is not None:
                self._version = version
                return None
            # Someone changed the lock between our read and write: look again.

    def renew(self) -> None:
        with self._mutex:
            while not self.lost and self._version is not None:
                version = self.out.write_if(LOCK, self._content(), self._version)
                if version is not None:
                    self._version = version
                    return
                got = self.out.read_versioned(LOCK)
                holder = read_holder_bytes(got[0]) if got else None
                if holder is not None and holder.owner == self.owner \
                        and holder.state == "running":
                    self._version = got[1]  # renewed by a parallel step of the same run
                    continue
                self.lost = ("it was taken over by " + holder.describe() if holder
                             else "its lock was removed")

    def check(self) -> None:
        """Renew now; raise if another run took the folder over (this run must not finish it)."""
        self.renew()
        if self.lost:
            raise OutputBusy(f"{self.out.display()}: this run lost the output folder: {self.lost}")

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.lease_s / 4):
                with contextlib.suppress(Exception):  # a failed renewal is retried next beat
                    self.renew()

        self._thread = threading.Thread(target=beat, name="semdedup-lease", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self, ok: bool) -> None:
        """Give the folder back. After a failure that followed the first write, the lock stays
        with state "failed" and an expired lease: a later run takes it at once, and `inspect`
        can still say when the unfinished run started."""
        self.stop_heartbeat()
        with self._mutex:
            if self.lost or self._version is None:
                return
            if ok or not self.began_writing:
                self.out.delete_if(LOCK, self._version)
            else:
                self.out.write_if(LOCK, self._content("failed", 0.0), self._version)
            self._version = None


def _try_take(lock: OutputLock) -> Holder | None:
    with storage_faults(lock.out.display(), "write the output folder"):
        return lock.try_take()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


BUSY_ADVICE = "wait for it (--wait) or choose another output_path"


def acquire(out: Storage, owner: str, pid: int | None = None, wait: bool = False,
            lease_s: float = LEASE_S, progress=None, advice: str = BUSY_ADVICE) -> OutputLock:
    """Take the output folder for `owner`, or raise OutputBusy naming its holder (with `wait`,
    poll until it is free). The lock write is also the check that the output can be written
    (S3: the bucket exists, the credentials may write), so a wrong bucket fails in seconds."""
    lock = OutputLock(out, owner, pid, lease_s)
    while (holder := _try_take(lock)) is not None:
        if not wait:
            raise OutputBusy(f"{out.display()}: another run is writing this output folder: "
                             f"{holder.describe()}; {advice}")
        if progress is not None:
            progress(holder)
        time.sleep(WAIT_POLL_S)
    lock.start_heartbeat()
    return lock


@contextlib.contextmanager
def take_output(out: Storage, owner: str | None = None, wait: bool = False,
                lease_s: float = LEASE_S, advice: str = BUSY_ADVICE) -> Iterator[OutputLock]:
    """The folder for the length of the block (one process; heartbeat included). On the way in,
    unfinished multipart uploads of crashed runs under the prefix are aborted. A local output
    folder this run created is removed again if the run wrote nothing into it."""
    created = out.local and not os.path.isdir(out.root)
    lock = acquire(out, owner or new_run_id(), os.getpid(), wait, lease_s, advice=advice)
    ok = False
    try:
        out.abort_multipart_uploads()
        yield lock
        ok = True
    finally:
        try:
            lock.release(ok)
        except Exception:  # noqa: BLE001 - the run's own error matters more (a full disk)
            if ok:
                raise
            log.warning("%s: could not mark the lock as failed", out.display(LOCK))
        if created and not lock.began_writing:
            with contextlib.suppress(OSError):
                os.rmdir(out.root)


# -- the completion record -----------------------------------------------------------------------
def begin_writing(out: Storage, lock: OutputLock, fingerprint: str | None = None) -> None:
    """Before the first write: the folder stops being complete. `fingerprint`: the input's,
    kept in the lock for the step that writes the record."""
    if out.exists(layout.CORPUS_MANIFEST):  # the run's centroids would replace the corpus's
        raise ConfigError(f"{out.display()}: holds a semdedup corpus, not a run's output; "
                          "nothing was changed; give the run another output path")
    if fingerprint is not None:
        lock.fingerprint = fingerprint
    lock.check()
    lock.began_writing = True
    out.delete_file(RECORD)


def input_fingerprint(files: list[tuple[str, int, float | None]]) -> str:
    """SHA-256 of the input files' (path, size, mtime) triples, in order; mtime None where it is
    not a property of the data (files extracted from a zip)."""
    h = hashlib.sha256()
    for rel, size, mtime in files:
        h.update(f"{rel}\0{size}\0{'' if mtime is None else repr(float(mtime))}\n".encode())
    return h.hexdigest()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("semdedup", "numpy", "pyarrow"):
        with contextlib.suppress(PackageNotFoundError):
            found[pkg] = version(pkg)
    return found


def remove_leftovers(out: Storage, cfg: DedupConfig, clusters: list[int],
                     extra_eps: list[float] = ()) -> list[str]:
    """Delete every file of the layout's folders that this run did not write: shards, pruning
    tables and parts of clusters that no longer exist, other eps' `unique_ids` and summaries,
    and temporary files of interrupted writes. One listing of the folder. Returns what went."""
    eps = list(cfg.eps_to_extract) + list(extra_eps)
    wanted = {layout.CENTROIDS}
    wanted |= {layout.pruning_table(c) for c in clusters}
    wanted |= {layout.unique_ids_part(e, c) for e in eps for c in clusters}
    wanted |= {layout.summary_csv(e) for e in eps}
    wanted.add(layout.AUDIT)
    if cfg.cross_cluster:  # without it, cross tables of an earlier run go (sweep would use them)
        wanted |= {layout.cross_table(c) for c in clusters}
    shard_dirs = {layout.shard_dir(c) for c in clusters}
    gone = []
    for rel in out.list_files():
        top = rel.split("/", 1)[0]
        keep = rel in wanted or (rel.rsplit("/", 1)[0] in shard_dirs
                                 and not rel.endswith(".tmp"))
        name = rel.rsplit("/", 1)[-1]
        tmp = name.endswith(".tmp") and not name.startswith(f".{LOCK}.")  # not the heartbeat's
        if top in (layout.CLUSTERING, layout.EXTRACTION) and not keep or tmp:
            out.delete_file(rel)
            gone.append(rel)
    if out.local:  # folders emptied above (S3 has no folders)
        for base in (layout.SHARDS, layout.EXTRACTION):
            root = out.path(base)
            for dirpath, _, _ in sorted(os.walk(root), reverse=True):
                if dirpath != root:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
    return gone


def counts(clips: int, dim: int, clusters: list[int], summary: dict[float, dict]) -> dict:
    return {"clips": clips, "dim": dim, "nonempty_clusters": len(clusters),
            "removed": {eps_text(e): r["removed"] for e, r in summary.items()}}


def write_record(out: Storage, lock: OutputLock, cfg: DedupConfig, counts: dict) -> None:
    """Write the completion record (last, while the lock is still ours)."""
    lock.check()
    out.write_bytes(RECORD, record_bytes(cfg, counts, lock.owner, lock.started,
                                         lock.fingerprint))


def record_bytes(cfg: DedupConfig, counts: dict, run_id: str, started: str,
                 fingerprint: str | None) -> bytes:
    """The completion record's content (also what a corpus writes into each drop it commits)."""
    record = {
        "format": RECORD_FORMAT,
        "run_id": run_id,
        "started": started,
        "finished": _now_text(),
        "host": socket.gethostname(),
        "config": cfg.model_dump(mode="json"),
        "input": {"path": cfg.input_embeddings_path, "fingerprint": fingerprint},
        "counts": counts,
        "versions": versions(),
    }
    return json.dumps(record, indent=1, sort_keys=True).encode()


def read_record(out: Storage) -> dict | None:
    try:
        return json.loads(out.read_bytes(RECORD))
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def incomplete_reason(out: Storage, own: OutputLock | None = None) -> str | None:
    """None when the folder holds a finished run; else one line saying what is going on.
    `own`: the caller's lock, if it holds the folder (its own lock says nothing)."""
    if read_record(out) is not None or committed_corpus_drop(out) is not None:
        return None
    holder = read_holder(out)
    if holder is not None and own is not None and holder.owner == own.owner:
        holder = None
    where = out.display()
    if holder is None:
        if not out.exists(layout.CLUSTERING) and not out.exists(layout.EXTRACTION):
            return f"{where}: no semdedup output here"
        return (f"{where}: incomplete: no completion record ({RECORD}); a run did not finish, "
                "or the folder was written by a semdedup without records")
    if not holder.is_stale():
        return f"{where}: incomplete: a run started at {holder.started} is still writing it " \
               f"({holder.describe()})"
    return f"{where}: incomplete: a run started at {holder.started} did not finish " \
           f"({holder.describe()}); run it again"


def committed_corpus_drop(out: Storage) -> tuple[Storage, str] | None:
    """(the corpus, the drop's name) when `out` is a drop folder of a corpus
    (`<corpus>/drops/<name>`) that the corpus's manifest, its commit, lists: such a folder is
    complete without a record of its own (semdedup_core/corpus.py)."""
    drops = out.parent()
    corpus = drops.parent() if drops is not None else None
    if corpus is None or posixpath.basename(drops.root.rstrip("/")) != layout.DROPS:
        return None
    try:
        manifest = json.loads(corpus.read_bytes(layout.CORPUS_MANIFEST))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None
    name = posixpath.basename(out.root.rstrip("/"))
    if any(d.get("name") == name for d in manifest.get("drops", [])):
        return corpus, name
    return None


def require_complete(out: Storage, own: OutputLock | None = None) -> dict:
    """The record, or OutputIncomplete with the reason."""
    reason = incomplete_reason(out, own)
    if reason is not None:
        raise OutputIncomplete(reason)
    return read_record(out)


# The record's note of a sweep under way (`begin_sweep`): gone when it ends, either way.
SWEEP_UNDER_WAY = "sweep_under_way"


def _write_record_dict(out: Storage, record: dict) -> None:
    out.write_bytes(RECORD, json.dumps(record, indent=1, sort_keys=True).encode())


def begin_sweep(out: Storage, lock: OutputLock, new_eps: list[float],
                previous_audit: bytes | None) -> bytes | None:
    """Before a sweep's first write: the record notes the eps it adds and the audit it will
    replace, so that a sweep killed half-way (with no chance to undo its writes) is undone by
    the next sweep (`interrupted_sweep`; a run rewrites the folder anyway). Returns the
    record's bytes before (None: it had none), for a failed sweep to put back (`put_back`)."""
    before = out.read_bytes(RECORD) if out.exists(RECORD) else None
    record = json.loads(before) if before is not None else {}
    lock.check()
    record[SWEEP_UNDER_WAY] = {
        "run_id": lock.owner, "started": _now_text(), "new_eps": [eps_text(e) for e in new_eps],
        "audit_before": None if previous_audit is None else previous_audit.decode()}
    _write_record_dict(out, record)
    return before


def put_back(out: Storage, before: bytes | None) -> None:
    """The record as `begin_sweep` found it."""
    if before is None:
        out.delete_file(RECORD)
    else:
        out.write_bytes(RECORD, before)


def interrupted_sweep(out: Storage) -> dict | None:
    """The note of a sweep that stopped before it ended (`begin_sweep`), or None."""
    record = read_record(out)
    return None if record is None else record.get(SWEEP_UNDER_WAY)


def forget_sweep(out: Storage, lock: OutputLock) -> None:
    """Once an interrupted sweep's writes are undone: its note goes (and a record that held
    nothing else, a corpus drop's, with it)."""
    record = read_record(out) or {}
    lock.check()
    record.pop(SWEEP_UNDER_WAY, None)
    if record:
        _write_record_dict(out, record)
    else:
        out.delete_file(RECORD)


def add_swept_eps(out: Storage, lock: OutputLock, eps: list[float], rows: dict) -> None:
    """After a sweep: the record lists the swept eps with their counts, so the folder stays
    described by its record; the sweep's note (`begin_sweep`) goes in the same write."""
    record = read_record(out) or {}
    lock.check()
    record.pop(SWEEP_UNDER_WAY, None)
    swept = record.setdefault("swept_eps", {})
    for e in eps:
        swept[eps_text(e)] = {k: rows[e][k] for k in ("kept", "removed", "total")}
    record["swept"] = _now_text()
    _write_record_dict(out, record)
