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

Compile: with ``compile_model=True`` (the ``-g`` option ``compile: true``, else ``UPSTREAM_COMPRESSED_COMPILE``)
the model's forward runs through ``torch.compile(model, dynamic=True)``, built lazily on the first forward,
one per upstream instance; the padding and the input checks stay outside it. ``dynamic=True`` makes the
batch and time sizes symbolic from the first compile, so a new length or batch size reuses the graph
(torch's default compiles the first shape static and recompiles, dynamic, at the second). A graph holds
for the sizes its guards admit, and a few size classes add one graph each, once, when first met:

- a batch of one utterance: dynamo specialises sizes 0 and 1;
- on CPU, ATen's choice of convolution kernel (oneDNN or its own) at size thresholds it guards on: for a
  batch of one, a length above or below 20480 samples (1.28 s) in HuBERT's first convolution (more
  thresholds for narrow front ends, e.g. 32 channels); a batch of 16 or more for the grouped positional
  convolution (seen on a test model);
- HuBERT's frame mask folds the samples into frames and branches on whether the padded length is an exact
  multiple of the frame count.

So the count is bounded by the classes met, not the number of batches (``tests/test_compile_option.py``,
``benchmarks/compile.py``: 12 batches of new shapes, 3 graphs); grad mode, autocast dtype, train/eval and the
thread count are guarded too. :data:`COMPILE_RECOMPILE_LIMIT` leaves room for several models' classes.
Weight-pruned Linears on the CSR kernel break the graph (torch.compile has no sparse tensors; their kernel
cache compares data pointers): dynamo then compiles the pieces between them, and the results are unchanged.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .model import SpeechTransformer
from .model.config import FBANK

SAMPLE_RATE = 16000
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ENV = "UPSTREAM_COMPRESSED_PRECISION"
COMPILE_ENV = "UPSTREAM_COMPRESSED_COMPILE"
# The environment variable's spellings of true and false (the yaml's must be a YAML boolean).
ENV_TRUE, ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# torch.compile's backend; tests swap in a cheaper one ("aot_eager") where only the graph count matters.
COMPILE_BACKEND = "inductor"
# Dynamo keeps its graphs per code object, so every SpeechTransformer compiled in a process shares the entries
# of SpeechTransformer.forward; torch's default limit (8) is less than one model's shape classes on CPU can
# take (the module docstring), after which it would run new shapes eagerly.
COMPILE_RECOMPILE_LIMIT = 32
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs that multiply the dtype in hardware (oneDNN uses them); without, it is emulated.
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_warned_emulated: set[str] = set()  # precisions already warned about in this process


def option_or_env(value: object | None, where: str, env: str) -> tuple[object | None, str]:
    """(the option's value, where it came from): ``value`` if given, else the environment variable's
    (None when unset or empty), named for error messages; the rule every upstream option follows."""
    if value is not None:
        return value, where
    return os.environ.get(env) or None, env


def resolve_precision(value: object | None, where: str = "precision") -> str:
    """``value`` if given, else the environment variable, else ``fp32``; refuses unknown values."""
    value, source = option_or_env(value, where, PRECISION_ENV)
    value = "fp32" if value is None else value
    if value not in PRECISIONS:
        raise ValueError(f"{source}: {value!r} is not one of {'|'.join(PRECISIONS)}")
    return str(value)


def resolve_compile(value: object | None, where: str = "compile") -> bool:
    """``value`` if given (a boolean), else the environment variable (1/0, true/false, ...), else False."""
    value, source = option_or_env(value, where, COMPILE_ENV)
    if value is None or isinstance(value, bool):
        return bool(value)
    if source == COMPILE_ENV and str(value).strip().lower() in ENV_TRUE + ENV_FALSE:
        return str(value).strip().lower() in ENV_TRUE
    allowed = "true or false" if source != COMPILE_ENV else "1 or 0 (true/false, yes/no, on/off)"
    raise ValueError(f"{source}: {value!r} is not {allowed}")


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

    def __init__(self, model: SpeechTransformer, manifest: dict | None = None, precision: str | None = None,
                 compile_model: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.manifest = manifest or {}
        # fp32, bf16 or fp16 (see the module docstring); None: the environment variable, else fp32.
        self.precision = resolve_precision(precision)
        # Run the model through torch.compile (module docstring); None: the environment variable, else False.
        self.compile_model = resolve_compile(compile_model)
        # (the model it compiles, its compiled forward): in a tuple, so that nn.Module does not register the
        # compiled wrapper as a submodule (its parameters would appear twice in state_dict).
        self._compiled: tuple[nn.Module, Callable[..., tuple[list[Tensor], Tensor]]] | None = None
        frontend = getattr(getattr(model, "config", None), "frontend", None)
        if self.precision == "fp16" and frontend == FBANK:
            raise ValueError("precision: fp16: this model's fbank front end (MelHuBERT: Kaldi fbank of the waveform "
                             "scaled to 16-bit range) overflows float16; use precision: bf16 or fp32")

    def get_downsample_rates(self, key: str) -> int:
        return self.model.config.downsample_rate

    @property
    def compiled(self) -> bool:
        """Whether the forward has run through torch.compile (built on the first forward with the option on)."""
        return self._compiled is not None and self._compiled[0] is self.model

    def _model_forward(self) -> Callable[..., tuple[list[Tensor], Tensor]]:
        """The model, or its compiled forward: built once, rebuilt only if ``self.model`` was replaced."""
        if not self.compile_model:
            return self.model
        if not self.compiled:
            self._compiled = (self.model, torch.compile(self.model, dynamic=True, backend=COMPILE_BACKEND,
                                                        recompile_limit=COMPILE_RECOMPILE_LIMIT))
        return self._compiled[1]

    def __getstate__(self) -> dict:
        # A copy or pickle compiles its own on its first forward; dynamo's wrapper does not travel.
        return {**super().__getstate__(), "_compiled": None}

    def forward(self, wavs: Sequence[Tensor]) -> dict[str, object]:
        validate_wavs(wavs, self.model.config.receptive_field)
        # Any float precision is fine (float64 from numpy, half from a loader): compute in the model's.
        dtype = self.model.input_dtype
        device = wavs[0].device
        lengths = torch.tensor([len(wav) for wav in wavs], device=device)
        batch = pad_sequence([wav.to(dtype) for wav in wavs], batch_first=True)
        model = self._model_forward()
        if self.precision == "fp32":  # no autocast at all: exactly the model as it is
            states, padding_mask = model(batch, lengths)
        else:
            check_precision(self.precision, device)
            with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.precision]):
                states, padding_mask = model(batch, lengths)
            states = [state.float() for state in states]  # what S3PRL's featurizer and downstreams expect
        return {
            "hidden_states": states,
            "last_hidden_state": states[-1],
            "pad_mask": ~padding_mask,  # S3PRL's convention: True on valid frames
        }
