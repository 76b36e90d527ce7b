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


# ------------------------------------------------------- survivors of the mutation run (scripts/mutation.py)
def test_batch_rule_refusals_say_exactly_what_is_wrong_and_a_batch_of_one_longest_crop_is_allowed():
    with pytest.raises(ValueError) as both:
        BatchRule(batch_size=4, seconds_per_batch=10.0)
    assert str(both.value) == "give exactly one of batch_size and seconds_per_batch"
    with pytest.raises(ValueError) as short:
        BatchRule(batch_size=None, seconds_per_batch=3.0, max_seconds=4.0)
    assert str(short.value) == "seconds_per_batch 3.0 must be at least max_seconds 4.0, or the longest files would fit no batch"
    rule = BatchRule(batch_size=None, seconds_per_batch=4.0, max_seconds=4.0)  # the longest crop fits, alone
    assert rule.max_samples == 64000
    plan = BatchPlan([64000, 64000, 16000, 16000], rule, seed=0)  # a short file padded to a long one is 8 s
    assert sorted(map(sorted, plan.epoch(0))) == [[0], [1], [2, 3]]


def test_a_plan_needs_one_full_batch_for_every_process():
    with pytest.raises(ValueError) as few:
        BatchPlan([16000] * 5, BatchRule(batch_size=2), seed=0, world_size=3)
    assert str(few.value) == "5 files cannot fill one batch on each of 3 process(es)"
    assert BatchPlan([16000] * 6, BatchRule(batch_size=2), seed=0, world_size=3).steps_in_epoch(0) == 1
    seconds = BatchRule(batch_size=None, seconds_per_batch=4.0)
    assert BatchPlan([16000], seconds, seed=0).epoch(0) == [[0]]  # one file is a batch by seconds
    with pytest.raises(ValueError, match="^0 files cannot fill one batch on each of 1 process"):
        BatchPlan([], seconds, seed=0)


def test_epochs_dropped_from_the_plan_s_cache_are_planned_again_identically():
    lengths = [8000 + 100 * i for i in range(8)]
    plan = BatchPlan(lengths, BatchRule(batch_size=2), seed=5)
    forward = [plan.batch(step) for step in range(40)]  # 10 epochs of 4 steps
    assert len(plan._epoch_cache) <= 3, "an epoch's plan is kept for a few epochs only"
    fresh = BatchPlan(lengths, BatchRule(batch_size=2), seed=5)
    assert [fresh.batch(step) for step in reversed(range(40))] == forward[::-1]
    assert [plan.batch(step) for step in range(40)] == forward  # epoch 0 again, after it was dropped
    assert [epoch for epoch, _ in forward] == [e for e in range(10) for _ in range(4)]


def test_a_loader_has_one_batch_per_step_of_its_range(corpus):
    from upstream_compressed.train.stream import StepSampler

    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3, max_seconds=0.5), seed=1)
    assert len(batch_loader(corpus, plan, 3, 7, num_workers=0)) == 4
    assert len(batch_loader(corpus, plan, 7, 3, num_workers=0)) == 0
    assert len(list(batch_loader(corpus, plan, 7, 3, num_workers=0))) == 0
    two = BatchPlan(corpus.num_samples, BatchRule(batch_size=3), seed=1, world_size=2)
    assert list(StepSampler(two, 2, 4)) == [[(two.batch(s)[0], i) for i in two.batch(s, 0)[1]] for s in (2, 3)]
    assert list(StepSampler(two, 2, 4)) != list(StepSampler(two, 2, 4, rank=1))


def test_the_loader_runs_the_workers_prefetch_and_pinning_it_is_given(corpus):
    from upstream_compressed.train.stream import default_workers

    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3), seed=1)
    default = batch_loader(corpus, plan, 0, 1)
    assert default.num_workers == default_workers() and default.prefetch_factor == 2 and default.pin_memory is False
    none = batch_loader(corpus, plan, 0, 1, num_workers=0)
    assert none.num_workers == 0 and none.prefetch_factor is None
    one = batch_loader(corpus, plan, 0, 1, num_workers=1, prefetch_factor=3, pin_memory=True)
    assert one.num_workers == 1 and one.prefetch_factor == 3 and one.pin_memory is True


def test_files_share_a_batch_with_the_files_nearest_in_length():
    ranks = [5, 2, 7, 0, 3, 6, 1, 4]  # file i is the ranks[i]-th shortest; 8 files fit one pool of 8 batches
    plan = BatchPlan([8000 + 500 * r for r in ranks], BatchRule(batch_size=2), seed=3)
    assert sorted(sorted(b) for b in plan.epoch(0)) == [[0, 7], [1, 4], [2, 5], [3, 6]]


def test_seconds_per_batch_fills_each_batch_up_to_the_budget_and_pools_hold_eight_batches():
    plan = BatchPlan([16000] * 8, BatchRule(batch_size=None, seconds_per_batch=4.0, max_seconds=1.0), seed=0)
    assert sorted(len(b) for b in plan.epoch(0)) == [4, 4]
    # a pool is POOL_BATCHES batches of files of the mean (cropped) length
    mixed = BatchPlan([16000] * 4 + [32000] * 4, BatchRule(batch_size=None, seconds_per_batch=6.0, max_seconds=2.0), 0)
    assert mixed._files_per_second_batch() == 4
    long = BatchPlan([32000] * 4, BatchRule(batch_size=None, seconds_per_batch=3.0, max_seconds=2.0), 0)
    assert long._files_per_second_batch() == 1


