"""Does ``compile: true`` (torch.compile of the upstream's model) gain? Compiled against eager, CPU or CUDA.

Models: HuBERT Base's shape with random weights (``common.hubert_base_shape``) and the bundled tiny HuBERT
(``tiny_hubert``), each as the upstream runs it (``UpstreamExpert``; fp32, or ``--precision bf16|fp16``:
eager and compiled then both run under that autocast, as the ``-g`` option ``precision:`` runs them). Workloads: one 10 s utterance,
and a padded batch of 4 utterances of different lengths (10, 8.5, 7, 5.5 s). For each, in this order:

- the first compiled call, timed alone: the compile (dynamo's trace and inductor's C++/Triton build) plus
  one forward. Inductor's cache is a fresh temporary folder (a cold compile), or ``--cache-dir DIR``: a
  second run with the same DIR finds the kernels built (``cache`` in the JSON says which; dynamo still
  traces), which keeps a run short enough to time with the machine's other jobs paused;
- eager and compiled medians timed in alternation (``common.interleaved_medians``), their ratio
  (compiled / eager; below 1 is a gain), and the largest |difference| of the hidden states on valid frames,
  absolute and over the largest |value|;

then the graphs dynamo compiles over a sequence of batches of new shapes (batch sizes 1, 2, 4 and 8,
lengths 1-6 s, each batch a padded length not seen before): how many of them added a graph, and the
total, with the shape and time of each call that compiled.

The last line is one JSON object per run: ``{"models": {"base": {...}, "tiny": {...}}, "threads", ...}``.

    python benchmarks/compile.py [--threads N] [--rounds 5] [--models base,tiny] [--parts single_10s,batch_4,sequence]
                                 [--device cpu|cuda] [--cache-dir DIR] [--precision fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hubert_base_shape, interleaved_medians, machine, synchronize  # noqa: E402

SAMPLE_RATE = 16000
BATCH_SECONDS = (10.0, 8.5, 7.0, 5.5)
WORKLOADS = {"single_10s": [10.0], "batch_4": list(BATCH_SECONDS)}
PARTS = (*WORKLOADS, "sequence")
# (batch size, seconds of its longest utterance): every padded length new, sizes on both sides of 1.
SEQUENCE = ((4, 3.1), (4, 5.3), (2, 2.2), (2, 4.7), (8, 1.9), (8, 3.6), (4, 1.2), (1, 2.9), (1, 5.8), (1, 1.05))


def build_model(name: str):
    """(SpeechTransformer, its description) for ``base`` or ``tiny``."""
    from upstream_compressed.embedded import bundled_checkpoint
    from upstream_compressed.model import SpeechTransformer
    from upstream_compressed.model.convert import load_base

    converted = hubert_base_shape() if name == "base" else load_base(bundled_checkpoint("tiny_hubert"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    return model, "HuBERT Base shape, random weights" if name == "base" else "bundled tiny_hubert"


def utterances(seconds: list[float], generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    return [(0.1 * torch.randn(int(s * SAMPLE_RATE), generator=generator)).to(device) for s in seconds]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def first_call_seconds(upstream, wavs: list[torch.Tensor]) -> tuple[float, int]:
    """(seconds of the call, graphs it added)."""
    before = graphs()
    synchronize(wavs[0].device)
    start = time.perf_counter()
    with torch.inference_mode():
        upstream(wavs)
    synchronize(wavs[0].device)
    return time.perf_counter() - start, graphs() - before


def max_valid_difference(got: dict, reference: dict) -> tuple[float, float]:
    """(largest |difference| on valid frames, that over the largest |value| of the same hidden state)."""
    valid = reference["pad_mask"]
    pairs = [(a[valid], b[valid]) for a, b in zip(got["hidden_states"], reference["hidden_states"], strict=True)]
    return (max((a - b).abs().max().item() for a, b in pairs),
            max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs))


def measure(name: str, rounds: int, device: torch.device, parts: list[str], precision: str = "fp32") -> dict:
    from upstream_compressed.expert import UpstreamExpert

    model, description = build_model(name)
    model = model.to(device)
    # One model, two upstreams: the compiled one wraps the same weights.
    eager = UpstreamExpert(model, precision=precision, compile_model=False).eval()
    compiled = UpstreamExpert(model, precision=precision, compile_model=True).eval()
    generator = torch.Generator().manual_seed(0)
    result: dict = {"model": description, "params": sum(p.numel() for p in model.parameters()), "precision": precision}
    for workload, seconds in WORKLOADS.items():
        if workload not in parts:
            continue
        wavs = utterances(seconds, generator, device)
        compile_s, added = first_call_seconds(compiled, wavs)
        eager_s, compiled_s = interleaved_medians([eager, compiled], wavs, rounds)
        with torch.inference_mode():
            difference, relative = max_valid_difference(compiled(wavs), eager(wavs))
        result[workload] = {
            "first_call_s": round(compile_s, 2), "graphs_added": added, "eager_ms": round(eager_s * 1000, 1),
            "compiled_ms": round(compiled_s * 1000, 1), "ratio": round(compiled_s / eager_s, 3),
            "max_abs_diff": difference, "max_rel_diff": relative,
        }
        print(f"{name} {workload}: first compiled call {compile_s:.1f} s ({added} graph(s)); eager "
              f"{eager_s * 1000:.1f} ms, compiled {compiled_s * 1000:.1f} ms, ratio {compiled_s / eager_s:.3f}, "
              f"max |difference| {difference:.2e} ({relative:.1e} of the largest |value|)", flush=True)
    start_graphs, compiles = graphs(), []
    for size, longest in SEQUENCE if "sequence" in parts else ():
        seconds = [longest * (1 - 0.08 * i) for i in range(size)]  # the longest first: it sets the padded length
        seconds_call, added = first_call_seconds(compiled, utterances(seconds, generator, device))
        if added:
            compiles.append({"batch": size, "samples": int(longest * SAMPLE_RATE), "graphs": added,
                             "seconds": round(seconds_call, 1)})
    if "sequence" in parts:
        result["sequence"] = {"batches": len(SEQUENCE), "graphs_added": graphs() - start_graphs,
                              "compiles": compiles, "graphs_total": graphs()}
        print(f"{name}: {len(SEQUENCE)} batches of new shapes added {graphs() - start_graphs} graph(s): {compiles}; "
              f"{graphs()} in all", flush=True)
    torch._dynamo.reset()  # the next model starts from an empty cache and its own count
    from torch._dynamo.utils import counters

    counters.clear()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="base,tiny", help="comma-separated: base, tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (the sequence alone still counts its graphs "
                             "from an empty cache)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="inductor's cache folder (default: a fresh temporary one: cold compiles)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="run eager and compiled under this autocast, as the upstream's precision option does")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    parts = [n.strip() for n in args.parts.split(",") if n.strip()]
    if not names or set(names) - {"base", "tiny"}:
        parser.error(f"--models: {args.models!r}; choose from base, tiny")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: {args.parts!r}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache_dir or Path(fresh)
        warm = cache.is_dir() and any(cache.iterdir())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read when inductor first compiles
        models = {name: measure(name, args.rounds, device, parts, args.precision) for name in names}
    print(json.dumps({"models": models, "device": str(device), "threads": torch.get_num_threads(),
                      "rounds": args.rounds, "cache": "warm" if warm else "cold", "torch": torch.__version__,
                      "load_average": [round(x, 2) for x in os.getloadavg()], **machine()}))


if __name__ == "__main__":
    main()
