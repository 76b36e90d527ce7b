"""``upstream-compressed``: compress a base by a recipe, inspect the delta it writes, report an experiment."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from .delta import DeltaError

DESCRIPTION = """\
Compress Transformer speech models (HuBERT, DistilHuBERT) for S3PRL.

  upstream-compressed compress RECIPE.yaml -o OUT.safetensors
  upstream-compressed inspect OUT.safetensors [--json]
  upstream-compressed analyse heads (--upstream OUT.safetensors | --base CKPT) --audio DIR [-o OUTDIR]
  upstream-compressed report EXPDIR [-o OUTDIR]

The delta then runs as an S3PRL upstream:
  run_downstream.py -m train -u hubert_<technique> -k OUT.safetensors -d ctc -c CONFIG.yaml
"""


def _compress(args: argparse.Namespace) -> int:
    from .compress import run_recipe
    from .delta import write_delta
    from .recipe import load_recipe

    base = args.base
    if base is not None and Path(os.path.expandvars(base)).exists():
        base = str(Path(os.path.expandvars(base)).resolve())  # a path on the command line is relative to here
    recipe = load_recipe(args.recipe, base=base)
    work_dir = Path(args.work_dir or f"{args.output}.work")
    delta = run_recipe(recipe, refresh=args.refresh, work_dir=work_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one process writes
    if not is_main:
        return 0
    path = write_delta(delta, args.output)
    if not args.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    params = delta.manifest["params"]
    print(
        f"wrote {path}: technique {delta.technique}, {params['compressed']:,} parameters "
        f"(base {params['base']:,}), {len(delta.tensors)} tensors stored"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .delta import read_delta

    delta = read_delta(args.delta)
    manifest = delta.manifest
    summary = {
        "technique": manifest["technique"],
        "base": manifest["base"],
        "steps": manifest["recipe"].get("steps", []),
        "params_base": manifest["params"]["base"],
        "params": manifest["params"]["compressed"],
        "macs_base": manifest.get("macs", {}).get("base"),
        "macs": manifest.get("macs", {}).get("compressed"),
        "macs_seconds_of_audio": manifest.get("macs", {}).get("seconds"),
        # weight-pruned deltas: zeros still count in params/macs above; these count only non-zeros
        "params_nonzero": manifest.get("sparsity", {}).get("params_nonzero"),
        "macs_effective": manifest.get("macs", {}).get("compressed_effective"),
        "structure": manifest["structure"],
        "config": manifest["config"],
        "stored_tensors": sorted(delta.tensors),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    base = manifest["base"]
    print(f"delta      {args.delta}")
    print(f"technique  {summary['technique']}")
    print(f"base       {base['name']} ({base['family']}, sha256 {base['sha256'][:16]}...)")
    print(f"params     {summary['params']:,} (base {summary['params_base']:,}, "
          f"{summary['params'] / summary['params_base']:.1%})")
    if summary["macs"]:
        print(f"MACs       {summary['macs'] / 1e9:.2f} G per {summary['macs_seconds_of_audio']:g} s of audio "
              f"(base {summary['macs_base'] / 1e9:.2f} G, {summary['macs'] / summary['macs_base']:.1%})")
    if summary["params_nonzero"] is not None:
        print(f"non-zero   {summary['params_nonzero']:,} parameters "
              f"(sparsity {manifest['sparsity']['sparsity']:.1%} of the masked encoder Linear weights)")
    if summary["macs_effective"] is not None:
        print(f"effective  {summary['macs_effective'] / 1e9:.2f} G MACs (non-zero weights only)")
    print(f"steps      {len(summary['steps'])}")
    for i, step in enumerate(summary["steps"]):
        print(f"  {i}: {step}")
    print("layers     source  heads  ffn   ranks")
    for origin, layer in zip(manifest["structure"]["layers"], manifest["config"]["layers"]):
        print(f"           {origin['source_layer']:>6}  {layer['num_heads']:>5}  {layer['ffn_dim']:>4}  {layer['ranks'] or '-'}")
    print(f"stored     {len(delta.tensors)} tensors")
    return 0


EXPERIMENT_HELP = """\
Run a plan: make each model (compress its recipe into a delta, or take the base, fbank, a random-weight
copy of the base), then train and test S3PRL's PR (-d ctc) and SID (-d voxceleb1) downstreams on it.
Work already done (a delta, a result.json) is reused, so a killed run resumes where it stopped.
Results land in EXPDIR/models/<model>/ and EXPDIR/downstream/<task>_<model>/result.json;
`upstream-compressed report EXPDIR` turns them into the trade-off table and plots.

  upstream-compressed experiment recipes/tiny/plan.yaml --expdir exp/tiny --jobs 2
