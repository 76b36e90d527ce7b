"""The native CSR kernel (model/spmm.c through model/native_spmm.py): its products, its build cache, its fallbacks."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from upstream_compressed.model import native_spmm
from upstream_compressed.model.native_spmm import CACHE_ENV, DISABLE_ENV, PANEL_INPUTS
from upstream_compressed.model.sparse import MaskedLinear, _CsrKernel

def _why_not_here() -> str | None:
    compiler = os.environ.get("CC") or "cc"
    return native_spmm.unsupported_reason() or (None if shutil.which(compiler) else f"no C compiler {compiler!r}")


needs_native = pytest.mark.skipif(_why_not_here() is not None, reason=f"the native kernel cannot run here: {_why_not_here()}")


@pytest.fixture(autouse=True)
def restore_threads_and_library(monkeypatch):
    """Tests change the thread count and the cached library: put both back for the tests after."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    native_spmm._load.cache_clear()


def pruned(out_features: int, in_features: int, sparsity: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    mask = torch.rand(out_features, in_features, generator=generator) >= sparsity
    return weight * mask, mask, torch.randn(out_features, generator=generator)


# --------------------------------------------------------------------------------- the product
@needs_native
@pytest.mark.parametrize("shape", [(37, 13), (129, 300), (768, 768), (8, 3 * PANEL_INPUTS + 5), (300, 8)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_native_product_equals_the_dense_one(shape, threads):
    """Odd shapes on purpose: inputs not a multiple of 8 or of a panel (300, 389), outputs not a multiple of a tile's
    rows (37, 129, 300), frames not a multiple of 8 or of a tile's 64 (1, 7, 65, 130); some rows empty."""
    weight, mask, bias = pruned(*shape, sparsity=0.85)
    weight[: shape[0] // 3], mask[: shape[0] // 3] = 0, False  # whole rows with nothing kept
    torch.set_num_threads(threads)
    kernel = _CsrKernel(weight, mask, bias)
    assert kernel.native is not None and kernel.native.panels == -(-shape[1] // PANEL_INPUTS)
    for frames in (1, 7, 8, 64, 65, 130, 499):
        x = torch.randn(frames, shape[1], generator=torch.Generator().manual_seed(frames))
        with torch.inference_mode():
            out = kernel(x)
        assert out.shape == (frames, shape[0]) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_native
def test_without_a_bias_and_on_a_non_contiguous_batch():
    weight, mask, _ = pruned(40, 24, sparsity=0.9)
    kernel = _CsrKernel(weight, mask, None)
    x = torch.randn(24, 3, 50).permute(1, 2, 0)  # batch x frames x in, not contiguous
    with torch.inference_mode():
        out = kernel(x)
    assert out.shape == (3, 50, 40)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@needs_native
def test_a_masked_linear_runs_the_native_kernel_and_follows_a_new_mask():
    weight, mask, bias = pruned(64, 48, sparsity=0.9)
    linear = torch.nn.Linear(48, 64)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.copy_(bias)
    module = MaskedLinear.from_linear(linear, mask)
    module.execution = "sparse"
    x = torch.randn(2, 70, 48)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        assert module._current_kernel().native is not None
        module.set_mask(mask & (torch.rand(64, 48) > 0.5))  # prune further: the packed matrix must follow
        torch.testing.assert_close(module(x), F.linear(x, module.weight, bias), rtol=1e-5, atol=1e-5)


def test_multiply_refuses_inputs_it_cannot_read():
    weight, mask, bias = pruned(8, 16, sparsity=0.5)
    rows, columns = mask.nonzero(as_tuple=True)
    matrix = native_spmm.pack(rows, columns, weight[rows, columns], (8, 16))
    with pytest.raises(ValueError, match=r"^rows must be a CPU float32 matrix with 16 columns, not torch.float64"):
        native_spmm.multiply(torch.randn(4, 16, dtype=torch.float64), matrix, bias)
    with pytest.raises(ValueError, match=r"with 16 columns, not torch.float32 \(4, 15\)"):
        native_spmm.multiply(torch.randn(4, 15), matrix, bias)
    with pytest.raises(ValueError, match=r"^bias must be float32 with 8 values$"):
        native_spmm.multiply(torch.randn(4, 16), matrix, torch.randn(7))


def test_pack_sorts_the_non_zeros_by_panel_then_row():
    mask = torch.zeros(3, PANEL_INPUTS + 2, dtype=torch.bool)
    mask[0, [1, PANEL_INPUTS + 1]] = True
    mask[2, [0, PANEL_INPUTS]] = True
    weight = torch.arange(mask.numel(), dtype=torch.float32).reshape(mask.shape) * mask
    rows, columns = mask.nonzero(as_tuple=True)
    matrix = native_spmm.pack(rows, columns, weight[rows, columns], tuple(mask.shape))
    assert matrix.panels == 2
    assert matrix.columns.tolist() == [1, 0, PANEL_INPUTS + 1, PANEL_INPUTS]  # panel 0 (rows 0, 2), then panel 1
    assert matrix.crow.tolist() == [0, 1, 1, 2, 3, 3, 4]  # (panel, row) starts
    assert matrix.values.tolist() == [weight[0, 1], weight[2, 0], weight[0, PANEL_INPUTS + 1], weight[2, PANEL_INPUTS]]
    assert matrix.crow.dtype == matrix.columns.dtype == torch.int32


# ---------------------------------------------------------------------------- build and cache
@needs_native
def test_the_library_is_built_once_into_the_cache_readable_by_all(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    native_spmm._load.cache_clear()
    assert native_spmm.available()
    built = native_spmm.library_path()
    assert built.parent == tmp_path and built.name.startswith("spmm-") and built.suffix == ".so"
    assert stat.S_IMODE(built.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == [built.name]  # no temporary file left
    first = built.stat().st_ino, built.stat().st_mtime_ns
    native_spmm._load.cache_clear()  # a new process: finds the library, does not build it again
    assert native_spmm.available() and (built.stat().st_ino, built.stat().st_mtime_ns) == first


@needs_native
def test_processes_building_at_once_each_load_a_whole_library(tmp_path):
    """torchrun starts one process per GPU, all building at once: the renames make each see a complete file."""
    code = ("import torch; from upstream_compressed.model import native_spmm as n, sparse as s; "
            "w = torch.randn(16, 16); m = torch.rand(16, 16) > 0.8; k = s._CsrKernel(w * m, m, None); "
            "x = torch.randn(5, 16); assert k.native is not None; "
            "assert torch.allclose(k(x), torch.nn.functional.linear(x, w * m), atol=1e-5)")
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".so" and not p.name.startswith(".")]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spmm-")]


@needs_native
def test_a_failed_build_warns_once_and_the_kernel_falls_back_to_torchs_product(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native_spmm._load.cache_clear()
    weight, mask, bias = pruned(20, 12, sparsity=0.8)
    with pytest.warns(RuntimeWarning, match=r"the native sparse kernel could not be built or loaded \(no C compiler"):
        kernel = _CsrKernel(weight, mask, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second kernel is quiet
        second = _CsrKernel(weight, mask, bias)
    x = torch.randn(30, 12)
    assert kernel.native is None and second.native is None
    torch.testing.assert_close(kernel(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []


@needs_native
def test_a_compiler_error_is_quoted(tmp_path, monkeypatch):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'spmm.c:1: boom' >&2\nexit 3\n")
    failing.chmod(0o755)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(failing))
    native_spmm._load.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"failed \(3\): spmm.c:1: boom"):
        assert not native_spmm.available()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary file is gone


def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert native_spmm.unsupported_reason() == f"{DISABLE_ENV}=0" and not native_spmm.available()
    weight, mask, bias = pruned(20, 12, sparsity=0.8)
    kernel = _CsrKernel(weight, mask, bias)
    assert kernel.native is None
    x = torch.randn(30, 12)
    torch.testing.assert_close(kernel(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_other_dtypes_stay_on_torchs_product():
    weight, mask, bias = pruned(20, 12, sparsity=0.8)
    kernel = _CsrKernel(weight.double(), mask, bias.double())
    assert kernel.native is None
    x = torch.randn(30, 12, dtype=torch.float64)
    torch.testing.assert_close(kernel(x), F.linear(x, weight.double(), bias.double()))



@needs_native
def test_an_unwritable_cache_says_which_folder_and_how_to_move_it(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocked / "kernels"))
    native_spmm._load.cache_clear()
    with pytest.warns(RuntimeWarning, match=rf"Set CC to a working C compiler, {CACHE_ENV} to a writable folder "
                                            rf"\(now {blocked / 'kernels'}\)"):
        assert not native_spmm.available()


@needs_native
def test_a_cached_library_others_can_write_is_not_loaded(tmp_path, monkeypatch):
    """Loading a library runs its code: one that another user could have replaced is refused, with what to do."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    native_spmm._load.cache_clear()
    assert native_spmm.available()
    built = native_spmm.library_path()
    built.chmod(0o777)
    native_spmm._load.cache_clear()
    with pytest.warns(RuntimeWarning, match=rf"{built} belongs to uid \d+ or is writable by others \(mode 0o777\); "
                                            rf"not loading it: delete it or point {CACHE_ENV} at a folder of your own"):
        assert not native_spmm.available()


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_a_long_input_runs_in_chunks_that_give_the_same_product(threads):
    """Past CHUNK_FRAMES frames the kernel is called per chunk (each chunk's data stays in cache): 1100 frames are
    two whole chunks and a short one; the chunk boundaries must not show in the product."""
    weight, mask, bias = pruned(37, 300, sparsity=0.9)
    torch.set_num_threads(threads)
    rows, columns = mask.nonzero(as_tuple=True)
    matrix = native_spmm.pack(rows, columns, weight[rows, columns], (37, 300))
    x = torch.randn(2 * native_spmm.CHUNK_FRAMES + 76, 300)
    torch.testing.assert_close(native_spmm.multiply(x, matrix, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
