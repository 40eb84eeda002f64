"""The exact rules of SPEC.md on hand-checkable fixtures, and the tiled kernel against a plain
reference on random clusters."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from semdedup_core.backends import CpuBackend
from semdedup_core.backends.base import Backend
from semdedup_core.config import eps_text, make_config, parse_job_spec
from semdedup_core.embeddings import normalize
from semdedup_core.errors import ConfigError
from semdedup_core.extraction import removed_mask
from semdedup_core.kmeans import centroid_distances, lloyd, nearest_centroid
from semdedup_core.pairwise import max_similarity_to_earlier
from semdedup_core.ranking import rank_order

CPU = CpuBackend()


def test_public_fixture_scores_and_matches():
    # From NeMo Curator's semantic-dedup tests: rows ranked in input order.
    rows = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [1, 2, 3], [1, 2, 3]],
                    dtype=np.float32)
    for tile in (1, 2, 4, 16):
        score, match = max_similarity_to_earlier(CPU, normalize(rows.copy()), tile)
        np.testing.assert_allclose(score, [0, 0.974631, 0.998190, 0.999618, 1, 1], atol=2e-6)
        assert match.tolist() == [0, 0, 1, 2, 0, 0]


def brute_force(emb: np.ndarray):
    """Plain reference: the full similarity matrix in float64."""
    e = emb.astype(np.float64)
    sims = e @ e.T
    n = len(e)
    score = np.zeros(n)
    match = np.arange(n)
    for j in range(1, n):
        col = sims[:j, j]
        score[j] = max(col.max(), 0.0)
        match[j] = int(np.argmax(col))  # earliest maximum
    return np.minimum(score, 1), match, sims


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 80), st.integers(1, 24), st.integers(1, 6), st.integers(1, 90),
       st.integers(0, 2**32 - 1), st.integers(1, 90))
# Identical rows in different tiles got GEMM dot products 1 ulp apart, and the later copy won,
# before ties were given a tolerance (TIE_TOL).
@example(n=43, dim=5, pool=1, tile=7, seed=76425, row_block=7)
def test_tiled_equals_brute_force(n, dim, pool, tile, seed, row_block):
    """Rows drawn from a small pool of vectors (so exact duplicates and ties are common) mixed
    with unique rows; any tile and row block size (row blocks straddling column tiles
    included) give the reference's scores and earliest matches."""
    rng = np.random.default_rng(seed)
    vectors = normalize(rng.standard_normal((pool, dim)).astype(np.float32))
    pick = rng.integers(0, pool + 3, n)  # >= pool: a fresh unique row
    emb = np.where((pick < pool)[:, None], vectors[np.minimum(pick, pool - 1)],
                   normalize(rng.standard_normal((n, dim)).astype(np.float32)))
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    ref_score, ref_match, sims = brute_force(emb)
    for j in range(1, n):  # skip draws with two distinct rows within float noise of the max
        col = np.unique(np.round(sims[:j, j], 12))
        assume(len(col) < 2 or col[-1] - col[-2] > 1e-5 or col[-1] == col[-2])
    score, match = max_similarity_to_earlier(CPU, emb, tile, row_block)
    np.testing.assert_allclose(score, ref_score, atol=1e-5)
    # The earliest row identical to the reference's best row is the one to report.
    for j in range(1, n):
        best = emb[ref_match[j]]
        earliest = int(np.flatnonzero((emb[:j] == best).all(axis=1))[0])
        assert match[j] == earliest, (j, match[j], earliest)
    assert score.dtype == np.float32 and match[0] == 0


@pytest.mark.parametrize("tile", [64, 100, 512])
def test_copies_in_other_tiles_still_match_the_earliest(tile):
    """Realistic width (768) and many identical copies spread over tiles: every copy names the
    first one, whatever the tile layout."""
    rng = np.random.default_rng(1)
    emb = normalize(rng.standard_normal((600, 768)).astype(np.float32))
    copies = rng.choice(np.arange(50, 600), 120, replace=False)
    emb[copies] = emb[37]
    score, match = max_similarity_to_earlier(CPU, emb, tile)
    assert (match[copies] == 37).all()
    assert np.allclose(score[copies], 1, atol=1e-6)