"""


def _experiment(args: argparse.Namespace) -> int:
    from .experiments import PlanError, load_plan, run_plan

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or any(t not in ("pr", "sid") for t in tasks):
        raise PlanError(f"--tasks {args.tasks!r}: give a comma-separated subset of pr,sid")
    plan = load_plan(args.plan, corpus=args.corpus)
    try:
        results = run_plan(
            plan, Path(args.expdir), tasks, jobs=args.jobs, device=args.device, threads=args.threads,
            models=args.models.split(",") if args.models else None,
            steps={"pr": args.pr_steps, "sid": args.sid_steps}, progress=not args.quiet,
        )
    except RuntimeError as error:
        print(f"upstream-compressed experiment: {error}", file=sys.stderr)
        return 1
    for result in sorted(results, key=lambda r: (r["task"], r["model"])):
        print(f"{result['task']:<4} {result['model']:<24} test {result['metric']} {result['test']:.4f}")
    return 0


def _analyse_heads(args: argparse.Namespace) -> int:
    from .head_analysis import run

    try:
        written = run(args.upstream, args.base, args.audio, args.output, args.diagonal_band, args.max_utterances,
                      args.max_seconds, args.batch_size, args.projections, args.seed, args.mean_std)
    except ValueError as error:  # e.g. a model with every head pruned
        print(f"upstream-compressed analyse heads: error: {error}", file=sys.stderr)
        return 2
    rows = written["rows"]
    print(f"{len(rows)} heads analysed; wrote {written['csv']}, {written['json']} and {written['png']}")
    print("layer head  diagonality  l1        data_driven  prune order (l1, data-driven)")
    for row in sorted(rows, key=lambda r: -r.diagonality)[:10]:
        print(f"{row.layer:>5} {row.head:>4}  {row.diagonality:>11.3f}  {row.l1:<8.4g}  {row.data_driven:<11.4g}  "
              f"{row.prune_order_l1}, {row.prune_order_data_driven}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import markdown_table, write_report

    report, written = write_report(args.expdir, args.output)
    for warning in report.warnings:
        print(f"upstream-compressed report: warning: {warning}", file=sys.stderr)
    print(markdown_table(report))
    for path in written:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstream-compressed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser("compress", help="run a recipe on its base and write a delta")
    compress.add_argument("recipe", help="YAML recipe: `base:` (path or known name) and `steps:`")
    compress.add_argument("-o", "--output", required=True, help="delta file to write (.safetensors)")
    compress.add_argument("--base", help="use this base instead of the recipe's `base:` (a checkpoint path or a "
                          "known name); the delta records the one used")
    compress.add_argument("--refresh", action="store_true", help="download a known base again")
    compress.add_argument("--work-dir", help="where recovery training keeps checkpoints so a killed run resumes "
                          "(default: OUTPUT.work; removed after success)")
    compress.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    compress.set_defaults(run=_compress)

    inspect = commands.add_parser("inspect", help="print a delta's manifest: base, steps, structure, params")
    inspect.add_argument("delta", help="a .safetensors delta")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(run=_inspect)

    experiment = commands.add_parser(
        "experiment", help="compress every model of a plan and score it with SUPERB PR and SID",
        description=EXPERIMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiment.add_argument("plan", help="plan YAML: corpus, base, pr_config, sid_config, models")
    experiment.add_argument("--expdir", required=True, help="output folder (models/, downstream/); reused to resume")
    experiment.add_argument("--corpus", help="make-corpus folder (overrides the plan's corpus:)")
    experiment.add_argument("--tasks", default="pr,sid", help="comma-separated subset of pr,sid (default both)")
    experiment.add_argument("--models", help="comma-separated model names (default: all in the plan)")
    experiment.add_argument("--jobs", type=int, default=1, help="downstream runs at a time (default 1)")
    experiment.add_argument("--device", default="cpu", help="cpu or cuda for the downstream runs (default cpu)")
    experiment.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    experiment.add_argument("--pr-steps", type=int, help="override the PR config's total_steps")
    experiment.add_argument("--sid-steps", type=int, help="override the SID config's total_steps")
    experiment.add_argument("--quiet", action="store_true", help="no progress bars")
    experiment.set_defaults(run=_experiment)

    from .embedded.commands import add_commands

    add_commands(commands)  # make-corpus, pretrain
    analyse = commands.add_parser("analyse", aliases=["analyze"], help="analyses of a model (heads)")
    analyses = analyse.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    heads = analyses.add_parser(
        "heads", help="per attention head: L1 and data-driven importance, diagonality; table and plot")
    heads.add_argument("--upstream", help="a delta (.safetensors) to analyse; its base is found as the upstream finds it")
    heads.add_argument("--base", help="a base checkpoint (path or known name) to analyse, or the base of --upstream")
    heads.add_argument("--audio", required=True, help="directory of .wav/.flac speech to score the heads on")
    heads.add_argument("-o", "--output", default="head_analysis", help="output folder (default: head_analysis)")
    heads.add_argument("--diagonal-band", type=int, default=2,
                       help="frames either side of the diagonal that count as diagonal (default 2)")
    heads.add_argument("--max-utterances", type=int, default=32, help="utterances used (default 32)")
    heads.add_argument("--max-seconds", type=float, default=8.0, help="each utterance cut to this (default 8)")
    heads.add_argument("--batch-size", type=int, default=4)
    heads.add_argument("--projections", type=int, default=4, help="random projections of the data-driven score")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--mean-std", help="a MelHuBERT base's fbank statistics .npy (default: found beside it)")
    heads.set_defaults(run=_analyse_heads)
    report = commands.add_parser("report", help="trade-off table (markdown, CSV) and plots of an experiment folder")
    report.add_argument("expdir", help="experiment folder with models/<model>/{model,profile}.json and "
                        "downstream/<task>_<model>/result.json (its merged rows go to EXPDIR/report.json)")
    report.add_argument("-o", "--output", help="folder for report.md, report.csv and the PNG plots (default: EXPDIR)")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .experiments import PlanError
    from .model.convert import CheckpointError
    from .recipe import RecipeError
    from .report import ReportError

    args = build_parser().parse_args(argv)
    if getattr(args, "analysis", None) == "heads":
        if args.diagonal_band < 0 or min(args.max_utterances, args.batch_size, args.projections) <= 0:
            build_parser().error("--diagonal-band must be >= 0; --max-utterances, --batch-size, --projections > 0")
    try:
        return args.run(args)
    except (DeltaError, RecipeError, CheckpointError, PlanError, ReportError, FileNotFoundError) as error:
        print(f"upstream-compressed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
