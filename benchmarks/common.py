"""Shapes and helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import HUBERT_FORMAT, Converted
from upstream_compressed.model.formats import wav2vec2, wavlm
from upstream_compressed.relative_timing import interleaved_times, synchronize  # noqa: F401 (re-exported)

HUBERT_BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
HUBERT_BASE_CONV_SPEC = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
# Base-size fields shared by the fairseq-style configs below (WavLM Base+ and wav2vec 2.0 Base).
_BASE_FIELDS = dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
                    conv_feature_layers=HUBERT_BASE_CONV_SPEC, conv_pos=128, conv_pos_groups=16,
                    extractor_mode="default", conv_bias=False, layer_norm_first=False)
# WavLM Base+'s WavLMConfig fields: HuBERT Base's shape plus the gated relative position bias.
WAVLM_BASE_PLUS_CFG = dict(_BASE_FIELDS, relative_position_embedding=True, num_buckets=320, max_distance=800,
                           gru_rel_pos=True, normalize=False)


def hubert_base_shape(seed: int = 0) -> Converted:
    """HuBERT Base's architecture (12 x 768, 12 heads, FFN 3072) with random weights, as a base."""
    torch.manual_seed(seed)
    config = ModelConfig(
        kind=HUBERT, embed_dim=768, head_dim=64, layers=[LayerConfig(12, 3072) for _ in range(12)],
        conv_layers=HUBERT_BASE_CONV,
    )
    model = SpeechTransformer(config)
    return Converted(model.config, model.state_dict(), HUBERT_FORMAT)


def _random_base(converted: Converted, seed: int) -> Converted:
    """``converted``'s config (read by its layout from the config alone) with random weights."""
    torch.manual_seed(seed)
    model = SpeechTransformer(converted.config)
    return Converted(model.config, model.state_dict(), converted.source_format, converted.extras)


def wavlm_base_plus_shape(seed: int = 0) -> Converted:
    """WavLM Base+'s architecture (HuBERT Base's, with its gated relative position bias) with random weights.

    The config is what our WavLM layout reads from WavLM Base+'s WavLMConfig fields (no S3PRL needed)."""
    return _random_base(wavlm.read({"cfg": dict(WAVLM_BASE_PLUS_CFG), "model": {}}), seed)


def wav2vec2_base_shape(seed: int = 0) -> Converted:
    """wav2vec 2.0 Base's architecture with random weights, its config read by our wav2vec 2.0 layout."""
    model_cfg = {"_name": wav2vec2.MODEL_NAME, **_BASE_FIELDS}
    return _random_base(wav2vec2.read({"model_cfg": model_cfg, "task_cfg": {"normalize": False}, "model_weight": {}}),
                        seed)


BASE_SHAPES = {"hubert": hubert_base_shape, "wavlm": wavlm_base_plus_shape, "wav2vec2": wav2vec2_base_shape}


def interleaved_medians(models: list[torch.nn.Module], wav: torch.Tensor, rounds: int, warmup: int = 1) -> list[float]:
    """Median forward time of each model, timed in alternation so drifts in machine load hit all alike.

    Each round starts one model later, so that no model gains from always running in the same place
    (the loop is the package's, shared with ``upstream-compressed time-vs-base``)."""
    for model in models:
        model.eval()
    times = interleaved_times([lambda m=m: m(wav) for m in models], rounds, warmup, wav[0].device)
    return [statistics.median(t) for t in times]


def machine() -> dict[str, object]:
    """The CPU model, its vector flags that decide our kernels' speed, cores, and torch's thread count."""
    import os
    import platform
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "torch_threads": torch.get_num_threads()}


def _process_memory(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their users), else its RSS."""
    base = Path("/proc") / str(pid)
    for name, field in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in (base / name).read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (DataLoader workers included), as PSS.

    Forked workers share most of their pages with the parent; summing their RSS would count those
    pages once per worker, PSS counts each page once in all.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        total += _process_memory(current)
    return total


def peak_tree_rss(command: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """(peak resident bytes of the process tree, seconds, its stderr) of running ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return peak, time.perf_counter() - start, err
