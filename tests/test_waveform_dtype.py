"""Any floating-point waveform runs in the model's own precision; non-float audio keeps a clear error."""

from __future__ import annotations

import pytest
import torch
import yaml

from upstream_compressed.cli import main as cli_main
from upstream_compressed.expert import UpstreamExpert
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base

from helpers import max_valid_difference


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, hubert_ckpt, s3prl_hub) -> UpstreamExpert:
    """The identity delta of the tiny HuBERT, loaded as S3PRL loads any upstream of ours."""
    folder = tmp_path_factory.mktemp("dtype")
    recipe = folder / "identity.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": []}))
    delta = folder / "identity.safetensors"
    assert cli_main(["compress", str(recipe), "-o", str(delta)]) == 0
    return s3prl_hub.compressed_local(ckpt=str(delta)).eval()


def _hidden_states(upstream: torch.nn.Module, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        result = upstream(wavs)
    return result["hidden_states"], ~result["pad_mask"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_waveforms_of_any_precision_give_the_float32_hidden_states(upstream, padded_batch, dtype):
    """A float64 batch is the float32 one (within float32 rounding); half inputs equal their float32 rounding."""
    wavs = [w.to(dtype) for w in padded_batch]
    states, padding = _hidden_states(upstream, wavs)
    expected, _ = _hidden_states(upstream, [w.float() for w in wavs])
    assert all(s.dtype == torch.float32 for s in states)
    for ours, reference in zip(states, expected):
        assert max_valid_difference(ours, reference, padding) < 1e-5


def test_mixed_precisions_in_one_batch_are_accepted(upstream, padded_batch):
    mixed = [padded_batch[0].double(), padded_batch[1], padded_batch[2].half()]
    states, padding = _hidden_states(upstream, mixed)
    expected, _ = _hidden_states(upstream, [w.float() for w in mixed])
    assert max_valid_difference(states[-1], expected[-1], padding) < 1e-5


def test_a_bfloat16_model_takes_float32_and_float64_audio(hubert_ckpt, padded_batch):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    reference, padding = _hidden_states(UpstreamExpert(model), padded_batch)
    low = UpstreamExpert(SpeechTransformer.from_state_dict(base.config, base.state_dict).to(torch.bfloat16).eval())
    for wavs in (padded_batch, [w.double() for w in padded_batch]):
        states, _ = _hidden_states(low, wavs)
        assert states[-1].dtype == torch.bfloat16
        scale = reference[-1].abs().max().item()
        assert max_valid_difference(states[-1].float(), reference[-1], padding) < 0.1 * scale


def test_the_model_itself_casts_a_float64_batch(hubert_ckpt):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    batch = torch.randn(2, 8000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        states, _ = model(batch)
        expected, _ = model(batch.float())
    assert torch.allclose(states[-1], expected[-1], atol=1e-6)


@pytest.mark.parametrize(
    "wav,message",
    [
        (torch.zeros(16000, dtype=torch.int16), "integer dtype torch.int16; convert to float"),
        (torch.zeros(16000, dtype=torch.complex64), "dtype torch.complex64; expected real samples"),
        (torch.zeros(16000, dtype=torch.bool), "dtype torch.bool; expected real samples"),
        (torch.zeros(2, 16000, dtype=torch.float64), "1-D mono"),
    ],
)
def test_non_float_or_multichannel_audio_keeps_its_clear_error(upstream, wav, message):
    with pytest.raises(ValueError, match=message):
        upstream([wav])


def test_the_model_refuses_an_integer_batch_by_name(hubert_ckpt):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    with pytest.raises(ValueError, match="wav has dtype torch.int16; expected a float batch"):
        model(torch.zeros(1, 16000, dtype=torch.int16))
