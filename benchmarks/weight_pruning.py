"""Does weight pruning run faster? Sparse kernels against dense, on the HuBERT Base shape (CPU or GPU).

For each sparsity (default 50/70/80/90/95%), every encoder Linear (q/k/v/out_proj, fc1, fc2) is
pruned to that sparsity (``selection: per_layer``, so each Linear has exactly it: global selection
on random weights would prune whole Linears whose initial scale is small). Side by side, timed in
alternation within one run on ``--seconds`` of audio:

(a) the 72 pruned Linears alone, each on its real input shape (frames x in): forced sparse (CSR)
    against the dense Linears; per shape as well, which gives the break-even sparsity; on a CPU
    where our native kernel runs, also torch's CSR products on copies of the same Linears, in the same
    rounds (what the native kernel gains over them); then
    ``auto``'s plan (its calibration, timed) and the Linears' time under the kernels it chose (each
    Linear's time in (a) with the chosen kernel) over the dense Linears';
(b) the whole upstream (``UpstreamExpert``, sparse execution ``auto``) against the dense model,
    with its bound: dense total / (dense total - dense time of the pruned Linears), i.e. the
    speed-up if the pruned Linears took no time at all (the CNN front end and attention stay).

It prints the CPU model, its vector flags and torch's thread count first (``--threads``: default
torch's, every core), and a check of the goals last: Linears >= 2.5x at 90% and >= 4x at 95%, the
whole model >= 1.6x at 90%, and ``auto`` never below 0.97x of dense (Linears and whole model, every
sparsity).

On ``--device cuda`` forced sparse means cuSPARSE CSR for unstructured masks, and ``--two-four``
adds a 2:4 model (``pattern: 2:4``, 50%) run on the semi-structured kernels (fp16/bf16, ``--dtype``).

The last line is one JSON object (``linear_speedup_90``, ``linear_speedup_95``,
``model_speedup_90``, ``model_bound_90``, ..., ``torch_csr_linear_speedup``, ``auto_linear_speedup``, ``auto_min_speedup``,
``calibration_seconds``, ``machine``).

    python benchmarks/weight_pruning.py [--seconds 10] [--rounds 5] [--threads N]
    python benchmarks/weight_pruning.py --seconds 80 --linears-only --sparsities 0.9 0.95
    python benchmarks/weight_pruning.py --device cuda --dtype float16 --two-four
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hubert_base_shape, interleaved_medians, machine, synchronize  # noqa: E402

from upstream_compressed.compress import STEPS, StepContext  # noqa: E402
from upstream_compressed.delta import Structure  # noqa: E402
from upstream_compressed.expert import UpstreamExpert  # noqa: E402
from upstream_compressed.model import LINEAR_NAMES, SpeechTransformer  # noqa: E402
from upstream_compressed.model import native_spmm  # noqa: E402
from upstream_compressed.model.sparse import CALIBRATION_MARGIN, CPU_CALIBRATE_FROM, MaskedLinear, calibrations  # noqa: E402
from upstream_compressed.profile import count_effective_macs, count_macs  # noqa: E402

SHAPES = {"q_proj": "attn 768x768", "k_proj": "attn 768x768", "v_proj": "attn 768x768",
          "out_proj": "attn 768x768", "fc1": "fc1 3072x768", "fc2": "fc2 768x3072"}


def linears(model: SpeechTransformer) -> list[tuple[str, torch.nn.Module]]:
    return [(SHAPES[name], model.linear(i, name)) for i in range(model.config.num_layers) for name in LINEAR_NAMES]


GOALS = {"linear_speedup_90": 2.5, "linear_speedup_95": 4.0, "model_speedup_90": 1.6, "auto_min_speedup": 0.97}


def time_linears(variants: list[list[tuple[str, torch.nn.Module]]], frames: int, rounds: int,
                 device: torch.device, dtype: torch.dtype) -> tuple[list[dict[str, float]], list[list[float]]]:
    """Per variant: the median (over rounds) of the summed forward time of its Linears per shape (and
    "all"), and each Linear's own median."""
    inputs = {n: torch.randn(1, frames, n, device=device, dtype=dtype) for n in (768, 3072)}
    totals: list[dict[str, list[float]]] = [{} for _ in variants]
    each: list[list[list[float]]] = [[[] for _ in modules] for modules in variants]
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up (and builds the sparse kernels)
            for v, modules in enumerate(variants):
                sums: dict[str, float] = {}
                for i, (shape, module) in enumerate(modules):
                    x = inputs[module.in_features]
                    synchronize(device)
                    start = time.perf_counter()
                    module(x)
                    synchronize(device)
                    seconds = time.perf_counter() - start
                    sums[shape] = sums.get(shape, 0.0) + seconds
                    if round_:
                        each[v][i].append(seconds)
                if round_:
                    for shape, seconds in sums.items():
                        totals[v].setdefault(shape, []).append(seconds)
                    totals[v].setdefault("all", []).append(sum(sums.values()))
    return ([{shape: statistics.median(t) for shape, t in variant.items()} for variant in totals],
            [[statistics.median(t) for t in variant] for variant in each])


