"""The `semdedup` command. Its `run` options are generated from `DedupConfig`, so the flags,
their defaults and their help are the config model's."""

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from typing import Any

from semdedup_core.config import DedupConfig, checked_eps, eps_text, make_config, parse_job_spec
from semdedup_core.errors import InputError, SemdedupError

log = logging.getLogger("semdedup")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str, f, job_spec: bool) -> str:
    if f.is_required():
        return " (required, here or in --job-spec)" if job_spec else " (required)"
    if name == "eps_to_extract":
        return " (default: 0.01; several allowed)"
    if f.default is None:
        return " (default: unset)"
    if name == "zip_max_bytes":
        return ""  # its description gives the default in GiB
    return f" (default: {f.default})"


def add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                       job_spec: bool = True) -> None:
    """One flag per DedupConfig field (also used by `semdedup-dagster-config`)."""
    for name, f in DedupConfig.model_fields.items():
        if name in skip:
            continue
        ann = f.annotation
        kwargs: dict[str, Any] = {"default": None, "dest": name}
        flags = [_flag(name)]
        args = typing.get_args(ann)
        if len(args) == 2 and type(None) in args:  # an optional setting: its flag takes the type
            ann = next(a for a in args if a is not type(None))
        if typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(args)
        elif name == "eps_to_extract":
            kwargs.update(type=float, nargs="+", action="extend", metavar="EPS")
            flags.append("--eps")  # the spelling of `sweep`
        elif ann is bool:
            kwargs.update(action="store_const", const=True)
        elif ann is int:
            kwargs["type"] = int
        elif ann is float:
            kwargs["type"] = float
        parser.add_argument(*flags, help=f.description + _default_text(name, f, job_spec), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semdedup",
        description="Semantic deduplication of clip embeddings: K-means, then inside each cluster "
                    "flag every clip within eps of an earlier-ranked clip.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline and write the output layout")
    run.add_argument("--job-spec", metavar="FILE",
                     help='JSON job spec {"pipeline": "semantic-dedup", "args": {...}}; flags given '
                          "beside it override its args")
    add_config_options(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--wait", action="store_true",
                     help="if another run is writing the output folder, wait for it to finish "
                          "instead of stopping")

    demo = sub.add_parser("demo", help="run on the bundled sample into a local folder")
    demo.add_argument("--output-path", default="semdedup-demo-output",
                      help="where to write (default: ./semdedup-demo-output)")

    def add_s3_options(p: argparse.ArgumentParser) -> None:
        for name in ("aws_profile", "aws_endpoint_url", "aws_region"):
            p.add_argument(_flag(name), dest=name, help=DedupConfig.model_fields[name].description)

    inspect = sub.add_parser("inspect", help="summaries, eps curve, largest clusters and the fate "
                                             "of given clips, from a finished output")
    inspect.add_argument("output_path", help="a semdedup output folder, local or s3://")
    inspect.add_argument("--id", action="append", default=[], metavar="ID",
                         help="report this clip: removed or not, and which clip it duplicates "
                              "(repeatable)")
    inspect.add_argument("--top", type=int, default=10, help="how many largest clusters to list")
    inspect.add_argument("--incomplete", action="store_true",
                         help="read an output that has no completion record anyway (flagged)")
    add_s3_options(inspect)

    sweep = sub.add_parser("sweep", help="write unique_ids and summaries for new eps from existing "
                                         "pruning tables (no other recomputation)")
    sweep.add_argument("output_path", help="a semdedup output folder, local or s3://")
    sweep.add_argument("--eps", "--eps-to-extract", dest="eps", type=float, nargs="+",
                       required=True, action="extend", metavar="EPS",
                       help="eps values in [1e-4, 1) (required)")
    add_s3_options(sweep)

    corpus = sub.add_parser("corpus", help="a corpus of drops, each deduplicated against every "
                                           "earlier drop (see README, Corpus)")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    add = corpus_sub.add_parser("add", help="deduplicate a new drop against the corpus and commit "
                                            "it as drops/<name>/ (the first add fits the centroids)")
    add.add_argument("corpus", help="the corpus folder, local or s3://")
    add.add_argument("--drop-name", required=True, help="the drop's name in the corpus (its folder)")
    add.add_argument("--wait", action="store_true",
                     help="wait for another add into the corpus to finish instead of failing")
    add_config_options(add, skip=("output_path",), job_spec=False)
    show = corpus_sub.add_parser("show", help="the drops of a corpus: clips, removed per eps "
                                              "inside the drop and of earlier drops, drift")
    show.add_argument("corpus", help="the corpus folder, local or s3://")
    add_s3_options(show)
    rebuild = corpus_sub.add_parser("rebuild", help="a new corpus from this one's drops: re-fit "
                                                    "the centroids on all drops, re-add in order")
    rebuild.add_argument("corpus", help="the corpus to rebuild (left as it is)")
    rebuild.add_argument("--into", required=True, help="the new corpus folder (must hold none)")
    add_config_options(rebuild, skip=("output_path", "input_embeddings_path", "eps_to_extract"),
                       job_spec=False)

    sample = sub.add_parser("make-sample", help="write synthetic clip embeddings with planted "
                                                "duplicates (for trials and benchmarks)")
    sample.add_argument("folder", help="folder to write parquet files into")
    sample.add_argument("--rows", type=int, default=10000, help="number of clips")
    sample.add_argument("--dim", type=int, default=512, help="embedding dimension")
    sample.add_argument("--files", type=int, default=4, help="number of parquet files")
    sample.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="stored value type")
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def given_config_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The config flags the user gave (unset ones are None)."""
    return {name: getattr(ns, name) for name in DedupConfig.model_fields
            if getattr(ns, name, None) is not None}


def config_from_args(ns: argparse.Namespace) -> DedupConfig:
    """The run's config: the job spec's args (if any) with the flags given beside it merged
    over them, validated as a whole."""
    flags = given_config_flags(ns)
    if ns.job_spec:
        return make_config(**parse_job_spec(ns.job_spec, overrides=flags))
    missing = [_flag(n) for n in ("input_embeddings_path", "n_clusters") if n not in flags]
    if missing:
        raise SemdedupError(f"missing {' and '.join(missing)} (or give them in --job-spec)")
    return make_config(**flags)


def format_report(report) -> str:
    """The closing table of `semdedup run` for a pipeline.RunReport."""
    lines = [f"output: {report.output_path}",
             f"clips: {report.n_rows:,}  dim: {report.dim}  clusters: {report.n_clusters} "
             f"({int((report.cluster_sizes > 0).sum())} non-empty, largest "
             f"{int(report.cluster_sizes.max()):,})  backend: {report.backend}  "
             f"k-means: {report.kmeans_iterations} iterations on {report.sample_rows:,} clips",
             "",
             f"{'eps':>8} {'total':>12} {'kept':>12} {'removed':>12} {'removed %':>10}"
             + (f" {'by cross only':>14}" if report.by_cross_only is not None else "")]
    for eps, row in report.summary.items():
        pct = 100.0 * row["removed"] / row["total"] if row["total"] else 0.0
        lines.append(f"{eps_text(eps):>8} {row['total']:>12,} {row['kept']:>12,} "
                     f"{row['removed']:>12,} {pct:>9.2f}%"
                     + (f" {report.by_cross_only.get(eps, 0):>14,}"
                        if report.by_cross_only is not None else ""))
    if report.audit:
        lines += ["", "audit: near-duplicate pairs left among kept clips (estimated from a sample "
                      "of kept clips; extraction/audit.json)",
                  f"{'eps':>8} {'sampled':>9} {'estimate':>10} {'95% interval':>22}"]
        for a in report.audit:
            lines.append(f"{eps_text(a.eps):>8} {a.sampled:>9,} {a.estimated_pairs:>10,.0f} "
                         f"{f'[{a.low:,.0f}, {a.high:,.0f}]':>22}")
    lines += ["", f"{'phase':<12} {'seconds':>9} {'GFLOP/s':>9}"]
    for name, secs in report.timer.seconds.items():
        g = report.timer.gflops(name)
        lines.append(f"{name:<12} {secs:>9.2f} {(f'{g:.1f}' if g else '-'):>9}")
    lines.append(f"{'total':<12} {sum(report.timer.seconds.values()):>9.2f}")
    return "\n".join(lines)


def _inspect_or_sweep(ns: argparse.Namespace) -> int:
    from semdedup_core.extraction import sweep
    from semdedup_core.inspection import format_inspection
    from semdedup_core import run_record
    from semdedup_core.storage import S3Options, Storage

    out = Storage(ns.output_path, S3Options(ns.aws_profile, ns.aws_endpoint_url, ns.aws_region))
    if ns.command == "inspect":
        reason = run_record.incomplete_reason(out)
        if reason is not None and not ns.incomplete:
            raise run_record.OutputIncomplete(reason + " (--incomplete reads it anyway)")
        note = run_record.interrupted_sweep(out)
        if note is not None:  # its files look like results; the record does not list them
            log.warning("%s: a sweep of eps %s (run %s, started %s) stopped before it finished: "
                        "what the report shows for those eps is not a finished result; the next "
                        "sweep of this folder removes it", out.display(),
                        ", ".join(note["new_eps"]) or "(none new)", note["run_id"],
                        note["started"])
        text, missing = format_inspection(out, ns.id, ns.top, incomplete=reason)
        print(text, flush=True)
        if missing:
            raise InputError(f"{out.display()}: clip {', '.join(missing)} not found in any "
                             "pruning table")
        return 0
    # Validate the eps with the same rules as a run.
    eps = checked_eps(ns.eps)
    rows = sweep(out, eps)
    print(f"{'eps':>8} {'total':>12} {'kept':>12} {'removed':>12}")
    for e, r in rows.items():
        print(f"{eps_text(e):>8} {r['total']:>12,} {r['kept']:>12,} {r['removed']:>12,}")
    return 0


def _corpus(ns: argparse.Namespace) -> int:
    from semdedup_core import corpus

    if ns.corpus_command == "show":
        store = corpus.open_corpus(ns.corpus, vars(ns))
        print(corpus.format_show(store))
        return 0
    args = {n: getattr(ns, n) for n in DedupConfig.model_fields if getattr(ns, n, None) is not None}
    if ns.corpus_command == "rebuild":
        reports = corpus.rebuild(ns.corpus, ns.into, args)
        print(corpus.format_show(corpus.open_corpus(ns.into, args)))
        return 0 if reports else 1
    if "input_embeddings_path" not in args:
        raise SemdedupError("missing --input-embeddings-path (the drop to add)")
    report = corpus.add_drop(ns.corpus, ns.drop_name, args, wait=ns.wait)
    print(corpus.format_add(report))
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    # Unwinds like an error, so the run's clean-up (its lock, its scratch files) happens.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if ns.command == "make-sample":
            from semdedup_core.sample import write_sample

            if os.path.isdir(ns.folder) and os.listdir(ns.folder):  # a mix would be no input
                raise InputError(f"{ns.folder}: not empty; make-sample writes into a new or "
                                 "empty folder")
            info = write_sample(ns.folder, ns.rows, ns.dim, files=ns.files, seed=ns.seed,
                                dtype=ns.dtype, keep_groups=False)
            print(f"wrote {info.rows:,} clips x {info.dim} into {len(info.files)} files "
                  f"under {ns.folder}")
            return 0
        if ns.command in ("inspect", "sweep"):
            return _inspect_or_sweep(ns)
        if ns.command == "corpus":
            return _corpus(ns)
        from semdedup_core.pipeline import run_pipeline

        if ns.command == "demo":
            from semdedup_core.sample import DEMO_ARGS

            cfg = make_config(**{**DEMO_ARGS, "output_path": ns.output_path})
            show = sys.stderr.isatty()
        else:
            cfg = config_from_args(ns)
            show = not ns.quiet and sys.stderr.isatty()
        report = run_pipeline(cfg, show_progress=show, wait=getattr(ns, "wait", False))
        print(format_report(report))
        return 0
    except SemdedupError as exc:
        print(f"semdedup: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a fault no layer named (a bug, or storage we do not map yet)
        print(f"semdedup: error: {one_line(exc)}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 1


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


if __name__ == "__main__":
    sys.exit(main())

