"""semdedup on Dagster: software-defined assets partitioned by centroid, the one-command job,
the drop sensor and the schedule. Thin: every computation is a call into `semdedup_core`."""
