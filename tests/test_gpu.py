"""The GPU backend: parity with the CPU where a CUDA GPU and CuPy are present (marked `gpu`,
skipped elsewhere), a clean fallback where they are not, and the GPU backend's own code paths
(one-hot scatter, slabs from the host, tile and fit sizing by device memory) run everywhere on
a host stand-in for CuPy."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from semdedup_core import pipeline
from semdedup_core.backends import CpuBackend, get_backend
from semdedup_core.backends.gpu import GpuBackend, unavailable_reason
from semdedup_core.config import make_config
from semdedup_core.embeddings import normalize
from semdedup_core.errors import ConfigError
from semdedup_core.extraction import removed_mask
from semdedup_core.kmeans import lloyd, nearest_centroid
from semdedup_core.pairwise import max_similarity_to_earlier
from semdedup_core.pipeline import run_pipeline

NO_GPU = unavailable_reason()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no GPU backend: {NO_GPU}")


@pytest.mark.skipif(NO_GPU is None, reason="a GPU is present")
def test_without_a_gpu_auto_picks_the_cpu_and_gpu_says_why():
    assert get_backend("auto").name == "cpu"
    with pytest.raises(ConfigError, match="backend 'gpu' is not usable here"):
        get_backend("gpu")


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


@needs_gpu
@pytest.mark.gpu
def test_gpu_pruning_equals_cpu():
    gpu = get_backend("gpu")
    rng = np.random.default_rng(5)
    for n, dim in ((1, 8), (700, 64), (5000, 256)):
        emb = normalize(rng.standard_normal((n, dim)).astype(np.float32))
        emb[n // 2:] = normalize(emb[: n - n // 2] + 1e-3 * rng.standard_normal(
            (n - n // 2, dim)).astype(np.float32))
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
    emb = normalize(np.random.default_rng(2).standard_normal((3000, 64)).astype(np.float32))
    whole = max_similarity_to_earlier(gpu, gpu.asarray(emb), 512)
    slabs = max_similarity_to_earlier(gpu, emb, 512)
    assert (gpu.to_numpy(whole[1]) == gpu.to_numpy(slabs[1])).all()
    assert (gpu.to_numpy(whole[0]) == gpu.to_numpy(slabs[0])).all()


@needs_gpu
@pytest.mark.gpu
def test_gpu_kmeans_agrees_with_cpu_on_blobs():
    gpu = get_backend("gpu")
    rng = np.random.default_rng(0)
    centers = normalize(rng.standard_normal((20, 32)).astype(np.float32))
    x = normalize(np.repeat(centers, 300, axis=0)
                  + 0.05 * rng.standard_normal((6000, 32)).astype(np.float32))
    c_cpu, _ = lloyd(CpuBackend(), x, 20, 100, 1e-4, 3)
    c_gpu, _ = gpu.fit_kmeans(x, 20, 100, 1e-4, 3)
    l_cpu, _ = nearest_centroid(CpuBackend(), x, c_cpu)
    l_gpu, _ = nearest_centroid(CpuBackend(), x, c_gpu)
    assert adjusted_rand_index(l_cpu, l_gpu) >= 0.99


@needs_gpu
@pytest.mark.gpu
def test_gpu_end_to_end_removes_the_same_clips(planted, tmp_path):
    folder, _ = planted
    reports = {}
    for backend in ("cpu", "gpu"):
        cfg = make_config(input_embeddings_path=str(folder), output_path=str(tmp_path / backend),
                          n_clusters=8, backend=backend)
        reports[backend] = run_pipeline(cfg)
    assert reports["gpu"].backend == "gpu"
    assert reports["gpu"].summary[0.01]["removed"] == reports["cpu"].summary[0.01]["removed"]


def test_adjusted_rand_index_helper():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a[::-1] + 5) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.1


# -- the GPU backend's code on a host stand-in for CuPy (runs in CI) ------------------------------
def on_device(x):
    if isinstance(x, tuple):
        return tuple(on_device(v) for v in x)
    return x.view(DeviceArray) if type(x) is np.ndarray else x


def as_plain(x):
    return x.view(np.ndarray) if isinstance(x, DeviceArray) else x


class DeviceArray(np.ndarray):
    """A numpy array standing for device memory. Like CuPy, arithmetic that mixes it with a
    host array fails, so a missing host-to-device copy in the kernels shows up here."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        if any(type(x) is np.ndarray and x.ndim for x in (*inputs, *out)):
            raise TypeError(f"{ufunc.__name__}: host array mixed with device arrays")
        if out:
            kwargs["out"] = tuple(as_plain(o) for o in out)
        return on_device(getattr(ufunc, method)(*(as_plain(x) for x in inputs), **kwargs))