def test_negative_similarity_is_written_as_zero():
    emb = normalize(np.array([[1, 0], [-1, 0.001]], dtype=np.float32))
    score, match = max_similarity_to_earlier(CPU, emb, 4)
    assert score.tolist() == [0, 0] and match.tolist() == [0, 0]


def test_removed_clip_still_matches_later_ones():
    # Fixed ranked rule: c is compared with b even though b is itself removed.
    a = [1.0, 0.0]
    b = [np.cos(0.01), np.sin(0.01)]
    c = [np.cos(0.02), np.sin(0.02)]
    emb = normalize(np.array([a, b, c], dtype=np.float32))
    score, match = max_similarity_to_earlier(CPU, emb, 2)
    assert match.tolist() == [0, 0, 1]
    assert removed_mask(score, 1e-3).tolist() == [False, True, True]


def test_threshold_is_inclusive():
    score = np.array([0.99, 0.98999, 1.0], dtype=np.float32)
    eps = 0.01
    mask = removed_mask(score, eps)
    assert mask.tolist() == [np.float64(np.float32(0.99)) >= 0.99, False, True]


def _ids(*names):
    return pa.array(list(names))


def test_ranking_hard_easy_and_id_tiebreak():
    ids = _ids("a", "b", "c", "d")
    cos = np.array([0.1, 0.3, 0.3, 0.2], dtype=np.float32)
    l2 = np.array([0.4, 0.1, 0.2, 0.3], dtype=np.float32)
    assert rank_order(ids, l2, cos, "cosine", "hard", 42, 0).tolist() == [2, 1, 3, 0]
    assert rank_order(ids, l2, cos, "cosine", "easy", 42, 0).tolist() == [0, 3, 1, 2]
    assert rank_order(ids, l2, cos, "l2", "hard", 42, 0).tolist() == [0, 3, 2, 1]


def test_random_ranking_is_seeded_and_layout_free():
    ids = _ids(*[f"id{i:03d}" for i in range(50)])
    d = np.zeros(50, dtype=np.float32)
    first = rank_order(ids, d, d, "cosine", "random", 7, 3)
    assert rank_order(ids, d, d, "cosine", "random", 7, 3).tolist() == first.tolist()
    assert rank_order(ids, d, d, "cosine", "random", 7, 4).tolist() != first.tolist()
    # Shuffling the rows does not change which ids come first.
    perm = np.random.default_rng(0).permutation(50)
    shuffled = rank_order(ids.take(pa.array(perm)), d, d, "cosine", "random", 7, 3)
    assert [ids[int(i)].as_py() for i in first] == \
        [ids[int(perm[i])].as_py() for i in shuffled]


def test_centroid_distances_follow_the_spec():
    emb = normalize(np.array([[1, 0], [0, 1]], dtype=np.float32))
    c = np.array([0.5, 0.0], dtype=np.float32)
    l2, cos = centroid_distances(emb, c)
    np.testing.assert_allclose(l2, [0.5, np.sqrt(1.25)], rtol=1e-6)
    np.testing.assert_allclose(cos, [0.0, 1.0], atol=1e-7)


def test_lloyd_recovers_separated_blobs_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = normalize(rng.standard_normal((5, 16)).astype(np.float32))
    x = normalize(np.repeat(centers, 200, axis=0)
                  + 0.05 * rng.standard_normal((1000, 16)).astype(np.float32))
    c1, _ = lloyd(CPU, x, 5, 50, 1e-6, 1)
    c2, _ = lloyd(CPU, x, 5, 50, 1e-6, 1)
    assert np.array_equal(c1, c2)
    labels, _ = nearest_centroid(CPU, x, c1)
    # every blob maps to exactly one cluster
    assert all(len(set(labels[i * 200:(i + 1) * 200].tolist())) == 1 for i in range(5))
    assert len(set(labels.tolist())) == 5


class OneThreadCpu(CpuBackend):
    """The CPU backend as it fitted before the compute threads: every GEMM and the centroid
    sums on the calling thread (BLAS splitting each product)."""

    def compute_pool(self):
        return Backend.compute_pool(self)


