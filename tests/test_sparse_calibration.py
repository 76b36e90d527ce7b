"""The CSR kernel at several threads (ATen's product, rows over torch's intra-op threads) and auto's calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upstream_compressed.model import native_spmm, sparse
from upstream_compressed.model.sparse import (
    CALIBRATION_FRAMES, CALIBRATION_MARGIN, CALIBRATION_ROUNDS, EXECUTION_ENV, MaskedLinear, _CsrKernel, calibrated_choice, calibrations,
    set_execution, sparsity_bucket, speed_up, time_candidates,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """Every test may change torch's thread count: put it back (later tests time at the default)."""
    monkeypatch.delenv(EXECUTION_ENV, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def parallel_for_any_size(monkeypatch):
    """Run torch's CSR products (not the native kernel, tests/test_native_spmm.py), even tiny ones on the
    multi-threaded path (by default they stay on MKL's, one thread)."""
    monkeypatch.setenv(native_spmm.DISABLE_ENV, "0")
    monkeypatch.setattr(sparse, "CPU_PARALLEL_MIN_MACS", 0)


class CountingTimer:
    """A timer that times nothing: it returns fixed times and counts the calibrations asking it."""

    def __init__(self, dense: float = 2.0, csr: float = 1.0) -> None:
        self.dense, self.csr, self.calls = dense, csr, 0

    def __call__(self, runs):
        assert set(runs) == {"dense", "csr"}
        self.calls += 1
        return {"dense": [self.dense], "csr": [self.csr]}


def pruned_weight(out_features: int, in_features: int, sparsity: float = 0.8, seed: int = 0):
    """A random weight with exactly round(sparsity * numel) weights pruned, its mask, and a bias."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    mask = torch.ones(out_features * in_features, dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=generator)[: round(sparsity * mask.numel())]] = False
    mask = mask.reshape(out_features, in_features)
    return weight * mask, mask, torch.randn(out_features, generator=generator)


def masked(out_features: int = 16, in_features: int = 16, sparsity: float = 0.9, seed: int = 0) -> MaskedLinear:
    weight, mask, bias = pruned_weight(out_features, in_features, sparsity, seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return MaskedLinear.from_linear(linear, mask)


# ------------------------------------------------------------------------- the parallel kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(7, 12), (33, 20), (1, 30), (64, 48)])  # 7, 33 rows: not divisible by 2, 3, 4
@pytest.mark.parametrize("bias", [True, False])
def test_the_csr_kernel_equals_the_dense_product_at_every_thread_count(parallel_for_any_size, threads, shape, bias):
    weight, mask, bias_values = pruned_weight(*shape)
    weight[0], mask[0] = 0, False  # an all-zero row (an empty CSR row)
    if shape[0] > 4:
        weight[3:5], mask[3:5] = 0, False  # and two more in a row
    bias_values = bias_values if bias else None
    torch.set_num_threads(threads)
    kernel = _CsrKernel(weight, mask, bias_values)
    for frames in (1, 33, 70):
        x = torch.randn(2, frames, shape[1], generator=torch.Generator().manual_seed(frames))
        with torch.inference_mode():
            out = kernel(x)
        assert out.shape == (2, frames, shape[0]) and out.is_contiguous()
        assert torch.allclose(out, F.linear(x, weight, bias_values), atol=1e-5), frames
        assert kernel.in_parallel(2 * frames) == (threads > 1)  # the multi-threaded path from 2 threads on


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_with_nothing_kept_gives_its_bias_without_a_product(parallel_for_any_size, monkeypatch, bias):
    """Global pruning empties whole Linears of small models: their output is the bias, at no cost."""
    bias_values = torch.arange(5.0) if bias else None
    kernel = _CsrKernel(torch.zeros(5, 8), torch.zeros(5, 8, dtype=torch.bool), bias_values)
    monkeypatch.setattr(sparse, "_multiply_chunks", None)  # neither product may run
    monkeypatch.setattr(sparse, "_multiply_rows_in_parallel", None)
    x = torch.randn(2, 20, 8)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = kernel(x)
        expected = (torch.arange(5.0) if bias else torch.zeros(5)).expand(2, 20, 5)
        assert out.is_contiguous() and torch.equal(out, expected)


def test_cpu_indices_are_int32_which_mkl_takes_without_converting_them():
    weight, mask, bias = pruned_weight(9, 12)
    matrix = _CsrKernel(weight, mask, bias).matrix
    assert matrix.crow_indices().dtype == matrix.col_indices().dtype == torch.int32


def test_small_products_and_one_thread_stay_on_mkls_product():
    weight, mask, bias = pruned_weight(9, 12)
    torch.set_num_threads(2)
    assert not _CsrKernel(weight, mask, bias).in_parallel(1000)  # 22 non-zeros x 1000 frames: not worth threads
    big, big_mask, big_bias = pruned_weight(512, 512, sparsity=0.9)  # 26k non-zeros x 499 frames: 13M MACs
    kernel = _CsrKernel(big, big_mask, big_bias)
    assert kernel.in_parallel(499) and not kernel.in_parallel(100)
    torch.set_num_threads(1)
    assert not kernel.in_parallel(499)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_parallel_path_runs_under_no_grad_and_inference_mode(parallel_for_any_size, context):
    weight, mask, bias = pruned_weight(33, 20)
    torch.set_num_threads(3)
    x = torch.randn(40, 20)
    with context():
        out = _CsrKernel(weight, mask, bias)(x)
    assert torch.allclose(out, F.linear(x, weight, bias), atol=1e-5)


def test_the_parallel_path_runs_in_float32_under_bf16_autocast(parallel_for_any_size):
    weight, mask, bias = pruned_weight(33, 20)
    torch.set_num_threads(2)
    kernel = _CsrKernel(weight, mask, bias)
    x = torch.randn(3, 11, 20).bfloat16()  # what the previous Linear hands on under autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernel(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.linear(x.float(), weight, bias), atol=1e-5)


def test_a_masked_linear_runs_the_parallel_path_like_the_dense_layer(parallel_for_any_size, monkeypatch):
    monkeypatch.setattr(sparse, "calibration_timer", CountingTimer(dense=2.0, csr=1.0))
    module = masked(33, 20, sparsity=0.8)
    torch.set_num_threads(2)
    x = torch.randn(2, 25, 20)
    with torch.no_grad():
        assert module.kernel_name() == "csr"
        assert torch.allclose(module(x), F.linear(x, module.weight * module.mask, module.bias), atol=1e-5)


# ---------------------------------------------------------------------------------- calibration
def test_calibration_picks_dense_when_csr_is_slower_and_csr_when_it_is_faster(monkeypatch):
    monkeypatch.setattr(sparse, "calibration_timer", CountingTimer(dense=1.0, csr=2.0))
    assert calibrated_choice((16, 16), 0.9, torch.float32, CPU) == "dense"
    assert masked().kernel_name() == "dense"
    monkeypatch.setattr(sparse, "calibration_timer", CountingTimer(dense=2.0, csr=1.0))
    assert calibrated_choice((16, 16), 0.9, torch.float32, CPU) == "csr"
    assert masked().kernel_name() == "csr"


@pytest.mark.parametrize(("speed_up", "choice"), [(CALIBRATION_MARGIN - 0.01, "dense"), (CALIBRATION_MARGIN, "csr")])
def test_csr_must_win_by_the_margin(monkeypatch, speed_up, choice):
    monkeypatch.setattr(sparse, "calibration_timer", CountingTimer(dense=speed_up, csr=1.0))
    assert calibrated_choice((16, 16), 0.9, torch.float32, CPU) == choice


def test_forced_modes_ignore_the_calibration(monkeypatch):
    timer = CountingTimer(dense=1.0, csr=2.0)
    monkeypatch.setattr(sparse, "calibration_timer", timer)
    module = masked()
    assert set_execution(nn.Sequential(module), "sparse") == {"0": "csr"}
    assert set_execution(nn.Sequential(module), "dense") == {"0": "dense"}
    assert timer.calls == 0


def test_each_key_is_calibrated_once(monkeypatch):
    timer = CountingTimer()
    monkeypatch.setattr(sparse, "calibration_timer", timer)
    model = nn.Sequential(*(masked(20, 20, sparsity=0.9, seed=seed) for seed in range(4)),  # one key for all four
                          masked(20, 20, sparsity=0.93),  # the same bucket (90-95%)
                          masked(20, 20, sparsity=0.96),  # another bucket
                          masked(20, 40, sparsity=0.9))  # another shape
    assert set(set_execution(model, "auto").values()) == {"csr"}
    assert timer.calls == 3 * len(CALIBRATION_FRAMES)  # 3 keys, each timed on the short and the long input
    with torch.no_grad():
        for module in model:
            module(torch.randn(3, module.in_features))
    set_execution(model, None)
    assert timer.calls == 3 * len(CALIBRATION_FRAMES)  # forwards and re-planning reuse the decisions
    assert sorted(key[:3] for key in calibrations()) == [(20, 20, 0.9), (20, 20, 0.95), (20, 40, 0.9)]


def test_a_new_thread_count_decides_again_and_the_module_follows(monkeypatch):
    """CSR faster at one thread, dense faster at two: the kernel follows torch.set_num_threads."""
    calls = []

    def timer(runs):
        calls.append(torch.get_num_threads())
        return {"dense": [2.0], "csr": [1.0]} if torch.get_num_threads() == 1 else {"dense": [1.0], "csr": [2.0]}

    monkeypatch.setattr(sparse, "calibration_timer", timer)
    module = masked()
    torch.set_num_threads(1)
    assert module.kernel_name() == "csr"
    torch.set_num_threads(2)
    assert module.kernel_name() == "dense"
    torch.set_num_threads(1)
    assert module.kernel_name() == "csr"
    assert calls == [1, 1, 2]  # CSR at 1 thread: short and long input; dense at 2: the short one settles it;
    # back at one thread: the cached decision, no new timing
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), F.linear(x, module.weight * module.mask, module.bias), atol=1e-5)


def test_autocast_decides_for_the_dtype_the_dense_gemm_runs_in(monkeypatch):
    """Calibration runs in the caller's autocast state: under bf16 autocast dense may win where fp32 lost."""

    def timer(runs):
        return {"dense": [1.0], "csr": [2.0]} if torch.is_autocast_enabled("cpu") else {"dense": [2.0], "csr": [1.0]}

    monkeypatch.setattr(sparse, "calibration_timer", timer)
    module = masked()
    assert module.kernel_name() == "csr"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.kernel_name() == "dense"
    assert module.kernel_name() == "csr"
    assert {key[5] for key in calibrations() if key[:2] == (16, 16)} >= {torch.float32, torch.bfloat16}


def test_a_csr_kernel_that_cannot_run_loses(monkeypatch):
    """No CPU CSR product for float16 weights: auto runs such a Linear dense instead of failing."""
    timer = CountingTimer()
    monkeypatch.setattr(sparse, "calibration_timer", timer)
    assert calibrated_choice((16, 16), 0.9, torch.float16, CPU) == "dense"
    assert timer.calls == 0


def test_sparsities_fall_in_buckets_timed_at_their_least_sparse_edge(monkeypatch):
    sparsities = (0.9, 0.93, 0.8999, 0.95, 0.5, 0.0, 1.0)
    assert [sparsity_bucket(s) for s in sparsities] == [0.9, 0.9, 0.85, 0.95, 0.5, 0.0, 1.0]
    seen = []

    def timer(runs):
        runs["csr"]()
        return {"dense": [2.0], "csr": [1.0]}

    real = sparse._CsrKernel

    class Recording(real):
        def __init__(self, weight, mask, bias):
            seen.append(1 - float(mask.float().mean()))
            super().__init__(weight, mask, bias)

    monkeypatch.setattr(sparse, "calibration_timer", timer)
    monkeypatch.setattr(sparse, "_CsrKernel", Recording)
    calibrated_choice((64, 64), 0.93, torch.float32, CPU)
    assert seen and abs(seen[0] - 0.9) < 0.02  # a random mask at 90%, not at the layer's 93%


def test_calibration_leaves_the_global_random_generator_alone():
    state = torch.random.get_rng_state()
    sparse._calibrate((16, 16), 0.9, torch.float32, CPU)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_default_timer_warms_up_then_times_rounds_starting_with_each_run_in_turn():
    order = []
    times = time_candidates({"dense": lambda: order.append("dense"), "csr": lambda: order.append("csr")})
    rounds = [["dense", "csr"] if r % 2 == 0 else ["csr", "dense"] for r in range(CALIBRATION_ROUNDS)]
    assert order == ["dense", "csr"] + [name for round_ in rounds for name in round_]
    assert {name: len(t) for name, t in times.items()} == {"dense": CALIBRATION_ROUNDS, "csr": CALIBRATION_ROUNDS}
    assert all(0 <= t < 0.1 for t in times["dense"] + times["csr"])


def test_the_speed_up_is_the_median_of_the_ratios_within_rounds():
    """A slow round (load) scales both times in it and cancels; minima from different rounds would say 2x."""
    times = {"dense": [1.0, 4.0, 1.1, 0.5, 1.0], "csr": [2.0, 8.0, 2.0, 1.0, 0.25]}  # ratios 0.5 0.5 0.55 0.5 4
    assert speed_up(times) == 0.5
    assert min(times["dense"]) / min(times["csr"]) == 2.0  # what a ratio of minima would have said
    lucky = {"dense": [2.0] * 7, "csr": [1.0, 4.0, 1.0, 4.0, 4.0, 4.0, 1.0]}  # CSR 2x in 3 rounds of 7, 0.5x in 4
    assert speed_up(lucky) == 0.5  # a few lucky rounds are not enough for CSR
    assert speed_up({"dense": [3.0], "csr": [2.0]}) == 1.5


def test_a_real_calibration_is_recorded_with_its_times():
    torch.set_num_threads(1)
    choice = calibrated_choice((64, 48), 0.9, torch.float32, CPU)
    record = calibrations()[(64, 48, 0.9, 1, torch.float32, torch.float32, "cpu")]
    assert record.choice == choice in ("csr", "dense")
    assert record.dense_seconds > 0 and record.csr_seconds > 0 and record.seconds >= record.dense_seconds
    assert (record.choice == "csr") == (record.speed_up >= CALIBRATION_MARGIN) and record.speed_up > 0
    assert record.speed_up == min(record.speed_ups) and len(record.speed_ups) == (2 if record.speed_ups[0] >= CALIBRATION_MARGIN else 1)


def test_csr_must_also_win_on_the_long_input(monkeypatch):
    """A kernel faster on 256 frames but slower on a batch's 2048 (the dense GEMM gains with frames) stays dense."""
    sizes = []

    def timer(runs):
        runs["dense"]()  # what the runs multiply: the calibration's inputs, short then long
        sizes.append(runs["csr"]().shape[0])
        return {"dense": [2.0], "csr": [1.0]} if len(sizes) == 1 else {"dense": [1.0], "csr": [2.0]}

    monkeypatch.setattr(sparse, "calibration_timer", timer)
    assert calibrated_choice((16, 16), 0.9, torch.float32, CPU) == "dense"
    assert sizes == list(CALIBRATION_FRAMES) == [256, 2048]
    record = calibrations()[(16, 16, 0.9, torch.get_num_threads(), torch.float32, torch.float32, "cpu")]
    assert record.speed_ups == (2.0, 0.5) and record.speed_up == 0.5 and record.choice == "dense"