class HostCuPy:
    """The part of CuPy's API that GpuBackend uses, over numpy, for a device of a chosen size:
    every array it makes is a DeviceArray."""

    def __init__(self, free: int, total: int):
        runtime = SimpleNamespace(memGetInfo=lambda: (free, total),
                                  getDeviceProperties=lambda i: {"name": b"host stand-in"})
        self.cuda = SimpleNamespace(runtime=runtime, Device=lambda: SimpleNamespace(id=0))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return lambda *a, **k: on_device(attr(*a, **k))
        return attr

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype).view(DeviceArray)  # the host-to-device copy

    def asnumpy(self, a):
        return np.asarray(a).view(np.ndarray)


class StandInGpu(GpuBackend):
    """GpuBackend exactly as shipped, except that its array module is HostCuPy (no cuML)."""

    def __init__(self, free: int = 64 << 30, total: int = 80 << 30):
        self.xp = HostCuPy(free, total)
        self._cuml = None

    def is_host(self, a) -> bool:
        return type(a) is np.ndarray


def near_duplicates(n, dim, seed):
    rng = np.random.default_rng(seed)
    emb = normalize(rng.standard_normal((n, dim)).astype(np.float32))
    emb[n // 2:] = normalize(emb[: n - n // 2] + 1e-3 * rng.standard_normal(
        (n - n // 2, dim)).astype(np.float32))
    return emb


def test_gpu_backend_pairwise_resident_and_slabs_equal_cpu():
    gpu = StandInGpu()
    tile = gpu.pairwise_tile_size(512, 64)
    assert tile == 8192  # a roomy device gets big tiles
    emb = near_duplicates(3000, 64, 5)
    s_cpu, m_cpu = max_similarity_to_earlier(CpuBackend(), emb, 512)
    for on_device in (gpu.asarray(emb), emb):  # resident cluster, then slabs from the host
        s, m = max_similarity_to_earlier(gpu, on_device, 1024)
        np.testing.assert_array_equal(gpu.to_numpy(s), s_cpu)
        np.testing.assert_array_equal(gpu.to_numpy(m), m_cpu)


def test_gpu_backend_small_device_shrinks_tiles_and_keeps_clusters_on_the_host():
    # tiles take 1/16 of total memory at ~9 bytes per entry: sqrt(32 MiB / 16 / 9) = 482
    assert StandInGpu(free=32 << 20, total=32 << 20).pairwise_tile_size(2048, 64) == 482
    small = StandInGpu(free=1 << 20, total=2 << 20)
    assert small.pairwise_tile_size(2048, 64) == 256  # the floor
    assert StandInGpu(free=4 << 30).pairwise_tile_size(2048, 64) == 8192  # free: no say...
    assert StandInGpu(free=256 << 20).pairwise_tile_size(2048, 64) == 2730  # ...unless low
    emb = near_duplicates(1500, 64, 6)
    assert not small.fits_on_device(emb.nbytes)  # 375 KiB > a quarter of 1 MiB: slabs
    ranked = pipeline.RankedShard(0, None, emb, np.zeros(len(emb), np.float32))
    cpu_cfg = make_config(input_embeddings_path="x", output_path="y", n_clusters=1)
    on_small = pipeline.score_shard(cpu_cfg, small, ranked)
    on_cpu = pipeline.score_shard(cpu_cfg, CpuBackend(), ranked)
    np.testing.assert_array_equal(on_small.score, on_cpu.score)
    np.testing.assert_array_equal(on_small.match, on_cpu.match)


def blobs(k=20, per=300, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((k, dim)).astype(np.float32))
    return normalize(np.repeat(centers, per, axis=0)
                     + 0.05 * rng.standard_normal((k * per, dim)).astype(np.float32))


def test_gpu_backend_fit_keeps_a_too_large_sample_on_the_host(caplog):
    x = blobs()
    roomy, small = StandInGpu(), StandInGpu(free=1 << 20, total=2 << 20)
    c_dev, it_dev = roomy.fit_kmeans(x, 20, 100, 1e-4, 3)
    with caplog.at_level(logging.INFO, logger="semdedup_core.backends.gpu"):
        c_host, it_host = small.fit_kmeans(x, 20, 100, 1e-4, 3)
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


def test_gpu_backend_end_to_end_removes_what_the_cpu_removes(planted, tmp_path, monkeypatch):
    cfg = {"input_embeddings_path": str(planted[0]), "n_clusters": 8,
           "eps_to_extract": [0.01, 0.1]}
    cpu = run_pipeline(make_config(output_path=str(tmp_path / "cpu"), backend="cpu", **cfg))
    monkeypatch.setattr(pipeline, "get_backend", lambda name: StandInGpu())
    gpu = run_pipeline(make_config(output_path=str(tmp_path / "gpu"), backend="gpu", **cfg))
    assert gpu.backend == "gpu"
    assert gpu.summary == cpu.summary
    assert (gpu.cluster_sizes == cpu.cluster_sizes).all()
