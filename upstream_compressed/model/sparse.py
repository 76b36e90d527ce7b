"""Masked Linear layers (weight pruning) and the kernels that run them.

A :class:`MaskedLinear` is an ``nn.Linear`` with a boolean ``mask`` buffer; its weight is zero
wherever the mask is False. Whenever autograd may be recording (training, recovery), it computes
``linear(x, weight * mask)``: the gradient of a pruned weight is then exactly zero, so optimizers
(SGD, Adam, AdamW with its decoupled decay, which multiplies zero) never move it away from zero.
Without autograd it runs a kernel chosen once and cached until the weights change:

- ``dense``: the ordinary GEMM on the (already zero-filled) weight;
- ``csr`` (CPU, or CUDA when forced): ``torch.addmm`` with the weight as a ``sparse_csr`` tensor;
- ``semi_structured`` (CUDA, 2:4 masks, fp16/bf16): ``torch.sparse.to_sparse_semi_structured``.

The execution mode (``auto``, ``dense``, ``sparse``) is the module's ``execution`` attribute when
set (from the upstream's ``-g`` option ``sparse_execution``), else the environment variable
:data:`EXECUTION_ENV`, else ``auto``: CSR on CPU from :data:`CPU_MIN_SPARSITY` on, dense otherwise
and always dense on CUDA (no sparse kernel won there; the measurement is noted below).
``sparse`` forces CSR (or 2:4 on CUDA where the mask allows it), ``dense`` the GEMM.

Under ``torch.autocast`` (the upstream's ``precision: bf16|fp16``) the dense path runs in the autocast
dtype like any Linear, but the CSR kernel runs in float32: torch's sparse CSR matmul has no bf16/fp16
kernel on CPU (``"addmm_out_sparse_csr_impl_mkl" not implemented for 'BFloat16'``), so autocast is
switched off around it and its input cast up; its output is float32 and the next op casts it down again.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXECUTION_MODES = ("auto", "dense", "sparse")
EXECUTION_ENV = "UPSTREAM_COMPRESSED_SPARSE_EXECUTION"
# Measured on the project's 2-core AMD EPYC CPU, 1 thread, HuBERT Base shapes, 10 s of audio
# (benchmarks/weight_pruning.py): chunked CSR breaks even with dense GEMM at about 70% sparsity for
# all three shapes (0.8x at 60%, 1.2x at 75%, 1.5x at 80%); 75% leaves a margin for noise.
CPU_MIN_SPARSITY = 0.75
# On CUDA no sparse kernel beats cuBLAS at these shapes (one NVIDIA H200, torch 2.11, 499 frames,
# benchmarks/weight_pruning.py --device cuda): cuSPARSE CSR runs the 72 Linears 0.22x as fast as
# dense at 90% sparsity and 0.33x at 95% (fp32), the 2:4 kernels 0.05x (fp16), so auto stays dense.
# CSR on CPU is fastest when the activations it streams stay in cache: multiply this many frames
# at a time (measured: 32 frames beat one call over all 499 frames by 1.1-1.5x at 90% sparsity).
CPU_CHUNK_ROWS = 32


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


class _CsrKernel:
    """``addmm(bias, W_csr, x^T)^T``, over chunks of frames on CPU."""

    name = "csr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None) -> None:
        # Built from the mask (kept zeros stay explicit), which is faster than to_sparse_csr's scan;
        # nonzero() lists entries row by row, so row starts are a sorted search.
        rows, columns = mask.nonzero(as_tuple=True)
        crow = torch.searchsorted(rows, torch.arange(mask.shape[0] + 1, device=mask.device))
        with _quiet_beta_warning():
            self.matrix = torch.sparse_csr_tensor(crow, columns, weight.detach()[rows, columns], tuple(mask.shape),
                                                  check_invariants=False)
        self.bias = None if bias is None else bias.detach()[:, None]
        self.chunk = CPU_CHUNK_ROWS if weight.device.type == "cpu" else None

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
        chunks = rows.split(self.chunk) if self.chunk else (rows,)
        with _quiet_beta_warning():
            pieces = [
                (torch.mm(self.matrix, c.T) if self.bias is None else torch.addmm(self.bias, self.matrix, c.T)).T
                for c in chunks
            ]
        return torch.cat(pieces).reshape(*x.shape[:-1], out_features)


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
        if mode == "sparse" or self.sparsity >= CPU_MIN_SPARSITY:
            return "csr"
        return "dense"

    def _cache_key(self) -> tuple:
        """What the kernel depends on: the mode as set, and each tensor's storage, dtype and in-place version.

        Read on every forward, so it is kept cheap (on a GPU the Python time per Linear is what a short
        forward waits on): direct dictionary reads, no tensor comparisons."""
        weight, bias, mask = self._parameters["weight"], self._parameters["bias"], self._buffers["mask"]
        return (self.execution, os.environ.get(EXECUTION_ENV), weight._version, weight.data_ptr(), weight.device,
                weight.dtype, mask._version, mask.data_ptr(), None if bias is None else (bias._version, bias.data_ptr()))

    def _current_kernel(self) -> Callable[[Tensor], Tensor] | None:
        """The cached kernel (None: dense), rebuilt when the mode, weights, device or dtype changed."""
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
