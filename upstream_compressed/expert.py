"""UpstreamExpert: the S3PRL upstream contract around a :class:`SpeechTransformer`.

Precision: ``fp32`` (default) runs the model as it is, with no autocast. ``bf16`` / ``fp16`` run the forward
under ``torch.autocast`` in that dtype on the device of the input, and the hidden states come back as
float32, so S3PRL's featurizer and downstreams run unchanged. Per device:

- CUDA: fp16 always; bf16 natively from compute capability 8.0 (Ampere) on; below it, where torch can
  emulate it (``torch.cuda.is_bf16_supported()``), it runs with a warning once (slow: use fp16 there),
  else it is refused.
- CPU: both run (torch >= 2.3's CPU autocast takes bf16 and fp16). Without native support in
  ``/proc/cpuinfo`` (bf16: ``avx512_bf16`` or ``amx_bf16``; fp16: ``avx512_fp16`` or ``amx_fp16``) the
  low-precision matmuls are emulated and much slower than fp32: a warning says so, once per process.
- a device type torch has no autocast for: refused, naming it.
- fp16 on a model with an fbank front end (MelHuBERT): refused when the upstream is built, since Kaldi
  fbank of the waveform scaled to the 16-bit range overflows float16 (its hidden states were NaN); bf16
  (float32's range) runs.

Weight-pruned Linears that run through the CSR kernel stay in float32 inside autocast (torch's sparse
CSR matmul has no bf16/fp16 kernel on CPU): see :mod:`upstream_compressed.model.sparse`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .model import SpeechTransformer
from .model.config import FBANK

SAMPLE_RATE = 16000
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ENV = "UPSTREAM_COMPRESSED_PRECISION"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs that multiply the dtype in hardware (oneDNN uses them); without, it is emulated.
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_warned_emulated: set[str] = set()  # precisions already warned about in this process


def resolve_precision(value: object | None, where: str = "precision") -> str:
    """``value`` if given, else the environment variable, else ``fp32``; refuses unknown values."""
    source = where
    if value is None:
        value, source = os.environ.get(PRECISION_ENV) or "fp32", PRECISION_ENV
    if value not in PRECISIONS:
        raise ValueError(f"{source}: {value!r} is not one of {'|'.join(PRECISIONS)}")
    return str(value)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def native_on_cpu(precision: str) -> bool | None:
    """Whether this CPU computes ``precision`` natively (fp32: always); None where /proc/cpuinfo is absent."""
    if precision == "fp32":
        return True
    flags = cpu_flags()
    return None if flags is None else any(flag in flags for flag in NATIVE_CPU_FLAGS[precision])


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse ``precision`` on a device that cannot run it; warn once where a CPU only emulates it."""
    if precision == "fp32":
        return
    where = f"precision: {precision}"
    if not torch.amp.is_autocast_available(device.type):
        raise RuntimeError(f"{where}: torch has no autocast for device {device.type!r}; use precision: fp32 there")
    if device.type == "cuda" and precision == "bf16" and not torch.version.hip:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # no bf16 tensor cores before Ampere
            name = f"CUDA device {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
            if not torch.cuda.is_bf16_supported(including_emulation=True):
                raise RuntimeError(f"{where}: {name} does not support bfloat16; use precision: fp16 (or fp32) there")
            if "cuda:bf16" not in _warned_emulated:
                _warned_emulated.add("cuda:bf16")
                warnings.warn(f"{where}: {name} has no native bfloat16 (needs 8.0), so bf16 is emulated: it runs, "
                              "with float32 hidden states, but slowly (use precision: fp16 there)",
                              RuntimeWarning, stacklevel=3)
    if device.type == "cpu" and precision not in _warned_emulated and native_on_cpu(precision) is False:
        _warned_emulated.add(precision)
        flags = " / ".join(NATIVE_CPU_FLAGS[precision])
        warnings.warn(f"{where}: this CPU has no {flags} in /proc/cpuinfo, so {precision} is emulated: it runs, "
                      "with float32 hidden states, but much slower than fp32 (use precision: fp32 on this CPU "
                      "for speed)", RuntimeWarning, stacklevel=3)


def validate_wavs(wavs: Sequence[Tensor], min_samples: int) -> None:
    """Refuse audio the model cannot meaningfully run on, naming the utterance and the problem."""
    if isinstance(wavs, Tensor) or not isinstance(wavs, (list, tuple)):
        raise ValueError("upstream input must be a list of 1-D waveform tensors (16 kHz), one per utterance")
    if len(wavs) == 0:
        raise ValueError("upstream input is an empty list: give at least one waveform")
    for i, wav in enumerate(wavs):
        if not isinstance(wav, Tensor):
            raise ValueError(f"waveform {i} is a {type(wav).__name__}, not a torch.Tensor")
        if wav.dim() != 1:
            raise ValueError(
                f"waveform {i} has shape {tuple(wav.shape)}; expected a 1-D mono waveform "
                "(mix multi-channel audio down to one channel first)"
            )
        if wav.is_complex() or wav.dtype == torch.bool:
            raise ValueError(f"waveform {i} has dtype {wav.dtype}; expected real samples in [-1, 1] as a float tensor")
        if not torch.is_floating_point(wav):
            raise ValueError(
                f"waveform {i} has integer dtype {wav.dtype}; convert to float in [-1, 1] "
                "(e.g. int16 samples / 32768)"
            )
        if wav.numel() < min_samples:
            raise ValueError(
                f"waveform {i} has {wav.numel()} samples; the front end needs at least {min_samples} "
                f"({min_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz) to produce one frame"
            )
        if not bool(torch.isfinite(wav).all()):
            raise ValueError(f"waveform {i} contains NaN or infinite values")


class UpstreamExpert(nn.Module):
    """What ``run_downstream.py -u NAME`` gets: ``forward(wavs) -> {"hidden_states": [...]}``."""

    def __init__(self, model: SpeechTransformer, manifest: dict | None = None, precision: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.manifest = manifest or {}
        # fp32, bf16 or fp16 (see the module docstring); None: the environment variable, else fp32.
        self.precision = resolve_precision(precision)
        frontend = getattr(getattr(model, "config", None), "frontend", None)
        if self.precision == "fp16" and frontend == FBANK:
            raise ValueError("precision: fp16: this model's fbank front end (MelHuBERT: Kaldi fbank of the waveform "
                             "scaled to 16-bit range) overflows float16; use precision: bf16 or fp32")

    def get_downsample_rates(self, key: str) -> int:
        return self.model.config.downsample_rate

    def forward(self, wavs: Sequence[Tensor]) -> dict[str, object]:
        validate_wavs(wavs, self.model.config.receptive_field)
        # Any float precision is fine (float64 from numpy, half from a loader): compute in the model's.
        dtype = self.model.input_dtype
        device = wavs[0].device
        lengths = torch.tensor([len(wav) for wav in wavs], device=device)
        batch = pad_sequence([wav.to(dtype) for wav in wavs], batch_first=True)
        if self.precision == "fp32":  # no autocast at all: exactly the model as it is
            states, padding_mask = self.model(batch, lengths)
        else:
            check_precision(self.precision, device)
            with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.precision]):
                states, padding_mask = self.model(batch, lengths)
            states = [state.float() for state in states]  # what S3PRL's featurizer and downstreams expect
        return {
            "hidden_states": states,
            "last_hidden_state": states[-1],
            "pad_mask": ~padding_mask,  # S3PRL's convention: True on valid frames
        }
