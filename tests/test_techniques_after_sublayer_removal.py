"""Every technique runs on a model whose attention or FFN sublayers were removed (joint pruning and
DPHuBERT's checkpoints make such models): it leaves the removed sublayers alone and compresses the rest."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress import STEPS, StepContext
from upstream_compressed.delta import Structure
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import Converted, load_base
from upstream_compressed.model.layers import LowRankLinear
from upstream_compressed.model.sparse import MaskedLinear
from upstream_compressed.recipe import STEP_VALIDATORS
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

from helpers import run_model


@pytest.fixture(scope="module")
def hollow(tmp_path_factory):
    """A 3-layer model without layer 0's attention and layer 1's FFN, as a base (Converted)."""
    converted = load_base(make_hubert_checkpoint(tmp_path_factory.mktemp("hollow") / "h.pt", layers=3))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    model.remove_attention(0)
    model.remove_ffn(1)
    return Converted(model.config, model.state_dict(), converted.source_format)


def run_step(base: Converted, step: dict, tmp_path) -> SpeechTransformer:
    STEP_VALIDATORS[step["method"]](step, "steps[0]")
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    structure = Structure.identity(base.config)
    structure.remove_attention(0)
    structure.remove_ffn(1)
    model, _ = STEPS[step["method"]](model, structure, step, StepContext(base, tmp_path, 0, {}))
    return model


@pytest.mark.parametrize("criterion", ["l1", "random", "data_driven", "diagonal_first"])
def test_head_pruning_skips_a_removed_attention(hollow, tmp_path, audio_dir, padded_batch, criterion):
    step = {"method": "head_pruning", "ratio": 0.5, "criterion": criterion, "selection": "global"}
    if criterion in ("data_driven", "diagonal_first"):
        step["audio"] = str(audio_dir)
    model = run_step(hollow, step, tmp_path)
    heads = [layer.num_heads for layer in model.config.layers]
    assert heads[0] == 0 and not model.config.layers[0].attention
    assert sum(heads) == 4  # half of the 8 heads that exist (layers 1 and 2)
    states, _ = run_model(model, padded_batch)
    assert all(torch.isfinite(s).all() for s in states)


@pytest.mark.parametrize("criterion", ["l1", "data_driven"])
def test_row_pruning_skips_a_removed_ffn(hollow, tmp_path, audio_dir, padded_batch, criterion):
    step = {"method": "row_pruning", "ratio": 0.5, "criterion": criterion}
    if criterion == "data_driven":
        step["audio"] = str(audio_dir)
    model = run_step(hollow, step, tmp_path)
    assert [layer.ffn_dim for layer in model.config.layers] == [64, 0, 64]
    assert model.layers[1].feed_forward is None
    run_model(model, padded_batch)


def test_low_rank_and_weight_pruning_touch_only_existing_linears(hollow, tmp_path, padded_batch):
    factored = run_step(hollow, {"method": "low_rank", "ratio": 0.5}, tmp_path)
    assert isinstance(factored.layers[0].feed_forward.fc1, LowRankLinear)
    assert factored.layers[0].attention is None and factored.layers[1].feed_forward is None
    assert set(factored.config.layers[1].ranks) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    sparse = run_step(hollow, {"method": "weight_pruning", "sparsity": 0.5}, tmp_path)
    assert isinstance(sparse.layers[1].attention.q_proj, MaskedLinear)
    assert sparse.config.layers[0].sparse == ["fc1", "fc2"] and sparse.config.layers[1].ffn_dim == 0
    run_model(sparse, padded_batch)
