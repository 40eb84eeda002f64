"""semdedup's engine: no Dagster import anywhere below this package."""

import os

# Arrow's allocator (mimalloc) hands freed pages back to the system 10 ms after they are freed
# by default; the streaming passes free and re-allocate batch-sized buffers every few
# milliseconds, so each batch's memory was faulted in and zeroed afresh. One second keeps the
# pages of a pass in use (measured at 1M x 512: ~3 CPU-s less in assign, ~1 in the scan, the
# same peak RSS). Set before pyarrow loads; a value the user set wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "1000")