def test_steps_walk_through_epochs_of_different_sizes():
    import random

    rng = random.Random(1)
    lengths = [rng.randrange(3000, 24000) for _ in range(40)]
    plan = BatchPlan(lengths, BatchRule(batch_size=None, seconds_per_batch=2.0, max_seconds=1.5), seed=0)
    sizes = [len(plan.epoch(e)) for e in range(4)]
    assert len(set(sizes)) > 1, "the number of batches by seconds varies with the epoch's pools"
    expected = [(e, b) for e in range(4) for b in BatchPlan(lengths, plan.rule, seed=0).epoch(e)]
    assert [plan.batch(step) for step in range(sum(sizes))] == expected


def test_each_seed_crops_its_files_elsewhere(tmp_path):
    ramp = (np.arange(48000) % 30000 / 30000 - 0.5).astype(np.float32)
    soundfile.write(str(tmp_path / "ramp.wav"), ramp, RATE, subtype="FLOAT")
    manifest = scan(tmp_path, progress=False)
    crops = {seed: [batch.wavs[0] for batch in batch_loader(
        manifest, BatchPlan(manifest.num_samples, BatchRule(batch_size=1, max_seconds=0.5), seed=seed), 0, 3,
        num_workers=0)] for seed in (4, 5)}
    assert not all(torch.equal(a, b) for a, b in zip(crops[4], crops[5]))
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=1, max_seconds=0.5), seed=4)
    again = [batch.wavs[0] for batch in batch_loader(manifest, plan, 0, 3, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(crops[4], again)), "the same seed crops the same stretch"


def test_a_loader_gives_its_rank_the_rank_s_files(corpus):
    plan = BatchPlan(corpus.num_samples, BatchRule(batch_size=3, max_seconds=0.5), seed=1, world_size=2)
    three = BatchPlan(corpus.num_samples, BatchRule(batch_size=2), seed=0, world_size=3)
    for step in range(three.steps_in_epoch(0)):  # a step takes the epoch's next world_size batches, rank by rank
        assert [three.batch(step, rank)[1] for rank in range(3)] == three.epoch(0)[3 * step:3 * step + 3]
    for rank in (0, 1):
        for step, batch in enumerate(batch_loader(corpus, plan, 0, 3, rank=rank, num_workers=0)):
            files = [round(float(wav[0]) * 64) - 1 for wav in batch.wavs]  # file uttNN's samples say NN
            assert files == [int(corpus.files[i][-7:-5]) for i in plan.batch(step, rank)[1]]


def test_a_file_exactly_as_long_as_the_crop_is_read_whole_and_an_empty_one_is_skipped(tmp_path):
    whole = (np.arange(8000) / 8000 - 0.5).astype(np.float32)
    soundfile.write(str(tmp_path / "whole.wav"), whole, RATE, subtype="FLOAT")
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), RATE, subtype="FLOAT")
    manifest = Manifest(tmp_path, ["whole.wav", "empty.wav"], [8000, 8000])  # empty since the scan
    plan = BatchPlan([8000], BatchRule(batch_size=1, max_seconds=0.5), seed=0)
    (batch,) = list(batch_loader(Manifest(tmp_path, ["whole.wav"], [8000]), plan, 0, 1, num_workers=0))
    assert np.array_equal(batch.wavs[0].numpy(), whole)
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=2, max_seconds=0.5), seed=0)
    (batch,) = list(batch_loader(manifest, plan, 0, 1, num_workers=0))
    assert len(batch) == 1 and batch.skipped == [(str(tmp_path / "empty.wav"), "no samples")]


def test_a_batch_whose_every_file_fails_is_empty_and_names_them_all(tmp_path):
    for name in ("a.flac", "b.flac"):
        (tmp_path / name).write_bytes(b"not audio at all" * 10)
    manifest = Manifest(tmp_path, ["a.flac", "b.flac"], [16000, 16000])
    plan = BatchPlan(manifest.num_samples, BatchRule(batch_size=2), seed=0)
    (batch,) = list(batch_loader(manifest, plan, 0, 1, num_workers=0))
    assert len(batch) == 0 and batch.wavs.shape == (0, 0) and batch.lengths.dtype == torch.long
    assert sorted(path for path, _ in batch.skipped) == [str(tmp_path / "a.flac"), str(tmp_path / "b.flac")]
    assert all(why.startswith("LibsndfileError: ") for _, why in batch.skipped)


def test_default_workers_are_the_cores_up_to_four(monkeypatch):
    from upstream_compressed.train import stream

    monkeypatch.setattr(stream.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert stream.default_workers() == 4  # the cores this process may use, not the machine's count
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert stream.default_workers() == 3
    monkeypatch.delattr(stream.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 3)
    assert stream.default_workers() == 3
    monkeypatch.setattr(stream.os, "cpu_count", lambda: None)
    assert stream.default_workers() == 1


def test_skipped_files_are_warned_about_on_stderr_with_the_step(capsys):
    from upstream_compressed.train.stream import Batch, warn_skipped

    batch = Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [("a.flac", "no samples"), ("b.wav", "X: y")])
    warn_skipped(batch, 7)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("warning: step 7: skipped a.flac: it failed to decode (no samples)\n"
                            "warning: step 7: skipped b.wav: it failed to decode (X: y)\n")
