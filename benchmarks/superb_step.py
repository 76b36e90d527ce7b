"""A SUPERB PR training step through S3PRL's own runner: our upstream against S3PRL's ``hubert_local``.

SUPERB downstream training runs the frozen upstream on every step, so the upstream's speed is the
user's training time. This times S3PRL's ``run_downstream.py -m train -d ctc`` (our wrapper of it,
``python -m upstream_compressed.run_downstream``) on a HuBERT Base-shaped checkpoint with random
weights, once as ``-u hubert_local -k base.pt`` (S3PRL's model) and once as ``-u hubert_identity -k
identity.safetensors`` (ours, the same weights; ``--precision bf16`` adds a ``-g`` yaml). Each is run
for a short and a long number of steps, alternating, and the time per step is the difference over
the steps between them, so the start-up (imports, model load, data listing) drops out. The corpus is
a make-corpus folder (``upstream-compressed make-corpus DIR``). The last line is one JSON object.

    python benchmarks/superb_step.py --corpus data/embedded_corpus [--device cuda] [--steps 10,60]
                                     [--rounds 2] [--precision fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HUBERT_BASE_CONV, machine  # noqa: E402

from upstream_compressed.bundled import bundled_config  # noqa: E402
from upstream_compressed.compress import run_recipe  # noqa: E402
from upstream_compressed.delta import write_delta  # noqa: E402
from upstream_compressed.overrides import ctc_override  # noqa: E402
from upstream_compressed.recipe import parse_recipe  # noqa: E402
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint  # noqa: E402


def train_seconds(upstream: list[str], corpus: Path, expdir: Path, steps: int, device: str, env: dict) -> float:
    """Wall-clock of one S3PRL PR training run of ``steps`` steps (no dev evaluation within them)."""
    override = ctc_override(corpus / "LibriSpeech", corpus / "lexicon.txt", corpus / "phoneme.txt")
    override += f",,config.runner.total_steps={steps},,config.runner.eval_step={10 * steps}" \
                f",,config.runner.save_step={10 * steps}"
    command = [sys.executable, "-m", "upstream_compressed.run_downstream", "--device", device, "-m", "train",
               *upstream, "-d", "ctc", "-c", str(bundled_config("ctc_libriphone_quick")), "-p", str(expdir),
               "-o", override]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a make-corpus folder")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", default="10,60", help="the short and the long run's steps (default 10,60)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats of each run (default 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="our upstream's -g precision (S3PRL's hubert_local always runs fp32)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: torch's)")
    args = parser.parse_args()
    short, long = (int(s) for s in args.steps.split(","))
    if not 0 < short < long or args.rounds < 1:
        parser.error("--steps SHORT,LONG with 0 < SHORT < LONG, and --rounds ≥ 1")
    if not (args.corpus / "corpus.json").is_file():
        parser.error(f"--corpus {args.corpus}: no corpus.json; make it with `upstream-compressed make-corpus {args.corpus}`")
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = make_hubert_checkpoint(tmp / "hubert_base_shape.pt", layers=12, dim=768, ffn=3072, heads=12,
                                      conv_layers=repr(HUBERT_BASE_CONV), conv_pos=128, conv_pos_groups=16)
        delta = write_delta(run_recipe(parse_recipe({"base": str(ckpt), "steps": []}), work_dir=tmp / "work"),
                            tmp / "identity.safetensors")
        ours = ["-u", "hubert_identity", "-k", str(delta)]
        if args.precision != "fp32":
            (tmp / "options.yaml").write_text(f"precision: {args.precision}\n")
            ours += ["-g", str(tmp / "options.yaml")]
        upstreams = {"s3prl": ["-u", "hubert_local", "-k", str(ckpt)], "ours": ours}
        times: dict[tuple[str, int], list[float]] = {}
        for round_index in range(args.rounds):
            for steps in (short, long):
                order = list(upstreams) if round_index % 2 == 0 else list(reversed(upstreams))
                for name in order:  # alternate, so that drifts of the machine hit both
                    expdir = tmp / f"{name}_{steps}_{round_index}"
                    times.setdefault((name, steps), []).append(
                        train_seconds(upstreams[name], args.corpus, expdir, steps, args.device, env))
    per_step = {name: (statistics.median(times[name, long]) - statistics.median(times[name, short])) / (long - short)
                for name in upstreams}
    print(f"S3PRL PR training (-d ctc, ctc_libriphone_quick), HuBERT Base shape, {args.device}, steps {short} and {long}")
    print("| upstream | s per step | run of short / long steps (s) |")
    print("|---|---:|---|")
    for name in upstreams:
        print(f"| {name} | {per_step[name]:.3f} | {statistics.median(times[name, short]):.1f} / "
              f"{statistics.median(times[name, long]):.1f} |")
    ratio = per_step["ours"] / per_step["s3prl"]
    print(f"ours / S3PRL per training step: {ratio:.3f} (our precision {args.precision})")
    print(json.dumps({"step_time_ratio": ratio, "ours_s_per_step": per_step["ours"],
                      "s3prl_s_per_step": per_step["s3prl"], "precision": args.precision, "device": args.device,
                      "steps": [short, long], "rounds": args.rounds, **machine()}))


if __name__ == "__main__":
    main()
