"""The GPU backend: parity with the CPU where a CUDA GPU and CuPy are present (marked `gpu`,
skipped elsewhere; `scripts/gpu-check` runs them on a device), a clean fallback where they are
not, and the GPU backend's own code (probe, one-hot scatter, slabs from the host, tile and fit
sizing by device memory, the cuML opt-in) run everywhere on the strict host stand-ins for CuPy
and cuML of `tests/cupy_standin.py`."""

import importlib.util
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from semdedup_core import layout, pipeline
from semdedup_core.backends import CpuBackend, get_backend
from semdedup_core.backends.gpu import GpuBackend, unavailable_reason
from semdedup_core.cli import main as cli_main
from semdedup_core.config import make_config, parse_job_spec
from semdedup_core.embeddings import normalize
from semdedup_core.errors import ConfigError
from semdedup_core.extraction import removed_mask, summarize
from semdedup_core.kmeans import lloyd, nearest_centroid
from semdedup_core.shards import save_centroids
from semdedup_core.pairwise import max_similarity_to_earlier
from semdedup_core.pipeline import run_pipeline
from tests.cupy_standin import DeviceArray, HostArrayError, HostCuPy, StandInKMeans, installed

NO_GPU = unavailable_reason()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no GPU backend: {NO_GPU}")


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return float((index - expected) / ((rows + cols) / 2 - expected))


def test_adjusted_rand_index_helper():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a[::-1] + 5) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.1


