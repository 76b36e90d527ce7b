"""Unit tests of each shim in ``upstream_compressed.s3prl_compat``."""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from upstream_compressed import s3prl_compat
from upstream_compressed.testing.corpus import make_tiny_corpus, make_tiny_voxceleb1

REPO = Path(__file__).resolve().parents[1]
TINY_CTC = REPO / "downstream_configs" / "ctc_libriphone_tiny.yaml"

s3prl_compat.apply()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2)


# -- apply ----------------------------------------------------------------------------------


def test_apply_is_idempotent_and_cheap():
    import torchaudio
    from s3prl.downstream.ctc import data
    from s3prl.downstream.voxceleb1.dataset import SpeakerClassifiDataset

    before = (torchaudio.load, data.load_dataset, SpeakerClassifiDataset.__init__)
    start = time.perf_counter()
    s3prl_compat.apply()
    s3prl_compat.apply()
    assert time.perf_counter() - start < 0.05
    # Re-running every shim must not wrap anything twice.
    s3prl_compat._shim_torchaudio_io()
    s3prl_compat._shim_ctc_num_workers()
    s3prl_compat._shim_voxceleb1_cache()
    s3prl_compat._shim_ctc_corpus()
    s3prl_compat._shim_torch_load()
    assert (torchaudio.load, data.load_dataset, SpeakerClassifiDataset.__init__) == before


