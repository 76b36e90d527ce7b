"""The bundled tiny HuBERT: small, documented, and loaded alike by S3PRL's hubert_local and our converter."""

from __future__ import annotations

import json

import pytest
import torch

from upstream_compressed.embedded import bundled_checkpoint
from upstream_compressed.embedded.pretrain import recipe_path, sha256
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base

from helpers import max_valid_difference, run_model

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint():
    return bundled_checkpoint("tiny_hubert")


@pytest.fixture(scope="module")
def speech_batch():
    """Three real utterances of different lengths (speech, not noise), so padding matters."""
    from upstream_compressed.embedded.espeak import EspeakProcess, Voice
    from upstream_compressed.embedded.synth_corpus import SAMPLE_RATE, Utterance, finish_audio

    texts = ["the quick brown fox jumps over the lazy dog.", "good morning to you.", "yes."]
    voices = [Voice("m3", 50, 50, 175), Voice("f2", 60, 40, 160), Voice("klatt4", 40, 50, 190)]
    wavs = []
    with EspeakProcess() as engine:
        for seed, (text, voice) in enumerate(zip(texts, voices), start=1):
            utterance = Utterance("x.wav", tuple(text.split()), voice, seed, snr_db=40.0, peak=0.5)
            samples = finish_audio(engine.synthesize(text, voice, seed), engine.sample_rate, utterance)
            wavs.append(torch.from_numpy(samples.astype("float32") / 32768.0))
    assert len({len(w) for w in wavs}) == 3 and min(len(w) for w in wavs) > SAMPLE_RATE // 4
    return wavs


def test_bundled_checkpoint_is_small_and_documented(checkpoint):
    assert checkpoint.is_file()
    assert checkpoint.stat().st_size < 15 * 2**20
    recipe = json.loads(recipe_path(checkpoint).read_text())
    assert recipe["sha256"] == sha256(checkpoint)  # the recipe describes this very file
    assert recipe["command"][:2] == ["upstream-compressed", "pretrain"]
    assert recipe["seed"] == recipe["train_options"]["seed"]
    assert recipe["data"]["corpus_manifest"]["options"]["seed"] is not None
    assert 2_000_000 <= recipe["parameters"] <= 6_000_000


def test_unknown_bundled_name_is_a_clear_error():
    with pytest.raises(KeyError, match="tiny_hubert"):
        bundled_checkpoint("huge_hubert")


def test_loads_through_s3prl_hubert_local_and_our_converter_with_parity(checkpoint, s3prl_hub, speech_batch):
    upstream = s3prl_hub.hubert_local(ckpt=str(checkpoint)).eval()
    with torch.no_grad():
        expected = upstream([w.clone() for w in speech_batch])["hidden_states"]

    converted = load_base(checkpoint)
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    states, padding_mask = run_model(model, speech_batch)

    assert len(states) == len(expected) == converted.config.num_hidden_states == 5
    assert padding_mask.any()
    for layer, (ours, theirs) in enumerate(zip(states, expected)):
        assert theirs.dtype == torch.float32  # fp16 storage, fp32 model
        assert max_valid_difference(ours, theirs, padding_mask) < TOLERANCE, f"hidden state {layer}"


def test_hubert_tiny_is_a_registered_upstream(checkpoint, s3prl_hub, speech_batch):
    assert hasattr(s3prl_hub, "hubert_tiny"), "upstream_compressed.register() must add the embedded entries"
    tiny = s3prl_hub.hubert_tiny().eval()
    local = s3prl_hub.hubert_local(ckpt=str(checkpoint)).eval()
    assert tiny.get_downsample_rates("hidden_states") == 320
    with torch.no_grad():
        a = tiny([w.clone() for w in speech_batch])["hidden_states"]
        b = local([w.clone() for w in speech_batch])["hidden_states"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
