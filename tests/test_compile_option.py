"""The upstream's ``compile`` option (``-g`` yaml, else ``UPSTREAM_COMPRESSED_COMPILE``, else false).

With it the model's forward runs through ``torch.compile(dynamic=True)``, built on the first forward. The graph
count is dynamo's, whatever the backend, so those tests use the cheap ``eager`` backend (dynamo's tracing
only); ``aot_eager`` checks bf16 autocast through AOTAutograd, and one test runs the real default (inductor,
which compiles C++ here: tens of seconds) on a one-layer, two-convolution model.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch._dynamo.utils import counters

from upstream_compressed import expert
from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import DeltaError, write_delta
from upstream_compressed.expert import COMPILE_ENV, PRECISION_ENV, UpstreamExpert
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint


@pytest.fixture(autouse=True)
def no_option_env(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(expert, "_warned_emulated", {"bf16", "fp16"})  # bf16 may be emulated here: said elsewhere


@pytest.fixture
def backend(monkeypatch):
    """Use ``backend`` for torch.compile, starting from an empty dynamo cache and zeroed counters."""
    def use(name: str) -> None:
        monkeypatch.setattr(expert, "COMPILE_BACKEND", name)
        torch._dynamo.reset()
        counters.clear()

    yield use
    torch._dynamo.reset()  # later tests must not find this test's graphs


def _delta(directory, **shape):
    ckpt = make_hubert_checkpoint(directory / "hubert.pt", **shape)
    recipe = parse_recipe({"base": str(ckpt), "steps": []})
    return write_delta(run_recipe(recipe, work_dir=directory / "work"), directory / "identity.safetensors")


@pytest.fixture(scope="module")
def tiny_delta(tmp_path_factory):
    return _delta(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def small_delta(tmp_path_factory):
    """One layer on a two-convolution front end: what compiles fastest (dynamo traces every module call)."""
    return _delta(tmp_path_factory.mktemp("small"), layers=1, conv_layers="[(32,10,5)] + [(32,4,4)]")


def options(tmp_path, text: str) -> str:
    path = tmp_path / f"options{abs(hash(text))}.yaml"
    path.write_text(text)
    return str(path)


def build(hub, delta, model_config: str | None = None) -> UpstreamExpert:
    return hub.hubert_identity(ckpt=str(delta), model_config=model_config, refresh=False).eval()


def forward(upstream, wavs) -> dict:
    with torch.inference_mode():
        return upstream([w.clone() for w in wavs])


def max_valid_difference(got: dict, reference: dict) -> float:
    """Largest |difference| over every hidden state's valid frames (padded ones are arbitrary, as in S3PRL)."""
    valid = reference["pad_mask"]
    assert torch.equal(got["pad_mask"], valid)
    assert all(state.dtype == torch.float32 for state in got["hidden_states"])
    return max((a[valid] - b[valid]).abs().max().item()
               for a, b in zip(got["hidden_states"], reference["hidden_states"], strict=True))


def graphs() -> int:
    """Graphs dynamo has compiled since the last reset (one per compile of a frame; graph breaks add more)."""
    return counters["stats"]["unique_graphs"]


# ------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("text, expected", [("compile: true\n", True), ("compile: false\n", False),
                                            ("precision: fp32\n", False)])
def test_the_yaml_sets_compile_and_its_default_is_off(tmp_path, s3prl_hub, tiny_delta, text, expected):
    assert build(s3prl_hub, tiny_delta, options(tmp_path, text)).compile_model is expected


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False),
                                             ("", False)])
def test_the_environment_variable_sets_compile(s3prl_hub, tiny_delta, monkeypatch, value, expected):
    monkeypatch.setenv(COMPILE_ENV, value)
    assert build(s3prl_hub, tiny_delta).compile_model is expected


