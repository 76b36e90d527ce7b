"""Every full recipe (recipes/full/*.yaml) run end to end at HuBERT Base's real shape, one step per loop.

A random-weight HuBERT Base (94.7 M parameters) in S3PRL's converted format (what `hubert_local`
reads) stands in for the downloaded one, and a synthesised corpus in LibriSpeech's layout
(train-clean-100, dev-clean, test-clean) is named by LIBRISPEECH, as on a real machine. Each recipe
runs as a user runs it:

  LIBRISPEECH=CORPUS upstream-compressed compress recipes/full/X.yaml --base BASE.pt --limit-steps 1 -o X.safetensors

then its delta is loaded as an S3PRL upstream (`compressed_local -k X.safetensors`) and run on 1 s
of audio. Printed per recipe: peak resident memory of the process tree, wall-clock seconds, seconds
per training step (the whole step: teacher forward, student forward and backward, on this machine),
and the delta's parameter count. Last line: one JSON object.

  python benchmarks/full_recipes.py [--recipes heads50,rows50] [--workdir DIR]   # trains on CUDA when there is one
  python benchmarks/full_recipes.py --recipes kd --limit-steps 20 --train-option amp=false --train-option num_workers=0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_tree_rss  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "upstream_compressed" / "recipes" / "full"
TRAINING_DONE = re.compile(r"training: (?P<what>.+?) done steps=(?P<steps>\d+) seconds=(?P<seconds>[\d.]+)")


def prepare(work: Path) -> tuple[Path, Path]:
    """(base checkpoint, LibriSpeech-layout corpus), made once and kept in ``work``."""
    from upstream_compressed.testing.checkpoints import HUBERT_BASE, make_hubert_checkpoint
    from upstream_compressed.testing.corpus import make_tiny_librispeech

    base, corpus = work / "hubert_base_random.pt", work / "LibriSpeech"
    if not base.is_file():
        make_hubert_checkpoint(base, **HUBERT_BASE)
    if not (corpus / ".complete").is_file():
        make_tiny_librispeech(corpus, num_speakers=4, utterances={"train-clean-100": 6, "dev-clean": 2, "test-clean": 2})
        (corpus / ".complete").touch()
    return base, corpus


def with_training_options(recipe: Path, overrides: dict, work: Path) -> Path:
    """A copy of ``recipe`` whose every training loop also gets ``overrides`` (e.g. amp: false)."""
    if not overrides:
        return recipe
    data = yaml.safe_load(recipe.read_text())
    for step in data["steps"]:
        if step["method"] == "distillation":
            step.update(overrides)
        if isinstance(step.get("recovery"), dict):
            step["recovery"].update(overrides)
    copy = work / "recipes" / recipe.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(data))
    return copy


def run_recipe(recipe: Path, base: Path, corpus: Path, work: Path, limit: int) -> dict:
    """Compress ``recipe`` with ``limit`` steps per training loop; its peak memory, times and delta."""
    output = work / f"{recipe.stem}.safetensors"
    output.unlink(missing_ok=True)
    env = {**os.environ, "LIBRISPEECH": str(corpus), "UPSTREAM_COMPRESSED_CACHE": str(work / "cache")}
    command = [sys.executable, "-m", "upstream_compressed.cli", "compress", str(recipe), "--base", str(base),
               "--limit-steps", str(limit), "-o", str(output), "--work-dir", str(work / f"{recipe.stem}.work")]
    peak, seconds, stderr = peak_tree_rss(command, env)
    loops = [m.groupdict() for m in TRAINING_DONE.finditer(stderr)]
    step_seconds = [float(m["seconds"]) / max(1, int(m["steps"])) for m in loops]
    return {"recipe": recipe.stem, "peak_mib": round(peak / 2**20, 1), "seconds": round(seconds, 1),
            "training_loops": len(loops), "seconds_per_step": [round(s, 2) for s in step_seconds],
            "delta": output}


def load_as_upstream(delta: Path) -> dict:
    """Run the delta through S3PRL's hub as `run_downstream.py -u compressed_local -k DELTA` would."""
    import torch

    import upstream_compressed

    upstream_compressed.register()  # our upstreams into s3prl.hub (and the shims importing it needs)
    import s3prl.hub

    upstream = getattr(s3prl.hub, "compressed_local")(ckpt=str(delta)).eval()
    with torch.inference_mode():
        states = upstream([torch.randn(16000)])["hidden_states"]
    return {"params_m": round(sum(p.numel() for p in upstream.parameters()) / 1e6, 2),
            "hidden_states": len(states), "frames": int(states[0].shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/full_recipes", help="base, corpus and deltas go here (kept)")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every recipes/full/*.yaml)")
    parser.add_argument("--limit-steps", type=int, default=1, help="training steps per loop (default 1)")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="set a training option in every loop (YAML value), e.g. amp=false or num_workers=0")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine()), flush=True)
    started = time.perf_counter()
    base, corpus = prepare(work)
    print(f"base and corpus ready in {time.perf_counter() - started:.0f} s: {base}, {corpus}", flush=True)
    overrides = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.train_option)}
    names = args.recipes.split(",") if args.recipes else sorted(p.stem for p in RECIPES.glob("*.yaml"))
    results = []
    for name in names:
        recipe = with_training_options(RECIPES / f"{name}.yaml", overrides, work)
        result = run_recipe(recipe, base, corpus, work, args.limit_steps)
        result.update(load_as_upstream(result.pop("delta")))
        results.append(result)
        print(f"{name:<12} peak {result['peak_mib']:>7.0f} MiB  {result['seconds']:>6.1f} s  "
              f"s/step per loop {result['seconds_per_step']}  -> {result['params_m']} M params as an upstream, "
              f"{result['hidden_states']} hidden states", flush=True)
    print(json.dumps({"recipes": results, "limit_steps": args.limit_steps, "train_options": overrides, **machine()}))


if __name__ == "__main__":
    main()
