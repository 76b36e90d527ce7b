"""Distillation's audio batches: full, length-grouped, shuffled, cropped, and a function of (seed, epoch, step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from upstream_compressed.audio import SAMPLE_RATE
from upstream_compressed.train.data import AudioBatches


def write_ramps(directory: Path, lengths: list[int]) -> Path:
    """One file per length; file k holds k + sample/1e6, so any sample tells which file and offset it came from."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(lengths):
        soundfile.write(directory / f"f{k:02d}.wav", (k + np.arange(n) / 1e6).astype(np.float32), SAMPLE_RATE,
                        subtype="FLOAT")
    return directory


@pytest.fixture
def forty(tmp_path):
    """40 files of distinct lengths (0.10-0.49 s): five pools of eight batches of two."""
    return write_ramps(tmp_path / "forty", [1600 + 160 * ((7 * k) % 40) for k in range(40)])


def as_sets(batches: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset(b) for b in batches}


def test_an_epoch_is_full_batches_each_file_at_most_once(tmp_path):
    data = AudioBatches(write_ramps(tmp_path / "a", [800 + 100 * k for k in range(11)]), 3, 1.0, seed=0)
    assert data.batches_per_epoch() == 3
    batches = data.epoch_order(0)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)  # the 11th file and 2 more wait for another epoch
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == 9 and set(seen) <= set(range(11))


def test_fewer_files_than_a_batch_still_give_one_batch(tmp_path):
    data = AudioBatches(write_ramps(tmp_path / "a", [800, 900]), 4, 1.0, seed=0)
    assert data.batches_per_epoch() == 1
    assert [sorted(b) for b in data.epoch_order(0)] == [[0, 1]]
    assert data.batch(0).lengths.tolist() in ([800, 900], [900, 800])
    assert data.batch(1).wavs.shape == (2, 900)  # the next epoch: the same two files


def test_batches_group_files_of_similar_length(tmp_path):
    lengths = [3000, 800, 2500, 900, 1800, 1000, 2600, 1700]  # one pool: sorted, then cut into batches
    data = AudioBatches(write_ramps(tmp_path / "a", lengths), 2, 1.0, seed=3)
    pairs = {frozenset(lengths[i] for i in b) for b in data.epoch_order(0)}
    assert pairs == {frozenset(p) for p in ([800, 900], [1000, 1700], [1800, 2500], [2600, 3000])}


def test_the_order_is_a_function_of_seed_and_epoch(forty):
    data = AudioBatches(forty, 2, 1.0, seed=1)
    again = AudioBatches(forty, 2, 1.0, seed=1)
    assert data.epoch_order(4) == again.epoch_order(4)
    orders = {(seed, epoch): AudioBatches(forty, 2, 1.0, seed=seed).epoch_order(epoch)
              for seed in (0, 1, 2) for epoch in (0, 1, 2)}
    assert len({repr(o) for o in orders.values()}) == 9  # no two (seed, epoch) pairs share an order
    assert orders[(1, 0)] != orders[(0, 1)]


def test_files_meet_different_partners_in_different_epochs(forty):
    data = AudioBatches(forty, 2, 1.0, seed=0)
    epochs = [as_sets(data.epoch_order(epoch)) for epoch in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # the pools are drawn afresh, not fixed runs of files


def test_batches_are_not_served_in_length_order(tmp_path):
    lengths = [800 + 100 * k for k in range(16)]  # one pool of 8 batches
    data = AudioBatches(write_ramps(tmp_path / "a", lengths), 2, 1.0, seed=0)
    for epoch in range(3):
        shortest = [min(lengths[i] for i in b) for b in data.epoch_order(epoch)]
        assert shortest != sorted(shortest)  # not a short-to-long curriculum


def test_steps_walk_the_epochs_in_order(forty):
    data = AudioBatches(forty, 2, 1.0, seed=0)
    per_epoch = data.batches_per_epoch()
    assert per_epoch == 20
    for step in (0, 7, 19, 20, 45):
        epoch, position = divmod(step, per_epoch)
        assert sorted(data.batch(step).lengths.tolist()) == sorted(data.lengths[i] for i in data.epoch_order(epoch)[position])


def test_ranks_take_disjoint_slices_of_each_epoch(forty):
    data = AudioBatches(forty, 2, 1.0, seed=0)
    order = data.epoch_order(1)
    # 20 batches, 2 ranks: each takes 10 steps per epoch; step s of epoch e is batches 2s and 2s + 1 of the epoch
    for rank in (0, 1):
        got = [sorted(data.batch(10 + s, rank, world_size=2).lengths.tolist()) for s in range(10)]
        assert got == [sorted(data.lengths[i] for i in order[2 * s + rank]) for s in range(10)]
    assert sorted(data.batch(20, 0, world_size=2).lengths.tolist()) == sorted(
        data.lengths[i] for i in data.epoch_order(2)[0])


def test_a_batch_is_zero_padded_with_its_true_lengths(tmp_path):
    data = AudioBatches(write_ramps(tmp_path / "a", [800, 1200]), 2, 1.0, seed=0)
    batch = data.batch(0)
    order = batch.lengths.tolist()
    assert sorted(order) == [800, 1200] and batch.wavs.shape == (2, 1200)
    short = order.index(800)
    assert torch.equal(batch.wavs[short, 800:], torch.zeros(400))
    ramp = torch.arange(1200) / 1e6
    assert torch.allclose(batch.wavs[short, :800], ramp[:800]) and torch.allclose(batch.wavs[1 - short], 1 + ramp)


def crop_start(batch_wavs: torch.Tensor) -> int:
    """Where the crop of file 0 (the row whose ramp starts below 1) begins in that file."""
    row = int(torch.argmin(batch_wavs[:, 0]))
    return round(float(batch_wavs[row, 0]) * 1e6)


def test_long_files_are_cropped_to_max_seconds_anywhere_and_reproducibly(tmp_path):
    # 0.1 s limit: file 0 is longer, file 1 exactly that long (kept whole), file 2 shorter
    data = AudioBatches(write_ramps(tmp_path / "a", [8000, 1600, 900]), 3, 0.1, seed=0)
    starts = []
    for epoch in range(6):
        batch = data.batch(epoch)
        by_file = {int(batch.wavs[row, 0].floor()): row for row in range(3)}
        assert sorted(batch.lengths.tolist()) == [900, 1600, 1600]
        start = crop_start(batch.wavs)
        assert 0 <= start <= 8000 - 1600
        crop = batch.wavs[by_file[0], :1600]
        assert torch.allclose(crop, torch.arange(start, start + 1600) / 1e6, atol=1e-6)  # one contiguous window
        assert round((float(batch.wavs[by_file[1], 0]) - 1) * 1e6) == 0  # the file of exactly 0.1 s is whole
        assert torch.equal(batch.wavs, AudioBatches(tmp_path / "a", 3, 0.1, seed=0).batch(epoch).wavs)
        starts.append(start)
    assert len(set(starts)) >= 4  # each epoch crops elsewhere
    other_seed = [crop_start(AudioBatches(tmp_path / "a", 3, 0.1, seed=1).batch(e).wavs) for e in range(6)]
    assert other_seed != starts
