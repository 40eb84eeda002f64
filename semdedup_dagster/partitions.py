"""Centroid partitions: one dynamic partition per K-means centroid index ("0", "1", ...),
registered by the step that makes the centroids."""

from dagster import DagsterInstance, DynamicPartitionsDefinition

CENTROIDS = DynamicPartitionsDefinition(name="centroids")


def register_centroids(instance: DagsterInstance, n_clusters: int) -> int:
    """Make sure partitions "0".."n_clusters-1" exist; returns how many were added."""
    existing = set(instance.get_dynamic_partitions(CENTROIDS.name))
    new = [str(k) for k in range(n_clusters) if str(k) not in existing]
    if new:
        instance.add_dynamic_partitions(CENTROIDS.name, new)
    return len(new)
