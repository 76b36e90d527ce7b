"""Distillation training: a killed run resumes to the same weights; torchrun with 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "distill_run.py"


def run_worker(*args, env=None, check=True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          env=environment, check=check, timeout=600)


@pytest.mark.parametrize("objective", ["hidden_states", "cluster_kl"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, hubert_ckpt, audio_dir, objective):
    steps, flag = 8, f"--objective={objective}"
    run_worker(hubert_ckpt, audio_dir, tmp_path / "straight.pt", tmp_path / "straight", steps, flag)
    straight = torch.load(tmp_path / "straight.rank0", weights_only=True)

    killed = run_worker(hubert_ckpt, audio_dir, tmp_path / "resumed.pt", tmp_path / "resumed", steps, flag,
                        "--kill-after=5", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "resumed.pt").is_file()  # the checkpoint of step 4 survived the kill
    run_worker(hubert_ckpt, audio_dir, tmp_path / "resumed.pt", tmp_path / "resumed", steps, flag)
    resumed = torch.load(tmp_path / "resumed.rank0", weights_only=True)
    if objective == "cluster_kl":  # the student's training-only cluster head resumes too
        heads = [torch.load(tmp_path / f"{run}.pt", weights_only=True)["cluster_head"] for run in ("straight", "resumed")]
        for name, tensor in heads[0].items():
            assert torch.allclose(heads[1][name], tensor, atol=1e-6), name

    assert resumed["resumed_from"] == 4
    assert len(resumed["history"]) == steps
    assert resumed["history"] == pytest.approx(straight["history"], abs=1e-6)
    for name, tensor in straight["state"].items():
        assert torch.allclose(resumed["state"][name], tensor, atol=1e-6), name
    if objective == "hidden_states":  # and it learned something (cluster_kl: test_logit_distillation checks that)
        assert straight["history"][-1] < straight["history"][0]


def test_torchrun_two_cpu_processes(tmp_path, hubert_ckpt, audio_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(hubert_ckpt), str(audio_dir), str(tmp_path / "ddp.pt"), str(tmp_path / "ddp"), "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp.rank0", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp.rank1", weights_only=True)
    assert len(rank0["history"]) == 4
    for name, tensor in rank0["state"].items():  # DDP keeps the replicas identical
        assert torch.equal(rank1["state"][name], tensor), name
    checkpoint = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert checkpoint["step"] == 4 and len(checkpoint["rng"]) == 2


# ------------------------------------------------------------------ in-process: what trains, what resumes
def tiny_pair(ckpt):
    from upstream_compressed.model import SpeechTransformer
    from upstream_compressed.model.convert import load_base

    base = load_base(ckpt)
    return (SpeechTransformer.from_state_dict(base.config, base.state_dict),
            SpeechTransformer.from_state_dict(base.config, base.state_dict))


def quick_options(audio_dir, **extra):
    from upstream_compressed.train.distill import TrainOptions

    return TrainOptions(**{"audio": str(audio_dir), "steps": 2, "batch_size": 2, "max_seconds": 0.5, "lr": 1e-2,
                           "checkpoint_every": 2, "device": "cpu", **extra})


def front_end(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.feature_extractor.state_dict().items()}


def test_each_run_trains_what_its_own_options_say(tmp_path, hubert_ckpt, audio_dir):
    """A frozen front end in one run must not stay frozen in the next run on the same modules."""
    from upstream_compressed.train.distill import train_distillation

    student, teacher = tiny_pair(hubert_ckpt)
    student.layers[0].attention.out_proj.weight.data.mul_(0.5)  # something to recover
    before = front_end(student)
    train_distillation(student, teacher, quick_options(audio_dir, freeze_front_end=True), tmp_path / "a.pt")
    frozen = front_end(student)
    assert all(torch.equal(before[k], frozen[k]) for k in before)
    train_distillation(student, teacher, quick_options(audio_dir, seed=1), tmp_path / "b.pt")
    assert any(not torch.equal(frozen[k], v) for k, v in front_end(student).items()), "front end stayed frozen"


def test_a_checkpoint_from_other_work_is_not_resumed(tmp_path, hubert_ckpt, audio_dir, capfd):
    from upstream_compressed.train.distill import train_distillation

    checkpoint = tmp_path / "run.pt"
    student, teacher = tiny_pair(hubert_ckpt)
    train_distillation(student, teacher, quick_options(audio_dir), checkpoint, description="run", origin={"criterion": "l1"})
    capfd.readouterr()

    same = train_distillation(tiny_pair(hubert_ckpt)[0], teacher, quick_options(audio_dir), checkpoint,
                              description="run", origin={"criterion": "l1"})
    assert same.resumed_from == 2 and "training: run start=2 end=2" in capfd.readouterr().err

    other = train_distillation(tiny_pair(hubert_ckpt)[0], teacher, quick_options(audio_dir), checkpoint,
                               description="run", origin={"criterion": "random"})
    err = capfd.readouterr().err
    assert other.resumed_from == 0 and "training: run start=0 end=2" in err
    assert f"not resuming {checkpoint}" in err and "origin.criterion: 'l1' -> 'random'" in err

    options = train_distillation(tiny_pair(hubert_ckpt)[0], teacher, quick_options(audio_dir, lr=1e-3), checkpoint,
                                 description="run", origin={"criterion": "random"})
    assert options.resumed_from == 0 and "options.lr: 0.01 -> 0.001" in capfd.readouterr().err


def test_resuming_on_another_process_count_is_refused(tmp_path, hubert_ckpt, audio_dir):
    """Each process takes its own slice of every step's batches, so 2 processes cannot continue a 1-process run."""
    killed = run_worker(hubert_ckpt, audio_dir, tmp_path / "run.pt", tmp_path / "run", 6, "--kill-after=3", check=False)
    assert killed.returncode == -9 and (tmp_path / "run.pt").is_file()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(hubert_ckpt), str(audio_dir), str(tmp_path / "run.pt"), str(tmp_path / "ddp"), "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "was written by a run on 1 process(es) and this run has 2" in result.stderr
    assert "Resume with the same count" in result.stderr
    assert not (tmp_path / "ddp.rank0").exists()
    # the same count still resumes
    run_worker(hubert_ckpt, audio_dir, tmp_path / "run.pt", tmp_path / "run", 6)
    assert torch.load(tmp_path / "run.rank0", weights_only=True)["resumed_from"] == 2
