"""Do structured methods turn their MAC savings into wall-clock savings?

For head pruning, FFN row pruning and low-rank at 25/50/75% on the HuBERT Base shape (random
weights), 10 s of audio on this CPU: parameters, MACs, median forward time, and
(time ratio) / (MAC ratio) against the base, each variant timed in alternation with the base.
The last line is one JSON object; ``worst_time_over_mac_ratio`` is the goal metric (<= 1.15).

    python benchmarks/structured.py [--seconds 10] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hubert_base_shape, interleaved_medians  # noqa: E402

from upstream_compressed.compress import STEPS, StepContext  # noqa: E402
from upstream_compressed.delta import Structure  # noqa: E402
from upstream_compressed.model import SpeechTransformer  # noqa: E402
from upstream_compressed.profile import count_macs  # noqa: E402

TECHNIQUES = {
    "head_pruning": lambda ratio: {"method": "head_pruning", "ratio": ratio, "criterion": "l1"},
    "row_pruning": lambda ratio: {"method": "row_pruning", "ratio": ratio, "criterion": "l1"},
    "low_rank": lambda ratio: {"method": "low_rank", "ratio": ratio, "targets": ["attention", "ffn"]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forwards per model (default 5)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = hubert_base_shape()
    base_model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    wav = torch.randn(1, int(args.seconds * 16000))
    base_params, base_macs = base_model.num_parameters(), count_macs(base_model, args.seconds)

    rows = []
    for technique, make_step in TECHNIQUES.items():
        for ratio in args.ratios:
            model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
            model, _ = STEPS[technique](model, Structure.identity(base.config), make_step(ratio),
                                        StepContext(base, Path("."), 0))
            base_time, time_ = interleaved_medians([base_model, model], wav, args.rounds)
            macs = count_macs(model, args.seconds)
            time_ratio, mac_ratio = time_ / base_time, macs / base_macs
            rows.append({
                "technique": technique, "ratio": ratio, "params_m": model.num_parameters() / 1e6,
                "gmacs": macs / 1e9, "seconds": time_, "base_seconds": base_time,
                "time_ratio": time_ratio, "mac_ratio": mac_ratio, "time_over_mac": time_ratio / mac_ratio,
            })
            r = rows[-1]
            print(f"{technique:<13} {ratio:>4.2f}  params {r['params_m']:6.2f}M  MACs {r['gmacs']:6.2f}G  "
                  f"time {time_ * 1000:7.1f} ms (base {base_time * 1000:7.1f})  time {time_ratio:5.3f}x  "
                  f"MACs {mac_ratio:5.3f}x  time/MAC {r['time_over_mac']:5.3f}", flush=True)

    print()
    print(f"base: params {base_params / 1e6:.2f}M, MACs {base_macs / 1e9:.2f}G for {args.seconds:g} s, "
          f"threads {torch.get_num_threads()}")
    print("| technique | removed | params (M) | GMACs | time (ms) | time ratio | MAC ratio | time/MAC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['technique']} | {r['ratio']:.0%} | {r['params_m']:.2f} | {r['gmacs']:.2f} | "
              f"{r['seconds'] * 1000:.1f} | {r['time_ratio']:.3f} | {r['mac_ratio']:.3f} | {r['time_over_mac']:.3f} |")
    worst = max(rows, key=lambda r: r["time_over_mac"])
    print(json.dumps({
        "worst_time_over_mac_ratio": round(worst["time_over_mac"], 4),
        "worst": f"{worst['technique']}@{worst['ratio']}",
        "base_gmacs": round(base_macs / 1e9, 3),
        "time_over_mac": {f"{r['technique']}@{r['ratio']}": round(r["time_over_mac"], 4) for r in rows},
    }))


if __name__ == "__main__":
    main()