@pytest.mark.parametrize("k", [40, 1100])
def test_lloyd_on_the_compute_threads_gives_the_same_centroids(k):
    # Above k=1024 the threads also take GEMMs of fewer rows (a bounded scratch each).
    rng = np.random.default_rng(k)
    x = normalize(rng.standard_normal((20000, 24)).astype(np.float32))
    threads, iters = lloyd(CPU, x, k, 4, 0.0, 3)
    alone, iters_alone = lloyd(OneThreadCpu(), x, k, 4, 0.0, 3)
    assert iters == iters_alone == 4
    assert threads.tobytes() == alone.tobytes()


def test_eps_text_is_shortest_float():
    assert [eps_text(e) for e in (0.01, 0.005, 0.1, 1e-4)] == ["0.01", "0.005", "0.1", "0.0001"]


def test_config_rules():
    cfg = make_config(input_embeddings_path="in", output_path="out", n_clusters=3,
                      eps_to_extract=0.05)
    assert cfg.eps_to_extract == [0.05] and cfg.max_iter == 100 and cfg.which_to_keep == "hard"
    for bad in ({"eps_to_extract": [0.00001]}, {"eps_to_extract": 1.0}, {"n_clusters": 0},
                {"sim_metric": "dot"}, {"n_clsters": 3}):
        args = {"input_embeddings_path": "in", "output_path": "out", "n_clusters": 3, **bad}
        with pytest.raises(ConfigError):
            make_config(**args)
    with pytest.raises(ConfigError, match="output_path is required"):
        make_config(input_embeddings_path="in", n_clusters=3)
    z = make_config(input_embeddings_path="s3://b/drops/x.zip", n_clusters=3)
    assert z.resolved_output_path == "s3://b/drops/x_semdedup"


def test_job_spec_parsing(tmp_path):
    spec = {"pipeline": "semantic-dedup", "args": {"input_embeddings_path": "in",
                                                   "output_path": "out", "n_clusters": 4}}
    assert parse_job_spec(spec)["n_clusters"] == 4
    assert parse_job_spec({**spec, "pipeline": "dedup"})["n_clusters"] == 4
    with pytest.raises(ConfigError, match="unknown argument"):
        parse_job_spec({"pipeline": "dedup", "args": {**spec["args"], "n_cluster": 3}})
    with pytest.raises(ConfigError):
        parse_job_spec({**spec, "extra": 1})
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=str(path)):
        parse_job_spec(str(path))


REAL = "/work/shared/data/pypi_minilm_embd_parquet/part-00002.parquet"


def real_cluster(rows: int) -> np.ndarray:
    """A seeded subset of real MiniLM embeddings, its nearest neighbours of one clip first (so
    near-duplicates and near-ties are dense, as in a real cluster)."""
    import pyarrow.parquet as pq
    t = pq.read_table(REAL).slice(0, 6000)
    emb = normalize(np.asarray(t.column("embedding").combine_chunks().flatten()
                               .to_numpy(zero_copy_only=False), dtype=np.float32)
                    .reshape(t.num_rows, -1))
    near = np.argsort(-(emb @ emb[int(np.random.default_rng(3).integers(len(emb)))]),
                      kind="stable")
    return np.ascontiguousarray(emb[near[:rows]])


def kernel_cluster(data: str, seed: int) -> np.ndarray:
    """1,500 clips for the kernel's bit-for-bit tests: real embeddings (`real_cluster`), or
    random unit rows with 300 exact copies (seeded)."""
    if data == "real":
        return real_cluster(1500)
    rng = np.random.default_rng(seed)
    emb = normalize(rng.standard_normal((1500, 64)).astype(np.float32))
    emb[rng.choice(np.arange(1, 1500), 300)] = emb[rng.integers(0, 1500, 300)]
    return emb


@pytest.mark.parametrize("data", ["random", "real"])
def test_sub_blocks_equal_whole_blocks_bit_for_bit(data):
    """The diagonal computed by sub-blocks (the default) gives the same scores and matches, bit
    for bit, as whole row blocks masked (the path before sub-blocks), for any tile, row block and
    first row, on random clusters with copies and on real embeddings."""
    emb = kernel_cluster(data, 11)
    for tile, row_block, sub_block, first_row in [(2048, None, None, 0), (512, None, 64, 0),
                                                  (300, 128, 40, 0), (2048, None, None, 777),
                                                  (256, 100, 33, 901)]:
        whole = max_similarity_to_earlier(CPU, emb, tile, row_block, first_row,
                                          sub_block=row_block or 10**9)
        split = max_similarity_to_earlier(CPU, emb, tile, row_block, first_row,
                                          sub_block=sub_block)
        assert whole[0].tobytes() == split[0].tobytes(), (tile, row_block, sub_block, first_row)
        assert whole[1].tobytes() == split[1].tobytes(), (tile, row_block, sub_block, first_row)


