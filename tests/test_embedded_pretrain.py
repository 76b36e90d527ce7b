"""Tiny HuBERT pretraining, in miniature: it writes S3PRL's converted format, atomically, with its recipe."""

from __future__ import annotations

import json

import pytest
import torch

from upstream_compressed.embedded import commands
from upstream_compressed.embedded.pretrain import ModelShape, PretrainError, TrainOptions, pretrain, recipe_path
from upstream_compressed.embedded.synth_corpus import CorpusOptions, make_corpus
from upstream_compressed.embedded.targets import kmeans, mfcc_features

SMALL = ModelShape(
    conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(32,2,2)] * 2",
    encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
    conv_pos=8, conv_pos_groups=4, final_dim=16,
)
QUICK = TrainOptions(clusters=8, kmeans_iterations=5, steps=3, batch_seconds=8.0, eval_every=2, threads=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(
        tmp_path_factory.mktemp("pretrain") / "corpus",
        CorpusOptions(speakers=3, utterances=3, sid_utterances=5, seed=1, max_words=5),
        progress=False,
    )


def test_pretrain_writes_a_checkpoint_hubert_local_loads(corpus, tmp_path, s3prl_hub):
    output = tmp_path / "out" / "tiny.pt"
    result = pretrain(corpus.root, output, SMALL, QUICK, command=["upstream-compressed", "pretrain"], progress=False)
    assert sorted(p.name for p in output.parent.iterdir()) == ["tiny.json", "tiny.pt"]  # no temp files left

    saved = torch.load(output, weights_only=True)
    assert set(saved) == {"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}
    assert saved["dictionaries_symbols"] == [[str(i) for i in range(8)]]
    assert all(t.dtype == torch.float16 for t in saved["model_weight"].values() if t.is_floating_point())

    recipe = json.loads(recipe_path(output).read_text())
    assert recipe["seed"] == QUICK.seed and recipe["parameters"] == result.parameters
    assert recipe["data"]["corpus_manifest"]["options"]["seed"] == 1
    assert [h["step"] for h in recipe["history"]] == [0, 2, 3]
    assert all(0.0 <= h["dev_masked_acc"] <= 1.0 for h in recipe["history"])

    upstream = s3prl_hub.hubert_local(ckpt=str(output)).eval()
    with torch.no_grad():
        states = upstream([torch.randn(16000), torch.randn(9000)])["hidden_states"]
    assert len(states) == SMALL.encoder_layers + 1 and states[0].shape == (2, 49, 32)


def test_pretrain_is_deterministic(corpus, tmp_path):
    a = pretrain(corpus.root, tmp_path / "a.pt", SMALL, QUICK, dev_split=None, progress=False)
    b = pretrain(corpus.root, tmp_path / "b.pt", SMALL, QUICK, dev_split=None, progress=False)
    wa = torch.load(a.checkpoint, weights_only=True)["model_weight"]
    wb = torch.load(b.checkpoint, weights_only=True)["model_weight"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_only_cli_writes_random_weights(tmp_path, s3prl_hub):
    output = tmp_path / "random.pt"
    assert commands.main(["pretrain", "--init-only", "-o", str(output), "--layers", "2", "--dim", "64",
                          "--ffn", "128", "--heads", "2", "--quiet"]) == 0
    recipe = json.loads(recipe_path(output).read_text())
    assert "random weights" in recipe["what"] and "data" not in recipe
    s3prl_hub.hubert_local(ckpt=str(output))


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(PretrainError, match="make-corpus"):
        pretrain(tmp_path / "nothing", tmp_path / "x.pt", SMALL, QUICK, progress=False)
    assert commands.main(["pretrain", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.pt"), "--quiet"]) == 2
    assert "make-corpus" in capsys.readouterr().err


def test_mfcc_and_kmeans():
    wav = torch.randn(16000) * 0.1
    assert mfcc_features(wav).shape == ((16000 - 400) // 160 + 1, 39)
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(200, 2, generator=generator) * 0.1 + torch.tensor([4.0 * i, 0.0]) for i in range(3)])
    centroids, inertia = kmeans(blobs, 3, seed=0)
    assert sorted(round(float(c)) for c in centroids[:, 0]) == [0, 4, 8]
    assert inertia < 0.05
