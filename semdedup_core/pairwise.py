"""The hot loop: for each clip of a ranked cluster, its highest cosine similarity to any clip
ranked before it, computed in (row block x column tile) pieces so memory is O(tile^2), never O(n^2).

Written once over the backend's array namespace: numpy on the CPU, CuPy on the GPU.
"""

from concurrent.futures import Executor

from semdedup_core.backends.base import Backend

# Dot products of unit float32 vectors computed by different GEMM tiles or devices differ by up
# to ~1e-6 (d <= 1024); eps is at least 1e-4, so a tolerance of 1e-5 changes no removal in
# practice while making max_id independent of tiling and backend.
TIE_TOL = 1e-5


def max_similarity_to_earlier(backend: Backend, emb, tile: int, row_block: int | None = None,
                              first_row: int = 0, sub_block: int | None = None,
                              pool: Executor | None = None):
    """For unit rows `emb` (n, d) in rank order, return (score float32 (n,), match int64 (n,)),
    on the backend's device: score[j] = max over i<j of emb[i].emb[j], match[j] = the smallest
    i reaching it. Row 0 gets score 0 and match 0 (itself). Scores are clipped to [0, 1].
    With `first_row` f, only rows j >= f are computed (a corpus: the rows before f are earlier
    drops' clips) and the arrays hold rows f..n-1; each is the same as in the full pass.

    Blocks of `row_block` rows (default `row_block_size(tile)`) are multiplied with the clips
    before them in column tiles of `tile`, so memory is O(row_block x tile): the columns before
    the block in one GEMM of all its rows; the block's own square, where one tile holds it and
    the backend has a symmetric product (`Backend.gram_lower`: OpenBLAS's ssyrk on the CPU, the
    same bits), as its lower triangle only; else by sub-blocks of `sub_block` rows (default
    `sub_block_size`), each against the columns before its end only. Either way, sub-block
    by sub-block, the part at or above the diagonal is masked (of the square above the
    diagonal only the sub-blocks' own squares are reduced). All of a tile's products for a row
    land in one buffer and are reduced together, however many GEMMs computed them. Products
    are reduced along the row, i.e. along contiguous memory. Ties go to the earliest clip: float32 GEMMs
    round the same dot product differently at different positions of a tile (and on different
    devices), so values within TIE_TOL of the best count as ties. Within a column tile the
    earliest such column wins; a later tile only wins when greater by more than TIE_TOL. Column
    tiles start at multiples of `tile` whatever the row block or sub-block, so neither changes
    any result. The score is then recomputed for the chosen clip.

    Row blocks are independent: with a `pool` (the CPU's compute threads, see
    `threads.compute_pool`) they run on its threads, each with its own slice of the results.

    `emb` may live on the device, or on the host when the cluster is larger than the device
    holds: then only the tiles in use are copied over (slabs), so device memory stays bounded.
    """
    xp = backend.xp
    n = emb.shape[0]
    rb = row_block or row_block_size(tile)
    sb = min(rb, sub_block or sub_block_size(rb))
    # later[a, x]: column x is not before row a; its slices mask a sub-block's own square.
    later = xp.arange(2 * sb)[None, :] >= xp.arange(sb)[:, None]
    score = xp.full(n - first_row, -xp.inf, dtype=xp.float32)
    match = xp.arange(first_row, n, dtype=xp.int64)

    def block(j0: int) -> None:
        j1 = min(j0 + rb, n)
        s0, s1 = j0 - first_row, j1 - first_row  # the block's place in score and match
        rows = backend.asarray(emb[j0:j1])
        best = xp.full(j1 - j0, -xp.inf, dtype=xp.float32)
        best_i = xp.zeros(j1 - j0, dtype=xp.int64)
        sims = xp.empty((j1 - j0, min(tile, j1)), dtype=xp.float32)  # one tile's products
        for i0 in range(0, j1, tile):
            i1 = min(i0 + tile, j1)
            cols = backend.asarray(emb[i0:i1])
            before = min(i1, j0) - i0  # the tile's columns before the block: one GEMM, all rows
            if before > 0:
                xp.matmul(rows, cols[:before].T, out=sims[:, :before])
            if i1 <= j0:  # the whole tile is before the block
                _fold_tile(xp, sims[:, :before], i0, best, best_i)
                continue
            d0 = max(i0, j0)  # the tile reaches the block's own clips from column d0 on
            # The block's own square inside this tile: its lower triangle in one product.
            gram = i0 <= j0 and j1 <= i1 and backend.gram_lower(rows, sims[:, j0 - i0:j1 - i0])
            for r0 in range(j0, j1, sb):
                r1 = min(r0 + sb, j1)
                c1 = min(i1, r1)  # columns from r1 on come after every row of the sub-block
                if c1 <= i0:
                    continue
                a0, a1 = r0 - j0, r1 - j0
                if not gram:
                    xp.matmul(rows[a0:a1], cols[d0 - i0:c1 - i0].T,
                              out=sims[a0:a1, d0 - i0:c1 - i0])
                part = sims[a0:a1, :c1 - i0]
                q0 = max(i0, r0)  # columns from q0 on may be at or after a row: only i < j count
                if c1 > q0:
                    part[:, q0 - i0:][later[:r1 - r0, q0 - r0:c1 - r0]] = -xp.inf
                _fold_tile(xp, part, i0, best[a0:a1], best_i[a0:a1])
        found = best > -xp.inf
        match[s0:s1] = xp.where(found, best_i, match[s0:s1])
        # The GEMM found the match; the score is then recomputed as one float64 dot product, so
        # its bits do not depend on tile shapes, BLAS threads or the device. (float32 products
        # are exact in float64; multiply casts as it goes, sparing two float64 copies.)
        earlier = backend.take_rows(emb, match[s0:s1])
        exact = xp.multiply(earlier, rows, dtype=xp.float64).sum(axis=1)
        score[s0:s1] = xp.where(found, exact, 0).astype(xp.float32)

    blocks = range(first_row, n, rb)
    if pool is None:
        for j0 in blocks:
            block(j0)
    else:
        for future in [pool.submit(block, j0) for j0 in blocks]:
            future.result()
    return xp.clip(score, 0, 1), match


