"""Centroid partitions: one dynamic partition per K-means centroid index ("0", "1", ...),
registered by the step that makes the centroids."""

from dagster import DagsterInstance, DynamicPartitionsDefinition

CENTROIDS = DynamicPartitionsDefinition(name="centroids")


def register_centroids(instance: DagsterInstance, n_clusters: int) -> int:
    """Make the partitions exactly "0".."n_clusters-1"; returns how many were added.

    Partitions >= n_clusters belonged to an earlier fit with more clusters, whose files the run
    removes: they are deleted, so the UI shows no partition that is not a cluster of the
    current output. (Their past events stay: Dagster's SQL event logs cannot wipe single
    partitions.)"""
    existing = set(instance.get_dynamic_partitions(CENTROIDS.name))
    wanted = {str(k) for k in range(n_clusters)}
    stale = sorted(existing - wanted, key=lambda k: int(k) if k.isdigit() else -1)
    for key in stale:
        instance.delete_dynamic_partition(CENTROIDS.name, key)
    new = [str(k) for k in range(n_clusters) if str(k) not in existing]
    if new:
        instance.add_dynamic_partitions(CENTROIDS.name, new)
    return len(new)
