"""Our HuBERT against S3PRL's own ``hubert_local`` on the same checkpoint.

HuBERT Base shape with random weights (written in S3PRL's converted format), 10 s of audio, CPU:
the largest absolute difference over all hidden states and the median forward-time ratio, timed in
alternation. ``--dtype bf16`` (or ``fp16``) also runs the upstream as a user gets it in that precision,
through the option path: ``-u hubert_identity`` on an identity delta of the same checkpoint with a ``-g``
yaml saying ``precision: bf16`` (autocast inside, float32 hidden states out), timed in alternation with
our fp32 model, and prints its time ratio and relative error against fp32 (per hidden state, norm of
the difference over the norm; the largest is reported). The last line is one JSON object with
``max_abs_diff`` and ``time_ratio`` (and ``precision`` when ``--dtype`` is not fp32).

``--device cuda`` times both on the GPU (synchronised around every forward); ``--batch N`` feeds N
utterances of ``--seconds`` each (equal lengths, as SUPERB's batches of cropped audio nearly are).

    python benchmarks/vs_s3prl.py [--seconds 10] [--batch 1] [--rounds 5] [--threads N] [--device cpu|cuda]
                                  [--dtype fp32|bf16|fp16]
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
from common import HUBERT_BASE_CONV, machine, synchronize  # noqa: E402

import upstream_compressed  # noqa: E402
from upstream_compressed.compress import run_recipe  # noqa: E402
from upstream_compressed.delta import write_delta  # noqa: E402
from upstream_compressed.expert import UpstreamExpert, native_on_cpu  # noqa: E402
from upstream_compressed.model import SpeechTransformer  # noqa: E402
from upstream_compressed.model.convert import load_base  # noqa: E402
from upstream_compressed.recipe import parse_recipe  # noqa: E402
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint  # noqa: E402


def timed(function, rounds: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)  # a GPU forward returns before it has run
        times.append(time.perf_counter() - start)
    return times


def relative_errors(got: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """Per hidden state: norm of the difference over the norm of the reference."""
    return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, reference)]


def precision_upstream(hub, ckpt: Path, tmp: Path, precision: str):
    """``-u hubert_identity -k <identity delta of ckpt> -g <yaml with precision>``, as run_downstream builds it."""
    delta = write_delta(run_recipe(parse_recipe({"base": str(ckpt), "steps": []}), work_dir=tmp / "work"),
                        tmp / "identity.safetensors")
    options = tmp / "precision.yaml"
    options.write_text(f"precision: {precision}\n")
    return hub.hubert_identity(ckpt=str(delta), model_config=str(options), refresh=False).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1, help="utterances per forward (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="also run the upstream with the -g option precision: DTYPE and compare it with fp32")
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    upstream_compressed.register()
    import s3prl.hub

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_hubert_checkpoint(Path(tmp) / "hubert_base_shape.pt", layers=12, dim=768, ffn=3072, heads=12,
                                      conv_layers=repr(HUBERT_BASE_CONV), conv_pos=128, conv_pos_groups=16)
        theirs = s3prl.hub.hubert_local(ckpt=str(ckpt)).eval().to(device)
        base = load_base(ckpt)
        low_upstream = None if args.dtype == "fp32" else \
            precision_upstream(s3prl.hub, ckpt, Path(tmp), args.dtype).to(device)
    ours = UpstreamExpert(SpeechTransformer.from_state_dict(base.config, base.state_dict)).eval().to(device)
    generator = torch.Generator().manual_seed(0)
    wavs = [torch.randn(int(args.seconds * 16000), generator=generator).to(device) for _ in range(args.batch)]

    with torch.inference_mode():
        expected = theirs([w.clone() for w in wavs])["hidden_states"]
        got = ours(wavs)["hidden_states"]
        max_diff = max((a - b).abs().max().item() for a, b in zip(got, expected))
        theirs(wavs), ours(wavs)  # warm-up
        their_times, our_times = [], []
        for _ in range(args.rounds):  # alternate so that load drifts hit both
            their_times += timed(lambda: theirs(wavs), 1, device)
            our_times += timed(lambda: ours(wavs), 1, device)
        low_precision = None
        if low_upstream is not None:
            low = low_upstream(wavs)  # also the warm-up (and the emulation warning, once)
            assert all(state.dtype == torch.float32 for state in low["hidden_states"]), "hidden states not float32"
            errors = relative_errors(low["hidden_states"], got)
            fp32_times, low_times = [], []
            for _ in range(args.rounds):  # alternate with fp32, as above
                fp32_times += timed(lambda: ours(wavs), 1, device)
                low_times += timed(lambda: low_upstream(wavs), 1, device)
            low_precision = {
                "precision": args.dtype, "upstream": "hubert_identity", "cpu_native": native_on_cpu(args.dtype),
                "time_ratio_vs_fp32": statistics.median(low_times) / statistics.median(fp32_times),
                "ms": statistics.median(low_times) * 1000,
                "max_relative_error_vs_fp32": max(errors), "relative_errors_vs_fp32": errors,
                "max_abs_diff_vs_fp32": max((a - b).abs().max().item() for a, b in zip(low["hidden_states"], got)),
            }

    theirs_s, ours_s = statistics.median(their_times), statistics.median(our_times)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"audio {args.batch} x {args.seconds:g} s on {args.device} ({where}), rounds {args.rounds}")
    print("| implementation | median forward (ms) |")
    print("|---|---|")
    print(f"| S3PRL hubert_local | {theirs_s * 1000:.1f} |")
    print(f"| ours (SpeechTransformer) | {ours_s * 1000:.1f} |")
    print(f"max |difference| over {len(got)} hidden states: {max_diff:.2e}")
    if low_precision:
        p = low_precision
        print(f"precision: {p['precision']} (-u hubert_identity -g): time {p['time_ratio_vs_fp32']:.3f}x fp32, "
              f"relative error vs fp32 {p['max_relative_error_vs_fp32']:.2e} (largest over {len(got)} hidden states), "
              f"max |difference| {p['max_abs_diff_vs_fp32']:.3e}")
        if p["cpu_native"] is False:
            print(f"this CPU has no native {p['precision']} (see /proc/cpuinfo): its matmuls are emulated, expect them slower")
    print(json.dumps({"max_abs_diff": max_diff, "time_ratio": ours_s / theirs_s, "ours_ms": ours_s * 1000,
                      "s3prl_ms": theirs_s * 1000, "batch": args.batch, "seconds": args.seconds, "device": args.device,
                      "threads": torch.get_num_threads(), **({"precision": low_precision} if low_precision else {}),
                      **machine()}))


if __name__ == "__main__":
    main()
