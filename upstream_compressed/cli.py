"""``upstream-compressed``: compress a base by a recipe, inspect and export the delta it writes, profile
any upstream, and package SUPERB leaderboard submissions."""

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
  upstream-compressed export OUT.safetensors -o FULL.ckpt          # one file, no base needed
  upstream-compressed profile -u NAME [-k CKPT] [--seconds 10] [--device cpu|cuda] [--json]
  upstream-compressed profile -u NAME [-k CKPT] --protocol superb [--json]
  upstream-compressed submission --pr EXPDIR --sid EXPDIR -o predict.zip

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


def _export(args: argparse.Namespace) -> int:
    from .delta import check_base, export_self_contained, read_delta, write_delta
    from .hubconf import find_base
    from .model.convert import load_base

    delta = read_delta(args.delta)
    if delta.self_contained:
        raise DeltaError(f"{args.delta} is already self-contained; copy it instead")
    base_path = find_base(delta, Path(args.delta), args.upstream_config, refresh=False)
    check_base(delta, base_path)  # the base's sha256 must match the one the delta records
    full = export_self_contained(delta, load_base(base_path))
    path = write_delta(full, args.output)
    print(f"wrote {path}: self-contained {delta.technique} model, {len(full.tensors)} tensors, "
          f"{path.stat().st_size / 2**20:.1f} MiB; load it with -u compressed_local -k {path}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .upstream_profile import format_profile, load_upstream, profile_upstream, resolve_device

    if args.protocol == "superb":
        from .superb.protocol import FORM_FIELDS, superb_profile

        device = resolve_device(args.device)
        values = superb_profile(load_upstream(args.upstream, args.ckpt, args.upstream_config), device)
        if args.json:
            print(json.dumps(values))
        else:
            print(f"SUPERB leaderboard profile of {args.upstream} (32 test-clean lengths, one utterance per forward)")
            for name in FORM_FIELDS:
                print(f"{name:<12}{values[name]}")
        return 0
    upstream = load_upstream(args.upstream, args.ckpt, args.upstream_config)
    result = profile_upstream(upstream, args.upstream, args.seconds, args.device, args.repeats)
    print(json.dumps(result) if args.json else format_profile(result))
    return 0


def _submission(args: argparse.Namespace) -> int:
    from .superb.submission import PUBLIC_TEST_UTTERANCES, write_submission

    files = write_submission(args.output, pr=args.pr, sid=args.sid, vocab=args.vocab)
    for task in files:
        print(f"{task.task}: {task.lines} utterances from {task.source} -> {task.member}")
        if task.lines != PUBLIC_TEST_UTTERANCES[task.task]:
            print(f"note: the public {task.task} test set has {PUBLIC_TEST_UTTERANCES[task.task]} utterances; "
                  "the server scores only the keys present", file=sys.stderr)
    print(f"wrote {args.output}")
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

    export = commands.add_parser("export", help="write a self-contained checkpoint (full weights, no base needed)")
    export.add_argument("delta", help="a .safetensors delta")
    export.add_argument("-o", "--output", required=True, help="file to write; loads with -u compressed_local -k FILE")
    export.add_argument("-g", "--upstream-config", help="options yaml with `base: PATH` (else the usual base search)")
    export.set_defaults(run=_export)

    profile = commands.add_parser("profile", help="params, MACs, time, real-time factor and memory of an upstream")
    profile.add_argument("-u", "--upstream", required=True,
                         help="any upstream in s3prl.hub (ours, hubert_local, fbank, ...)")
    profile.add_argument("-k", "--ckpt", help="its checkpoint or delta (as run_downstream.py -k)")
    profile.add_argument("-g", "--upstream-config", help="its options yaml (as run_downstream.py -g)")
    profile.add_argument("--seconds", type=float, default=10.0, help="length of the audio (default 10 s)")
    profile.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    profile.add_argument("--repeats", type=int, default=5, help="timed forwards after one warm-up (default 5)")
    profile.add_argument("--protocol", choices=["superb"],
                         help="superb: the leaderboard's MAC protocol, printed as its form's fields")
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(run=_profile)

    submission = commands.add_parser("submission", help="predict.zip for the SUPERB leaderboard from evaluated expdirs")
    submission.add_argument("--pr", help="phone recognition expdir with a finished `-m evaluate` (test-hyp.ark)")
    submission.add_argument("--sid",
                            help="speaker identification expdir with a finished `-m evaluate` (test_predict.txt)")
    submission.add_argument("-o", "--output", required=True, help="zip to write (e.g. predict.zip)")
    submission.add_argument("--vocab", help="phone vocabulary for PR (default: the vocab_file of the expdir's config)")
    submission.set_defaults(run=_submission)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .model.convert import CheckpointError
    from .recipe import RecipeError
    from .superb.submission import SubmissionError
    from .upstream_profile import ProfileError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DeltaError, RecipeError, CheckpointError, FileNotFoundError, ProfileError, SubmissionError) as error:
        print(f"upstream-compressed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
