"""``upstream-compressed``: compress a base by a recipe, inspect and export the delta it writes, profile
any upstream, run and report experiments, analyse heads, and package SUPERB leaderboard submissions."""

from __future__ import annotations

import argparse
import json
import os
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
  upstream-compressed export OUT.safetensors -o FULL.ckpt          # one file, no base needed
  upstream-compressed profile -u NAME [-k CKPT] [--seconds 10] [--device cpu|cuda] [--json]
  upstream-compressed profile -u NAME [-k CKPT] --protocol superb [--json]
  upstream-compressed submission --pr EXPDIR --sid EXPDIR -o predict.zip
  upstream-compressed manifest AUDIO_DIR -o AUDIO.tsv [--skip-bad]

The delta then runs as an S3PRL upstream:
  run_downstream.py -m train -u hubert_<technique> -k OUT.safetensors -d ctc -c CONFIG.yaml
"""


def _compress(args: argparse.Namespace) -> int:
    from .compress import clean_work_dir, limit_training_steps, run_recipe
    from .delta import write_delta
    from .recipe import load_recipe

    base = args.base
    if base is not None and Path(os.path.expandvars(base)).exists():
        base = str(Path(os.path.expandvars(base)).resolve())  # a path on the command line is relative to here
    recipe = load_recipe(args.recipe, base=base)
    if args.limit_steps is not None:
        recipe = limit_training_steps(recipe, args.limit_steps)
    work_dir = Path(args.work_dir or f"{args.output}.work")
    # A folder the user named that already existed is theirs: only compress's own files leave it.
    own_folder = args.work_dir is None or not work_dir.exists()
    delta = run_recipe(recipe, refresh=args.refresh, work_dir=work_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one process writes
    if not is_main:
        return 0
    path = write_delta(delta, args.output)
    if not args.keep_work:
        clean_work_dir(work_dir, remove_folder=own_folder)
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

  upstream-compressed make-corpus data/embedded_corpus
  upstream-compressed experiment quick --corpus data/embedded_corpus --expdir exp/quick --jobs 2

A plan is a file or a bundled plan's name (quick, tiny). Paths inside a plan or a recipe are relative
to that file's folder, after ~ and ${VAR} are expanded; recipe, pr_config and sid_config may also be
bundled names (tiny/kd, ctc_libriphone_embedded). Recipes read their audio as ${CORPUS}/..., which
the plan's corpus (or --corpus) sets.

Seeds and SUPERB's learning-rate search (each flag replaces the plan's seeds / sid_lr_search /
pr_lr_search field):

  upstream-compressed experiment quick --corpus c --expdir e --seeds 0,1,2 --sid-lr-search 1e-1,1e-2,1e-3,1e-4

Every searched rate trains with the first seed; the rate with the best dev score (min PER, max
accuracy; a tie goes to the rate listed first) is tested, then the other seeds run at it only:
n_rates + n_seeds - 1 runs per model and task, each its own job (EXPDIR/downstream/<task>_<model>/runs/
lr<rate>-seed<seed>/), combined in EXPDIR/downstream/<task>_<model>/result.json. A model with its own
downstream_lr is not searched. Without --seeds a search uses S3PRL's default seed (1337).
"""


