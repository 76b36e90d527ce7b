"""Profile any S3PRL upstream: parameters, MACs, wall-clock time, real-time factor, peak memory.

The upstream is built exactly as S3PRL's runner builds it (``getattr(s3prl.hub, NAME)(ckpt=...,
model_config=..., refresh=...)``) after this plugin registered its entries, so NAME may be one of
ours (``hubert_headpruned``, ``compressed_local``, ...) or any of S3PRL's (``hubert_local``, ``fbank``, ...).

MACs: for our upstreams they are counted on the SpeechTransformer inside (``profile.count_macs``,
with the effective count for weight-pruned models); for any other upstream, on the whole module
with ``FlopCounterMode`` (FLOPs / 2).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one forward (the weights
included); on CPU, the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the forward; the weights, Python and libraries included).
``peak_memory_forward_bytes`` is the part above what was in use just before the forward. On CPU,
glibc keeps the memory that earlier forwards freed mapped, so a warm forward reuses it without
raising the RSS (it read 0); ``malloc_trim(0)`` first hands those free pages back to the system, so
the forward has to touch its working memory again and the RSS rise measures it. That is what the
operating system sees (oneDNN scratch buffers and allocator slack included), unlike a count of
tensor bytes, and costs nothing, unlike a fresh process per measurement.

Precision: ``precision`` is what the forward computes in: for ours, the ``-g`` yaml's ``precision`` (or
``UPSTREAM_COMPRESSED_PRECISION``) where it is bf16/fp16 (autocast, float32 hidden states out), else the
weights' dtype (``fp32`` normally), as for any other upstream. ``precision_native`` says whether the
device computes it in hardware: on CPU, from /proc/cpuinfo (bf16: ``avx512_bf16``/``amx_bf16``; fp16:
``avx512_fp16``/``amx_fp16``; False: emulated, much slower than fp32; None: unknown); on CUDA, True
(a CUDA device without bf16 refuses it).

Compile: ``compiled`` says whether the forward ran through ``torch.compile`` (ours, with the ``-g`` option
``compile: true`` or ``UPSTREAM_COMPRESSED_COMPILE=1``; any other upstream: false). The compile happens in
the untimed warm-up forward, so the median is the compiled model's steady state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

SAMPLE_RATE = 16000


class ProfileError(Exception):
    """An upstream that cannot be profiled as asked (unknown name, missing file, no CUDA, ...)."""


def load_upstream(name: str, ckpt: str | None = None, model_config: str | None = None) -> nn.Module:
    """The upstream ``name`` as ``run_downstream.py -u NAME -k CKPT -g CONFIG`` builds it."""
    import upstream_compressed

    upstream_compressed.register()
    import s3prl.hub as hub

    names = sorted(n for n in dir(hub) if not n.startswith("_") and callable(getattr(hub, n)))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        hint = (f"; did you mean {', '.join(close)}?" if close
                else "; list them with `python -c 'import s3prl.hub; print(dir(s3prl.hub))'`")
        raise ProfileError(f"unknown upstream {name!r} (not in s3prl.hub after registering this plugin){hint}")
    if ckpt and not Path(ckpt).exists():
        raise ProfileError(f"checkpoint (-k) {ckpt} does not exist")
    if model_config and not Path(model_config).exists():
        raise ProfileError(f"upstream options file (-g) {model_config} does not exist")
    return _build_checked(getattr(hub, name), name, ckpt, model_config)


def _build_checked(entry: Callable[..., nn.Module], name: str, ckpt: str | None,
                   model_config: str | None) -> nn.Module:
    """Build an upstream; S3PRL's own entries get their -k checked as our bases are (``model/trust.py``).

    Their -g files are S3PRL's, so only ``--trust-checkpoint`` or the environment opts in for them.
    """
    from .hubconf import entries
    from .model.convert import check_checkpoint_file
    from .model.trust import full_unpickling_by_s3prl

    if name in entries() or not ckpt or not Path(ckpt).is_file():  # ours check their bases themselves
        return entry(ckpt=ckpt, model_config=model_config, refresh=False)
    with full_unpickling_by_s3prl(check_checkpoint_file(ckpt)):
        return entry(ckpt=ckpt, model_config=model_config, refresh=False)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ProfileError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError("--device cuda asked, but torch sees no CUDA device here; use --device cpu")
    return torch.device(device)


def _speech_transformer(upstream: nn.Module):
    from .expert import UpstreamExpert

    return upstream.model if isinstance(upstream, UpstreamExpert) else None


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def upstream_precision(upstream: nn.Module) -> str:
    """The precision the upstream's forward computes in (see the module docstring)."""
    precision = getattr(upstream, "precision", None) if _speech_transformer(upstream) is not None else None
    if precision not in (None, "fp32"):
        return precision
    dtype = next((p.dtype for p in upstream.parameters() if p.is_floating_point()), torch.float32)
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def precision_native(precision: str, device: torch.device) -> bool | None:
    """Whether ``device`` computes ``precision`` in hardware (None: unknown)."""
    from .expert import NATIVE_CPU_FLAGS, native_on_cpu

    if device.type == "cpu" and precision in NATIVE_CPU_FLAGS:
        return native_on_cpu(precision)
    return True if device.type == "cuda" or precision in ("fp32", "fp64") else None


