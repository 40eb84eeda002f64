"""The scale benchmark's cost model (bench/run_bench.py): fitted on runs whose seconds follow
known per-phase costs, it predicts a larger run's seconds exactly."""

import importlib.util
import os

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "run_bench", os.path.join(os.path.dirname(__file__), "..", "bench", "run_bench.py"))
run_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_bench)


def fake_run(n: int, k: int, rng, truth: dict) -> dict:
    sizes = rng.multinomial(n, rng.dirichlet(np.ones(k)))
    run = {"n_rows": n, "dim": 64, "n_clusters": k, "sample_rows": min(n, 256 * k),
           "kmeans_iterations": int(rng.integers(5, 30)), "cluster_sizes": sizes.tolist(),
           "wall": 1.0, "peak_rss_gib": 1.0}
    counts = run_bench.counts(run)
    run["seconds"] = {phase: sum(c * counts[t] for t, c in terms.items())
                      for phase, terms in truth.items()}
    return run


def test_model_fitted_on_two_k_predicts_other_sizes():
    rng = np.random.default_rng(0)
    truth = {phase: {t: float(rng.uniform(1e-9, 1e-7)) for t in terms}
             for phase, terms in run_bench.PHASE_TERMS.items()}
    model = run_bench.fit_model([fake_run(50_000, 50, rng, truth),
                                 fake_run(50_000, 250, rng, truth)])
    for k in (50, 250, 1000):
        target = fake_run(200_000, k, rng, truth)
        predicted = run_bench.predict(model, target)
        for phase, seconds in target["seconds"].items():
            assert predicted[phase] == pytest.approx(seconds, rel=1e-6), phase
        table, ok = run_bench.scale_table(model, [target], target)
        assert ok and "OUTSIDE" not in table
    slow = fake_run(200_000, 50, rng, truth)
    slow["seconds"]["assign"] *= 1.3  # a cliff in one phase is flagged
    table, ok = run_bench.scale_table(model, [slow], slow)
    assert not ok and "assign" in next(ln for ln in table.splitlines() if "OUTSIDE" in ln)