def near_duplicates(n, dim, seed):
    rng = np.random.default_rng(seed)
    emb = normalize(rng.standard_normal((n, dim)).astype(np.float32))
    emb[n // 2:] = normalize(emb[: n - n // 2] + 1e-3 * rng.standard_normal(
        (n - n // 2, dim)).astype(np.float32))
    return emb


def blobs(k=20, per=300, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((k, dim)).astype(np.float32))
    return normalize(np.repeat(centers, per, axis=0)
                     + 0.05 * rng.standard_normal((k * per, dim)).astype(np.float32))


def run_from_centroids(cfg, backend, centroids: np.ndarray) -> None:
    """Every stage after the fit, from given centroids: the pipeline on `backend` without
    K-means convergence in the comparison."""
    out = pipeline.output_storage(cfg)
    with pipeline.open_source(cfg) as source:
        save_centroids(out, centroids)
        sizes = pipeline.assign(cfg, source, centroids, out, backend)
    clusters = [int(c) for c in np.flatnonzero(sizes)]
    removed = pipeline.prune_all(cfg, out, clusters, backend)
    summarize(out, cfg.eps_to_extract, clusters, int(sizes.sum()), removed)


def pruning_tables(root) -> dict:
    folder = root / layout.PRUNING_TABLES
    return {p.name: pq.read_table(p).to_pydict() for p in sorted(folder.iterdir())}


def assert_same_pipeline_results(cpu_root, gpu_root, atol: float) -> None:
    """Same clusters, ranks, matches and removals; scores within atol."""
    cpu, gpu = pruning_tables(cpu_root), pruning_tables(gpu_root)
    assert cpu.keys() == gpu.keys() and cpu
    for name in cpu:
        assert gpu[name]["id"] == cpu[name]["id"], name
        assert gpu[name]["max_id"] == cpu[name]["max_id"], name
        np.testing.assert_allclose(gpu[name]["cosine_sim_score"], cpu[name]["cosine_sim_score"],
                                   atol=atol)
    for summary in sorted(cpu_root.glob("extraction/dedup_summary_*.csv")):
        assert (gpu_root / summary.relative_to(cpu_root)).read_text() == summary.read_text()


# -- on a real device (skipped without one) ------------------------------------------------------
@pytest.mark.skipif(NO_GPU is None, reason="a GPU is present")
def test_without_a_gpu_auto_picks_the_cpu_and_gpu_says_why():
    assert get_backend("auto").name == "cpu"
    with pytest.raises(ConfigError, match="backend 'gpu' is not usable here"):
        get_backend("gpu")


@needs_gpu
@pytest.mark.gpu
def test_gpu_pruning_equals_cpu():
    gpu = get_backend("gpu")
    for n, dim in ((1, 8), (700, 64), (5000, 256)):
        emb = near_duplicates(n, dim, 5)
        s_cpu, m_cpu = max_similarity_to_earlier(CpuBackend(), emb, 512)
        s_gpu, m_gpu = max_similarity_to_earlier(gpu, gpu.asarray(emb), 4096)
        s_gpu, m_gpu = gpu.to_numpy(s_gpu), gpu.to_numpy(m_gpu)
        np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-5)
        assert (m_gpu == m_cpu).all()
        assert (removed_mask(s_gpu, 0.01) == removed_mask(s_cpu, 0.01)).all()


@needs_gpu
@pytest.mark.gpu
def test_gpu_slabs_from_host_equal_the_device_resident_cluster():
    """A cluster too large for the device stays on the host and moves over tile by tile."""
    gpu = get_backend("gpu")
    emb = near_duplicates(3000, 64, 2)
    whole = max_similarity_to_earlier(gpu, gpu.asarray(emb), 512)
    slabs = max_similarity_to_earlier(gpu, emb, 512)
    assert (gpu.to_numpy(whole[1]) == gpu.to_numpy(slabs[1])).all()
    assert (gpu.to_numpy(whole[0]) == gpu.to_numpy(slabs[0])).all()


@needs_gpu
@pytest.mark.gpu
def test_gpu_lloyd_is_bit_reproducible_and_agrees_with_cpu():
    gpu = get_backend("gpu")
    x = blobs()
    c_gpu, it = gpu.fit_kmeans(x, 20, 100, 1e-4, 3)
    again, it_again = gpu.fit_kmeans(x, 20, 100, 1e-4, 3)
    assert c_gpu.tobytes() == again.tobytes() and it == it_again
    c_cpu, _ = lloyd(CpuBackend(), x, 20, 100, 1e-4, 3)
    l_cpu, _ = nearest_centroid(CpuBackend(), x, c_cpu)
    l_gpu, _ = nearest_centroid(CpuBackend(), x, c_gpu)
    assert adjusted_rand_index(l_cpu, l_gpu) >= 0.99


@needs_gpu
@pytest.mark.gpu
def test_gpu_pipeline_from_the_cpu_centroids_removes_the_same_clips(planted, tmp_path):
    """The CPU's centroids for both, so this checks assignment, ranking and pruning on the
    device, not K-means convergence (GEMM rounding may move a fit's near-ties)."""
    args = {"input_embeddings_path": str(planted[0]), "n_clusters": 8,
            "eps_to_extract": [0.01, 0.1]}
    cpu_cfg = make_config(output_path=str(tmp_path / "cpu"), backend="cpu", **args)
    run_pipeline(cpu_cfg)
    centroids = np.load(tmp_path / "cpu" / layout.CENTROIDS)
    gpu_cfg = make_config(output_path=str(tmp_path / "gpu"), backend="gpu", **args)
    run_from_centroids(gpu_cfg, get_backend("gpu"), centroids)
    assert_same_pipeline_results(tmp_path / "cpu", tmp_path / "gpu", atol=1e-5)


# -- the settings cuML refuses are refused on every door -----------------------------------------
@pytest.mark.parametrize("arg,value,message", [
    ("random_state", -1, "random_state: Input should be greater than or equal to 0"),
    ("random_state", 2**32, "random_state: Input should be less than 4294967296"),
    ("kmeans_tol", 0, "kmeans_tol: Input should be greater than 0"),
])
def test_settings_cuml_refuses_fail_the_same_way_on_every_door(tmp_path, capsys, arg, value,
                                                               message):
    args = {"input_embeddings_path": str(tmp_path / "in"), "output_path": str(tmp_path / "out"),
            "n_clusters": 2, arg: value}
    with pytest.raises(ConfigError, match=message):
        make_config(**args)
    with pytest.raises(ConfigError, match=message):
        parse_job_spec({"pipeline": "semantic-dedup", "args": args})
    if importlib.util.find_spec("dagster") is not None:  # not on the GPU check machine
        from semdedup_dagster.config import SemdedupResource

        with pytest.raises(ConfigError, match=message):
            SemdedupResource(**args).engine()
    flags = ["run", "--input-embeddings-path", str(tmp_path / "in"), "--output-path",
             str(tmp_path / "out"), "--n-clusters", "2", "--" + arg.replace("_", "-"), str(value)]
    assert cli_main(flags) == 1
    assert message in capsys.readouterr().err
    make_config(**{**args, arg: {"random_state": 2**32 - 1, "kmeans_tol": 1e-12}[arg]})


# -- the strict stand-in behaves like CuPy where the kernels depend on it ------------------------
def test_standin_refuses_host_arrays_implicit_conversion_and_unknown_keywords():
    xp = HostCuPy()
    d = xp.asarray(np.arange(6, dtype=np.float32))
    host, zero_d = np.arange(6, dtype=np.float32), np.asarray(np.float32(1))
    calls = {
        "where": lambda h: xp.where(d > 2, h, d), "maximum": lambda h: xp.maximum(d, h),
        "matmul": lambda h: xp.matmul(d, h), "searchsorted": lambda h: xp.searchsorted(d, h),
        "take_along_axis": lambda h: xp.take_along_axis(d, h, axis=0),
        "concatenate": lambda h: xp.concatenate([d, h]), "bincount": lambda h: xp.bincount(h),
        "cumsum": lambda h: xp.cumsum(h), "argsort": lambda h: xp.argsort(h),
        "clip": lambda h: xp.clip(d, h, 3), "arithmetic": lambda h: d + h,
        "reflected": lambda h: h * d, "in place": lambda h: d.__iadd__(h),
    }
    for name, call in calls.items():
        for h in (host if name != "bincount" else host.astype(np.int64), zero_d):
            with pytest.raises((HostArrayError, NotImplementedError)):
                call(h)
                pytest.fail(f"{name} accepted a host array of shape {h.shape}")
    assert float((d * np.float32(2) + 1).sum()) == 36.0  # numpy and Python scalars are fine
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    with pytest.raises(TypeError):
        np.maximum(d, d)  # numpy functions never see device memory
    with pytest.raises(ValueError, match="kind can only be None or 'stable'"):
        xp.argsort(d, kind="quicksort")
    with pytest.raises(TypeError):
        d.argsort(kind="stable")  # CuPy 13's method takes no kind
    with pytest.raises(TypeError):
        xp.asarray(host, copy=False)  # CuPy 14 only
    with pytest.raises(AttributeError, match="cupy.add is not in the stand-in"):
        xp.add  # noqa: B018 - not used by the engine, so not in the stand-in
    with pytest.raises(AttributeError, match="cupy.ndarray.mean is not in the stand-in"):
        d.mean()


def test_standin_copies_between_host_and_device_and_sorts_stably():
    xp = HostCuPy()
    host = np.zeros(4, dtype=np.float32)
    d = xp.asarray(host)
    host[0] = 1
    assert float(d[0]) == 0  # the device copy did not follow the host
    back = xp.asnumpy(d)
    back[1] = 5
    assert float(d[1]) == 0
    assert xp.asarray(d) is d  # already on the device: no copy, as on CuPy
    ties = xp.asarray(np.array([1, 0, 1, 0, 1, 0] * 50))
    assert xp.asnumpy(xp.argsort(ties)).tolist() == list(range(1, 300, 2)) + list(range(0, 300, 2))
    view = d[1:]
    view[view >= 0] = 7  # masked assignment into a view writes through, as on CuPy
    assert xp.asnumpy(d).tolist() == [0, 7, 7, 7]


def test_cuml_standin_refuses_what_cuml_refuses():
    x = DeviceArray(blobs(k=3, per=20, dim=4))
    init = x[:3].copy()
    good = {"n_clusters": 3, "max_iter": 10, "tol": 1e-4, "n_init": 1, "init": init,
            "random_state": 0, "max_samples_per_batch": 32768, "output_type": "cupy"}
    StandInKMeans(**good).fit(x)
    StandInKMeans(**{**good, "random_state": 2**32 - 1}).fit(x)
    for bad, match in (({"tol": 0.0}, "tol must be > 0"),
                       ({"random_state": -1}, "random_state"),
                       ({"random_state": 2**32}, "random_state"),
                       ({"n_init": "auto"}, "n_init"),
                       ({"init": x[:2].copy()}, "shape of the initial centers")):
        with pytest.raises(ValueError, match=match):
            StandInKMeans(**{**good, **bad}).fit(x)
    with pytest.raises(TypeError):
        StandInKMeans(3)  # keyword-only, as cuML's


# -- the shipped GpuBackend on the stand-ins ------------------------------------------------------
def test_probe_runs_a_kernel_and_a_matmul_and_auto_falls_back(monkeypatch, caplog):
    installed(monkeypatch, HostCuPy())
    assert unavailable_reason() is None
    assert get_backend("auto").name == "gpu"
    installed(monkeypatch, HostCuPy(devices=0))
    assert unavailable_reason() == "no CUDA device is visible"
    for part, words in (("kernel", "cannot compile or run a kernel"), ("matmul", "cannot run a matmul")):
        installed(monkeypatch, HostCuPy(broken=part))
        reason = unavailable_reason()
        assert words in reason and "[ctk]" in reason and "libnvrtc.so or libcublas.so" in reason
        with caplog.at_level(logging.INFO, logger="semdedup_core.backends"):
            assert get_backend("auto").name == "cpu"
        assert words in caplog.text
        with pytest.raises(ConfigError, match=f"backend 'gpu' is not usable here: CuPy {words}"):
            get_backend("gpu")


def test_tf32_in_the_environment_is_warned_about(monkeypatch, caplog):
    installed(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="semdedup_core.backends.gpu"):
        monkeypatch.setenv("CUPY_TF32", "0")
        GpuBackend()
        assert "TF32" not in caplog.text
        monkeypatch.setenv("CUPY_TF32", "1")
        GpuBackend()
    assert "CUPY_TF32=1" in caplog.text and "1e-5 tie tolerance" in caplog.text


def test_free_memory_counts_the_pools_free_blocks(monkeypatch):
    # 256 MiB free shrinks the tile (see below); 4 GiB more held free in CuPy's pool does not.
    installed(monkeypatch, HostCuPy(free=256 << 20, pool_free=4 << 30))
    gpu = GpuBackend()
    assert gpu.free_bytes() == (256 << 20) + (4 << 30)
    assert gpu.pairwise_tile_size(2048, 64) == 8192
    assert gpu.fits_on_device(1 << 30) and not gpu.fits_on_device(2 << 30)


def test_gpu_backend_pairwise_resident_and_slabs_equal_cpu(monkeypatch):
    installed(monkeypatch)
    gpu = GpuBackend()
    assert gpu.pairwise_tile_size(512, 64) == 8192  # a roomy device gets big tiles
    emb = near_duplicates(3000, 64, 5)
    s_cpu, m_cpu = max_similarity_to_earlier(CpuBackend(), emb, 512)
    for cluster in (gpu.asarray(emb), emb):  # resident cluster, then slabs from the host
        s, m = max_similarity_to_earlier(gpu, cluster, 1024)
        np.testing.assert_array_equal(gpu.to_numpy(s), s_cpu)
        np.testing.assert_array_equal(gpu.to_numpy(m), m_cpu)


def test_gpu_backend_small_device_shrinks_tiles_and_keeps_clusters_on_the_host(monkeypatch):
    def backend(**device):
        installed(monkeypatch, HostCuPy(**device))
        return GpuBackend()

    # tiles take 1/16 of total memory at ~9 bytes per entry: sqrt(32 MiB / 16 / 9) = 482
    assert backend(free=32 << 20, total=32 << 20).pairwise_tile_size(2048, 64) == 482
    assert backend(free=4 << 30).pairwise_tile_size(2048, 64) == 8192  # free: no say...
    assert backend(free=256 << 20).pairwise_tile_size(2048, 64) == 2730  # ...unless low
    small = backend(free=1 << 20, total=2 << 20)
    assert small.pairwise_tile_size(2048, 64) == 256  # the floor
    emb = near_duplicates(1500, 64, 6)
    assert not small.fits_on_device(emb.nbytes)  # 375 KiB > a quarter of 1 MiB: slabs
    ranked = pipeline.RankedShard(0, None, emb, np.zeros(len(emb), np.float32))
    cpu_cfg = make_config(input_embeddings_path="x", output_path="y", n_clusters=1)
    on_small = pipeline.score_shard(cpu_cfg, small, ranked)
    on_cpu = pipeline.score_shard(cpu_cfg, CpuBackend(), ranked)
    np.testing.assert_array_equal(on_small.score, on_cpu.score)
    np.testing.assert_array_equal(on_small.match, on_cpu.match)


def test_gpu_backend_fit_is_the_lloyd_and_keeps_a_too_large_sample_on_the_host(monkeypatch,
                                                                                caplog):
    x = blobs()
    installed(monkeypatch)
    roomy = GpuBackend()
    c_dev, it_dev = roomy.fit_kmeans(x, 20, 100, 1e-4, 3)
    again, _ = roomy.fit_kmeans(x, 20, 100, 1e-4, 3)
    assert c_dev.tobytes() == again.tobytes()
    installed(monkeypatch, HostCuPy(free=1 << 20, total=2 << 20))
    with caplog.at_level(logging.INFO, logger="semdedup_core.backends.gpu"):
        c_host, it_host = GpuBackend().fit_kmeans(x, 20, 100, 1e-4, 3)
    assert "sample in host memory" in caplog.text
    # same kernels, same order of operations: the sample's location changes no bit
    np.testing.assert_array_equal(c_host, c_dev)
    assert it_host == it_dev
    # and the one-hot GEMM scatter agrees with the CPU's sparse scatter
    c_cpu, _ = lloyd(CpuBackend(), x, 20, 100, 1e-4, 3)
    np.testing.assert_allclose(c_dev, c_cpu, atol=1e-5)
    l_cpu, _ = nearest_centroid(CpuBackend(), x, c_cpu)
    l_dev, _ = nearest_centroid(CpuBackend(), x, c_dev)
    assert adjusted_rand_index(l_cpu, l_dev) == pytest.approx(1.0)


def test_cuml_is_opt_in_and_its_import_error_is_logged(monkeypatch, caplog):
    x = blobs()
    installed(monkeypatch)  # no cuML
    lloyd_fit, _ = GpuBackend().fit_kmeans(x, 20, 100, 1e-4, 3)
    with caplog.at_level(logging.INFO, logger="semdedup_core.backends.gpu"):
        fallback, _ = GpuBackend().fit_kmeans(x, 20, 100, 1e-4, 3, gpu_kmeans="cuml")
    assert "cuML cannot be imported (ModuleNotFoundError: " in caplog.text
    assert fallback.tobytes() == lloyd_fit.tobytes()
    installed(monkeypatch, cuml=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="semdedup_core.backends.gpu"):
        by_cuml, iters = GpuBackend().fit_kmeans(x, 20, 100, 1e-4, 3, gpu_kmeans="cuml")
        assert GpuBackend().fit_kmeans(x, 20, 100, 1e-4, 3)[0].tobytes() == lloyd_fit.tobytes()
    assert "cuML KMeans" in caplog.text and iters >= 1
    l_lloyd, _ = nearest_centroid(CpuBackend(), x, lloyd_fit)
    l_cuml, _ = nearest_centroid(CpuBackend(), x, by_cuml)
    assert adjusted_rand_index(l_lloyd, l_cuml) >= 0.99


def test_gpu_backend_end_to_end_on_the_standin(planted, tmp_path, monkeypatch):
    """A whole run through `get_backend("gpu")` equals the CPU's, and so does the pipeline after
    the fit from the CPU's centroids, byte for byte (the stand-in's GEMMs are the CPU's)."""
    args = {"input_embeddings_path": str(planted[0]), "n_clusters": 8,
            "eps_to_extract": [0.01, 0.1]}
    cpu = run_pipeline(make_config(output_path=str(tmp_path / "cpu"), backend="cpu", **args))
    installed(monkeypatch)
    gpu_cfg = make_config(output_path=str(tmp_path / "gpu"), backend="gpu", **args)
    gpu = run_pipeline(gpu_cfg)
    assert gpu.backend == "gpu"
    assert gpu.summary == cpu.summary
    assert (gpu.cluster_sizes == cpu.cluster_sizes).all()
    centroids = np.load(tmp_path / "cpu" / layout.CENTROIDS)
    from_cpu_cfg = make_config(output_path=str(tmp_path / "from_cpu"), backend="gpu", **args)
    run_from_centroids(from_cpu_cfg, get_backend("gpu"), centroids)
    assert_same_pipeline_results(tmp_path / "cpu", tmp_path / "from_cpu", atol=0)


def test_gpu_backend_cross_cluster_and_audit_equal_cpu(planted, tmp_path, monkeypatch):
    """The cross-cluster search (probes, pull GEMMs, ties) and the audit through the GPU
    backend's code on the stand-in: the same tables and audit as the CPU."""
    cfg = {"input_embeddings_path": str(planted[0]), "n_clusters": 8, "cross_cluster": True,
           "eps_to_extract": [0.05, 0.2], "pairwise_tile_size": 64}
    cpu = run_pipeline(make_config(output_path=str(tmp_path / "cpu"), backend="cpu", **cfg))
    installed(monkeypatch)
    gpu = run_pipeline(make_config(output_path=str(tmp_path / "gpu"), backend="gpu", **cfg))
    assert gpu.backend == "gpu"
    assert gpu.summary == cpu.summary and gpu.audit == cpu.audit
    matched = 0
    for c in np.flatnonzero(cpu.cluster_sizes):
        a = pq.read_table(tmp_path / "cpu" / layout.cross_table(int(c)))
        b = pq.read_table(tmp_path / "gpu" / layout.cross_table(int(c)))
        assert a.drop_columns(["cosine_sim_score"]).equals(b.drop_columns(["cosine_sim_score"]))
        np.testing.assert_allclose(a.column("cosine_sim_score").to_numpy(),
                                   b.column("cosine_sim_score").to_numpy(), atol=1e-6)
        matched += int((a.column("max_cluster").to_numpy() != c).sum())
    assert matched > 0