def test_the_yaml_beats_the_environment(tmp_path, s3prl_hub, tiny_delta, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert build(s3prl_hub, tiny_delta, options(tmp_path, "compile: false\n")).compile_model is False
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert build(s3prl_hub, tiny_delta, options(tmp_path, "compile: true\n")).compile_model is True


def test_hubert_tiny_s3prls_own_upstream_refuses_compile_it_would_ignore(tmp_path, s3prl_hub):
    with pytest.raises(DeltaError, match="hubert_tiny .* runs eagerly.*compile: true.*hubert_identity"):
        s3prl_hub.hubert_tiny(model_config=options(tmp_path, "compile: true\n"))
    eager = s3prl_hub.hubert_tiny(model_config=options(tmp_path, "compile: false\n")).eval()
    with torch.inference_mode():
        assert len(eager([torch.zeros(16000)])["hidden_states"]) == 5  # compile: false is no refusal


@pytest.mark.parametrize("value", ["'true'", "1", "maybe", "[true]"])
def test_a_non_boolean_is_refused_naming_the_file_and_the_field(tmp_path, s3prl_hub, tiny_delta, value):
    path = options(tmp_path, f"compile: {value}\n")
    message = rf"upstream options file \(-g\) {re.escape(path)}: compile: .* is not true or false$"
    with pytest.raises(DeltaError, match=message):
        build(s3prl_hub, tiny_delta, path)


def test_a_bad_environment_value_is_refused_naming_the_variable(s3prl_hub, tiny_delta, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "maybe")
    with pytest.raises(DeltaError, match=rf"^{COMPILE_ENV}: 'maybe' is not 1 or 0"):
        build(s3prl_hub, tiny_delta)


def test_without_the_option_nothing_is_compiled(s3prl_hub, tiny_delta, padded_batch, backend):
    backend("eager")
    upstream = build(s3prl_hub, tiny_delta)
    forward(upstream, padded_batch)
    assert not upstream.compiled and graphs() == 0


# ------------------------------------------------------------------------------- compiled forwards
def test_lengths_and_batch_sizes_do_not_recompile_per_batch(tmp_path, s3prl_hub, tiny_delta, backend):
    """dynamic=True: the first batch's graph serves other lengths and batch sizes. A few size classes add
    one graph each, once (expert's module docstring): here a padded length that is an exact multiple of
    its frame count (HuBERT's frame mask branches on it; 13000 samples make 40 frames), and a batch of one
    (dynamo specialises size 1), whose lengths 7000-11111 fall in one range of ATen's CPU convolution
    kernel choice."""
    backend("eager")
    upstream = build(s3prl_hub, tiny_delta, options(tmp_path, "compile: true\n"))
    generator = torch.Generator().manual_seed(0)
    seen = []
    for lengths in ([16000, 12000], [9000, 8000], [20000, 5000], [7001, 7000], [13000, 6000],
                    [16000, 12000, 8000, 4000], [9000, 9000, 5000, 3000], [17000, 6000, 5000, 2000]):
        forward(upstream, [torch.randn(n, generator=generator) for n in lengths])
        seen.append(graphs())
    assert upstream.compiled
    assert seen[0] == 1 and seen[-1] <= 2, seen  # 8 batches, 7 padded lengths, 2 batch sizes: at most 2 graphs
    for n in (7000, 9000, 11111):
        forward(upstream, [torch.randn(n, generator=generator)])
    assert graphs() <= seen[-1] + 1  # the batch of one: one graph for the three lengths
    assert not counters["graph_break"]


def test_compiled_hidden_states_equal_the_eager_ones_and_the_module_stays_the_same(tmp_path, s3prl_hub, small_delta,
                                                                                  padded_batch, backend):
    backend("aot_eager")  # AOTAutograd's traced graph, run eagerly
    eager = build(s3prl_hub, small_delta)
    compiled = build(s3prl_hub, small_delta, options(tmp_path, "compile: true\n"))
    assert max_valid_difference(forward(compiled, padded_batch), forward(eager, padded_batch)) < 1e-5
    assert compiled.compiled
    # The compiled wrapper is no submodule: the same state_dict, and copies build their own.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    twin = copy.deepcopy(compiled)
    assert twin.compile_model and not twin.compiled
    assert max_valid_difference(forward(twin, padded_batch), forward(eager, padded_batch)) < 1e-5


def test_compile_with_bf16_autocast_equals_eager_bf16(tmp_path, s3prl_hub, small_delta, padded_batch, backend):
    backend("aot_eager")
    eager = build(s3prl_hub, small_delta, options(tmp_path, "precision: bf16\n"))
    compiled = build(s3prl_hub, small_delta, options(tmp_path, "precision: bf16\ncompile: true\n"))
    assert max_valid_difference(forward(compiled, padded_batch), forward(eager, padded_batch)) < 1e-5


def test_inductor_compiles_the_upstream_and_equals_eager(tmp_path, s3prl_hub, small_delta, padded_batch, backend):
    """The default backend, really compiled (C++ on CPU), on the small model to keep the compile short."""
    backend("inductor")
    eager = build(s3prl_hub, small_delta)
    compiled = build(s3prl_hub, small_delta, options(tmp_path, "compile: true\n"))
    assert max_valid_difference(forward(compiled, padded_batch), forward(eager, padded_batch)) < 1e-5
    assert compiled.compiled and graphs() == 1


def test_the_profile_reports_whether_the_upstream_ran_compiled(tmp_path, s3prl_hub, small_delta, backend):
    from upstream_compressed.upstream_profile import format_profile, profile_upstream

    backend("eager")
    plain = profile_upstream(build(s3prl_hub, small_delta), "hubert_identity", seconds=0.5, repeats=1)
    result = profile_upstream(build(s3prl_hub, small_delta, options(tmp_path, "compile: true\n")), "hubert_identity",
                              seconds=0.5, repeats=1)
    assert plain["compiled"] is False and result["compiled"] is True
    assert "torch.compile" in format_profile(result) and "torch.compile" not in format_profile(plain)
