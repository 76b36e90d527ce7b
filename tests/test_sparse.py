"""MaskedLinear on its own: the mask invariant, the kernel it picks and caches, and the execution modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upstream_compressed.model import native_spmm, sparse
from upstream_compressed.model.sparse import (
    CPU_CALIBRATE_FROM, EXECUTION_ENV, MaskedLinear, _CsrKernel, forced_execution, is_two_four, masked_linears,
    resolve_execution, set_execution,
)


def masked(out_features: int = 8, in_features: int = 12, sparsity: float = 0.5, bias: bool = True,
           seed: int = 0) -> MaskedLinear:
    """A MaskedLinear pruning the first round(sparsity * numel) weights of a random permutation."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    mask = torch.ones(out_features * in_features, dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=generator)[: round(sparsity * mask.numel())]] = False
    return MaskedLinear.from_linear(linear, mask.reshape(out_features, in_features))


def reference(module: MaskedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight.detach() * module.mask, None if module.bias is None else module.bias.detach())


@pytest.fixture(autouse=True)
def no_environment_mode(monkeypatch):
    monkeypatch.delenv(EXECUTION_ENV, raising=False)


def csr_faster(runs):
    return {"dense": [2.0], "csr": [1.0]}


def dense_faster(runs):
    return {"dense": [1.0], "csr": [2.0]}


@pytest.fixture(autouse=True)
def calibration_says_csr(monkeypatch):
    """auto's calibration decides without timing: CSR wins (these tests are about caching, not speed;
    tests/test_sparse_calibration.py tests the calibration itself)."""
    monkeypatch.setattr(sparse, "calibration_timer", csr_faster)


# ------------------------------------------------------------------------------------ the mode
def test_mode_comes_from_the_argument_then_the_environment_then_auto(monkeypatch):
    assert resolve_execution(None) == "auto"
    monkeypatch.setenv(EXECUTION_ENV, "")
    assert resolve_execution(None) == "auto"  # set but empty: as if unset
    monkeypatch.setenv(EXECUTION_ENV, "dense")
    assert resolve_execution(None) == "dense"
    assert resolve_execution("sparse") == "sparse"  # the module's own setting wins


def test_unknown_modes_are_refused_naming_where_they_came_from(monkeypatch):
    with pytest.raises(ValueError, match=r"^sparse_execution: 'fast' is not one of auto\|dense\|sparse$"):
        resolve_execution("fast")
    with pytest.raises(ValueError, match=r"^upstream\.sparse: 'fast' is not one of"):
        resolve_execution("fast", where="upstream.sparse")
    monkeypatch.setenv(EXECUTION_ENV, "csr")
    with pytest.raises(ValueError, match=rf"^{EXECUTION_ENV}: 'csr' is not one of"):
        resolve_execution(None, where="ignored")
    with pytest.raises(ValueError, match="'fast'"):
        set_execution(nn.Sequential(), "fast")  # checked even when there is nothing to set


def test_two_four_means_at_most_two_kept_in_every_group_of_four_inputs():
    assert is_two_four(torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 0, 1, 0]], dtype=torch.bool))
    assert not is_two_four(torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool))  # three in the first group
    assert not is_two_four(torch.tensor([[1, 0, 1, 0, 1, 1, 1, 0]], dtype=torch.bool))  # three in the last group
    assert not is_two_four(torch.zeros(2, 6, dtype=torch.bool))  # inputs not a multiple of 4


# ------------------------------------------------------------------------------------ the mask
def test_from_linear_copies_the_layer_and_zeroes_what_the_mask_prunes():
    linear = nn.Linear(6, 4).double()
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    module = MaskedLinear.from_linear(linear, mask)
    assert module.weight.dtype == torch.float64 and module.mask.dtype == torch.bool
    assert torch.equal(module.weight, linear.weight.detach() * mask) and torch.equal(module.bias, linear.bias.detach())
    assert torch.equal(module.mask, mask) and module.execution is None
    unbiased = MaskedLinear.from_linear(nn.Linear(6, 4, bias=False), mask)
    assert unbiased.bias is None


def test_a_new_masked_linear_prunes_nothing():
    module = MaskedLinear(5, 3)
    assert module.mask.shape == (3, 5) and bool(module.mask.all()) and module.num_pruned == 0
    assert module.sparsity == 0.0 and module.kernel_name() == "dense"