def encoder_parameters(upstream: nn.Module) -> int | None:
    """Parameters of the Transformer layer stack (ours: ``model.layers``; others: the largest ``*layers``
    ModuleList)."""
    model = _speech_transformer(upstream)
    if model is not None:
        return model.num_parameters(encoder_only=True)
    stacks = [m for n, m in upstream.named_modules()
              if isinstance(m, nn.ModuleList) and n.split(".")[-1].endswith("layers")]
    if not stacks:
        return None
    return max(sum(p.numel() for p in m.parameters()) for m in stacks)


def count_upstream_macs(upstream: nn.Module, seconds: float, device: torch.device) -> tuple[int, int | None]:
    """(dense MACs, effective MACs or None when unknown) of one forward on ``seconds`` of audio."""
    from torch.utils.flop_counter import FlopCounterMode

    from .model.sparse import masked_linears
    from .profile import count_effective_macs, count_macs  # also registers the CPU attention formula

    model = _speech_transformer(upstream)
    if model is not None:
        dense = count_macs(model, seconds)
        has_masks = next(masked_linears(model), None) is not None
        return dense, count_effective_macs(model, seconds) if has_masks else dense
    wav = torch.zeros(int(seconds * SAMPLE_RATE), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        upstream([wav])
    return counter.get_total_flops() // 2, None


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int, cuda: bool) -> float:
    """Median wall-clock seconds of ``run()`` over ``repeats`` after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where there is none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def peak_memory(run: Callable[[], Any], device: torch.device) -> tuple[int, int, str]:
    """(peak bytes during ``run()``, the part above the level before it, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - before, "torch.cuda.max_memory_allocated"
    # Without this, a warm forward runs in heap pages that earlier forwards left mapped: no RSS rise.
    trimmed = release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        before = _proc_status_bytes("VmRSS")
        run()
        peak = _proc_status_bytes("VmHWM")
        how = "malloc_trim, then " if trimmed else ""
        return peak, peak - before, f"process peak RSS ({how}VmHWM reset before the forward)"
    except OSError:  # not Linux: the high-water mark since start cannot be reset, so only its growth
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak - before, "ru_maxrss (peak RSS since start; forward part is a lower bound)"


def seeded_audio(seconds: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The seeded random waveform ``profile`` times on (same seed: same audio)."""
    if seconds <= 0:
        raise ProfileError(f"--seconds must be positive, not {seconds}")
    generator = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=generator)).to(device)


def profile_upstream(
    upstream: nn.Module, name: str, seconds: float = 10.0, device: str = "cpu", repeats: int = 5, warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything ``upstream-compressed profile`` reports, as one flat dict."""
    if seconds <= 0:
        raise ProfileError(f"--seconds must be positive, not {seconds}")
    if repeats < 1:
        raise ProfileError(f"--repeats must be at least 1, not {repeats}")
    target = resolve_device(device)
    upstream = upstream.eval().to(target)
    precision = upstream_precision(upstream)
    if _speech_transformer(upstream) is not None:  # a precision this device cannot run: refused before any work
        from .expert import check_precision

        try:
            check_precision(getattr(upstream, "precision", "fp32"), target)
        except RuntimeError as error:
            raise ProfileError(str(error)) from error
    params = sum(p.numel() for p in upstream.parameters())
    macs, macs_effective = count_upstream_macs(upstream, seconds, target)
    wav = seeded_audio(seconds, target, seed)

    def forward() -> None:
        with torch.inference_mode():
            upstream([wav])

    median = median_seconds(forward, repeats, warmup, cuda=target.type == "cuda")
    peak, peak_forward, measure = peak_memory(forward, target)
    ours = _speech_transformer(upstream) is not None
    return {
        "upstream": name,
        "device": str(target),
        "precision": precision,
        "precision_native": precision_native(precision, target),
        "threads": torch.get_num_threads() if target.type == "cpu" else None,
        "compiled": bool(ours and getattr(upstream, "compiled", False)),
        "params": params,
        "params_encoder": encoder_parameters(upstream),
        "macs": macs,
        "macs_effective": macs_effective,
        "seconds_audio": seconds,
        "median_seconds": median,
        "repeats": repeats,
        "rtf": median / seconds,
        "peak_memory_bytes": peak,
        "peak_memory_forward_bytes": peak_forward,
        "peak_memory_measure": measure,
    }


def format_profile(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`profile_upstream`'s result."""
    def number(value: int | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:,}{unit}"

    mib = 1 << 20
    lines = [
        f"upstream        {result['upstream']} on {result['device']}"
        + (f" ({result['threads']} threads)" if result.get("threads") else ""),
        f"precision       {result.get('precision', 'n/a')}"
        + (" (emulated on this CPU: no native support in /proc/cpuinfo, slower than fp32)"
           if result.get("precision_native") is False else ""),
        f"params          {number(result['params'])} (encoder layers {number(result['params_encoder'])})",
        f"MACs            {result['macs'] / 1e9:.2f} G per {result['seconds_audio']:g} s of audio"
        + ("" if result["macs_effective"] in (None, result["macs"])
           else f" (effective, non-zero weights only: {result['macs_effective'] / 1e9:.2f} G)"),
        f"time            {result['median_seconds'] * 1000:.1f} ms median of {result['repeats']} "
        f"(real-time factor {result['rtf']:.4f})"
        + ("; torch.compile (compiled in the untimed warm-up)" if result.get("compiled") else ""),
        f"peak memory     {result['peak_memory_bytes'] / mib:.1f} MiB "
        f"({result['peak_memory_forward_bytes'] / mib:.1f} MiB above the level before the forward; "
        f"{result['peak_memory_measure']})",
    ]
    return "\n".join(lines)