@pytest.mark.parametrize("data", ["random", "real"])
def test_row_blocks_on_compute_threads_equal_one_pass_bit_for_bit(data):
    """Row blocks computed side by side on the compute threads (one BLAS thread each, the CPU's
    prune phase) give the same scores and matches, bit for bit, as one pass on this thread with
    BLAS on every core, for any tile, row block and first row."""
    from semdedup_core.threads import compute_pool

    emb = kernel_cluster(data, 12)
    cases = [(2048, None, 0), (512, None, 0), (300, 128, 0), (2048, 256, 777), (256, 100, 901)]
    one_pass = [max_similarity_to_earlier(CPU, emb, tile, rb, first) for tile, rb, first in cases]
    with compute_pool() as pool:
        threaded = [max_similarity_to_earlier(CPU, emb, tile, rb, first, pool=pool)
                    for tile, rb, first in cases]
    for case, (s1, m1), (s2, m2) in zip(cases, one_pass, threaded):
        assert s1.tobytes() == s2.tobytes() and m1.tobytes() == m2.tobytes(), case


class MatmulOnlyCpu(CpuBackend):
    """The CPU backend without its symmetric product: every diagonal square by matmul (the
    path the GPU takes)."""

    def gram_lower(self, a, out) -> bool:
        return False


@pytest.mark.parametrize("threads", ["one BLAS thread", "every core"])
def test_openblas_gram_lower_has_the_bits_of_matmul(threads):
    """OpenBLAS's ssyrk (numpy's own BLAS, through ctypes) writes a @ a.T's lower triangle with
    the bits of numpy's matmul, element for element, and leaves the rest of `out` alone."""
    import contextlib
    import os

    import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded beside numpy's, as in a run)

    from semdedup_core.backends import openblas
    from semdedup_core.threads import single_threaded_blas

    assert os.path.basename(os.path.dirname(openblas.ssyrk()[0])) == "numpy.libs"  # not SciPy's
    rng = np.random.default_rng(5)
    with single_threaded_blas() if threads == "one BLAS thread" else contextlib.nullcontext():
        for n, d in [(1, 8), (37, 64), (128, 384), (513, 384), (700, 1024)]:
            a = normalize(rng.standard_normal((n + 3, d)).astype(np.float32))[3:]
            buf = np.full((n, n + 50), np.nan, dtype=np.float32)
            assert openblas.gram_lower(a, buf[:, 20:20 + n])  # numpy's wheels ship OpenBLAS
            lower = np.tril_indices(n)
            assert buf[:, 20:20 + n][lower].tobytes() == (a @ a.T)[lower].tobytes(), (n, d)
            assert np.isnan(buf[:, 20:20 + n][np.triu_indices(n, 1)]).all()
            assert np.isnan(buf[:, :20]).all() and np.isnan(buf[:, 20 + n:]).all()
    assert not openblas.gram_lower(a.astype(np.float64), buf[:, 20:20 + n])


@pytest.mark.parametrize("data", ["random", "real"])
def test_symmetric_diagonal_equals_matmul_bit_for_bit(data):
    """The block's own square by the symmetric product (the CPU) gives the same scores and
    matches, bit for bit, as by matmul, for any tile, row block (inside a tile or across two)
    and first row, on one thread and on the compute threads."""
    from semdedup_core.threads import compute_pool

    emb = kernel_cluster(data, 13)
    cases = [(2048, None, 0), (512, None, 0), (1000, None, 0), (300, 128, 0), (2048, 256, 777),
             (256, 100, 901)]
    matmul = [max_similarity_to_earlier(MatmulOnlyCpu(), emb, tile, rb, first)
              for tile, rb, first in cases]
    with compute_pool() as pool:
        for pool_or_none in (None, pool):
            for case, (s1, m1) in zip(cases, matmul):
                s2, m2 = max_similarity_to_earlier(CPU, emb, *case, pool=pool_or_none)
                assert s1.tobytes() == s2.tobytes() and m1.tobytes() == m2.tobytes(), case
