"""Our own CPU kernel for a pruned Linear's CSR product (``spmm.c``): built on first use, cached, loaded with ctypes.

Why a kernel of our own: torch's CSR products do not scale with cores and stay slow per core. On the project's
2-core AMD EPYC (AVX2 + FMA), 499 frames, HuBERT Base's three Linear shapes at 90% sparsity, MKL's
``mkl_sparse_s_mm`` (torch's ``addmm`` on a ``sparse_csr`` weight) ran at about 5 GMAC/s per core against the
dense GEMM's 35-40, and neither it nor ATen's own CSR product gained from a second core (the dense GEMM gains
1.5-1.9x), so CSR's speed-up over dense fell as threads were added. ``spmm.c`` keeps 64 frames of an output row
in registers across the row's non-zeros (8 loads and 8 fused multiply-adds per non-zero, the input transposed
once so those frames are contiguous) and splits tiles of frames x rows over the OpenMP threads torch itself
uses: about 15 GMAC/s per core here (the dense GEMM: 45), 3.48x faster than dense at 1 thread and 3.20x at 2
for HuBERT Base's Linears at 90% sparsity, where torch's products gave 1.66x and 1.21x in the same rounds; on a
2-core EPYC with AVX-512 (the same AVX2 build) 3.52x and 3.65x, torch's 1.91x and 1.47x
(``benchmarks/weight_pruning.py``).

It is plain C with no torch headers, so it compiles in about a second with the system's C compiler
(``$CC``, else ``cc``) the first time a CSR kernel is built, into a cache folder (:data:`CACHE_ENV`, else
``$XDG_CACHE_HOME/upstream_compressed/kernels``, else ``~/.cache/...``); the file is named by a hash of the
source, the flags and the compiler's version, and written under a temporary name then renamed, so processes
started together (torchrun, Slurm arrays) never load a half-written library; a cached library that
another user owns or could write is not loaded (its code would run in this process). It links OpenMP by the name
``libgomp.so.1``, which is the copy torch already loaded, so both run on one thread pool (checked in
``/proc/self/maps`` with torch's pip wheel; a torch built on another OpenMP runtime would bring the
system's libgomp beside it, whose threads then compete with torch's). Where it cannot run
(not x86-64 Linux, a CPU without AVX2/FMA, no compiler, or :data:`DISABLE_ENV` set to ``0``) the CSR kernel
falls back to torch's products (``sparse.py``); a failed build warns once with the compiler's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("spmm.c")
DISABLE_ENV = "UPSTREAM_COMPRESSED_NATIVE_SPMM"  # "0": never build or use the kernel
CACHE_ENV = "UPSTREAM_COMPRESSED_KERNEL_CACHE"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
SYMBOL = "upstream_compressed_spmm"
_ARGUMENTS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
# Inputs per panel: a panel's 64 frames are 512 x 64 floats = 128 KiB, which stay in a core's L2 cache while a
# tile's rows take their non-zeros there (fc2's 3072 inputs are 768 KiB). Measured on the 2-core EPYC at one
# thread (HuBERT Base's shapes, 499 frames, side by side in one process, input then transposed whole rather
# than in blocks of 64 frames): 90% sparsity 2.70x over dense
# with 512 against 2.59x without panels, 2.70x with 256 and 2.60x with 128 (one L1: too few non-zeros per
# row and panel); 95% 4.39x against 4.34x, 4.27x and 3.84x; fc2 alone 2.54x against 2.18x at 90%.
PANEL_INPUTS = 512
# Frames per call of the kernel: a longer input runs in chunks, so that each chunk's input, its transposed copy
# and its output stay in the last-level cache. Measured on the 2-core EPYC at 2 threads, fc1 / fc2 at 90%
# sparsity, 3999 frames (the frames of a SUPERB batch of 8 x 10 s) in one call: 2.01x / 2.06x over dense,
# against 3.3x at 499 frames; 60% sparsity went from 1.27x / 1.18x at 256 frames to 1.00x / 0.84x at 4096.
CHUNK_FRAMES = 512


@dataclass(frozen=True)
class PanelCsr:
    """A weight's non-zeros sorted by (input panel, row, column), as ``spmm.c`` reads them."""

    crow: Tensor  # int32, panels * out + 1: where each (panel, row)'s non-zeros start
    columns: Tensor  # int32
    values: Tensor  # float32
    shape: tuple[int, int]  # (out, in)
    panels: int


