"""semdedup on Dagster: software-defined assets partitioned by centroid, the one-command job,
the drop sensor and the schedule. Thin: every computation is a call into `semdedup_core`."""

import warnings

# Dagster flags two parameters as beta on every load, printing a warning on every `dagster`
# command: `backfill_policy` (we rely on single-run backfills, a documented feature) and the
# sensor decorator's own `owners` (we pass none). Silence just those two.
warnings.filterwarnings("ignore", message=r"Parameter `(backfill_policy|owners)` of ")
