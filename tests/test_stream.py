"""Streamed batches: planned from lengths alone, exact on resume, disjoint across ranks, bad files skipped."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from upstream_compressed.audio.manifest import Manifest, scan
from upstream_compressed.train.stream import BatchPlan, BatchRule, batch_loader

RATE = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 files of 0.2-1.5 s across 4 speakers, each file's samples telling which file it is."""
    root = tmp_path_factory.mktemp("stream_corpus")
    rng = np.random.default_rng(0)
    for i in range(24):
        path = root / f"spk{i % 4}" / f"utt{i:02d}.flac"
        path.parent.mkdir(exist_ok=True)
        samples = int(rng.integers(int(0.2 * RATE), int(1.5 * RATE)))
        soundfile.write(str(path), np.full(samples, (i + 1) / 64, np.float32), RATE, subtype="PCM_16")
    return scan(root, progress=False)


def _batches(loader) -> list[torch.Tensor]:
    return [batch.wavs for batch in loader]


def test_the_same_steps_give_the_same_batches_with_and_without_workers(corpus):
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3, max_seconds=0.5), seed=1)
    without = _batches(batch_loader(corpus, plan, 0, 20, num_workers=0))
    with_workers = _batches(batch_loader(corpus, plan, 0, 20, num_workers=2))
    assert len(without) == 20
    assert all(torch.equal(a, b) for a, b in zip(without, with_workers))


def test_a_loader_started_mid_run_continues_with_the_very_same_batches(corpus):
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3, max_seconds=0.5), seed=1)
    whole = _batches(batch_loader(corpus, plan, 0, 20, num_workers=0))
    resumed = _batches(batch_loader(corpus, BatchPlan(corpus.num_samples, plan.rule, seed=1), 13, 20, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(whole[13:], resumed))
    other_seed = _batches(batch_loader(corpus, BatchPlan(corpus.num_samples, plan.rule, seed=2), 13, 20, num_workers=0))
    assert not all(torch.equal(a, b) for a, b in zip(whole[13:], other_seed))


def test_ranks_take_disjoint_slices_of_every_epoch(corpus):
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=2), seed=0, world_size=3)
    per_epoch = plan.steps_in_epoch(0)
    assert per_epoch == 24 // 2 // 3
    for epoch_start in (0, per_epoch):  # the first two epochs
        seen = [[i for step in range(epoch_start, epoch_start + per_epoch) for i in plan.batch(step, rank)[1]]
                for rank in range(3)]
        assert all(set(a).isdisjoint(b) for a in seen for b in seen if a is not b)
        assert sorted(i for files in seen for i in files) == list(range(24))


def test_every_file_is_seen_once_an_epoch_and_epochs_are_reshuffled(corpus):
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=4), seed=0)
    epochs = [[i for step in range(e * 6, e * 6 + 6) for i in plan.batch(step)[1]] for e in range(2)]
    assert [sorted(files) for files in epochs] == [list(range(24))] * 2
    assert epochs[0] != epochs[1]
    assert plan.locate(6) == (1, 0) and plan.locate(13) == (2, 1)


def test_seconds_per_batch_bounds_the_padded_audio_and_covers_the_epoch(corpus):
    rule = BatchRule(batch_size=None, seconds_per_batch=2.0, max_seconds=1.0)
    plan = BatchPlan(corpus.num_samples, rule, seed=0)
    batches = plan.epoch(0)
    assert sorted(i for b in batches for i in b) == list(range(24))
    padded = [len(b) * max(plan.lengths[i] for i in b) for b in batches]
    assert max(padded) <= 2.0 * RATE
    assert len({len(b) for b in batches}) > 1, "short files should share a batch with more of their kind"
    loader = batch_loader(corpus, plan, 0, len(batches), num_workers=0)
    assert all(batch.wavs.numel() <= 2.0 * RATE for batch in loader)


@pytest.mark.parametrize("rule, message", [
    (dict(batch_size=4, seconds_per_batch=10.0), "exactly one"),
    (dict(batch_size=None, seconds_per_batch=None), "exactly one"),
    (dict(batch_size=None, seconds_per_batch=2.0, max_seconds=4.0), "at least max_seconds"),
])
def test_batch_rules_that_cannot_work_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        BatchRule(**rule)


def test_a_file_that_fails_to_decode_is_skipped_and_named(corpus, tmp_path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC but not really" * 20)
    manifest = Manifest(corpus.root, list(corpus.files), list(corpus.num_samples))
    manifest.files[5] = str(broken)  # an absolute path replaces root / file: as if it broke after the scan
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=24), seed=0)
    (batch,) = list(batch_loader(manifest, plan, 0, 1, num_workers=1))
    assert len(batch) == 23
    assert [path for path, _ in batch.skipped] == [str(broken)]


def test_the_loader_leaves_the_training_random_stream_alone(corpus):
    """A resumed run starts its loader later than an uninterrupted one: it must not draw from torch's RNG."""
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3, max_seconds=0.5), seed=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for workers in (0, 1):
        list(batch_loader(corpus, plan, 0, 2, num_workers=workers))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("options, message", [
    ({"seconds_per_batch": 2.0, "max_seconds": 4.0}, r"seconds_per_batch: 2.0 is less than max_seconds 4.0"),
    ({"seconds_per_batch": 20.0, "batch_size": 4}, "not both"),
    ({"num_workers": -1}, r"num_workers: expected a non-negative integer"),
    ({"seconds_per_batch": "8 s"}, r"seconds_per_batch: expected a positive number"),
])
def test_recipes_with_batch_rules_that_cannot_work_are_refused_naming_the_field(options, message):
    from upstream_compressed.compress.options import check_training_options
    from upstream_compressed.recipe import RecipeError

    with pytest.raises(RecipeError, match=message):
        check_training_options({"audio": "corpus", **options}, "steps[0].recovery")


def test_recovery_trains_on_seconds_per_batch_batches(tmp_path, hubert_ckpt, audio_dir, capfd):
    import yaml

    from upstream_compressed.cli import main

    recovery = {"audio": str(audio_dir), "steps": 3, "seconds_per_batch": 2.0, "max_seconds": 1.0, "num_workers": 1,
                "device": "cpu"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": [
        {"method": "head_pruning", "ratio": 0.5, "criterion": "l1", "recovery": recovery}]}))
    assert main(["compress", str(recipe), "-o", str(tmp_path / "d.safetensors")]) == 0
    assert "training: step 0 recovery done steps=3" in capfd.readouterr().err


def test_a_crop_is_one_stretch_of_its_file_decoded_alone(tmp_path):
    """Only the crop is decoded (the start comes from the manifest's length); it is a contiguous part of the file."""
    ramp = (np.arange(48000) % 30000 / 30000 - 0.5).astype(np.float32)
    soundfile.write(str(tmp_path / "ramp.wav"), ramp, RATE, subtype="FLOAT")
    manifest = scan(tmp_path, progress=False)
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=1, max_seconds=0.5), seed=4)
    crops = [batch.wavs[0].numpy() for batch in batch_loader(manifest, plan, 0, 3, num_workers=0)]
    starts = []
    for crop in crops:
        assert crop.shape == (8000,)
        start = int(np.flatnonzero(ramp == crop[0])[0])
        assert np.array_equal(ramp[start:start + 8000], crop)
        starts.append(start)
    assert len(set(starts)) > 1, "each epoch crops elsewhere"
