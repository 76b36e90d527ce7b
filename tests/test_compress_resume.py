"""Work folders of `compress`: state is reused only for the very run it came from, resume is exact
after SIGKILL in any training step, and cleaning up removes only what compress wrote."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from upstream_compressed.cli import main as cli_main
from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import read_delta
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

TRAINING_STEPS = 10
TRAINING_LINE = re.compile(r"^training: step (\d+) (\w+) start=(\d+) end=(\d+)$", re.M)


def training(audio_dir: Path, **extra) -> dict:
    return {"audio": str(audio_dir), "steps": TRAINING_STEPS, "batch_size": 2, "max_seconds": 0.5, "lr": 1e-3,
            "checkpoint_every": 2, "device": "cpu", **extra}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, atol=1e-6, rtol=0), name


# ------------------------------------------------------------- stale work from another run is not reused
def heads_recipe(base: Path, audio_dir: Path, criterion: str) -> dict:
    recovery = training(audio_dir, steps=4, checkpoint_every=4)
    return {"base": str(base), "steps": [{"method": "head_pruning", "ratio": 0.5, "criterion": criterion,
                                          "seed": 3, "recovery": recovery}]}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The tiny HuBERT's shape with other weights: a different base that fits the same work files."""
    return make_hubert_checkpoint(tmp_path_factory.mktemp("other") / "other.pt", seed=5)


@pytest.mark.parametrize("change", ["criterion", "base"])
def test_work_from_another_recipe_or_base_is_not_reused(tmp_path, hubert_ckpt, other_base, audio_dir, capfd, change):
    """An l1 run's work folder, rerun with random heads (or another base): the result is the new run's own.

    Today's failure: the l1 training checkpoint was resumed (same shapes, same training options),
    giving l1-trained weights under the random-heads manifest.
    """
    first = heads_recipe(hubert_ckpt, audio_dir, "l1")
    second = heads_recipe(other_base, audio_dir, "l1") if change == "base" else heads_recipe(hubert_ckpt, audio_dir, "random")
    work = tmp_path / "work"
    stale = run_recipe(parse_recipe(first), work_dir=work)
    capfd.readouterr()
    reused = run_recipe(parse_recipe(second), work_dir=work)
    messages = capfd.readouterr().err
    fresh = run_recipe(parse_recipe(second), work_dir=tmp_path / "fresh")

    if change == "criterion":
        assert reused.manifest["structure"] != stale.manifest["structure"], "the two criteria must keep other heads"
    assert reused.manifest == fresh.manifest
    assert_same_tensors(fresh.tensors, reused.tensors)
    differs = "recipe.steps[0].criterion: 'l1' -> 'random'" if change == "criterion" else "base_sha256"
    assert re.search(rf"not resuming .*step-0-training\.pt.*{re.escape(differs)}", messages), messages
    assert re.search(r"training: step 0 recovery start=0 end=4", messages)


def test_snapshot_from_another_recipe_is_not_reused(tmp_path, hubert_ckpt, audio_dir, capfd):
    work = tmp_path / "work"
    run_recipe(parse_recipe(heads_recipe(hubert_ckpt, audio_dir, "l1")), work_dir=work)
    capfd.readouterr()
    rerun = run_recipe(parse_recipe(heads_recipe(hubert_ckpt, audio_dir, "random")), work_dir=work)
    messages = capfd.readouterr().err
    assert re.search(r"not resuming from .*after-step-0\.pt.*criterion: 'l1' -> 'random'", messages), messages
    assert "resuming: after step" not in messages
    fresh = run_recipe(parse_recipe(heads_recipe(hubert_ckpt, audio_dir, "random")))
    assert rerun.manifest == fresh.manifest


def test_distillation_rerun_from_the_snapshot_before_it_builds_the_same_student(tmp_path, hubert_ckpt, audio_dir):
    """Killed before the distillation step's first training checkpoint: the rerun starts that step again
    from the previous snapshot, in a process whose random state differs; its student must not."""
    recipe = parse_recipe({"base": str(hubert_ckpt), "steps": [
        {"method": "row_pruning", "ratio": 0.5, "recovery": training(audio_dir, steps=2)},
        {"method": "distillation", "student_layers": 1, **training(audio_dir, steps=2)},
    ]})
    uninterrupted = run_recipe(recipe, work_dir=tmp_path / "uninterrupted")
    work = tmp_path / "rerun"
    work.mkdir()
    shutil.copy(tmp_path / "uninterrupted" / "after-step-0.pt", work)
    torch.manual_seed(12345)  # whatever this process drew before
    rerun = run_recipe(recipe, work_dir=work)
    assert rerun.manifest == uninterrupted.manifest
    assert_same_tensors(uninterrupted.tensors, rerun.tensors)


