"""The order of clips inside a cluster (`which_to_keep` x `sim_metric`): the clip ranked first
is the one kept from each group of near-duplicates."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def rank_order(ids: pa.Array, l2_dist: np.ndarray, cosine_dist: np.ndarray, sim_metric: str,
               which_to_keep: str, random_state: int, cluster: int) -> np.ndarray:
    """Row indices of the cluster in rank order (int64).

    hard: (distance, id) both descending, so the clip farthest from the centroid comes first;
    easy: both ascending; random: rows sorted by id, then permuted by a generator seeded with
    (random_state, cluster), so the order does not depend on how the input was laid out.
    """
    if which_to_keep == "random":
        by_id = pc.sort_indices(ids).to_numpy()
        perm = np.random.default_rng([random_state, cluster]).permutation(len(by_id))
        return by_id[perm].astype(np.int64)
    dist = cosine_dist if sim_metric == "cosine" else l2_dist
    direction = "descending" if which_to_keep == "hard" else "ascending"
    keys = pa.table({"d": pa.array(dist), "id": ids})
    return pc.sort_indices(keys, sort_keys=[("d", direction), ("id", direction)]).to_numpy() \
        .astype(np.int64)