def test_apply_without_argv_leaves_sys_argv_alone(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--local-rank=1"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    s3prl_compat.apply()
    assert sys.argv == ["prog", "--local-rank=1"]


def test_s3prl_entry_points_import():
    import s3prl.hub  # noqa: F401
    import s3prl.run_downstream  # noqa: F401

    assert hasattr(s3prl.hub, "hubert_local") and hasattr(s3prl.hub, "distiller_local")


# -- torchaudio -----------------------------------------------------------------------------


def test_torchaudio_backend_and_sox_effects():
    import torchaudio
    import torchaudio.sox_effects as sox_effects

    torchaudio.set_audio_backend("sox_io")  # a no-op, must not raise
    with pytest.raises(RuntimeError, match="sox_effects"):
        sox_effects.apply_effects_tensor(torch.zeros(1, 10), 16000, [])


@pytest.mark.parametrize("suffix", [".flac", ".wav"])
def test_torchaudio_load_reads_with_soundfile(tmp_path, suffix):
    import torchaudio

    rng = np.random.default_rng(0)
    stereo = (0.5 * rng.standard_normal((1600, 2))).clip(-1, 1).astype(np.float32)
    path = tmp_path / f"x{suffix}"
    soundfile.write(str(path), stereo, 16000, subtype="PCM_16")
    expected = soundfile.read(str(path), dtype="float32")[0]

    wav, sr = torchaudio.load(str(path))
    assert sr == 16000 and wav.dtype == torch.float32 and wav.shape == (2, 1600)
    np.testing.assert_allclose(wav.numpy(), expected.T)

    part, _ = torchaudio.load(path, frame_offset=100, num_frames=50, channels_first=False)
    assert part.shape == (50, 2)
    np.testing.assert_allclose(part.numpy(), expected[100:150])

    raw, _ = torchaudio.load(path, normalize=False)
    assert raw.dtype == torch.int16  # old torchaudio: stored integers when not normalising

    info = torchaudio.info(str(path))
    assert (info.sample_rate, info.num_frames, info.num_channels, info.bits_per_sample) == (16000, 1600, 2, 16)


def test_torchaudio_load_is_kept_when_torchcodec_exists(monkeypatch):
    def sentinel(*args, **kwargs):
        return "torchcodec"

    fake = types.SimpleNamespace(load=sentinel)
    monkeypatch.setattr(s3prl_compat, "_torchcodec_available", lambda: True)
    s3prl_compat._shim_torchaudio_io(fake)
    assert fake.load is sentinel and fake.info is s3prl_compat.soundfile_info

    monkeypatch.setattr(s3prl_compat, "_torchcodec_available", lambda: False)
    s3prl_compat._shim_torchaudio_io(fake)
    assert fake.load is s3prl_compat.soundfile_load


# -- huggingface_hub ------------------------------------------------------------------------


def test_huggingface_hub_names_added_only_when_missing():
    removed = types.ModuleType("huggingface_hub")  # what huggingface_hub >= 1.0 looks like
    s3prl_compat._shim_huggingface_hub(removed)
    assert removed.HfFolder is s3prl_compat._HfFolder
    with pytest.raises(RuntimeError, match="push_to_hf_hub"):
        removed.Repository(local_dir="x", clone_from="y")

    present = types.ModuleType("huggingface_hub")
    present.HfFolder, present.Repository = object(), object()
    kept = (present.HfFolder, present.Repository)
    s3prl_compat._shim_huggingface_hub(present)
    assert (present.HfFolder, present.Repository) == kept

    import huggingface_hub

    assert huggingface_hub.HfFolder is not s3prl_compat._HfFolder  # the pinned < 1.0 has its own


# -- torch.load -----------------------------------------------------------------------------


def _parse_s3prl_args(monkeypatch, tmp_path, *extra: str) -> tuple[argparse.Namespace, dict]:
    """s3prl's own command-line parsing, as ``run_downstream.py`` does it."""
    from s3prl.run_downstream import get_downstream_args

    argv = ["run_downstream.py", "-m", "train", "-u", "hubert_local", "-d", "ctc",
            "-c", str(TINY_CTC), "-p", str(tmp_path / "exp"), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    args, config, _ = get_downstream_args()
    return args, config


def test_states_checkpoint_loads_weights_only(monkeypatch, tmp_path):
    """A ``states-*.ckpt`` with everything s3prl's runner puts in it loads with the default torch.load."""
    from s3prl.optimizers import get_optimizer
    from s3prl.schedulers import get_scheduler

    args, config = _parse_s3prl_args(monkeypatch, tmp_path, "-o", "config.optimizer.lr=0.5")
    model = torch.nn.Linear(4, 3)
    optimizer = get_optimizer([model], 10, config["optimizer"])
    scheduler = get_scheduler(optimizer, 10, {"name": "linear_schedule_with_warmup", "num_warmup_steps": 2})
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    states = {
        "Optimizer": optimizer.state_dict(),
        "Step": 1,
        "Epoch": 0,
        "Args": args,
        "Config": config,
        "Downstream": model.state_dict(),
        "Scheduler": scheduler.state_dict(),
    }
    path = tmp_path / "states-1.ckpt"
    torch.save(states, path)

    loaded = torch.load(path, map_location="cpu")  # weights_only=True by default
    assert loaded["Args"] == args and loaded["Config"]["optimizer"]["lr"] == 0.5
    assert loaded["Scheduler"] == scheduler.state_dict()
    torch.testing.assert_close(loaded["Downstream"], model.state_dict())


class _NotAllowed:
    pass


def test_torch_load_stays_weights_only(tmp_path):
    """The shim allow-lists classes; it does not turn the safe unpickler off."""
    torch.save({"x": _NotAllowed()}, tmp_path / "bad.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "bad.ckpt")


# -- ctc corpus -----------------------------------------------------------------------------


def test_ctc_corpus_served_under_s3prl_name():
    from upstream_compressed.corpus.libriphone import LibriPhoneDataset

    module = importlib.import_module("s3prl.downstream.ctc.corpus.libriphone")
    assert module.LibriPhoneDataset is LibriPhoneDataset  # one class, not a second copy
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("s3prl.downstream.ctc.corpus.librispeech")  # not provided: s3prl's error


def test_ctc_loader_keeps_num_workers(corpus):
    from s3prl.downstream.ctc.data import load_dataset
    from s3prl.downstream.ctc.text import load_text_encoder

    tokenizer = load_text_encoder("word", str(corpus.phone_vocab))
    config = dict(name="libriphone", path=str(corpus.librispeech), lexicon=str(corpus.lexicon),
                  train=["train-clean-100"], dev=["dev-clean"], test=["test-clean"],
                  bucketing=True, batch_size=2, num_workers=0)
    for split in ("train", "dev", "test"):
        loader = load_dataset(split, tokenizer, config)
        assert loader.num_workers == 0, split  # unshimmed s3prl gives dev/test 12 workers
    assert config["num_workers"] == 0


# -- voxceleb1 cache ------------------------------------------------------------------------


def test_voxceleb1_cache_keyed_by_data(monkeypatch, tmp_path):
    from s3prl.downstream.voxceleb1 import dataset as vox

    cache = tmp_path / "cache"
    monkeypatch.setenv(s3prl_compat.VOXCELEB1_CACHE_ENV, str(cache))
    site_cache = Path(vox._upstream_compressed_default_cache)
    site_before = sorted(site_cache.rglob("*")) if site_cache.exists() else None

    big_root, big_split = make_tiny_voxceleb1(tmp_path / "big", num_speakers=3, per_speaker=(2, 1, 1))
    toy_root, toy_split = make_tiny_voxceleb1(tmp_path / "toy", num_speakers=2, per_speaker=(1, 1, 1), seed=1)

    toy = vox.SpeakerClassifiDataset("train", toy_root, toy_split)
    big = vox.SpeakerClassifiDataset("train", big_root, big_split)  # s3prl alone would reuse toy's list
    assert len(toy) == 2 and all(p.startswith(str(toy_root)) for p in toy.dataset)
    assert len(big) == 6 and all(p.startswith(str(big_root)) for p in big.dataset)
    assert len(list(cache.glob("*/train.pkl"))) == 2

    again = vox.SpeakerClassifiDataset("train", big_root, big_split)  # served from its own cache
    assert again.dataset == big.dataset
    assert (sorted(site_cache.rglob("*")) if site_cache.exists() else None) == site_before


def test_voxceleb1_cache_key_follows_split_file(monkeypatch, tmp_path):
    monkeypatch.delenv(s3prl_compat.VOXCELEB1_CACHE_ENV, raising=False)
    split = tmp_path / "iden_split.txt"
    split.write_text("1 id10001/a/00001.wav\n")
    first = s3prl_compat.voxceleb1_cache_dir(tmp_path, split, "/default")
    assert first.startswith("/default/")
    assert s3prl_compat.voxceleb1_cache_dir(tmp_path, split, "/default") == first
    assert s3prl_compat.voxceleb1_cache_dir(tmp_path / "other", split, "/default") != first
    split.write_text("1 id10001/a/00001.wav\n3 id10001/a/00002.wav\n")
    assert s3prl_compat.voxceleb1_cache_dir(tmp_path, split, "/default") != first
    monkeypatch.setenv(s3prl_compat.VOXCELEB1_CACHE_ENV, str(tmp_path / "c"))
    assert s3prl_compat.voxceleb1_cache_dir(tmp_path, split, "/default").startswith(str(tmp_path / "c"))


# -- local rank -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["p", "-m", "train", "--local-rank=1"], {}, ["p", "-m", "train", "--local_rank=1"]),
        (["p", "--local-rank", "2", "-m", "train"], {}, ["p", "--local_rank", "2", "-m", "train"]),
        (["p", "-m", "train"], {"LOCAL_RANK": "3"}, ["p", "-m", "train", "--local_rank=3"]),
        (["p", "--local-rank=0"], {"LOCAL_RANK": "0"}, ["p", "--local_rank=0"]),
        (["p", "--local_rank", "1"], {"LOCAL_RANK": "1"}, ["p", "--local_rank", "1"]),
        (["p", "-m", "train"], {"LOCAL_RANK": ""}, ["p", "-m", "train"]),
        (["p", "-m", "train"], {}, ["p", "-m", "train"]),
        (["p", "--", "--local-rank=1"], {}, ["p", "--", "--local-rank=1"]),
    ],
)
def test_fix_local_rank_argv(argv, env, expected):
    result = s3prl_compat.fix_local_rank_argv(argv, env)
    assert result is argv and argv == expected


def test_local_rank_reaches_s3prl_parser(monkeypatch, tmp_path):
    """After the fix, s3prl's own argparse sees the rank that torchrun/launch gave."""
    from s3prl.run_downstream import get_downstream_args

    argv = ["run_downstream.py", "-m", "train", "-u", "hubert_local", "-d", "ctc",
            "-c", str(TINY_CTC), "-p", str(tmp_path / "exp"), "--local-rank=1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    s3prl_compat.apply(argv=sys.argv)
    args, _, _ = get_downstream_args()
    assert args.local_rank == 1

    monkeypatch.setattr(sys, "argv", argv[:-1])
    monkeypatch.setenv("LOCAL_RANK", "2")
    s3prl_compat.apply(argv=sys.argv)
    args, _, _ = get_downstream_args()
    assert args.local_rank == 2
