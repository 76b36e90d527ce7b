"""Masked Linear layers (weight pruning) and the kernels that run them.

A :class:`MaskedLinear` is an ``nn.Linear`` with a boolean ``mask`` buffer; its weight is zero
wherever the mask is False. Whenever autograd may be recording (training, recovery), it computes
``linear(x, weight * mask)``: the gradient of a pruned weight is then exactly zero, so optimizers
(SGD, Adam, AdamW with its decoupled decay, which multiplies zero) never move it away from zero.
Without autograd it runs a kernel chosen once and cached until the weights, the mode, the thread count
or the autocast dtype change:

- ``dense``: the ordinary GEMM on the (already zero-filled) weight;
- ``csr`` (CPU, or CUDA when forced): a product with the weight as a ``sparse_csr`` tensor (below);
- ``semi_structured`` (CUDA, 2:4 masks, fp16/bf16): ``torch.sparse.to_sparse_semi_structured``.

The execution mode (``auto``, ``dense``, ``sparse``) is the module's ``execution`` attribute when
set (from the upstream's ``-g`` option ``sparse_execution``), else the environment variable
:data:`EXECUTION_ENV`, else ``auto``. ``sparse`` forces CSR (or 2:4 on CUDA where the mask allows it),
``dense`` the GEMM. ``auto`` runs dense on CUDA (no sparse kernel won there; the measurement is noted
below) and below :data:`CPU_CALIBRATE_FROM` sparsity; otherwise it **calibrates**: it times the dense
GEMM against the CSR kernel for the weight's shape, on this machine, at the current
``torch.get_num_threads()`` (:func:`calibrated_choice`), and runs CSR only if that was at least
:data:`CALIBRATION_MARGIN` times faster. Decisions are cached per (shape, sparsity bucket, threads,
dtype, autocast dtype, device), so the 72 Linears of HuBERT Base (3 shapes) calibrate 3 times per sparsity bucket; a
new thread count decides again. A fixed threshold cannot do this: how much faster CSR is depends on
the core count (dense GEMM scales with cores, a sparse product less well) and on the CPU.

**The CSR kernel on CPU** is our own where it can run (:mod:`native_spmm`, ``spmm.c``: float32 weights on
x86-64 Linux with AVX2 and FMA, built with the system's C compiler on first use and cached): tiles of 64 frames
x output rows over torch's OpenMP threads, each keeping its frames in registers across a row's non-zeros. On
the project's 2-core AMD EPYC it runs about twice MKL's speed per core and keeps its speed-up over dense at 2
threads (HuBERT Base's 72 Linears at 90% sparsity: 3.48x at 1 thread and 3.20x at 2, against 1.66x and 1.21x
for the torch products below in the same rounds; on an AVX-512 EPYC 3.52x and 3.65x; docs/profiling.md). Elsewhere (another CPU, no compiler, float64 weights,
:data:`native_spmm.DISABLE_ENV` = 0) it runs torch's products: at one intra-op thread (or for a product under
:data:`CPU_PARALLEL_MIN_MACS` per thread) MKL's ``mkl_sparse_s_mm`` (torch's ``addmm`` on a ``sparse_csr``
weight) over :data:`CPU_CHUNK_ROWS` frames at a time, the activations it streams staying in cache; at more
threads ATen's own CSR product, ``torch.sparse.mm(W, x^T, "sum")``, its rows split by non-zeros over torch's
intra-op threads. Chosen between by measurement on the same EPYC (499 frames, 90% sparsity, 768x768 /
3072x768 / 768x3072, each timed right after a dense GEMM as in a forward, median of 15-21 rounds, quiet): at
2 threads ATen's product ran 0.67-1.33 / 1.32-1.95 / 0.97-1.09x the dense GEMM's speed, MKL's chunked one
with 2 intra-op threads about the same (but a fork and join per 32-frame chunk), and row blocks on a pool of
Python threads 0.53-0.86 / 1.20-1.21 / 0.75-0.78x (torch's OpenMP threads spin after each dense op and take
the cores from a second set of threads); at 1 thread MKL's chunked product is the faster (1.25-1.35 /
1.76-1.78 / 1.18-1.24x against ATen's 1.05 / 1.60 / 1.09x). Also measured and dropped: ``torch.jit.fork``
tasks (threads x threads threads on the cores); MKL's column-major product through ``ctypes`` (3-5x
slower); COO (0.8-2.6x); a numba kernel (0.2-0.7x). Indices are int32 on CPU, which MKL (LP64) and the
native kernel take as they are (int64 ones cost MKL a conversion per call, 10-25% at 90%).

Under ``torch.autocast`` (the upstream's ``precision: bf16|fp16``) the dense path runs in the autocast
dtype like any Linear, but the CSR kernel runs in float32: torch's sparse CSR matmul has no bf16/fp16
kernel on CPU (``"addmm_out_sparse_csr_impl_mkl" not implemented for 'BFloat16'``), so autocast is
switched off around it and its input cast up; its output is float32 and the next op casts it down again.
The calibration times the dense GEMM in the dtype it will run in (the autocast dtype, if on).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native_spmm

EXECUTION_MODES = ("auto", "dense", "sparse")
EXECUTION_ENV = "UPSTREAM_COMPRESSED_SPARSE_EXECUTION"
# Below this sparsity auto runs dense without timing: CSR never came near the dense GEMM there
# (0.68x at 50% on the 2-core AMD EPYC at 1 thread, HuBERT Base shapes; less at more threads).
CPU_CALIBRATE_FROM = 0.5
# auto runs CSR only if it was at least this much faster than dense in the calibration: a smaller
# gain is within what the timing moves, and a wrong CSR choice costs more than a missed one. At 1.05, on a
# quiet 2-core EPYC (AVX-512) at 2 threads, fc1 (3072x768) at 50% calibrated 1.01-1.22x over four repeats,
# took CSR in one of two benchmark runs, and then ran 0.87x of dense on 3999-frame inputs (auto 0.95x in all).
CALIBRATION_MARGIN = 1.10
# Calibration inputs: 256 frames (5 s of audio), then, only if CSR won there, 2048 (a batch of SUPERB
# utterances), and CSR must win at both. At fewer frames a multi-threaded dense GEMM loses more to its threads'
# synchronisation, which overstates CSR's gain (768x768 at 70%, 2 threads, under load: 1.9x at 128 frames,
# 1.4x at 256, 0.8x at 499); and the dense GEMM keeps gaining efficiency with frames where CSR does not (2-core
# EPYC, 2 threads, 60% sparsity, fc1 / fc2: 1.22x / 1.15x at 256 frames, 1.06x / 0.98x at 2048, 0.99x /
# 0.98x at 4096): calibrated on 256 frames alone, auto ran those at 0.94x of dense on 3999-frame inputs.
# 7 rounds after one warm-up each (see speed_up).
CALIBRATION_FRAMES = (256, 2048)
CALIBRATION_ROUNDS = 7
# Sparsities are bucketed in steps of 5% and each bucket is timed at its least sparse edge, so a decision
# for CSR holds for every Linear in the bucket (they have at most as many non-zeros).
SPARSITY_BUCKET = 0.05
# On CUDA no sparse kernel beats cuBLAS at these shapes (one NVIDIA H200, torch 2.11, 499 frames,
# benchmarks/weight_pruning.py --device cuda): cuSPARSE CSR runs the 72 Linears 0.22x as fast as
# dense at 90% sparsity and 0.33x at 95% (fp32), the 2:4 kernels 0.05x (fp16), so auto stays dense.
# CSR on CPU is fastest when the activations it streams stay in cache: multiply this many frames
# at a time (measured: 32 frames beat one call over all 499 frames by 1.1-1.5x at 90% sparsity).
CPU_CHUNK_ROWS = 32
# At several threads the CSR kernel runs ATen's multi-threaded product from this many multiply-adds per
# thread on (about 0.5 ms of work on one core); a smaller product runs MKL's chunked one.
CPU_PARALLEL_MIN_MACS = 2_000_000


def resolve_execution(mode: str | None, where: str = "sparse_execution") -> str:
    """``mode`` if given, else the environment variable, else ``auto``; refuses unknown values."""
    source = where
    if mode is None:
        mode, source = os.environ.get(EXECUTION_ENV) or "auto", EXECUTION_ENV
    if mode not in EXECUTION_MODES:
        raise ValueError(f"{source}: {mode!r} is not one of {'|'.join(EXECUTION_MODES)}")
    return mode


def is_two_four(mask: Tensor) -> bool:
    """At most 2 kept weights in every group of 4 consecutive inputs of a row (NVIDIA's 2:4 pattern)."""
    if mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all())


