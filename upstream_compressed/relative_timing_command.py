"""The ``time-vs-base`` subcommand of ``upstream-compressed`` (``cli.py`` calls :func:`add_command`)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

HELP = """\
Time upstreams beside a base in one process: every round runs each model once, in an order rotated
by one model per round, and divides each model's time by the base's time in that round. Reports the
median of those per-round ratios and their 25th-75th percentiles, and each model's own median time
and real-time factor (RTF) over the same rounds. Models are written [LABEL=]NAME[:CKPT]: NAME any
upstream in s3prl.hub once this plugin is registered (ours, hubert_local, fbank, ...), CKPT its -k.

  upstream-compressed time-vs-base --base-upstream hubert_local --base-ckpt tiny_hubert.pt \\
      -u heads50=hubert_headpruned:heads50.safetensors -u fbank --seconds 10 --rounds 10 --threads 1
"""

_LABEL = re.compile(r"^([\w.-]+)=(.+)$")  # an upstream name holds no '=', so LABEL= is unambiguous


def parse_model(text: str) -> dict[str, Any]:
    """``[LABEL=]NAME[:CKPT]`` as a model.json-like entry: ``{"model", "upstream", "ckpt"}``.

    The label defaults to what was typed, so that two checkpoints of one upstream stay apart."""
    label_match = _LABEL.match(text)
    label, spec = label_match.groups() if label_match else (text, text)
    upstream, _, ckpt = spec.partition(":")
    if not upstream:
        raise argparse.ArgumentTypeError(f"expected [LABEL=]NAME[:CKPT], got {text!r}")
    return {"model": label, "upstream": upstream, "ckpt": ckpt or None}


def _run(args: argparse.Namespace) -> int:
    import torch

    from .relative_timing import format_table, time_models_against_base
    from .upstream_profile import ProfileError

    base = {"model": args.base_name, "upstream": args.base_upstream, "ckpt": args.base_ckpt}
    if any(m["model"] == base["model"] for m in args.models):
        raise ProfileError(f"a model is labelled {base['model']!r}, the base's label; give it another "
                           "(LABEL=NAME[:CKPT]) or the base one (--base-name)")
    models = [base, *args.models]
    cpu = args.device == "cpu"
    results = time_models_against_base(models, base["model"], args.seconds, args.rounds, args.warmup, args.threads,
                                       args.device)
    run = {"base": base["model"], "seconds_audio": args.seconds, "device": args.device, "rounds": args.rounds,
           "warmup": args.warmup, "threads": (args.threads or torch.get_num_threads()) if cpu else None,
           "order": "rotated: round r starts at model r mod n",
           "spread": "time_ratio_iqr: 25th and 75th percentile of the per-round ratios",
           "models": {m["model"]: {"upstream": m["upstream"], "ckpt": m["ckpt"], **results[m["model"]]}
                      for m in models}}
    if args.json:
        print(json.dumps(run))
    else:
        threads = f"{run['threads']} threads, " if cpu else ""
        print(format_table(results, f"beside {base['model']} ({args.base_upstream}) on {args.device}, {threads}"
                           f"{args.seconds:g} s of audio, {args.rounds} rounds (rotated), {args.warmup} warm-up"))
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``time-vs-base`` to an argparse subparsers object."""
    from .cli import _add_trust_option  # cli imports this module only while building its parser

    command = subparsers.add_parser(
        "time-vs-base", help="time upstreams interleaved with a base in one process: ratio to the base and spread",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--base-upstream", required=True, help="the base's upstream (e.g. hubert_local)")
    command.add_argument("--base-ckpt", help="the base's checkpoint (its -k)")
    command.add_argument("--base-name", default="base", help="the base's label in the output (default base)")
    command.add_argument("-u", "--upstream", dest="models", action="append", type=parse_model, required=True,
                         metavar="[LABEL=]NAME[:CKPT]", help="a model to time beside the base (repeat it)")
    command.add_argument("--seconds", type=float, default=10.0, help="length of the audio (default 10 s)")
    command.add_argument("--rounds", type=int, default=10, help="timed rounds, each model once per round (default 10)")
    command.add_argument("--warmup", type=int, default=1, help="untimed forwards of each model first (default 1)")
    command.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    command.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    command.add_argument("--json", action="store_true", help="print one JSON line")
    _add_trust_option(command)
    command.set_defaults(run=_run)
