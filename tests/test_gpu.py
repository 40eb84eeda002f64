"""The GPU backend: parity with the CPU where a CUDA GPU and CuPy are present (marked `gpu`,
skipped elsewhere), and a clean fallback where they are not (runs everywhere)."""

import numpy as np
import pytest

from semdedup_core.backends import CpuBackend, get_backend
from semdedup_core.backends.gpu import unavailable_reason
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
