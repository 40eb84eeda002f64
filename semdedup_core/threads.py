"""Host threads that overlap I/O with compute. Parquet decoding and encoding, hashing and file
writes release the GIL, so while the main thread runs the GEMMs (BLAS or the GPU), other threads
decode the next input and write the last results. Results always come back in input order, so
outputs never depend on thread timing; work in flight is capped, so memory stays bounded."""

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# A cap, not a measured optimum (only 2 cores were at hand): the GIL-held parts of decoding and
# writing set a limit, and a CPU-limited container may still report all of its node's cores.
MAX_HOST_THREADS = 8
# For many small reads that mostly wait on storage round trips (S3: ~20 ms each), not on cores.
LATENCY_BOUND_THREADS = 32


def host_threads() -> int:
    """Threads for host I/O: the cores this process may use, at most MAX_HOST_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_HOST_THREADS, cores))


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block (process-wide), for work that runs many small GEMMs
    side by side on host threads: OpenBLAS splitting each of them over all cores costs more
    than the product (a 10 x 300 x 512 one took 0.1 ms alone, up to 10 ms with 2 BLAS threads
    on a loaded machine), and threads of both kinds would oversubscribe the cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def compute_pool() -> Iterator[ThreadPoolExecutor]:
    """host_threads() compute threads for the CPU's GEMMs, with BLAS on one thread for the
    duration (`single_threaded_blas`): independent GEMMs side by side keep every core busy, also
    through the single-threaded numpy work between them (reductions, masks, the float64
    re-scoring), where one GEMM split over all cores leaves the others idle. Each product is
    the same bits with one BLAS thread or several (threads split rows and columns, not sums)."""
    with single_threaded_blas(), \
            ThreadPoolExecutor(host_threads(), thread_name_prefix="semdedup-compute") as pool:
        yield pool


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                ahead: int | None = None, pool: Executor | None = None) -> Iterator[R]:
    """`fn(item)` for every item on `workers` threads (or on `pool`'s), yielded in item order.
    At most `ahead` (default: `workers`) calls are submitted but not yet consumed. `items` is
    iterated on the calling thread, so a generator feeding it runs there (e.g. the device
    work)."""
    ahead = max(1, ahead or workers)
    with contextlib.nullcontext(pool) if pool is not None else \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="semdedup-io") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early or a call failed: start nothing more
            for future in pending:
                future.cancel()


@contextlib.contextmanager
def in_order_beside(backlog: int) -> Iterator[Callable[[Callable[[], None]], None]]:
    """A `submit(call)` that runs the calls one after another, in order, on a thread of their
    own beside the caller. At most `backlog` wait (then `submit` waits for the oldest), so
    what they hold stays bounded; when the block ends all have run, and the first error is
    raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix="semdedup-beside") as pool:
        pending: deque = deque()

        def submit(call: Callable[[], None]) -> None:
            while len(pending) >= max(1, backlog):
                pending.popleft().result()
            pending.append(pool.submit(call))

        try:
            yield submit
            while pending:
                pending.popleft().result()
        finally:  # the caller failed or a call did: start nothing more
            for future in pending:
                future.cancel()


_ITEM, _ERROR, _END = range(3)


def chain_ahead(producers: Iterable[Callable[[], Iterable[T]]], workers: int,
                depth: int = 1) -> Iterator[T]:
    """The items of every producer's iterable, producer after producer, in order, while up to
    `workers` producers run ahead on threads, each holding at most `depth` finished items.
    An exception inside a producer is raised here when its turn comes, so errors surface in
    input order too."""
    stop = threading.Event()

    def put(q: queue.Queue, entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump(producer, q: queue.Queue) -> None:
        try:
            for item in producer():
                if not put(q, (_ITEM, item)):
                    return
            put(q, (_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(q, (_ERROR, exc))

    producers = iter(producers)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="semdedup-read") as pool:
        running: deque[queue.Queue] = deque()

        def start_next() -> None:
            producer = next(producers, None)
            if producer is not None:
                q: queue.Queue = queue.Queue(maxsize=depth)
                pool.submit(pump, producer, q)
                running.append(q)

        for _ in range(max(1, workers)):
            start_next()
        try:
            while running:
                kind, value = running[0].get()
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    running.popleft()
                    start_next()
        finally:
            stop.set()  # producers blocked on a full queue give up within 0.1 s