# ------------------------------------------------------------------------------- --work-dir clean-up
@pytest.fixture
def small_recipe(tmp_path, hubert_ckpt, audio_dir) -> Path:
    path = tmp_path / "recipe.yaml"
    recipe = {"base": str(hubert_ckpt), "steps": [{"method": "row_pruning", "ratio": 0.5,
                                                   "recovery": training(audio_dir, steps=2)}]}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_work_dir_keeps_files_compress_did_not_write(tmp_path, small_recipe):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (work / "sub").mkdir()
    assert cli_main(["compress", str(small_recipe), "-o", str(tmp_path / "out.safetensors"), "--work-dir", str(work)]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "sub"]  # compress's own files are gone
    assert (work / "notes.txt").read_text() == "keep me"


def test_work_dir_dot_keeps_the_current_folder(tmp_path, small_recipe, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "data.txt").write_text("x")
    monkeypatch.chdir(here)
    assert cli_main(["compress", str(small_recipe), "-o", "out.safetensors", "--work-dir", "."]) == 0
    assert sorted(p.name for p in here.iterdir()) == ["data.txt", "out.safetensors"]


def test_default_work_dir_is_removed_after_success(tmp_path, small_recipe):
    output = tmp_path / "out.safetensors"
    assert cli_main(["compress", str(small_recipe), "-o", str(output), "--keep-work"]) == 0
    assert (tmp_path / "out.safetensors.work" / "after-step-0.pt").is_file()  # --keep-work keeps it
    (tmp_path / "out.safetensors.work" / ".after-step-0.pt.abc123.tmp").write_bytes(b"")  # left by a kill
    assert cli_main(["compress", str(small_recipe), "-o", str(output)]) == 0
    assert not (tmp_path / "out.safetensors.work").exists()


# --------------------------------------------------------- SIGKILL of `compress` itself, in every step
def resume_recipe(base: Path, audio_dir: Path) -> dict:
    """Distillation (front end frozen), then heads + recovery (frozen), then rows + recovery (not frozen):
    the last step must train the front end again, whatever the earlier steps froze."""
    return {"base": str(base), "steps": [
        {"method": "distillation", "student_layers": 1, **training(audio_dir, freeze_front_end=True)},
        {"method": "head_pruning", "ratio": 0.5, "criterion": "l1",
         "recovery": training(audio_dir, freeze_front_end=True, seed=1)},
        {"method": "row_pruning", "ratio": 0.5, "recovery": training(audio_dir, seed=2)},
    ]}


def compress_command(recipe: Path, output: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "upstream_compressed.cli", "compress", str(recipe), "-o", str(output),
            "--work-dir", str(work), "--keep-work"]


def run_compress(recipe: Path, output: Path, work: Path) -> str:
    result = subprocess.run(compress_command(recipe, output, work), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def trained_steps(stderr: str) -> list[tuple[int, int, int]]:
    """(recipe step, first training step, last) of every training run that stderr reports."""
    return [(int(step), int(start), int(end)) for step, _, start, end in TRAINING_LINE.findall(stderr)]


def kill_when_written(recipe: Path, output: Path, work: Path, checkpoint: Path) -> None:
    """Start compress and SIGKILL it as soon as ``checkpoint`` exists, before its training ends."""
    log_path = work.parent / f"killed-{checkpoint.stem}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(compress_command(recipe, output, work), stdout=log, stderr=log,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    assert torch.load(checkpoint, weights_only=True)["step"] < TRAINING_STEPS


def kill_during_training(recipe: Path, output: Path, work: Path, step: int) -> None:
    """Start compress and SIGKILL it as soon as the training checkpoint of ``step`` exists."""
    kill_when_written(recipe, output, work, work / f"step-{step}-training.pt")
    assert not (work / f"after-step-{step}.pt").exists(), "killed too late: step finished"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, hubert_ckpt, audio_dir):
    folder = tmp_path_factory.mktemp("uninterrupted")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(resume_recipe(hubert_ckpt, audio_dir)))
    stderr = run_compress(recipe, folder / "delta.safetensors", folder / "work")
    assert trained_steps(stderr) == [(i, 0, TRAINING_STEPS) for i in range(3)]
    return recipe, read_delta(folder / "delta.safetensors")