@contextlib.contextmanager
def _quiet_beta_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


# ------------------------------------------------------------------------------ the CSR kernel
def _product(matrix: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``matrix @ rows^T + bias`` (out x frames)."""
    with _quiet_beta_warning():
        return torch.mm(matrix, rows.T) if bias is None else torch.addmm(bias, matrix, rows.T)


def _multiply_chunks(matrix: Tensor, bias: Tensor | None, rows: Tensor, chunk: int | None) -> Tensor:
    """``rows @ matrix^T + bias`` (frames x out), ``chunk`` frames at a time (None: all at once)."""
    chunks = rows.split(chunk) if chunk else (rows,)
    return torch.cat([_product(matrix, bias, c).T for c in chunks])


def _multiply_rows_in_parallel(matrix: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``rows @ matrix^T + bias`` (frames x out, contiguous) by ATen's CSR kernel, its rows split over
    torch's intra-op threads (``torch.sparse.mm(..., reduce="sum")``)."""
    with _quiet_beta_warning():
        product = torch.sparse.mm(matrix, rows.T.contiguous(), "sum")  # out x frames
    out = rows.new_empty(rows.shape[0], matrix.shape[0])
    return out.copy_(product.T) if bias is None else torch.add(product.T, bias[:, 0], out=out)


class _CsrKernel:
    """``addmm(bias, W_csr, x^T)^T``: on CPU over chunks of frames at one thread, rows over threads at more."""

    name = "csr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None) -> None:
        # Built from the mask (kept zeros stay explicit), which is faster than to_sparse_csr's scan;
        # nonzero() lists entries row by row, so row starts are a sorted search.
        rows, columns = mask.nonzero(as_tuple=True)
        crow = torch.searchsorted(rows, torch.arange(mask.shape[0] + 1, device=mask.device))
        cpu = weight.device.type == "cpu"
        if cpu and rows.numel() < 2**31:  # MKL (LP64) converts int64 indices to int32 on every call
            crow, columns = crow.to(torch.int32), columns.to(torch.int32)
        with _quiet_beta_warning():
            self.matrix = torch.sparse_csr_tensor(crow, columns, weight.detach()[rows, columns], tuple(mask.shape),
                                                  check_invariants=False)
        self.bias = None if bias is None else bias.detach()[:, None]
        self.chunk = CPU_CHUNK_ROWS if cpu else None
        # The native kernel (native_spmm.py) where it runs: float32 weights on an AVX2 CPU, int32 indices.
        self.native = None
        if cpu and weight.dtype == torch.float32 and crow.dtype == torch.int32 and native_spmm.available():
            self.native = native_spmm.pack(rows, columns, self.matrix.values(), tuple(mask.shape))
            self.native_bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # no low-precision CSR kernel: see the module docstring
            with torch.autocast(x.device.type, enabled=False):
                return self._multiply(x.to(self.matrix.dtype))
        return self._multiply(x)

    def _multiply(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out_features = self.matrix.shape[0]
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], out_features)
        if self.matrix.values().numel() == 0:  # nothing kept (global pruning empties whole Linears): the bias
            out = rows.new_zeros(rows.shape[0], out_features)
            out = out if self.bias is None else out.add_(self.bias[:, 0])
        elif self.native is not None:
            out = native_spmm.multiply(rows, self.native, self.native_bias)
        elif self.chunk and self.in_parallel(rows.shape[0]):
            out = _multiply_rows_in_parallel(self.matrix, self.bias, rows)
        else:
            out = _multiply_chunks(self.matrix, self.bias, rows, self.chunk)
        return out.reshape(*x.shape[:-1], out_features)

    def in_parallel(self, frames: int) -> bool:
        """Whether ``frames`` frames run on ATen's multi-threaded kernel: at several intra-op threads, for a
        product of at least :data:`CPU_PARALLEL_MIN_MACS` per thread (a smaller one is not worth the threads)."""
        threads = torch.get_num_threads()
        return threads > 1 and self.matrix.values().numel() * frames >= threads * CPU_PARALLEL_MIN_MACS