def break_even(sparsities: list[float], speedups: list[float]) -> float | None:
    """The sparsity where sparse and dense take equal time, interpolated between measured points."""
    points = list(zip(sparsities, speedups))
    for (s0, r0), (s1, r1) in zip(points, points[1:]):
        if r0 < 1 <= r1:
            return s0 + (1 - r0) * (s1 - s0) / (r1 - r0)
    return sparsities[0] if speedups and speedups[0] >= 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="weights and audio (default float32; the 2:4 kernels need float16/bfloat16)")
    parser.add_argument("--linears-only", action="store_true",
                        help="time (a) and auto's plan only, not the whole upstream (b): for long inputs, where (b)'s "
                             "attention dominates (e.g. --seconds 80: 3999 frames, a SUPERB batch of 8 x 10 s)")
    parser.add_argument("--two-four", action="store_true",
                        help="add a 2:4 pruned model (50%%) run on CUDA's semi-structured sparse kernels")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.two_four and device.type != "cuda":
        parser.error("--two-four needs --device cuda (the 2:4 kernels are NVIDIA's)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    host = machine()
    print(f"CPU {host['cpu']}, flags {' '.join(host['flags']) or 'none of ours'}, {host['cores']} cores; "
          f"torch threads {torch.get_num_threads()} ({'--threads' if args.threads else 'default'}), "
          f"load average {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}")

    base = hubert_base_shape()
    dense = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval().to(device, dtype)
    steps = [(f"{s:.0%}", {"method": "weight_pruning", "sparsity": s, "selection": "per_layer"})
             for s in args.sparsities]
    if args.two_four:
        steps.append(("2:4", {"method": "weight_pruning", "sparsity": 0.5, "selection": "per_layer",
                                   "pattern": "2:4"}))
    pruned, effective_macs = [], []
    for _, step in steps:
        model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
        model, _ = STEPS["weight_pruning"](model, Structure.identity(base.config), step,
                                           StepContext(base, Path("."), 0, origin={}))
        effective_macs.append(count_effective_macs(model, args.seconds))  # on CPU in fp32, before the move
        pruned.append(model.to(device, dtype))
    base_macs = count_macs(SpeechTransformer.from_state_dict(base.config, base.state_dict), args.seconds)
    labels = [label for label, _ in steps]
    unstructured = args.sparsities  # 2:4, if asked for, comes after them
    wav = torch.randn(int(args.seconds * 16000), device=device, dtype=dtype)
    frames = len(wav)
    for _, kernel, stride in base.config.conv_layers:
        frames = (frames - kernel) // stride + 1
    where = f"{device.type}, {args.dtype}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")

    # (a) the pruned Linears alone: forced sparse against dense, and (CPU, where our kernel runs) against torch's
    # CSR products on copies of the same Linears, side by side.
    for model in pruned:
        model.set_sparse_execution("sparse")
    sparse_kernels = [sorted({m.kernel_name() for _, m in linears(model)}) for model in pruned]
    torch_csr = []
    if device.type == "cpu" and native_spmm.available():
        os.environ[native_spmm.DISABLE_ENV] = "0"
        try:
            for model in pruned:
                copy = [(shape, MaskedLinear.from_linear(module, module.mask)) for shape, module in linears(model)]
                for _, module in copy:
                    module.execution = "sparse"
                    module.kernel_name()  # builds the torch-product kernel while ours is switched off
                torch_csr.append(copy)
        finally:
            del os.environ[native_spmm.DISABLE_ENV]
    linear_times, each_linear = time_linears([linears(dense)] + [linears(m) for m in pruned] + torch_csr, frames,
                                             args.rounds, device, dtype)
    torch_csr_times = linear_times[len(pruned) + 1:]
    linear_times, each_linear = linear_times[:len(pruned) + 1], each_linear[:len(pruned) + 1]
    dense_linear = linear_times[0]
    print(f"(a) the {len(linears(dense))} encoder Linears alone, {frames} frames ({args.seconds:g} s), {where}, "
          f"median of {args.rounds} rounds: dense vs the sparse kernel (forced sparse)"
          + ("; last column: torch's CSR products (UPSTREAM_COMPRESSED_NATIVE_SPMM=0) on the same Linears, "
             "timed in the same rounds" if torch_csr else ""))
    shapes = [s for s in dense_linear if s != "all"]
    print("| sparsity | sparse kernel | dense (ms) | sparse (ms) | speed-up | "
          + " | ".join(f"{s} speed-up" for s in shapes) + (" | torch's CSR speed-up |" if torch_csr else " |"))
    print("|---|---|---|---|---|" + "---|" * (len(shapes) + bool(torch_csr)))
    linear_speedup: dict[str, float] = {}
    torch_csr_speedup: dict[str, float] = {}
    for i, (label, kernel, times) in enumerate(zip(labels, sparse_kernels, linear_times[1:])):
        linear_speedup[label] = dense_linear["all"] / times["all"]
        if torch_csr:
            torch_csr_speedup[label] = dense_linear["all"] / torch_csr_times[i]["all"]
        print(f"| {label} | {'+'.join(kernel)} | {dense_linear['all'] * 1000:.2f} | {times['all'] * 1000:.2f} | "
              f"{linear_speedup[label]:.2f}x | " + " | ".join(f"{dense_linear[s] / times[s]:.2f}x" for s in shapes)
              + (f" | {torch_csr_speedup[label]:.2f}x |" if torch_csr else " |"))
    per_shape = {s: [dense_linear[s] / t[s] for t in linear_times[1:len(unstructured) + 1]] for s in shapes}
    even = {s: break_even(unstructured, per_shape[s]) for s in shapes}
    even["all"] = break_even(unstructured, [linear_speedup[label] for label in labels[:len(unstructured)]])
    rule = (f"auto calibrates from {CPU_CALIBRATE_FROM:.0%} and takes CSR if >= {CALIBRATION_MARGIN:g}x faster"
            if device.type == "cpu" else "auto runs every mask dense on CUDA")
    print("break-even sparsity (sparse = dense, interpolated): " +
          ", ".join(f"{s} {v:.0%}" if v is not None else f"{s} not reached" for s, v in even.items()) + f"; {rule}")

    # auto's plan: the calibration (timed), and the Linears' time under the kernels it chose.
    print()
    print(f"auto at {torch.get_num_threads()} threads: plan time (calibration and kernel builds), the kernels it "
          f"chose, and the Linears' time under them against dense (sums of each Linear's median in (a); dense "
          f"{sum(each_linear[0]) * 1000:.2f} ms)")
    print("| sparsity | plan (s) | calibrations | calibrated CSR speed-up per shape | kernels per shape | "
          "auto Linears (ms) | auto speed-up |")
    print("|---|---|---|---|---|---|---|")
    plan_seconds, calibration_seconds, auto_linear_speedup, auto_kernels = {}, {}, {}, {}
    for label, model, times in zip(labels, pruned, each_linear[1:]):
        known = set(calibrations())
        start = time.perf_counter()
        model.set_sparse_execution("auto")
        plan_seconds[label] = time.perf_counter() - start
        new = {key: value for key, value in calibrations().items() if key not in known}
        calibration_seconds[label] = sum(c.seconds for c in new.values())
        chosen = [m.kernel_name() for _, m in linears(model)]
        auto_kernels[label] = {shape: "+".join(sorted({k for (s, _), k in zip(linears(model), chosen) if s == shape}))
                               for shape in shapes}
        # Sums of per-Linear medians on both sides (a median of sums, as in (a), is not a sum of medians).
        auto_time = sum(t if k != "dense" else d for t, d, k in zip(times, each_linear[0], chosen))
        auto_linear_speedup[label] = sum(each_linear[0]) / auto_time
        ratios = ", ".join(f"{key[0]}x{key[1]} {c.speed_up:.2f}" for key, c in new.items())
        print(f"| {label} | {plan_seconds[label]:.2f} | {len(new)} ({calibration_seconds[label]:.2f} s) | "
              f"{ratios or '-'} | " + ", ".join(f"{s} {k}" for s, k in auto_kernels[label].items()) +
              f" | {auto_time * 1000:.2f} | {auto_linear_speedup[label]:.2f}x |")

    model_speedup: dict[str, float] = {}
    way: dict[str, float] = {}
    bound = None
    if not args.linears_only:
        # (b) the whole upstream with automatic kernel choice (planned above) against the dense model.
        kernels = [sorted({m.kernel_name() for _, m in linears(model)}) for model in pruned]
        experts = [UpstreamExpert(dense)] + [UpstreamExpert(m) for m in pruned]
        model_times = interleaved_medians(experts, [wav], args.rounds)
        dense_total = model_times[0]
        bound = dense_total / (dense_total - dense_linear["all"])
        print()
        print(f"(b) whole upstream, {args.seconds:g} s of audio, {where}, sparse_execution auto, median of {args.rounds} "
              f"rounds; dense {dense_total * 1000:.2f} ms, of which pruned Linears {dense_linear['all'] * 1000:.2f} ms "
              f"-> bound {bound:.2f}x")
        if device.type == "cuda":
            print("(on CUDA the Linears in (a) are timed one at a time with a synchronisation each, which adds "
                  "launch latency that the whole forward overlaps: the bound overstates what pruning could gain)")
        print("| sparsity | kernels | GMACs dense | GMACs effective | time (ms) | speed-up | bound | way to bound |")
        print("|---|---|---|---|---|---|---|---|")
        for label, kernel, effective, seconds in zip(labels, kernels, effective_macs, model_times[1:]):
            model_speedup[label] = dense_total / seconds
            way[label] = (model_speedup[label] - 1) / (bound - 1)
            print(f"| {label} | {'+'.join(kernel)} | {base_macs / 1e9:.1f} | {effective / 1e9:.1f} | "
                  f"{seconds * 1000:.2f} | {model_speedup[label]:.2f}x | {bound:.2f}x | {way[label]:.0%} |")
    print()
    load_after = os.getloadavg()
    print(f"threads {torch.get_num_threads()} of {os.cpu_count()} cores; load average (1/5/15 min) "
          f"before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")
    auto_min = min(list(auto_linear_speedup.values()) + list(model_speedup.values()))
    measured = {"linear_speedup_90": linear_speedup.get("90%"), "linear_speedup_95": linear_speedup.get("95%"),
                "model_speedup_90": model_speedup.get("90%"), "auto_min_speedup": auto_min}
    print("goals: " + "; ".join(
        f"{name} {value:.2f} (goal >= {GOALS[name]:g}: {'met' if value >= GOALS[name] else 'NOT met'})"
        for name, value in measured.items() if value is not None))
    def at(values: dict[str, float], label: str) -> float | None:  # None (JSON null) if not measured
        return round(values[label], 3) if label in values else None

    result = {
        "linear_speedup_90": at(linear_speedup, "90%"),
        "linear_speedup_95": at(linear_speedup, "95%"),
        "model_speedup_90": at(model_speedup, "90%"),
        "model_bound_90": round(bound, 3) if bound else None,
        "model_way_to_bound_90": at(way, "90%"),
        "model_speedup_over_bound_90": round(model_speedup["90%"] / bound, 3) if bound and "90%" in model_speedup else None,
        "linear_speedup": {k: round(v, 3) for k, v in linear_speedup.items()},
        "torch_csr_linear_speedup": {k: round(v, 3) for k, v in torch_csr_speedup.items()},
        "model_speedup": {k: round(v, 3) for k, v in model_speedup.items()},
        "break_even": {s: (round(v, 3) if v is not None else None) for s, v in even.items()},
        "auto_linear_speedup": {k: round(v, 3) for k, v in auto_linear_speedup.items()},
        "auto_min_speedup": round(auto_min, 3),
        "auto_kernels": auto_kernels,
        "plan_seconds": {k: round(v, 3) for k, v in plan_seconds.items()},
        "calibration_seconds": {k: round(v, 3) for k, v in calibration_seconds.items()},
        "device": where,
        "threads": torch.get_num_threads(),
        "machine": host,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
