"""The command line's start-up: `semdedup run` loads no Dagster (nor scipy.stats), so a small run
pays only for the engine's own imports."""

import json
import subprocess
import sys

from semdedup_core.sample import write_sample

# Runs the command line in a fresh interpreter, then lists the heavy packages it loaded.
PROBE = """
import json, sys
from semdedup_core.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("dagster", "dagster_aws", "matplotlib") or m == "scipy.stats")
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_run_from_the_command_line_imports_no_dagster(tmp_path):
    write_sample(str(tmp_path / "in"), 600, 16, files=2, seed=3)
    done = subprocess.run([sys.executable, "-c", PROBE, "run", "--input-embeddings-path",
                           str(tmp_path / "in"), "--output-path", str(tmp_path / "out"),
                           "--n-clusters", "4", "--quiet"],
                          capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, done.stderr[-2000:]