# ------------------------------------------------------------------------------ calibration
Timer = Callable[[dict[str, Callable[[], object]]], dict[str, list[float]]]


def time_candidates(runs: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Wall-clock seconds of each run in each of :data:`CALIBRATION_ROUNDS` rounds, after a warm-up each.

    A round runs every candidate back to back, starting with each in turn (no candidate always runs
    first, or right after the same one)."""
    names = list(runs)
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(CALIBRATION_ROUNDS):
        first = round_ % len(names)
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def speed_up(times: dict[str, list[float]]) -> float:
    """CSR's speed-up over dense: the median, over rounds, of their time ratio within a round.

    A ratio within a round cancels a change of machine load that lasts longer than the round, which a
    ratio of two minima taken from different rounds does not (under a load of 3-8 on 2 cores, best-of-5
    ratios for one shape ranged 0.2-5.9 from one calibration to the next; these medians, at 1 thread,
    1.17-1.36 for 768x3072 at 90%). The median needs CSR to win in most rounds, not in a few lucky ones
    (a lower quartile was tried too: 10-15% below the median at 1 thread, it missed real gains of 1.2-1.3x)."""
    return statistics.median(dense / csr for dense, csr in zip(times["dense"], times["csr"]))


# The timer calibrations use: replace it (e.g. in tests) to decide without timing; decisions are cached
# per timer, so a new one decides afresh.
calibration_timer: Timer = time_candidates


@dataclass(frozen=True)
class Calibration:
    """One calibrated decision: the kernel auto runs, CSR's speed-up over dense, the median times, and
    what deciding took (seconds)."""

    choice: str
    speed_up: float  # the lowest over the inputs timed
    dense_seconds: float  # on the shortest input
    csr_seconds: float
    seconds: float
    speed_ups: tuple[float, ...] = ()  # per input timed, in CALIBRATION_FRAMES order (a dense verdict stops early)


_CALIBRATIONS: dict[tuple, Calibration] = {}


def sparsity_bucket(sparsity: float) -> float:
    """The least sparse edge of ``sparsity``'s :data:`SPARSITY_BUCKET` bucket (0.93 -> 0.9)."""
    steps = math.floor(round(sparsity / SPARSITY_BUCKET, 6))  # round first: 0.9 / 0.05 is 17.999999999999996
    return round(steps * SPARSITY_BUCKET, 6)


def calibrations() -> dict[tuple, Calibration]:
    """The current timer's decisions so far, by (out, in, sparsity bucket, threads, dtype, compute dtype,
    device type)."""
    return {key[1:]: value for key, value in _CALIBRATIONS.items() if key[0] is calibration_timer}


def clear_calibrations() -> None:
    """Forget every decision (the next auto plan times again)."""
    _CALIBRATIONS.clear()


def calibrated_choice(shape: tuple[int, int], sparsity: float, dtype: torch.dtype, device: torch.device) -> str:
    """``csr`` or ``dense``: which kernel auto runs for a ``dtype`` weight of ``shape`` and ``sparsity``.

    Timed once per key: the shape, the sparsity's bucket, the current thread count, the weight's dtype,
    the dtype the dense GEMM computes in here (the autocast dtype if on) and the device type."""
    device = torch.device(device)
    key = (calibration_timer, *shape, sparsity_bucket(sparsity), torch.get_num_threads(), dtype,
           _compute_dtype(device.type, dtype), device.type)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = _calibrate(shape, sparsity_bucket(sparsity), dtype, device)
    return _CALIBRATIONS[key].choice


def _calibrate(shape: tuple[int, int], sparsity: float, dtype: torch.dtype, device: torch.device) -> Calibration:
    """Time the dense GEMM against the CSR kernel on a random weight of ``shape`` at ``sparsity``, in the
    caller's autocast state; a CSR kernel that cannot run (no kernel for the dtype) loses."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)  # never the global generator: planning must not move it
    weight = torch.randn(shape, generator=generator).to(device, dtype)
    mask = (torch.rand(shape, generator=generator) >= sparsity).to(device)
    weight.mul_(mask)
    bias = torch.randn(shape[0], generator=generator).to(device, dtype)
    with torch.no_grad():
        csr = _CsrKernel(weight, mask, bias)
        try:
            csr(torch.zeros(1, shape[1], device=device, dtype=dtype))
        except (RuntimeError, NotImplementedError):
            return Calibration("dense", 0.0, math.nan, math.inf, time.perf_counter() - started)
        gains, medians = [], []
        for frames in CALIBRATION_FRAMES:
            x = torch.randn(frames, shape[1], generator=generator).to(device, dtype)
            times = calibration_timer({"dense": lambda: F.linear(x, weight, bias), "csr": lambda: csr(x)})
            gains.append(speed_up(times))
            medians.append((statistics.median(times["dense"]), statistics.median(times["csr"])))
            if gains[-1] < CALIBRATION_MARGIN:
                break
    gain = min(gains)
    return Calibration("csr" if gain >= CALIBRATION_MARGIN else "dense", gain, *medians[0],
                       time.perf_counter() - started, tuple(gains))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear's GEMM runs in here: the autocast dtype if autocast is on, else the weight's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _SemiStructuredKernel:
    """NVIDIA 2:4 sparse tensor cores (CUDA only; untested on this project's CPU machines)."""

    name = "semi_structured"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None) -> None:
        self.matrix = torch.sparse.to_sparse_semi_structured(weight.detach() * mask)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return F.linear(rows, self.matrix, self.bias).reshape(*x.shape[:-1], -1)


class MaskedLinear(nn.Linear):
    """A Linear whose weight is zero where ``mask`` is False; runs dense or through a sparse kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.execution: str | None = None  # None: the environment variable, else auto
        self._kernel: tuple[tuple, Callable[[Tensor], Tensor] | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor) -> "MaskedLinear":
        masked = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype).to_empty(device=linear.weight.device)  # no random init to discard
        with torch.no_grad():
            masked.weight.copy_(linear.weight)
            if linear.bias is not None:
                masked.bias.copy_(linear.bias)
        masked.set_mask(mask)
        return masked

    # ------------------------------------------------------------------------------ the mask
    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask and zero the weights it prunes."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.mask.copy_(mask.to(device=self.mask.device, dtype=torch.bool))
        self.apply_mask_()

    def apply_mask_(self) -> None:
        """Zero the pruned weights in place (the invariant every kernel relies on)."""
        with torch.no_grad():
            self.weight.mul_(self.mask)

    @property
    def num_pruned(self) -> int:
        return self.mask.numel() - int(self.mask.count_nonzero())

    @property
    def sparsity(self) -> float:
        return self.num_pruned / max(1, self.mask.numel())

    # ----------------------------------------------------------------------------- execution
    def kernel_name(self) -> str:
        """The kernel this module runs without autograd on its current device (plans it if needed)."""
        return getattr(self._current_kernel(), "name", "dense")

    def _choose(self, mode: str) -> str:
        weight = self.weight
        if mode == "dense" or weight.numel() == 0:
            return "dense"
        if weight.device.type == "cuda":  # auto: dense, which won at every sparsity measured there
            if mode == "auto":
                return "dense"
            return "semi_structured" if is_two_four(self.mask) else "csr"
        if mode == "sparse":
            return "csr"
        if self.sparsity < CPU_CALIBRATE_FROM:
            return "dense"
        return calibrated_choice(tuple(weight.shape), self.sparsity, weight.dtype, weight.device)

    def _cache_key(self) -> tuple:
        """What the kernel depends on: the mode as set, each tensor's storage, dtype and in-place version, and
        what auto's calibration depends on: the intra-op thread count and the autocast dtype.

        Read on every forward, so it is kept cheap (on a GPU the Python time per Linear is what a short
        forward waits on): direct dictionary reads, no tensor comparisons."""
        weight, bias, mask = self._parameters["weight"], self._parameters["bias"], self._buffers["mask"]
        return (self.execution, os.environ.get(EXECUTION_ENV), weight._version, weight.data_ptr(), weight.device,
                weight.dtype, mask._version, mask.data_ptr(),
                None if bias is None else (bias._version, bias.data_ptr()),
                torch.get_num_threads(), _compute_dtype(weight.device.type, weight.dtype))

    def _current_kernel(self) -> Callable[[Tensor], Tensor] | None:
        """The cached kernel (None: dense), rebuilt when the mode, weights, device, dtype, threads or autocast
        changed."""
        if self._kernel is not None and self._kernel[0] == self._cache_key():
            return self._kernel[1]
        mode = resolve_execution(self.execution)
        choice, kernel = self._choose(mode), None
        if choice == "semi_structured":
            try:
                kernel = _SemiStructuredKernel(self.weight, self.mask, self.bias)
            except (RuntimeError, ValueError, NotImplementedError) as error:
                warnings.warn(f"2:4 sparse kernel unavailable ({error}); using CSR")
                choice = "csr"
        if choice == "csr":
            kernel = _CsrKernel(self.weight, self.mask, self.bias)
        elif choice == "dense":
            self.apply_mask_()  # the plain GEMM relies on pruned weights being exactly zero
        self._kernel = (self._cache_key(), kernel)  # after apply_mask_, which moves the weight's version
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # autograd may record: keep the mask in the graph (zero gradients)
            return F.linear(x, self.weight * self.mask, self.bias)
        kernel = self._current_kernel()
        return F.linear(x, self.weight, self.bias) if kernel is None else kernel(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.3f}"


def masked_linears(model: nn.Module) -> Iterator[tuple[str, MaskedLinear]]:
    """Every :class:`MaskedLinear` of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            yield name, module


def set_execution(model: nn.Module, mode: str | None) -> dict[str, str]:
    """Set every masked Linear's execution mode; returns the kernel each one will run, by name."""
    if mode is not None:
        resolve_execution(mode)
    choices = {}
    for name, module in masked_linears(model):
        module.execution = mode
        choices[name] = module.kernel_name()
    return choices


@contextlib.contextmanager
def forced_execution(model: nn.Module, mode: str) -> Iterator[None]:
    """Run ``model``'s masked Linears in ``mode`` inside the block (e.g. dense, for FLOP counting)."""
    saved = [(module, module.execution) for _, module in masked_linears(model)]
    try:
        for module, _ in saved:
            module.execution = mode
        yield
    finally:
        for module, execution in saved:
            module.execution = execution
