"""The host-thread helpers: results in input order whatever the timing, work in flight capped,
errors raised in input order, and no thread left behind when the consumer stops early."""

import random
import threading
import time

import pytest

from semdedup_core.threads import chain_ahead, in_order_beside, ordered_map


def test_ordered_map_keeps_order_and_caps_work_in_flight():
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}

    def slow_square(x):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(random.random() / 200)  # finish out of order
        with lock:
            state["running"] -= 1
        return x * x

    submitted = []

    def items():
        for i in range(60):
            submitted.append(i)
            yield i

    seen = []
    for result in ordered_map(slow_square, items(), workers=4, ahead=4):
        seen.append(result)
        # never more than `ahead` items taken beyond what was consumed
        assert len(submitted) - len(seen) <= 4
    assert seen == [i * i for i in range(60)]
    assert 1 < state["peak"] <= 4


def test_ordered_map_raises_the_first_failure_in_order_and_stops():
    def fail_on_3_and_7(x):
        if x in (3, 7):
            raise ValueError(f"item {x}")
        return x

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for r in ordered_map(fail_on_3_and_7, range(100), workers=3):
            got.append(r)
    assert got == [0, 1, 2]


def producer(n, delay, fail_at=None):
    def run():
        for i in range(n):
            time.sleep(delay)
            if i == fail_at:
                raise RuntimeError(f"producer failed at {i}")
            yield (n, delay, i)
    return run


def test_chain_ahead_yields_producers_in_order():
    # the later producers are faster: their items must still come after the earlier ones'
    producers = [producer(5, d) for d in (0.01, 0.002, 0.0, 0.005)]
    expected = [item for p in producers for item in p()]
    assert list(chain_ahead(producers, workers=3)) == expected


def test_chain_ahead_raises_a_later_failure_only_after_earlier_items():
    producers = [producer(4, 0.01), producer(3, 0.0, fail_at=1)]
    got = []
    with pytest.raises(RuntimeError, match="failed at 1"):
        for item in chain_ahead(producers, workers=2):
            got.append(item)
    assert got == [(4, 0.01, i) for i in range(4)] + [(3, 0.0, 0)]


def test_chain_ahead_stopped_early_leaves_no_thread_running():
    before = threading.active_count()
    gen = chain_ahead([producer(1000, 0.0) for _ in range(4)], workers=4)
    assert next(gen) == (1000, 0.0, 0)
    gen.close()  # producers are blocked on full queues: they must give up
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_single_threaded_blas_sets_and_restores_openblas_threads():
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)
    from threadpoolctl import threadpool_info

    from semdedup_core.threads import single_threaded_blas

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy's OpenBLAS was not found"
    with single_threaded_blas():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before


def test_in_order_beside_runs_calls_in_order_with_a_bounded_backlog():
    """The calls run one at a time in submission order on another thread, `submit` waits
    once `backlog` are queued, all have run when the block ends, and a failure is raised
    there."""
    done, caller = [], threading.get_ident()
    gate = threading.Event()

    def call(i):
        def run():
            gate.wait()
            assert threading.get_ident() != caller
            done.append(i)
        return run

    with in_order_beside(backlog=3) as submit:
        for i in range(3):
            submit(call(i))
        assert done == []  # queued, not run: the gate is shut
        gate.set()
        for i in range(3, 40):
            submit(call(i))
            assert i + 1 - len(done) <= 3  # waited for the oldest beyond the backlog
    assert done == list(range(40))

    ran = []

    def fail():
        raise ValueError("call 2 failed")

    with pytest.raises(ValueError, match="call 2 failed"):
        with in_order_beside(backlog=10) as submit:
            submit(lambda: ran.append(1))
            submit(fail)
            submit(lambda: (time.sleep(0.05), ran.append(3)))
    assert ran[0] == 1


def test_a_run_writes_the_same_outputs_whatever_the_host_thread_count(planted, tmp_path,
                                                                      monkeypatch):
    """The thread count comes from the cores the process may use (`host_threads`): 1 and 3
    give the same bytes in every artifact (centroids, pruning and cross tables, unique_ids,
    summaries, audit.json) and the same clips in every shard. Only which of a cluster's clips
    share a shard file may differ (files are cut at decoded batches, read_batch_rows / threads
    rows: README, Shards)."""
    import os

    import numpy as np
    import pyarrow.parquet as pq

    from semdedup_core import layout
    from semdedup_core.config import make_config
    from semdedup_core.pipeline import run_pipeline
    from tests.test_end_to_end import tree

    folder, _ = planted
    trees, shards = [], []
    for threads in (1, 3):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=threads: set(range(n)))
        out = tmp_path / f"t{threads}"
        run_pipeline(make_config(input_embeddings_path=str(folder), output_path=str(out),
                                 n_clusters=6, eps_to_extract=[0.01, 0.1], cross_cluster=True,
                                 which_to_keep="random", read_batch_rows=700,
                                 spill_buffer_mb=0.05))
        files = tree(out)
        trees.append({f: h for f, h in files.items() if not f.startswith(layout.SHARDS)})
        content = {}
        for c in range(6):
            table = pq.read_table(out / layout.shard_dir(c)).sort_by(layout.ID)
            content[c] = (table.column(layout.ID).to_pylist(),
                          np.stack(table.column(layout.EMBEDDING).to_numpy(zero_copy_only=False)))
        shards.append(content)
    assert trees[0] == trees[1]
    assert any(f.endswith("audit.json") for f in trees[0])
    for c in range(6):
        assert shards[0][c][0] == shards[1][c][0]
        np.testing.assert_array_equal(shards[0][c][1], shards[1][c][1])
