"""The upstream's ``precision`` option (``-g`` yaml, else ``UPSTREAM_COMPRESSED_PRECISION``, else fp32).

bf16 / fp16 run the forward under ``torch.autocast`` and return float32 hidden states within 2% relative
error (norm of the difference over the norm, per hidden state and utterance, on valid frames) of fp32;
fp32 runs no autocast at all, so it equals the upstream without the option bit for bit. Weight-pruned
Linears on the CSR kernel stay in float32 inside autocast (torch has no bf16/fp16 CSR matmul on CPU).
bf16 on this project's AVX2-only CPUs is emulated (slow): inputs are kept short.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from upstream_compressed import expert
from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import DeltaError, write_delta
from upstream_compressed.expert import PRECISION_ENV, UpstreamExpert, check_precision, native_on_cpu
from upstream_compressed.model import sparse
from upstream_compressed.model.sparse import MaskedLinear, masked_linears
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.checkpoints import HUBERT_BASE, make_hubert_checkpoint, make_melhubert_checkpoint
from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint

TOLERANCE = 0.02  # relative error of bf16/fp16 against fp32
ALLOWED = r"is not one of fp32\|bf16\|fp16"


@pytest.fixture(autouse=True)
def no_precision_env(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)


@pytest.fixture(autouse=True)
def quiet_emulation(monkeypatch):
    """The emulation warning is tested on its own; elsewhere it is already given (this CPU may lack bf16)."""
    monkeypatch.setattr(expert, "_warned_emulated", {"bf16", "fp16"})


def _identity_delta(ckpt, tmp_path, steps=()):
    recipe = parse_recipe({"base": str(ckpt), "steps": list(steps)})
    return write_delta(run_recipe(recipe, work_dir=tmp_path / "work"), tmp_path / "delta.safetensors")


@pytest.fixture(scope="module")
def tiny_delta(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    return _identity_delta(make_hubert_checkpoint(directory / "hubert.pt"), directory)


def options(tmp_path, text: str) -> str:
    path = tmp_path / f"options{abs(hash(text))}.yaml"
    path.write_text(text)
    return str(path)


def build(hub, entry: str, delta, model_config: str | None = None) -> UpstreamExpert:
    return getattr(hub, entry)(ckpt=str(delta), model_config=model_config, refresh=False).eval()


def forward(upstream, wavs) -> dict:
    with torch.inference_mode():
        return upstream([w.clone() for w in wavs])


def relative_errors(got: dict, reference: dict) -> list[float]:
    """Per hidden state, the largest over utterances of |got - ref| / |ref| on that utterance's valid frames."""
    valid = reference["pad_mask"]
    assert torch.equal(got["pad_mask"], valid)
    errors = []
    for a, b in zip(got["hidden_states"], reference["hidden_states"], strict=True):
        errors.append(max(((a[i][v] - b[i][v]).norm() / b[i][v].norm()).item() for i, v in enumerate(valid)))
    return errors


def assert_float32_and_close(got: dict, reference: dict) -> list[float]:
    assert all(state.dtype == torch.float32 for state in got["hidden_states"])
    assert got["last_hidden_state"].dtype == torch.float32
    assert got["last_hidden_state"] is got["hidden_states"][-1]
    errors = relative_errors(got, reference)
    assert max(errors) < TOLERANCE, errors
    assert min(errors) > 1e-4, f"no rounding at all: the forward did not run in low precision ({errors})"
    return errors


# -------------------------------------------------------------------------------- tiny HuBERT
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_returns_float32_hidden_states_close_to_fp32(tmp_path, s3prl_hub, tiny_delta, padded_batch,
                                                                   precision):
    reference = forward(build(s3prl_hub, "hubert_identity", tiny_delta), padded_batch)
    upstream = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, f"precision: {precision}\n"))
    assert upstream.precision == precision
    assert_float32_and_close(forward(upstream, padded_batch), reference)


def test_s3prls_featurizer_runs_unchanged_on_a_bf16_upstream(tmp_path, s3prl_hub, tiny_delta, padded_batch):
    from s3prl.upstream.interfaces import Featurizer

    upstream = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: bf16\n"))
    featurizer = Featurizer(upstream, upstream_device="cpu")  # probes the upstream with 1 s of audio
    with torch.no_grad():
        features = featurizer(padded_batch, upstream(padded_batch))
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in features)


