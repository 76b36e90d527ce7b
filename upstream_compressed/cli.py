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
  upstream-compressed report EXPDIR [-o OUTDIR]

The delta then runs as an S3PRL upstream:
  run_downstream.py -m train -u hubert_<technique> -k OUT.safetensors -d ctc -c CONFIG.yaml
"""


def _compress(args: argparse.Namespace) -> int:
    from .compress import run_recipe
    from .delta import write_delta
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
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
    compress.add_argument("--refresh", action="store_true", help="download a known base again")
    compress.add_argument("--work-dir", help="where recovery training keeps checkpoints so a killed run resumes "
                          "(default: OUTPUT.work; removed after success)")
    compress.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    compress.set_defaults(run=_compress)

    inspect = commands.add_parser("inspect", help="print a delta's manifest: base, steps, structure, params")
    inspect.add_argument("delta", help="a .safetensors delta")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(run=_inspect)

    report = commands.add_parser("report", help="trade-off table (markdown, CSV) and plots of an experiment folder")
    report.add_argument("expdir", help="experiment folder with models/<model>/{model,profile}.json and "
                        "downstream/<task>_<model>/result.json (its merged rows go to EXPDIR/report.json)")
    report.add_argument("-o", "--output", help="folder for report.md, report.csv and the PNG plots (default: EXPDIR)")
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .model.convert import CheckpointError
    from .recipe import RecipeError
    from .report import ReportError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DeltaError, RecipeError, CheckpointError, ReportError, FileNotFoundError) as error:
        print(f"upstream-compressed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
