"""Do structured methods turn their MAC savings into wall-clock savings?

For head pruning, FFN row pruning, low-rank and CNN channel pruning at 25/50/75%, and a
joint-pruned structure of DPHuBERT's size, on the HuBERT Base shape (random weights), 10 s of
audio on this CPU: parameters, MACs, median forward time, and (time ratio) / (MAC ratio) against
the base, each variant timed in alternation with the base. The goal: every time/MAC ratio <= 1.15,
and the joint structure's time ratio within 10% of its MAC ratio. The CPU, its flags, the thread
count and the load average (before and after: other jobs share the machine) are printed; the
last line is one JSON object (``worst_time_over_mac_ratio`` is the goal metric).

The joint structure (``joint_dphubert_size``): DPHuBERT's released 23.59 M model cannot be
downloaded here, so this is a structure of its size built on the HuBERT Base shape in the pattern
DPHuBERT's paper reports (CNN channels pruned most in the early layers, more heads kept in lower
layers, the FFNs pruned hardest), chosen so that both its size and its MACs match DPHuBERT's
published figures (23.59 M parameters; MACs 654 G / HuBERT Base's 1669 G = 0.392 in STaR's table):

    conv channels (7 layers):  384 416 448 480 512 512 512          (base 512 each)
    heads per layer (12):      7 7 6 6 5 4 3 3 2 2 1 0  (layer 12: attention removed; base 12)
    FFN units per layer (12):  640 576 512 448 384 320 256 224 192 160 96 32            (base 3072)

which is 23.60 M parameters, CNN included, and 0.386 of the base's MACs. Which channels, heads
and units are kept (the first ones) does not change the timing.

``--base wavlm`` measures the same on WavLM Base+'s shape (its gated relative position bias included:
pruned heads keep their bias rows and gate chunks), ``--base wav2vec2`` on wav2vec 2.0 Base's; the
joint structure is then the same pattern on that base. The JSON line names the base.

    python benchmarks/structured.py [--base hubert|wavlm|wav2vec2] [--seconds 10] [--rounds 5] [--threads N]
                                    [--techniques ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASE_SHAPES, interleaved_medians, machine  # noqa: E402

from upstream_compressed.compress import STEPS, StepContext  # noqa: E402
from upstream_compressed.delta import Structure  # noqa: E402
from upstream_compressed.model import SpeechTransformer  # noqa: E402
from upstream_compressed.model.convert import Converted  # noqa: E402
from upstream_compressed.model.costs import mac_count, parameter_count  # noqa: E402
from upstream_compressed.profile import count_macs  # noqa: E402

TECHNIQUES: dict[str, Callable[[float], dict]] = {
    "head_pruning": lambda ratio: {"method": "head_pruning", "ratio": ratio, "criterion": "l1"},
    "row_pruning": lambda ratio: {"method": "row_pruning", "ratio": ratio, "criterion": "l1"},
    "low_rank": lambda ratio: {"method": "low_rank", "ratio": ratio, "targets": ["attention", "ffn"]},
    "conv_pruning": lambda ratio: {"method": "conv_pruning", "ratio": ratio, "criterion": "l1"},
}

# The DPHuBERT-size structure of the docstring.
JOINT_CONV_CHANNELS = [384, 416, 448, 480, 512, 512, 512]
JOINT_HEADS = [7, 7, 6, 6, 5, 4, 3, 3, 2, 2, 1, 0]
JOINT_UNITS = [640, 576, 512, 448, 384, 320, 256, 224, 192, 160, 96, 32]
JOINT = "joint_dphubert_size"


def joint_structure(base: Converted) -> SpeechTransformer:
    """The base with the joint structure's channels, heads and units kept (the first ones) and attention
    removed where it keeps no head."""
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    for i, channels in enumerate(JOINT_CONV_CHANNELS):
        if channels != model.config.conv_layers[i][0]:
            model.keep_channels(i, list(range(channels)))
    for layer, (heads, units) in enumerate(zip(JOINT_HEADS, JOINT_UNITS)):
        if heads:
            model.keep_heads(layer, list(range(heads)))
        else:
            model.remove_attention(layer)
        model.keep_units(layer, list(range(units)))
    return model


def variants(base: Converted, ratios: list[float],
             techniques: list[str]) -> Iterator[tuple[str, float | None, SpeechTransformer]]:
    """(technique, ratio, model): each chosen technique at every ratio, then the joint structure if chosen."""
    for technique, make_step in TECHNIQUES.items():
        for ratio in ratios if technique in techniques else []:
            model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
            model, _ = STEPS[technique](model, Structure.identity(base.config), make_step(ratio),
                                        StepContext(base, Path("."), 0, {}))
            yield technique, ratio, model
    if JOINT in techniques:
        yield JOINT, None, joint_structure(base)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=list(BASE_SHAPES), default="hubert",
                        help="the base's shape, random weights (default hubert: HuBERT Base; wavlm: WavLM Base+)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forwards per model (default 5)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--techniques", nargs="+", choices=[*TECHNIQUES, JOINT], default=[*TECHNIQUES, JOINT],
                        help="which to measure (default all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s of audio, 2 rounds, ratio 0.5 only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seconds, args.rounds, args.ratios = 2.0, 2, [0.5]
    load_before = load()
    print(json.dumps({**machine(), "base": args.base, "load_average_1_5_15": load_before}), flush=True)

    base = BASE_SHAPES[args.base]()
    base_model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    wav = torch.randn(1, int(args.seconds * 16000))
    base_params, base_macs = base_model.num_parameters(), count_macs(base_model, args.seconds)

    rows = []
    for technique, ratio, model in variants(base, args.ratios, args.techniques):
        macs, params = count_macs(model, args.seconds), model.num_parameters()
        # The analytic costs (model/costs.py) must agree with the counted ones: else a figure is wrong.
        analytic = (parameter_count(model.config), mac_count(model.config, args.seconds))
        if analytic != (params, macs):
            raise SystemExit(f"{technique}@{ratio}: analytic params/MACs {analytic} != counted {(params, macs)}")
        base_time, time_ = interleaved_medians([base_model, model], wav, args.rounds)
        time_ratio, mac_ratio = time_ / base_time, macs / base_macs
        rows.append({
            "technique": technique, "ratio": ratio, "params_m": params / 1e6,
            "gmacs": macs / 1e9, "seconds": time_, "base_seconds": base_time,
            "time_ratio": time_ratio, "mac_ratio": mac_ratio, "time_over_mac": time_ratio / mac_ratio,
        })
        r = rows[-1]
        shown = f"{ratio:>4.2f}" if ratio is not None else "    "
        print(f"{technique:<19} {shown}  params {r['params_m']:6.2f}M  MACs {r['gmacs']:6.2f}G  "
              f"time {time_ * 1000:7.1f} ms (base {base_time * 1000:7.1f})  time {time_ratio:5.3f}x  "
              f"MACs {mac_ratio:5.3f}x  time/MAC {r['time_over_mac']:5.3f}", flush=True)
    load_after = load()

    joint = next((r for r in rows if r["technique"] == JOINT), None)
    print()
    print(f"base {args.base}: params {base_params / 1e6:.2f}M, MACs {base_macs / 1e9:.2f}G for {args.seconds:g} s, "
          f"threads {torch.get_num_threads()}, rounds {args.rounds}; load average (1/5/15 min) "
          f"before {load_before}, after {load_after}")
    print(f"{JOINT}: conv channels {JOINT_CONV_CHANNELS}, heads {JOINT_HEADS}, FFN units {JOINT_UNITS}")
    print("| technique | removed | params (M) | GMACs | time (ms) | time ratio | MAC ratio | time/MAC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        removed = f"{r['ratio']:.0%}" if r["ratio"] is not None else "DPHuBERT size"
        print(f"| {r['technique']} | {removed} | {r['params_m']:.2f} | {r['gmacs']:.2f} | "
              f"{r['seconds'] * 1000:.1f} | {r['time_ratio']:.3f} | {r['mac_ratio']:.3f} | {r['time_over_mac']:.3f} |")
    worst = max(rows, key=lambda r: r["time_over_mac"])

    def key(r: dict) -> str:
        return r["technique"] if r["ratio"] is None else f"{r['technique']}@{r['ratio']}"

    print(json.dumps({
        "base": args.base,
        "worst_time_over_mac_ratio": round(worst["time_over_mac"], 4),
        "worst": key(worst),
        "all_within_1_15": all(r["time_over_mac"] <= 1.15 for r in rows),
        "base_gmacs": round(base_macs / 1e9, 3),
        "time_over_mac": {key(r): round(r["time_over_mac"], 4) for r in rows},
        **({JOINT: {"params_m": round(joint["params_m"], 3), "mac_ratio": round(joint["mac_ratio"], 4),
                    "time_ratio": round(joint["time_ratio"], 4),
                    "time_within_10pct_of_macs": abs(joint["time_over_mac"] - 1) <= 0.10,
                    "conv_channels": JOINT_CONV_CHANNELS, "heads": JOINT_HEADS, "ffn_units": JOINT_UNITS}}
           if joint is not None else {}),
        "seconds": args.seconds, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_after,
        "cpu": machine()["cpu"], "flags": machine()["flags"],
    }))


if __name__ == "__main__":
    main()