def test_set_mask_takes_any_zero_one_tensor_and_refuses_a_wrong_shape():
    module = masked(sparsity=0.0)
    module.set_mask(torch.eye(8, 12))  # float 0/1: read as booleans
    assert module.mask.dtype == torch.bool and module.num_pruned == 8 * 12 - 8
    assert torch.equal(module.weight != 0, torch.eye(8, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape \(12, 8\) differs from the weight's \(8, 12\)"):
        module.set_mask(torch.ones(12, 8))


def test_sparsity_counts_the_pruned_weights():
    module = masked(4, 4, sparsity=0.75)
    assert module.num_pruned == 12 and module.sparsity == 0.75
    single = MaskedLinear(1, 1)
    single.set_mask(torch.zeros(1, 1))
    assert single.sparsity == 1.0
    assert MaskedLinear(4, 0).sparsity == 0.0  # a layer with nothing left is not "infinitely sparse"
    assert "sparsity=0.750" in repr(module)


# --------------------------------------------------------------------------------- the kernels
def kernels(module: MaskedLinear) -> dict[str, str]:
    return {mode: set_execution(nn.Sequential(module), mode)["0"] for mode in ("auto", "dense", "sparse")}


def test_auto_on_cpu_runs_what_the_calibration_chose_from_the_calibration_floor_on(monkeypatch):
    assert kernels(masked(16, 16, sparsity=0.8)) == {"auto": "csr", "dense": "dense", "sparse": "csr"}
    below = masked(20, 20, sparsity=CPU_CALIBRATE_FROM - 0.01)
    assert kernels(below) == {"auto": "dense", "dense": "dense", "sparse": "csr"}  # not even timed
    at_floor = masked(20, 20, sparsity=CPU_CALIBRATE_FROM)
    assert at_floor.sparsity == CPU_CALIBRATE_FROM and kernels(at_floor)["auto"] == "csr"
    monkeypatch.setattr(sparse, "calibration_timer", dense_faster)
    assert kernels(masked(16, 16, sparsity=0.8)) == {"auto": "dense", "dense": "dense", "sparse": "csr"}


def test_a_layer_with_no_weights_runs_dense_even_when_sparse_is_forced():
    module = MaskedLinear(4, 0)
    module.execution = "sparse"
    with torch.no_grad():
        assert module(torch.randn(3, 4)).shape == (3, 0)
    assert module.kernel_name() == "dense"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frames", [0, 1, 33, 70])
def test_every_kernel_equals_the_masked_dense_layer(bias, frames):
    module = masked(9, 12, sparsity=0.8, bias=bias)
    with torch.no_grad():
        module.weight[0] = 0  # a row with nothing kept (an empty CSR row)
        module.mask[0] = False
        module.weight[5] = 0
        module.mask[5] = False
    x = torch.randn(1, frames, 12, generator=torch.Generator().manual_seed(frames))
    expected = reference(module, x)
    for mode in ("dense", "sparse", "auto"):
        module.execution = mode
        with torch.no_grad():
            out = module(x)
        assert out.shape == (1, frames, 9)
        assert torch.allclose(out, expected, atol=1e-5), mode


def test_the_csr_kernel_is_quiet():
    module = masked(8, 12, sparsity=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = _CsrKernel(module.weight, module.mask, module.bias)
        kernel(torch.randn(40, 12))
    assert [str(w.message) for w in caught] == []


def test_the_kernel_is_chosen_once_and_kept_while_nothing_changes():
    module = masked(16, 16, sparsity=0.9)
    first = module._current_kernel()
    assert first is not None and module._current_kernel() is first
    with torch.no_grad():
        module(torch.randn(3, 16))
    assert module._current_kernel() is first


@pytest.mark.parametrize("change", ["weight", "bias", "mask", "execution", "environment", "dtype", "new weight"])
def test_the_kernel_follows_every_change_it_depends_on(change, monkeypatch):
    module = masked(16, 16, sparsity=0.9)
    x = torch.randn(5, 16)
    with torch.no_grad():
        module(x)  # plans and caches the CSR kernel
        if change == "weight":
            module.weight.mul_(2)
        elif change == "bias":
            module.bias.add_(1)
        elif change == "mask":
            module.set_mask(module.mask & (torch.arange(16) < 8)[None, :])
        elif change == "execution":
            module.execution = "dense"
        elif change == "environment":
            monkeypatch.setenv(EXECUTION_ENV, "dense")
        elif change == "dtype":
            module.double()
            x = x.double()
        else:
            module.weight = nn.Parameter(module.weight * 3)
        expected = reference(module, x)
        assert torch.allclose(module(x), expected, atol=1e-5)
    assert module.kernel_name() == ("dense" if change in ("execution", "environment") else "csr")


def test_dense_execution_restores_zeros_written_into_pruned_weights():
    module = masked(8, 12, sparsity=0.5)
    module.execution = "dense"
    pruned = ~module.mask
    with torch.no_grad():
        module.weight[pruned] = 5.0  # e.g. an optimizer step that ignored the mask
        out = module(torch.randn(4, 12))
    assert torch.equal(module.weight[pruned], torch.zeros(int(pruned.sum())))
    assert out.shape == (4, 8)


def test_training_sees_the_mask_in_the_graph_so_pruned_weights_get_zero_gradients():
    module = masked(8, 12, sparsity=0.9)
    x = torch.randn(4, 12)
    with torch.no_grad():
        module.weight[~module.mask] = 1.0  # even a stray value does not leak into the output
    out = module(x)
    assert torch.allclose(out, reference(module, x), atol=1e-6)
    out.sum().backward()
    assert module.weight.grad is not None
    assert torch.equal(module.weight.grad[~module.mask], torch.zeros(int((~module.mask).sum())))
    assert bool((module.weight.grad[module.mask] != 0).any())


# ------------------------------------------------------------------------------ whole models
def model_of_three() -> nn.Sequential:
    return nn.Sequential(masked(16, 16, sparsity=0.9, seed=1), nn.Linear(16, 16), nn.Sequential(masked(16, 16, 0.1)))


def test_masked_linears_lists_only_the_masked_ones_with_their_names():
    model = model_of_three()
    assert [(name, module) for name, module in masked_linears(model)] == [("0", model[0]), ("2.0", model[2][0])]


def test_set_execution_sets_every_masked_linear_and_reports_its_kernel():
    model = model_of_three()
    assert set_execution(model, "sparse") == {"0": "csr", "2.0": "csr"}
    assert model[0].execution == "sparse" and model[2][0].execution == "sparse"
    assert set_execution(model, None) == {"0": "csr", "2.0": "dense"}  # back to auto
    assert model[0].execution is None


def test_forced_execution_applies_inside_the_block_and_restores_afterwards():
    model = model_of_three()
    model[0].execution = "sparse"
    with forced_execution(model, "dense"):
        assert [m.execution for _, m in masked_linears(model)] == ["dense", "dense"]
    assert [m.execution for _, m in masked_linears(model)] == ["sparse", None]
    with pytest.raises(RuntimeError):
        with forced_execution(model, "dense"):
            raise RuntimeError("interrupted")
    assert [m.execution for _, m in masked_linears(model)] == ["sparse", None]


def test_the_csr_matrix_built_without_invariant_checks_is_well_formed():
    module = masked(9, 12, sparsity=0.8)
    with torch.no_grad():
        module.mask[0] = False  # an empty first row
        module.apply_mask_()
    matrix = _CsrKernel(module.weight, module.mask, module.bias).matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the beta notice
        checked = torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), matrix.values(), matrix.shape,
                                          check_invariants=True)  # raises if the rows' starts or columns are wrong
    assert torch.equal(checked.to_dense(), module.weight.detach() * module.mask)


@pytest.mark.parametrize("bias", [True, False])
def test_the_csr_kernel_multiplies_cpu_frames_in_chunks_of_cpu_chunk_rows(monkeypatch, bias):
    """CPU_CHUNK_ROWS frames at a time (the activations it streams stay in cache); the last chunk is the rest."""
    from upstream_compressed.model.sparse import CPU_CHUNK_ROWS

    monkeypatch.setenv(native_spmm.DISABLE_ENV, "0")  # torch's products, where the native kernel cannot run
    module = masked(9, 12, sparsity=0.8, bias=bias)
    module.execution = "sparse"
    x = torch.randn(2, 50, 12, generator=torch.Generator().manual_seed(0))
    chunks = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, real=real: chunks.append(args[-1].shape[1]) or real(*args))
    with torch.no_grad():
        out = module(x)
    monkeypatch.undo()
    assert chunks == [CPU_CHUNK_ROWS] * 3 + [100 - 3 * CPU_CHUNK_ROWS]
    assert torch.allclose(out, reference(module, x), atol=1e-5)