def pack(rows: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> PanelCsr:
    """The :class:`PanelCsr` of a weight of ``shape`` with non-zeros ``values`` at (``rows``, ``columns``)."""
    out_features, in_features = shape
    if values.numel() >= 2**31:
        raise ValueError(f"{values.numel()} non-zeros: int32 indices hold fewer than 2**31")
    panels = max(1, -(-in_features // PANEL_INPUTS))
    rows, columns = rows.to(torch.int64), columns.to(torch.int64)
    key = columns // PANEL_INPUTS * out_features + rows
    order = torch.argsort(key * in_features + columns)
    crow = torch.searchsorted(key[order], torch.arange(panels * out_features + 1))
    return PanelCsr(crow.to(torch.int32), columns[order].to(torch.int32).contiguous(),
                    values.detach()[order].to(torch.float32).contiguous(), (out_features, in_features), panels)


def unsupported_reason() -> str | None:
    """Why this process cannot run the kernel, or None if it can (it may still fail to build)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs a CPU with AVX2 and FMA (torch reports {capability})"
    return None


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "upstream_compressed" / "kernels"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def library_path() -> Path:
    """The cached library for this source, these flags and this compiler."""
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"no C compiler {_compiler()!r} ({error}); set CC to one") from error
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_dir() / f"spmm-{digest}.so"


def build(path: Path) -> None:
    """Compile ``spmm.c`` to ``path`` (atomically: a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".spmm-", suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        result = subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.chmod(temporary, 0o755)  # mkstemp makes it 0600; a shared cache needs it readable by others
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_owned(path: Path) -> None:
    """Refuse a library another user could have written: loading it runs its code in this process."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{path} belongs to uid {info.st_uid} or is writable by others (mode "
                           f"{oct(info.st_mode & 0o777)}); not loading it: delete it or point {CACHE_ENV} at a "
                           "folder of your own")


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        path = library_path()
        if not path.exists():
            build(path)
        check_owned(path)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"the native sparse kernel could not be built or loaded ({error}); pruned Linears run torch's "
                      f"CSR product instead, which is slower. Set CC to a working C compiler, {CACHE_ENV} to a "
                      f"writable folder (now {cache_dir()}), or {DISABLE_ENV}=0 to stop trying.",
                      RuntimeWarning, stacklevel=3)
        return None
    function = getattr(library, SYMBOL)
    function.restype, function.argtypes = None, _ARGUMENTS
    return library


def available() -> bool:
    """Whether CSR products on this CPU run the native kernel (builds it on the first call that can)."""
    return unsupported_reason() is None and _load() is not None


def multiply(rows: Tensor, matrix: PanelCsr, bias: Tensor | None) -> Tensor:
    """``rows @ W^T + bias`` (frames x out) on torch's intra-op thread count; ``rows``: frames x in, float32."""
    library = _load()
    if library is None:
        raise RuntimeError("the native sparse kernel is not available (see available())")
    out_features, in_features = matrix.shape
    if rows.dim() != 2 or rows.shape[1] != in_features or rows.dtype != torch.float32 or rows.device.type != "cpu":
        raise ValueError(f"rows must be a CPU float32 matrix with {in_features} columns, not {rows.dtype} "
                         f"{tuple(rows.shape)} on {rows.device}")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != out_features):
        raise ValueError(f"bias must be float32 with {out_features} values")
    rows = rows.contiguous()
    bias = None if bias is None else bias.contiguous()
    frames = rows.shape[0]
    out = rows.new_empty(frames, out_features)
    if frames == 0:
        return out
    chunk = min(frames, CHUNK_FRAMES)
    scratch = rows.new_empty(-(-chunk // 64) * in_features * 64)  # blocks of 64 frames (spmm.c)
    function, threads, item = getattr(library, SYMBOL), torch.get_num_threads(), rows.element_size()
    for start in range(0, frames, chunk):
        count = min(chunk, frames - start)
        function(rows.data_ptr() + start * in_features * item, count, in_features, matrix.crow.data_ptr(),
                 matrix.columns.data_ptr(), matrix.values.data_ptr(), None if bias is None else bias.data_ptr(),
                 out_features, matrix.panels, scratch.data_ptr(), out.data_ptr() + start * out_features * item,
                 threads)
    return out
