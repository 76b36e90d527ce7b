"""How training data scales: start-up time per 1,000 files, memory per hour of audio, batches per second.

Synthesises corpora of growing size (1 s files: 1k, 4k, 16k; 60 s files: 1 h and 16 h), then measures
side by side in one run:
- start-up: seconds per 1,000 files to list a corpus (headers only; cold, then from the cached manifest);
- memory: peak resident memory of the whole process tree of a real recovery run
  (`upstream-compressed compress`, head pruning + recovery on the bundled tiny HuBERT) on 1 h and on
  16 h of audio (median of 3 runs each); the slope is MiB per hour of audio (goal <= 1: memory follows the batch, not the corpus);
- throughput: batches per second of the training loader with 0 workers and with the default workers.
The last line is one JSON object.

  python benchmarks/data_scale.py [--quick] [--workdir /tmp/data_scale] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_tree_rss  # noqa: E402

RATE = 16000


def synthesise(root: Path, files: int, seconds: float, speakers: int = 40) -> Path:
    """``files`` FLAC files of ``seconds`` each in LibriSpeech's speaker/chapter/file layout (kept between runs)."""
    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(files)
    samples = int(seconds * RATE)
    t = np.arange(samples) / RATE
    for i in range(files):
        speaker = 1000 + i % speakers
        folder = root / str(speaker) / "1"
        folder.mkdir(parents=True, exist_ok=True)
        tone = 0.1 * np.sin(2 * np.pi * (100 + 5 * (i % 50)) * t) + 0.02 * rng.standard_normal(samples)
        soundfile.write(str(folder / f"{speaker}-1-{i:06d}.flac"), tone.astype(np.float32), RATE, subtype="PCM_16")
    done.touch()
    return root


def recovery_peak(corpus: Path, work: Path, steps: int) -> tuple[float, float]:
    """(peak MiB, seconds) of head pruning + ``steps`` recovery steps on ``corpus`` with the tiny HuBERT."""
    recipe = work / f"recovery_{corpus.name}.yaml"
    recipe.write_text(yaml.safe_dump({"base": "tiny_hubert", "steps": [{
        "method": "head_pruning", "ratio": 0.25, "criterion": "l1",
        "recovery": {"audio": str(corpus), "steps": steps, "batch_size": 4, "max_seconds": 4.0,
                     "checkpoint_every": 10_000},
    }]}))
    env = {**os.environ, "UPSTREAM_COMPRESSED_CACHE": str(work / "cache")}
    command = [sys.executable, "-m", "upstream_compressed.cli", "compress", str(recipe), "-o",
               str(work / f"{corpus.name}.safetensors")]
    peak, seconds, _ = peak_tree_rss(command, env)
    return peak / 2**20, seconds


def startup(corpus: Path, cache: Path) -> tuple[float, float]:
    """(cold, warm) seconds to turn ``corpus`` into a manifest: scanning headers, then from the cache."""
    shutil.rmtree(cache, ignore_errors=True)  # the benchmark's own cache folder: cold means no manifest yet
    os.environ["UPSTREAM_COMPRESSED_CACHE"] = str(cache)
    from upstream_compressed.audio.manifest import load_corpus

    start = time.perf_counter()
    load_corpus(corpus, progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    load_corpus(corpus, progress=False)
    return cold, time.perf_counter() - start


def loader_throughput(corpus: Path, cache: Path, workers: int, batches: int) -> float:
    """Batches per second of the training loader (batch 8, 4 s crops) over ``batches`` steps."""
    os.environ["UPSTREAM_COMPRESSED_CACHE"] = str(cache)
    from upstream_compressed.audio.manifest import load_corpus
    from upstream_compressed.train.stream import BatchPlan, BatchRule, batch_loader

    manifest = load_corpus(corpus, progress=False)
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=8, max_seconds=4.0), seed=0)
    loader = batch_loader(manifest, plan, 0, batches + 2, num_workers=workers)
    iterator = iter(loader)
    next(iterator), next(iterator)  # workers started and warm
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/data_scale", help="corpora are synthesised (and kept) here")
    parser.add_argument("--quick", action="store_true", help="smaller corpora (1k/2k/4k files; 0.5 h and 1 h)")
    parser.add_argument("--recovery-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3,
                        help="recovery runs per corpus; the median peak counts (a peak varies by tens of MiB run to run)")
    parser.add_argument("--threads", type=int, help="torch threads here and in the recovery run (default: torch's, every core)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the recovery run's torch reads it
    from upstream_compressed.train.stream import default_workers

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine()))
    counts = (1000, 2000, 4000) if args.quick else (1000, 4000, 16000)
    hours = (0.5, 1.0) if args.quick else (1.0, 16.0)

    rows = []
    for count in counts:
        corpus = synthesise(work / f"short_{count}", count, 1.0)
        cold, warm = startup(corpus, work / f"cache_{count}")
        rows.append({"files": count, "cold_s_per_1k": cold / count * 1000, "cached_s_per_1k": warm / count * 1000})
        print(f"start-up  {count:>6} files: {rows[-1]['cold_s_per_1k']:.3f} s per 1k files cold, "
              f"{rows[-1]['cached_s_per_1k']:.3f} s cached", flush=True)

    peaks = []
    for h in hours:
        corpus = synthesise(work / f"long_{h:g}h", int(round(h * 60)), 60.0)
        runs = sorted(recovery_peak(corpus, work, args.recovery_steps) for _ in range(args.repeats))
        mib, seconds = runs[len(runs) // 2]
        peaks.append(mib)
        print(f"recovery  {h:>4g} h of 60 s files: median peak {mib:.0f} MiB of {[round(r[0]) for r in runs]} "
              f"(process tree), {seconds:.1f} s", flush=True)
    slope = (peaks[1] - peaks[0]) / (hours[1] - hours[0])
    print(f"memory per hour of audio: {slope:.1f} MiB (goal <= 1)")

    biggest = work / f"short_{counts[-1]}"
    workers = max(1, default_workers())
    rates = {w: loader_throughput(biggest, work / f"cache_{counts[-1]}", w, 60) for w in (0, workers)}
    print(f"loader    {rates[0]:.1f} batches/s with 0 workers, {rates[workers]:.1f} with {workers} "
          f"(batch 8 x 1 s files)")
    print(json.dumps({
        "rss_mib_per_audio_hour": round(slope, 2),
        "startup_s_per_1k_files": round(rows[-1]["cold_s_per_1k"], 4),
        "startup_cached_s_per_1k_files": round(rows[-1]["cached_s_per_1k"], 4),
        "batches_per_s": {"0": round(rates[0], 2), str(workers): round(rates[workers], 2)},
        "recovery_peak_mib": dict(zip([f"{h:g}h" for h in hours], [round(p, 1) for p in peaks])),
        **machine(),
    }))


if __name__ == "__main__":
    main()
