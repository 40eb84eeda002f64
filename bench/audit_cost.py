"""What the audit costs a run: the same `semdedup run` with the audit fed and with it not fed
(switched off in-process: the pruning, outputs and every other phase are the same), alternating,
--repeats times each after a warm-up run, the best wall time and least CPU time (all threads)
of each.

    python bench/audit_cost.py --repeats 5                 # the 80k MiniLM set + 25% near-copies, k=100
    python bench/audit_cost.py --repeats 5 --cross-cluster
    python bench/audit_cost.py --synthetic 1000000 --dim 512 --clusters 1000 --repeats 3

Prints, for the run with the audit: its audit phase (the audit's own CPU time: it runs on a
thread beside the prune loop) as a share of the run's wall time, which is what the closing table
and bench/cross_cluster.py report, and the differences in wall and CPU time between the two runs
(the real cost; noisy on a loaded machine: compare them with the phase, not alone). Target: the
audit at most 5% of the run. Data as in bench/cross_cluster.py (same options).
"""
import argparse
import json
import time

from cross_cluster import add_input_arguments, input_from

from semdedup_core import audit, layout
from semdedup_core.config import make_config
from semdedup_core.pipeline import run_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(p)
    p.add_argument("--cross-cluster", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    ns = p.parse_args()
    work, n = input_from(ns, "semdedup-bench-audit-")
    cfg = make_config(input_embeddings_path=f"{work}/in", output_path=f"{work}/out",
                      n_clusters=ns.clusters, backend="cpu", eps_to_extract=ns.eps,
                      cross_cluster=ns.cross_cluster)
    run_pipeline(cfg)  # warm-up (imports, page cache), not counted
    fed = audit.KeptPairsAudit.add_cluster
    wall, cpu, phase = {"fed": [], "not fed": []}, {"fed": [], "not fed": []}, []
    for _ in range(ns.repeats):
        for name in ("fed", "not fed"):
            audit.KeptPairsAudit.add_cluster = fed if name == "fed" else lambda *a, **k: None
            c0, t0 = time.process_time(), time.perf_counter()
            report = run_pipeline(cfg)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "fed":
                phase.append(report.timer.seconds["audit"])
    audit.KeptPairsAudit.add_cluster = fed
    best = {k: min(v) for k, v in wall.items()}
    least = {k: min(v) for k, v in cpu.items()}
    print(f"clips {n:,}  clusters {ns.clusters}  cross_cluster {ns.cross_cluster}  "
          f"sample rate {json.loads(open(f'{work}/out/{layout.AUDIT}').read())['sample_rate']:.5f}")
    print(f"wall (best of {ns.repeats}): fed {best['fed']:.2f} s, not fed {best['not fed']:.2f} s,"
          f" difference {best['fed'] - best['not fed']:+.3f} s")
    print(f"CPU (least of {ns.repeats}): fed {least['fed']:.2f} s, not fed "
          f"{least['not fed']:.2f} s, difference {least['fed'] - least['not fed']:+.3f} s")
    print(f"audit phase (its CPU time, least of {ns.repeats}): {min(phase):.3f} s = "
          f"{100 * min(phase) / best['fed']:.1f}% of the run's wall time")
    print(f"(outputs under {work})")


if __name__ == "__main__":
    main()