def _experiment(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .downstream_runs import rates_from_text, seeds_from_text
    from .experiments import PlanError, load_plan, run_plan
    from .launch import SlurmOptions

    tasks = [] if args.no_downstream else [t for t in args.tasks.split(",") if t]
    if (not tasks and not args.no_downstream) or any(t not in ("pr", "sid") for t in tasks):
        raise PlanError(f"--tasks {args.tasks!r}: give a comma-separated subset of pr,sid")
    seeds = None if args.seeds is None else seeds_from_text(args.seeds, "--seeds")
    searches = {task: rates_from_text(text, f"--{task}-lr-search")
                for task, text in (("sid", args.sid_lr_search), ("pr", args.pr_lr_search)) if text is not None}
    plan = load_plan(args.plan, corpus=args.corpus)
    plan = replace(plan, seeds=plan.seeds if seeds is None else seeds, lr_search={**plan.lr_search, **searches})
    try:
        results = run_plan(
            plan, Path(args.expdir), tasks, jobs=args.jobs, device=args.device, threads=args.threads,
            models=args.models.split(",") if args.models else None,
            steps={"pr": args.pr_steps, "sid": args.sid_steps}, progress=not args.quiet,
            profile_seconds=args.profile_seconds, profile_repeats=args.profile_repeats,
            launcher=args.launcher, slurm=SlurmOptions(args.slurm_partition, args.slurm_gpus, args.slurm_time,
                                                       args.slurm_mem, args.slurm_cpus, args.slurm_folder),
        )
    except RuntimeError as error:
        print(f"upstream-compressed experiment: {error}", file=sys.stderr)
        return 1
    for result in sorted(results, key=lambda r: (r["task"], r["model"])):
        seeds = f"  (mean of {len(result['seeds'])} seed(s), lr {result['lr']:g})" if "seeds" in result else ""
        print(f"{result['task']:<4} {result['model']:<24} test {result['metric']} {result['test']:.4f}{seeds}")
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


def _export(args: argparse.Namespace) -> int:
    from .delta import check_base, export_self_contained, read_delta, write_delta
    from .hubconf import find_base, trust_option
    from .model.convert import load_base

    delta = read_delta(args.delta)
    if delta.self_contained:
        raise DeltaError(f"{args.delta} is already self-contained; copy it instead")
    base_path = find_base(delta, Path(args.delta), args.upstream_config, refresh=False)
    check_base(delta, base_path)  # the base's sha256 must match the one the delta records
    full = export_self_contained(delta, load_base(base_path, trust=trust_option(args.upstream_config)))
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


MANIFEST_HELP = """\
List a corpus's audio files and their lengths (from file headers only, in parallel) in fairseq's
manifest layout: the first line the root folder, then `relative/path<TAB>num_samples`. Every `audio:`
option (recovery, distillation, data-driven criteria, analyse heads) takes a manifest as well as a
folder. Files that cannot be read, are empty or are not 16 kHz mono are named; the command then exits
1, unless --skip-bad leaves them out.

  upstream-compressed manifest /data/LibriSpeech/train-960 -o train-960.tsv --jobs 32
"""


def _manifest(args: argparse.Namespace) -> int:
    from .audio.manifest import describe_bad, scan

    manifest = scan(args.directory, jobs=args.jobs, progress=not args.quiet)
    if manifest.bad and not args.skip_bad:
        print(f"upstream-compressed manifest: {len(manifest.bad)} file(s) cannot be used:\n"
              f"{describe_bad(manifest)}\nfix them, or pass --skip-bad to leave them out; nothing written",
              file=sys.stderr)
        return 1
    manifest.write(args.output)
    skipped = f", {len(manifest.bad)} bad file(s) left out" if manifest.bad else ""
    print(f"wrote {args.output}: {len(manifest):,} files, {manifest.hours:.2f} h of audio{skipped}")
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


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint`` for every command that loads a base checkpoint (see ``model/trust.py``)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a base checkpoint that pickles more than S3PRL's formats need (full "
                        "unpickling can run code from the file: only for files you trust)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstream-compressed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser("compress", help="run a recipe on its base and write a delta")
    compress.add_argument("recipe", help="YAML recipe (`base:` and `steps:`) or a bundled recipe's name, e.g. "
                          "tiny/kd; its paths are relative to its folder")
    compress.add_argument("-o", "--output", required=True, help="delta file to write (.safetensors)")
    compress.add_argument("--base", help="use this base instead of the recipe's `base:` (a checkpoint path or a "
                          "known name); the delta records the one used")
    compress.add_argument("--refresh", action="store_true", help="download a known base again")
    compress.add_argument("--work-dir", help="where recovery training keeps checkpoints so a killed run resumes "
                          "(default: OUTPUT.work). After success compress removes the files it wrote there "
                          "(and the folder, if it made it and nothing else is in it)")
    compress.add_argument("--limit-steps", type=_positive_int, metavar="N",
                          help="cut every training loop of the recipe to at most N steps (smoke-test a full recipe "
                          "at its real shape in minutes; the delta's recipe records the cut)")
    compress.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    _add_trust_option(compress)
    compress.set_defaults(run=_compress)

    inspect = commands.add_parser("inspect", help="print a delta's manifest: base, steps, structure, params")
    inspect.add_argument("delta", help="a .safetensors delta")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(run=_inspect)

    experiment = commands.add_parser(
        "experiment", help="compress every model of a plan and score it with SUPERB PR and SID",
        description=EXPERIMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiment.add_argument("plan", help="plan YAML (corpus, base, pr_config, sid_config, models) or a bundled "
                            "plan's name: quick, tiny")
    experiment.add_argument("--expdir", required=True, help="output folder (models/, downstream/); reused to resume")
    experiment.add_argument("--corpus", help="make-corpus folder (overrides the plan's corpus:; the bundled "
                            "plans need it, or CORPUS set)")
    experiment.add_argument("--tasks", default="pr,sid", help="comma-separated subset of pr,sid (default both)")
    experiment.add_argument("--models", help="comma-separated model names (default: all in the plan)")
    experiment.add_argument("--jobs", type=int, default=1, help="downstream runs at a time (default 1)")
    experiment.add_argument("--device", default="cpu", help="cpu or cuda for the downstream runs (default cpu)")
    experiment.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    experiment.add_argument("--pr-steps", type=int, help="override the PR config's total_steps")
    experiment.add_argument("--sid-steps", type=int, help="override the SID config's total_steps")
    experiment.add_argument("--seeds", metavar="LIST",
                            help="comma-separated downstream seeds (S3PRL's --seed), e.g. 0,1,2: every run is "
                            "repeated per seed, each in downstream/<task>_<model>/runs/lr<rate>-seed<seed>/, and the "
                            "report's intervals resample them (replaces the plan's seeds:; default one run, "
                            "S3PRL's seed)")
    experiment.add_argument("--sid-lr-search", metavar="LIST",
                            help="comma-separated SID learning rates to search as SUPERB does, e.g. "
                            "1e-1,1e-2,1e-3,1e-4: each trains with the first seed, the best dev accuracy is "
                            "chosen (a tie: the first listed), tested, and the other seeds run at it only "
                            "(replaces sid_lr_search:; models with downstream_lr are not searched)")
    experiment.add_argument("--pr-lr-search", metavar="LIST",
                            help="the same for PR, choosing the lowest dev PER (replaces pr_lr_search:)")
    experiment.add_argument("--profile-seconds", type=float, help="also profile every model on this many seconds "
                            "of audio (CPU, one at a time, after training) into models/<model>/profile.json")
    experiment.add_argument("--profile-repeats", type=int, default=5, help="timed forwards per profile (default 5)")
    experiment.add_argument("--no-downstream", action="store_true", help="only make (and profile) the models")
    experiment.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                            help="local (default): a pool of --jobs processes here; slurm: every compression and "
                            "every downstream run is its own Slurm job (submitit), in the same resumable layout; "
                            "submitit-local: the same jobs through submitit on this machine (to try it)")
    experiment.add_argument("--slurm-partition", help="Slurm partition for the jobs")
    experiment.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job (default 1)")
    experiment.add_argument("--slurm-time", type=int, default=240, help="time limit per job, minutes (default 240)")
    experiment.add_argument("--slurm-mem", type=int, default=32, help="memory per job, GB (default 32)")
    experiment.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per job (default 8)")
    experiment.add_argument("--slurm-folder", help="job scripts and logs (default EXPDIR/slurm)")
    experiment.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_trust_option(experiment)
    experiment.set_defaults(run=_experiment)

    from .embedded.commands import add_commands

    add_commands(commands)  # make-corpus, pretrain
    from .relative_timing_command import add_command

    add_command(commands)  # time-vs-base
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
    _add_trust_option(heads)
    heads.set_defaults(run=_analyse_heads)
    report = commands.add_parser("report", help="trade-off table (markdown, CSV) and plots of an experiment folder")
    report.add_argument("expdir", help="experiment folder with models/<model>/{model,profile}.json and "
                        "downstream/<task>_<model>/result.json (its merged rows go to EXPDIR/report.json)")
    report.add_argument("-o", "--output", help="folder for report.md, report.csv and the PNG plots (default: EXPDIR)")
    report.set_defaults(run=_report)
    export = commands.add_parser("export", help="write a self-contained checkpoint (full weights, no base needed)")
    export.add_argument("delta", help="a .safetensors delta")
    export.add_argument("-o", "--output", required=True, help="file to write; loads with -u compressed_local -k FILE")
    export.add_argument("-g", "--upstream-config", help="options yaml with `base: PATH` (else the usual base search)")
    _add_trust_option(export)
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
    _add_trust_option(profile)
    profile.set_defaults(run=_profile)

    manifest = commands.add_parser("manifest", help="list a corpus's audio files and lengths (fairseq's .tsv)",
                                   description=MANIFEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    manifest.add_argument("directory", help="folder searched recursively for .wav/.flac files")
    manifest.add_argument("-o", "--output", required=True, help="manifest to write (.tsv)")
    manifest.add_argument("--jobs", type=int, default=16, help="files read at a time (default 16; more on network disks)")
    manifest.add_argument("--skip-bad", action="store_true", help="leave unusable files out (counted) instead of failing")
    manifest.add_argument("--quiet", action="store_true", help="no progress bar")
    manifest.set_defaults(run=_manifest)

    submission = commands.add_parser("submission", help="predict.zip for the SUPERB leaderboard from evaluated expdirs")
    submission.add_argument("--pr", help="phone recognition expdir with a finished `-m evaluate` (test-hyp.ark)")
    submission.add_argument("--sid",
                            help="speaker identification expdir with a finished `-m evaluate` (test_predict.txt)")
    submission.add_argument("-o", "--output", required=True, help="zip to write (e.g. predict.zip)")
    submission.add_argument("--vocab", help="phone vocabulary for PR (default: the vocab_file of the expdir's config)")
    submission.set_defaults(run=_submission)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .audio.manifest import ManifestError
    from .train.distill import TrainingError
    from .experiments import PlanError
    from .model.convert import CheckpointError
    from .model.trust import trusting
    from .recipe import RecipeError
    from .report import ReportError
    from .superb.submission import SubmissionError
    from .upstream_profile import ProfileError

    args = build_parser().parse_args(argv)
    if getattr(args, "analysis", None) == "heads":
        if args.diagonal_band < 0 or min(args.max_utterances, args.batch_size, args.projections) <= 0:
            build_parser().error("--diagonal-band must be >= 0; --max-utterances, --batch-size, --projections > 0")
    try:
        # Commands that start others (experiment) hand the opt-in on through the environment.
        with trusting(getattr(args, "trust_checkpoint", False), inherit=True):
            return args.run(args)
    except (DeltaError, RecipeError, CheckpointError, PlanError, ReportError, FileNotFoundError, ProfileError,
            SubmissionError, ManifestError, TrainingError) as error:
        print(f"upstream-compressed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
