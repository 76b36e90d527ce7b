"""experiment --launcher: every compression and downstream run as its own submitit job (local executor here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from upstream_compressed.cli import main
from upstream_compressed.launch import Launcher, SlurmOptions, job_environment, make_launcher


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from upstream_compressed.embedded.synth_corpus import CorpusOptions, make_corpus

    options = CorpusOptions(speakers=3, utterances=4, sid_utterances=5)
    return make_corpus(tmp_path_factory.mktemp("synth") / "corpus", options, progress=False).root


def _plan(tmp_path: Path, base: Path) -> Path:
    recipe = tmp_path / "heads.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "steps": [{"method": "head_pruning", "ratio": 0.5,
                                                                     "criterion": "l1"}]}))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "base": str(base), "pr_config": "ctc_libriphone_quick", "sid_config": "voxceleb1_quick",
        "models": [{"name": "heads50", "method": "head_pruning", "rate": 0.5, "recipe": "heads.yaml",
                    "upstream": "hubert_headpruned"}],
    }))
    return plan


def test_each_compression_and_downstream_run_is_its_own_job_and_a_rerun_submits_nothing(
        tmp_path, hubert_ckpt, tiny_corpus, capsys):
    expdir = tmp_path / "exp"
    command = ["experiment", str(_plan(tmp_path, hubert_ckpt)), "--corpus", str(tiny_corpus), "--expdir", str(expdir),
               "--tasks", "pr", "--pr-steps", "2", "--launcher", "submitit-local", "--slurm-gpus", "0",
               "--quiet"]
    assert main(command) == 0
    assert "PR   heads50" in capsys.readouterr().out
    result = json.loads((expdir / "downstream" / "pr_heads50" / "result.json").read_text())
    assert result["steps"] == 2 and 0 <= result["test"]
    def job_logs() -> list[Path]:
        return sorted((expdir / "slurm").glob("*_log.out"))

    assert len(job_logs()) == 2, "one job for the compression, one for the downstream run"
    assert main(command) == 0  # everything is kept: nothing is submitted again
    assert len(job_logs()) == 2


def test_a_job_gets_the_machine_environment_plus_only_the_plans_variables(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.setenv("UPSTREAM_COMPRESSED_TRUST_CHECKPOINT", "1")
    environment = job_environment({"CORPUS": "/data/corpus", "OMP_NUM_THREADS": "4"})
    assert environment == {"UPSTREAM_COMPRESSED_TRUST_CHECKPOINT": "1", "CORPUS": "/data/corpus", "OMP_NUM_THREADS": "4"}


def test_slurm_parameters_and_launcher_kinds(tmp_path):
    assert SlurmOptions(partition="gpu", gpus=2, time_min=60, mem_gb=64, cpus=10).parameters("pr_x") == {
        "name": "pr_x", "timeout_min": 60, "mem_gb": 64, "cpus_per_task": 10, "gpus_per_node": 2,
        "slurm_partition": "gpu"}
    assert type(make_launcher("local", {}, tmp_path)) is Launcher
    assert make_launcher("submitit-local", {}, tmp_path).name == "submitit-local"
    with pytest.raises(ValueError, match="not one of"):
        make_launcher("pbs", {}, tmp_path)


def test_a_failed_job_names_its_logs(tmp_path):
    launcher = make_launcher("submitit-local", {}, tmp_path, SlurmOptions(gpus=0, time_min=5))

    def broken(env):
        raise OSError("disk full on the node")

    with pytest.raises(RuntimeError, match=r"(?s)job .* \(broken\) failed; its logs: .*disk full on the node"):
        launcher.call("broken", broken)