@pytest.mark.parametrize("killed_step", [0, 1, 2], ids=["distillation", "recovery-frozen", "recovery"])
def test_sigkilled_compress_resumes_to_the_uninterrupted_delta(tmp_path, uninterrupted, killed_step):
    recipe, expected = uninterrupted
    work, output = tmp_path / "work", tmp_path / "delta.safetensors"
    work.mkdir()
    kill_during_training(recipe, output, work, killed_step)
    stderr = run_compress(recipe, output, work)

    # It resumed: from the snapshot of the step before, then from the killed step's training checkpoint.
    if killed_step > 0:
        assert f"resuming: after step {killed_step - 1} from {work / f'after-step-{killed_step - 1}.pt'}" in stderr
    else:
        assert "resuming: after step" not in stderr
    runs = trained_steps(stderr)
    assert [step for step, _, _ in runs] == list(range(killed_step, 3)), stderr[-3000:]
    assert runs[0][1] > 0, "the killed step's training restarted from scratch instead of resuming"
    assert sum(end - start for _, start, end in runs) < 3 * TRAINING_STEPS

    delta = read_delta(output)
    assert {k: v for k, v in delta.manifest.items() if k != "tensors_sha256"} == \
        {k: v for k, v in expected.manifest.items() if k != "tensors_sha256"}
    assert_same_tensors(expected.tensors, delta.tensors)
    assert any(name.startswith("feature_extractor.") for name in delta.tensors), "the last step trains the front end"


# ----------------------------------------- SIGKILL of `compress` in either phase of joint pruning
def joint_recipe(base: Path, audio_dir: Path, target: int) -> dict:
    return {"base": str(base), "steps": [
        {"method": "joint_pruning", "structures": ["conv", "heads", "ffn"], "target_params": target,
         **training(audio_dir), "final_distillation": training(audio_dir, seed=1)},
    ]}


@pytest.fixture(scope="module")
def joint_uninterrupted(tmp_path_factory, hubert_ckpt, audio_dir):
    from upstream_compressed.model import SpeechTransformer
    from upstream_compressed.model.convert import load_base

    base = load_base(hubert_ckpt)
    size = SpeechTransformer.from_state_dict(base.config, base.state_dict).num_parameters()
    folder = tmp_path_factory.mktemp("joint_uninterrupted")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(joint_recipe(hubert_ckpt, audio_dir, int(0.6 * size))))
    run_compress(recipe, folder / "delta.safetensors", folder / "work")
    return recipe, read_delta(folder / "delta.safetensors")


@pytest.mark.parametrize("phase", ["training", "final"])
def test_sigkilled_joint_pruning_resumes_to_the_uninterrupted_delta(tmp_path, joint_uninterrupted, phase):
    """Killed while the gates train (``step-0-training.pt``) or during the final distillation
    (``step-0-final.pt``): the rerun continues from that checkpoint to the same delta (1e-6)."""
    recipe, expected = joint_uninterrupted
    work, output = tmp_path / "work", tmp_path / "delta.safetensors"
    work.mkdir()
    kill_when_written(recipe, output, work, work / f"step-0-{phase}.pt")
    stderr = run_compress(recipe, output, work)
    description = "joint pruning" if phase == "training" else "final distillation"
    started = re.search(rf"^training: step 0 {description} start=(\d+) end={TRAINING_STEPS}$", stderr, re.M)
    assert started and int(started.group(1)) > 0, stderr[-3000:]  # resumed, not restarted
    delta = read_delta(output)
    assert {k: v for k, v in delta.manifest.items() if k != "tensors_sha256"} == \
        {k: v for k, v in expected.manifest.items() if k != "tensors_sha256"}
    assert_same_tensors(expected.tensors, delta.tensors)
