"""Our HuBERT against S3PRL's own ``hubert_local`` on the same checkpoint.

HuBERT Base shape with random weights (written in S3PRL's converted format), 10 s of audio, CPU:
the largest absolute difference over all hidden states and the median forward-time ratio, timed in
alternation. ``--dtype bf16`` also times our model in bfloat16 autocast and prints its speed-up and
error against fp32. The last line is one JSON object with ``max_abs_diff`` and ``time_ratio``.

    python benchmarks/vs_s3prl.py [--seconds 10] [--rounds 5] [--threads N] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HUBERT_BASE_CONV  # noqa: E402

import upstream_compressed  # noqa: E402
from upstream_compressed.expert import UpstreamExpert  # noqa: E402
from upstream_compressed.model import SpeechTransformer  # noqa: E402
from upstream_compressed.model.convert import load_base  # noqa: E402
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint  # noqa: E402


def timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); None where /proc/cpuinfo is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    upstream_compressed.register()
    import s3prl.hub

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_hubert_checkpoint(Path(tmp) / "hubert_base_shape.pt", layers=12, dim=768, ffn=3072, heads=12,
                                      conv_layers=repr(HUBERT_BASE_CONV), conv_pos=128, conv_pos_groups=16)
        theirs = s3prl.hub.hubert_local(ckpt=str(ckpt)).eval()
        base = load_base(ckpt)
    ours = UpstreamExpert(SpeechTransformer.from_state_dict(base.config, base.state_dict)).eval()
    wavs = [torch.randn(int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))]

    with torch.inference_mode():
        expected = theirs([w.clone() for w in wavs])["hidden_states"]
        got = ours(wavs)["hidden_states"]
        max_diff = max((a - b).abs().max().item() for a, b in zip(got, expected))
        theirs(wavs), ours(wavs)  # warm-up
        their_times, our_times = [], []
        for _ in range(args.rounds):  # alternate so that load drifts hit both
            their_times += timed(lambda: theirs(wavs), 1)
            our_times += timed(lambda: ours(wavs), 1)
        bf16 = None
        if args.dtype == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = ours(wavs)["hidden_states"]
                bf16_times = timed(lambda: ours(wavs), args.rounds)
            bf16 = {"cpu_native_bf16": native_bf16(),
                    "time_ratio_vs_fp32": statistics.median(bf16_times) / statistics.median(our_times),
                    "max_abs_diff_vs_fp32": max((a.float() - b).abs().max().item() for a, b in zip(low, got))}

    theirs_s, ours_s = statistics.median(their_times), statistics.median(our_times)
    print(f"audio {args.seconds:g} s, threads {torch.get_num_threads()}, rounds {args.rounds}")
    print("| implementation | median forward (ms) |")
    print("|---|---|")
    print(f"| S3PRL hubert_local | {theirs_s * 1000:.1f} |")
    print(f"| ours (SpeechTransformer) | {ours_s * 1000:.1f} |")
    print(f"max |difference| over {len(got)} hidden states: {max_diff:.2e}")
    if bf16:
        print(f"bf16 autocast: time {bf16['time_ratio_vs_fp32']:.3f}x fp32, max |difference| {bf16['max_abs_diff_vs_fp32']:.3e}")
        if bf16["cpu_native_bf16"] is False:
            print("this CPU has no avx512_bf16/amx_bf16 (see /proc/cpuinfo): bf16 matmuls are emulated, expect them slower")
    print(json.dumps({"max_abs_diff": max_diff, "time_ratio": ours_s / theirs_s, "ours_ms": ours_s * 1000,
                      "s3prl_ms": theirs_s * 1000, **({"bf16": bf16} if bf16 else {})}))


if __name__ == "__main__":
    main()
