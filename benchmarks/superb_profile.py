"""`profile` and the SUPERB leaderboard protocol on a random HuBERT Base shape, on any device.

Runs without S3PRL (our upstream is built directly), so it also runs on a bare GPU machine:
the profile (params, MACs, median time, RTF, peak memory) at 10 s and 30 s of audio, then the
leaderboard's 32-utterance MAC count twice, with the counted calls' arithmetic skipped (the
default) and computed, which must agree with each other and with the published HuBERT Base MACs.
The last line is one JSON object.

    python benchmarks/superb_profile.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from upstream_compressed.expert import UpstreamExpert  # noqa: E402
from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer  # noqa: E402
from upstream_compressed.superb.protocol import form_values, superb_profile, utterance_macs  # noqa: E402
from upstream_compressed.upstream_profile import format_profile, profile_upstream  # noqa: E402

PUBLISHED_MACS = {"macs": 1_669_156_022_848, "macsShort": 149_255_103_040, "macsMedium": 261_280_279_552,
                  "macsLong": 422_366_359_296, "macsLonger": 836_254_280_960}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config = ModelConfig(kind=HUBERT, embed_dim=768, head_dim=64, layers=[LayerConfig(12, 3072) for _ in range(12)],
                         conv_layers=[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2,
                         attention_dropout=0.1)  # HuBERT Base's rate: the leaderboard counts dropout
    torch.manual_seed(0)
    upstream = UpstreamExpert(SpeechTransformer(config))
    summary: dict = {"device": args.device}
    for seconds in (10.0, 30.0):
        result = profile_upstream(upstream, "hubert_base_shape", seconds, args.device, args.repeats)
        print(format_profile(result), flush=True)
        summary[f"rtf_{seconds:g}s"] = result["rtf"]
        summary[f"peak_memory_bytes_{seconds:g}s"] = result["peak_memory_bytes"]
    start = time.perf_counter()
    skipped = superb_profile(upstream, args.device)
    summary["protocol_seconds_skipped"] = time.perf_counter() - start
    start = time.perf_counter()
    computed = form_values(utterance_macs(upstream, device=args.device, compute=True), skipped["paramShared"])
    summary["protocol_seconds_computed"] = time.perf_counter() - start
    print("protocol (arithmetic skipped) ", skipped)
    print("protocol (arithmetic computed)", computed)
    summary["protocol_skip_equals_compute"] = skipped == computed
    summary["protocol_equals_published"] = all(skipped[k] == v for k, v in PUBLISHED_MACS.items())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