def test_auto_choosing_dense_also_restores_zeros_written_into_pruned_weights(monkeypatch):
    monkeypatch.setattr(sparse, "calibration_timer", dense_faster)
    module = masked(8, 12, sparsity=0.5)
    assert module.kernel_name() == "dense"
    pruned = ~module.mask
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.weight[pruned] = 5.0  # e.g. an optimizer step that ignored the mask
        out = module(x)
    assert torch.equal(module.weight[pruned], torch.zeros(int(pruned.sum())))
    assert torch.allclose(out, reference(module, x), atol=1e-5)


def test_the_cached_kernel_follows_a_new_bias_parameter():
    module = masked(16, 16, sparsity=0.9)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        module(x)  # plans and caches the CSR kernel, which holds the bias
        module.bias = nn.Parameter(module.bias + 1)
        assert torch.allclose(module(x), reference(module, x), atol=1e-5)
    assert module.kernel_name() == "csr"


def test_a_masked_linear_is_built_on_the_device_it_is_given():
    """from_linear builds on "meta" (no memory, no random init) and then moves: weight, bias and mask all follow."""
    module = MaskedLinear(12, 8, device="meta")
    assert {t.device.type for t in (module.weight, module.bias, module.mask)} == {"meta"}
    assert module.mask.dtype == torch.bool and module.mask.shape == (8, 12)