def _fold_tile(xp, sims, i0: int, best, best_i) -> None:
    """Fold one column tile's products (rows x columns from i0) into the rows' running best and
    its column, in place: the earliest column within TIE_TOL of the tile's maximum, taken only
    when that maximum beats the best so far by more than TIE_TOL."""
    top = sims.max(axis=1)
    arg = (sims >= (top - TIE_TOL)[:, None]).argmax(axis=1)  # earliest near-max column
    best_i[:] = xp.where(top > best + TIE_TOL, arg + i0, best_i)
    best[:] = xp.maximum(best, top)


def row_block_size(tile: int) -> int:
    """Rows per block: small enough that little work falls above the diagonal, big enough for
    efficient GEMMs. Measured on 2 CPU cores, d=512, tile 2048: 1,000-clip clusters 6.6 ms
    (15.1 ms with whole-tile blocks), 20,000-clip clusters unchanged (1.42 s)."""
    return min(tile, max(512, tile // 4))


def sub_block_size(row_block: int) -> int:
    """Rows per sub-block where a tile meets the diagonal (the columns before the block go in
    one GEMM of the whole block): where matmul computes the diagonal, smaller sub-blocks waste
    less of the square above it, but their GEMMs run slower. Measured on real skewed clusters
    (80k MiniLM, k=100, tile 2048, one BLAS thread, CPU seconds of the pass): quarters 4% less
    than halves, eighths and sixths no better (a 64-row GEMM runs at 3/4 of a 512-row one's
    speed). With `ssyrk` (the CPU) sub-blocks only mask and reduce: 64 to 256 rows, the same."""
    return max(32, row_block // 4)


def pairwise_flops(n: int, tile: int, dim: int, first_row: int = 0) -> int:
    """Multiply-add FLOPs the tiled loop performs for a cluster of n clips (rows from
    `first_row` on)."""
    total = 0
    for j0 in range(first_row, n, tile):
        j1 = min(j0 + tile, n)
        total += 2 * (j1 - j0) * j1 * dim
    return total