def test_fp32_default_is_bit_identical_to_no_option_and_to_the_model_itself(tmp_path, s3prl_hub, tiny_delta,
                                                                            padded_batch):
    plain = build(s3prl_hub, "hubert_identity", tiny_delta)
    explicit = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: fp32\n"))
    assert plain.precision == explicit.precision == "fp32"
    a, b = forward(plain, padded_batch), forward(explicit, padded_batch)
    lengths = torch.tensor([len(w) for w in padded_batch])
    with torch.inference_mode():
        raw, _ = plain.model(torch.nn.utils.rnn.pad_sequence(padded_batch, batch_first=True), lengths)
    for x, y, z in zip(a["hidden_states"], b["hidden_states"], raw, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_the_environment_variable_sets_the_precision(tmp_path, s3prl_hub, tiny_delta, padded_batch, monkeypatch):
    reference = forward(build(s3prl_hub, "hubert_identity", tiny_delta), padded_batch)
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    upstream = build(s3prl_hub, "hubert_identity", tiny_delta)
    assert upstream.precision == "bf16"
    assert_float32_and_close(forward(upstream, padded_batch), reference)


def test_the_yaml_beats_the_environment(tmp_path, s3prl_hub, tiny_delta, padded_batch, monkeypatch):
    reference = forward(build(s3prl_hub, "hubert_identity", tiny_delta), padded_batch)
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    upstream = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: fp32\n"))
    assert upstream.precision == "fp32"
    for x, y in zip(forward(upstream, padded_batch)["hidden_states"], reference["hidden_states"], strict=True):
        assert torch.equal(x, y)
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    assert build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: bf16\n")).precision == "bf16"
    # null means "not given": the environment's value then
    assert build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: null\n")).precision == "fp16"


@pytest.mark.parametrize("value", ["fp64", "float16", "BF16", "16"])
def test_an_unknown_value_is_refused_before_any_work_naming_the_field_and_the_allowed_values(tmp_path, s3prl_hub,
                                                                                             value):
    config = options(tmp_path, f"precision: {value}\n")
    missing = tmp_path / "not_there.safetensors"  # not even read: the option is checked first
    with pytest.raises(DeltaError, match=rf"upstream options file \(-g\) .*: precision: .*{ALLOWED}$"):
        build(s3prl_hub, "hubert_identity", missing, config)


def test_an_unknown_environment_value_is_refused_naming_the_variable(s3prl_hub, tmp_path, monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(DeltaError, match=rf"^{PRECISION_ENV}: 'half' {ALLOWED}$"):
        build(s3prl_hub, "hubert_identity", tmp_path / "not_there.safetensors")
    with pytest.raises(ValueError, match=rf"^{PRECISION_ENV}: 'half' {ALLOWED}$"):
        UpstreamExpert(torch.nn.Identity())  # built directly, the expert reads the variable too


def test_hubert_tiny_s3prls_own_upstream_refuses_a_precision_it_would_ignore(tmp_path, s3prl_hub):
    with pytest.raises(DeltaError, match="hubert_tiny .* fp32 only, not precision bf16.*hubert_identity"):
        s3prl_hub.hubert_tiny(model_config=str(options(tmp_path, "precision: bf16\n")))
    assert s3prl_hub.hubert_tiny(model_config=str(options(tmp_path, "precision: fp32\n"))) is not None


def test_a_misspelt_option_is_still_refused(tmp_path, s3prl_hub, tiny_delta):
    with pytest.raises(DeltaError, match=r"unknown option\(s\) \['precison'\].*'precision'"):
        build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precison: bf16\n"))


# --------------------------------------------------------------------- devices and warnings
def test_bf16_on_a_cpu_without_native_bf16_warns_once_and_runs(tmp_path, s3prl_hub, tiny_delta, padded_batch,
                                                               monkeypatch):
    monkeypatch.setattr(expert, "_warned_emulated", set())
    monkeypatch.setattr(expert, "cpu_flags", lambda: {"avx2", "fma"})
    upstream = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: bf16\n"))
    with pytest.warns(RuntimeWarning, match=r"precision: bf16: this CPU has no avx512_bf16 / amx_bf16 in "
                                            r"/proc/cpuinfo, so bf16 is emulated: it runs.*much slower"):
        forward(upstream, padded_batch[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second forward, or upstream, is quiet
        forward(upstream, padded_batch[:1])
        forward(build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: bf16\n")),
                padded_batch[:1])


def test_a_cpu_with_native_bf16_is_not_warned_about(monkeypatch):
    monkeypatch.setattr(expert, "_warned_emulated", set())
    monkeypatch.setattr(expert, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", torch.device("cpu"))
        check_precision("fp32", torch.device("cpu"))
    assert native_on_cpu("bf16") is True and native_on_cpu("fp16") is False and native_on_cpu("fp32") is True


def test_fp16_on_a_cpu_without_native_fp16_warns_naming_its_flags(monkeypatch):
    monkeypatch.setattr(expert, "_warned_emulated", set())
    monkeypatch.setattr(expert, "cpu_flags", lambda: {"avx2"})
    with pytest.warns(RuntimeWarning, match=r"precision: fp16: this CPU has no avx512_fp16 / amx_fp16"):
        check_precision("fp16", torch.device("cpu"))


def test_torch_cpu_autocast_takes_both_low_precisions():
    """What the CPU path relies on (torch >= 2.3): autocast on CPU in bf16 and fp16, not a silent fall-back."""
    assert torch.amp.is_autocast_available("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns and disables autocast for a dtype it does not take
            with torch.autocast("cpu", dtype=dtype):
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device of the given compute capability and bf16 support, for check_precision (no GPU here)."""
    def make(capability: tuple[int, int], bf16: bool) -> None:
        monkeypatch.setattr(expert, "_warned_emulated", set())
        monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: True)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla X")
    return make


def test_a_cuda_device_without_bf16_is_refused_suggesting_fp16(fake_cuda):
    fake_cuda((6, 1), bf16=False)
    with pytest.raises(RuntimeError, match=r"^precision: bf16: CUDA device Tesla X \(compute capability 6.1\) does not "
                                           r"support bfloat16; use precision: fp16 \(or fp32\) there$"):
        check_precision("bf16", torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("fp16", torch.device("cuda"))  # fp16 runs on every CUDA device


def test_bf16_on_a_cuda_device_before_ampere_warns_once_that_it_is_emulated(fake_cuda):
    fake_cuda((7, 0), bf16=True)
    with pytest.warns(RuntimeWarning, match=r"^precision: bf16: CUDA device Tesla X \(compute capability 7.0\) has no "
                                            r"native bfloat16 .* emulated.*use precision: fp16 there"):
        check_precision("bf16", torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", torch.device("cuda"))  # once
        fake_cuda((9, 0), bf16=True)
        check_precision("bf16", torch.device("cuda"))  # an H100 / H200: native


def test_a_device_without_autocast_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: device_type != "meta")
    with pytest.raises(RuntimeError, match=r"^precision: bf16: torch has no autocast for device 'meta'"):
        check_precision("bf16", torch.device("meta"))
    check_precision("fp32", torch.device("meta"))  # fp32 needs no autocast


# ------------------------------------------------------------------------------ weight pruning
def test_csr_linears_run_in_float32_inside_autocast():
    torch.manual_seed(0)
    layer = MaskedLinear(48, 32)
    layer.set_mask(torch.rand(32, 48) > 0.9)
    layer.execution = "sparse"
    x = torch.randn(5, 7, 48)
    with torch.inference_mode():
        assert layer.kernel_name() == "csr"
        exact = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_input = layer(x.bfloat16())  # what the previous Linear hands on under autocast
            fp32_input = layer(x)
        layer.execution = "dense"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = layer(x)
    assert low_input.dtype == fp32_input.dtype == torch.float32
    assert torch.equal(fp32_input, exact)
    torch.testing.assert_close(low_input, layer(x.bfloat16().float()).detach(), rtol=0, atol=1e-6)
    assert dense.dtype == torch.bfloat16  # the dense GEMM is autocast like any Linear


@pytest.mark.parametrize("execution", ["sparse", "auto", "dense"])
def test_a_weight_pruned_upstream_runs_in_bf16(tmp_path, s3prl_hub, hubert_ckpt, padded_batch, execution,
                                               monkeypatch):
    # auto's calibration told that CSR is twice as fast, so its choice does not hang on this machine's timing
    monkeypatch.setattr(sparse, "calibration_timer", lambda runs: {"dense": [2.0], "csr": [1.0]})
    delta = _identity_delta(hubert_ckpt, tmp_path, [{"method": "weight_pruning", "sparsity": 0.9}])
    config = options(tmp_path, f"sparse_execution: {execution}\n")
    reference = forward(build(s3prl_hub, "hubert_weightpruned", delta, config), padded_batch)
    upstream = build(s3prl_hub, "hubert_weightpruned", delta,
                     options(tmp_path, f"sparse_execution: {execution}\nprecision: bf16\n"))
    kernels = {name: module.kernel_name() for name, module in masked_linears(upstream.model)}
    calibrated = {name: "csr" if module.sparsity >= sparse.CPU_CALIBRATE_FROM else "dense"
                  for name, module in masked_linears(upstream.model)}
    expected = {"sparse": {name: "csr" for name in kernels}, "auto": calibrated,
                "dense": {name: "dense" for name in kernels}}[execution]
    assert kernels == expected  # auto: CSR where the calibration (told CSR wins) is asked, from 50% sparsity
    assert_float32_and_close(forward(upstream, padded_batch), reference)


# ------------------------------------------------------------------------------------ WavLM
def test_wavlm_with_its_float_bias_mask_runs_in_bf16(tmp_path, s3prl_hub, padded_batch):
    delta = _identity_delta(make_wavlm_checkpoint(tmp_path / "wavlm.pt"), tmp_path)
    reference = forward(build(s3prl_hub, "wavlm_identity", delta), padded_batch)
    upstream = build(s3prl_hub, "wavlm_identity", delta, options(tmp_path, "precision: bf16\n"))
    assert upstream.model.relative_position_bias is not None
    assert_float32_and_close(forward(upstream, padded_batch), reference)


# -------------------------------------------------------------------------------- MelHuBERT
def test_melhubert_runs_in_bf16_and_refuses_fp16_whose_range_its_fbank_overflows(tmp_path, s3prl_hub, padded_batch):
    ckpt = make_melhubert_checkpoint(tmp_path / "melhubert.ckpt")
    reference = forward(s3prl_hub.melhubert_local(ckpt=str(ckpt)).eval(), padded_batch)
    upstream = s3prl_hub.melhubert_local(ckpt=str(ckpt), model_config=options(tmp_path, "precision: bf16\n")).eval()
    assert_float32_and_close(forward(upstream, padded_batch), reference)
    with pytest.raises(DeltaError, match=r"^precision: fp16: this model's fbank front end .* overflows float16; "
                                         r"use precision: bf16 or fp32$"):
        s3prl_hub.melhubert_local(ckpt=str(ckpt), model_config=options(tmp_path, "precision: fp16\n"))


# --------------------------------------------------------------------------- HuBERT Base shape
def test_hubert_base_shape_in_bf16_is_within_two_percent_of_fp32(tmp_path, s3prl_hub):
    delta = _identity_delta(make_hubert_checkpoint(tmp_path / "base.pt", **HUBERT_BASE), tmp_path)
    upstream = build(s3prl_hub, "hubert_identity", delta, options(tmp_path, "precision: bf16\n"))
    assert upstream.model.config.embed_dim == 768 and len(upstream.model.layers) == 12
    wavs = [0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(0))]  # 0.5 s: bf16 is emulated here
    reference = forward(UpstreamExpert(upstream.model, precision="fp32"), wavs)  # the same weights, in fp32
    errors = assert_float32_and_close(forward(upstream, wavs), reference)
    assert len(errors) == 13


# ----------------------------------------------------------------------- upstream-compressed profile
def test_the_profile_reports_the_precision(tmp_path, s3prl_hub, tiny_delta):
    from upstream_compressed.upstream_profile import format_profile, profile_upstream

    low = build(s3prl_hub, "hubert_identity", tiny_delta, options(tmp_path, "precision: bf16\n"))
    result = profile_upstream(low, "hubert_identity", seconds=0.3, repeats=1, warmup=0)
    assert result["precision"] == "bf16" and result["precision_native"] == native_on_cpu("bf16")
    assert "precision       bf16" in format_profile(result)
    plain = profile_upstream(build(s3prl_hub, "hubert_identity", tiny_delta), "hubert_identity", seconds=0.3,
                             repeats=1, warmup=0)
    assert plain["precision"] == "fp32" and plain["precision_native"] is True
