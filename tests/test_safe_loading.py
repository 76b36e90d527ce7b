"""Base checkpoints are read weights-only: a file that would run code is refused unless the user opts in.

The malicious file is a real converted-HuBERT checkpoint whose ``task_cfg`` carries an object that,
when unpickled, creates a marker file. The real-format checkpoints (built with S3PRL's own classes,
with what S3PRL's and MelHuBERT's training runners save beside the weights) load with no opt-in.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from upstream_compressed.cli import main as cli_main
from upstream_compressed.delta import DeltaError
from upstream_compressed.model.convert import CheckpointError, UntrustedCheckpointError, load_base
from upstream_compressed.model.trust import TRUST_ENV, TrustedCheckpointWarning, trusting
from upstream_compressed.testing.checkpoints import (
    make_distiller_checkpoint,
    make_hubert_checkpoint,
    make_melhubert_checkpoint,
)

OPT_INS = ("--trust-checkpoint", "trust_checkpoint: true", f"{TRUST_ENV}=1")
# The settings of S3PRL's distiller pretraining (s3prl/pretrain/distiller/config_runner.yaml).
DISTILLER_OPTIMIZER = {"name": "AdamW_with_schedule", "lr": 2e-4, "warmup_proportion": 0.07,
                       "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 1e-6}


class Payload:
    """Unpickles as a call that creates ``marker``: what a malicious checkpoint runs when loaded."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(autouse=True)
def no_opt_in_from_the_environment(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _with_payload(path: pathlib.Path, marker: pathlib.Path, put) -> pathlib.Path:
    ckpt = torch.load(path, weights_only=True)
    put(ckpt, Payload(marker))
    torch.save(ckpt, path)
    return path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


@pytest.fixture
def evil_hubert(tmp_path, marker):
    """A converted HuBERT (S3PRL's format) with the payload in ``task_cfg``, where fairseq's config goes."""
    path = make_hubert_checkpoint(tmp_path / "evil_hubert.pt")
    return _with_payload(path, marker, lambda ckpt, payload: ckpt["task_cfg"].update(fine_tuning=payload))


@pytest.fixture
def evil_delta(tmp_path, evil_hubert, marker):
    """An identity delta of ``evil_hubert`` (made trusting it; the marker is then removed)."""
    recipe = tmp_path / "identity.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(evil_hubert), "steps": []}))
    delta = tmp_path / "identity.safetensors"
    with pytest.warns(TrustedCheckpointWarning):
        assert cli_main(["compress", str(recipe), "-o", str(delta), "--trust-checkpoint"]) == 0
    marker.unlink()
    return delta


def _assert_refusal(message: str, path: pathlib.Path) -> None:
    assert str(path) in message and "getattr" in message  # the file, and the global torch refused
    for opt_in in OPT_INS:
        assert opt_in in message


# ------------------------------------------------------------------------------ compress (CLI)
def _compress(tmp_path, base, *extra, env=None):
    recipe = tmp_path / "recipe.yaml"
    steps = [{"method": "head_pruning", "ratio": 0.5, "criterion": "l1"}]
    recipe.write_text(yaml.safe_dump({"base": str(base), "steps": steps}))
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "upstream_compressed.cli", "compress", str(recipe), "-o", str(out), *extra],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )
    return result, out


def test_compress_refuses_a_base_that_would_run_code(tmp_path, evil_hubert, marker):
    result, out = _compress(tmp_path, evil_hubert)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    _assert_refusal(result.stderr, evil_hubert)
    assert not marker.exists()
    assert not out.exists() and not out.with_name(out.name + ".work").exists()  # refused before any work


@pytest.mark.parametrize("opt_in", ["flag", "env"])
def test_compress_loads_a_trusted_base_and_warns_naming_it(tmp_path, evil_hubert, marker, opt_in):
    extra, env = (["--trust-checkpoint"], None) if opt_in == "flag" else ([], {TRUST_ENV: "1"})
    result, out = _compress(tmp_path, evil_hubert, *extra, env=env)
    assert result.returncode == 0, result.stderr
    assert "TrustedCheckpointWarning" in result.stderr and str(evil_hubert) in result.stderr
    assert marker.exists() and out.is_file()


# ------------------------------------------------------------------------- upstreams (s3prl.hub)
def test_upstream_refuses_a_base_that_would_run_code(s3prl_hub, evil_delta, evil_hubert, marker):
    for name in ("compressed_local", "hubert_identity"):
        with pytest.raises(DeltaError) as error:
            getattr(s3prl_hub, name)(ckpt=str(evil_delta), model_config=None, refresh=False)
        _assert_refusal(str(error.value), evil_hubert)
    assert not marker.exists()


@pytest.mark.parametrize("opt_in", ["g_yaml", "env", "cli"])
def test_upstream_loads_a_trusted_base_and_warns_naming_it(tmp_path, monkeypatch, s3prl_hub, evil_delta,
                                                           evil_hubert, marker, opt_in):
    options = tmp_path / "options.yaml"
    options.write_text("trust_checkpoint: true\n")
    if opt_in == "env":
        monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(TrustedCheckpointWarning, match=str(evil_hubert)):
        if opt_in == "cli":  # profile builds the upstream through s3prl.hub, as run_downstream.py does
            command = ["profile", "-u", "compressed_local", "-k", str(evil_delta), "--seconds", "0.5",
                       "--repeats", "1", "--trust-checkpoint"]
            assert cli_main(command) == 0
        else:
            model_config = str(options) if opt_in == "g_yaml" else None
            upstream = s3prl_hub.compressed_local(ckpt=str(evil_delta), model_config=model_config, refresh=False)
            assert len(upstream([torch.zeros(16000)])["hidden_states"]) == 3
    assert marker.exists()


def test_hubert_tiny_checks_its_k_before_s3prls_loader(tmp_path, s3prl_hub, evil_hubert, marker):
    """``hubert_tiny -k`` hands the file to S3PRL's own ``hubert_local``; ours refuses it first."""
    with pytest.raises(DeltaError) as error:
        s3prl_hub.hubert_tiny(ckpt=str(evil_hubert))
    _assert_refusal(str(error.value), evil_hubert)
    assert not marker.exists()
    options = tmp_path / "options.yaml"
    options.write_text("trust_checkpoint: true\n")
    with pytest.warns(TrustedCheckpointWarning, match=str(evil_hubert)):
        upstream = s3prl_hub.hubert_tiny(ckpt=str(evil_hubert), model_config=str(options))
    assert marker.exists() and len(upstream([torch.zeros(16000)])["hidden_states"]) == 3


# ------------------------------------------------------------------- the other base-loading commands
@pytest.fixture
def evil_distiller(tmp_path, marker):
    path = make_distiller_checkpoint(tmp_path / "evil_distiller.ckpt")
    return _with_payload(path, marker, lambda ckpt, payload: ckpt.update(Args=payload))


@pytest.mark.parametrize("command", ["analyse heads", "export", "profile ours", "profile s3prl"])
def test_every_base_loading_command_refuses_without_opt_in(tmp_path, capsys, evil_delta, evil_hubert,
                                                           evil_distiller, audio_dir, marker, command):
    argv, base = {
        "analyse heads": (["analyse", "heads", "--base", str(evil_hubert), "--audio", str(audio_dir),
                           "-o", str(tmp_path / "heads"), "--max-utterances", "2"], evil_hubert),
        "export": (["export", str(evil_delta), "-o", str(tmp_path / "full.safetensors")], evil_hubert),
        "profile ours": (["profile", "-u", "compressed_local", "-k", str(evil_delta)], evil_hubert),
        # S3PRL's distiller loader unpickles fully by itself: only our check stands in its way.
        "profile s3prl": (["profile", "-u", "distiller_local", "-k", str(evil_distiller)], evil_distiller),
    }[command]
    assert cli_main([*argv, "--seconds", "0.5", "--repeats", "1"] if "profile" in command else argv) == 2
    _assert_refusal(capsys.readouterr().err, base)
    assert not marker.exists()
    with pytest.warns(TrustedCheckpointWarning, match=str(base)):
        assert cli_main([*argv, "--trust-checkpoint", *(["--seconds", "0.5", "--repeats", "1"]
                                                         if "profile" in command else [])]) == 0
    assert marker.exists()


# --------------------------------------------------------------- real checkpoints need no opt-in
def _s3prl_distiller_pretraining_states(path: pathlib.Path) -> pathlib.Path:
    """A distiller checkpoint with everything S3PRL's pretrain runner saves (``s3prl/pretrain/runner.py``:
    Optimizer, Step, Args, Config; the distiller's ``add_state_to_save``: Distiller, Config)."""
    from s3prl.optimizers import get_optimizer
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    make_distiller_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    model = DistillerModel(DistillerConfig(ckpt["Config"]["distiller"]))
    model.load_state_dict(ckpt["Distiller"])
    optimizer = get_optimizer([model], 10, DISTILLER_OPTIMIZER)  # S3PRL's Lamb with its schedule object
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    args = argparse.Namespace(mode="train", upstream="distiller", config="config_runner.yaml",
                              upstream_config="config_model.yaml", expdir="result/pretrain/distiller",
                              init_ckpt=None, seed=1337, device="cuda", multi_gpu=False, past_exp=None)
    config = {"distiller": ckpt["Config"]["distiller"], "teacher": {"model": "hubert_base", "n_layers": 12},
              "task": {"sequence_length": 250000}, "audio": {"target_level": None}}
    torch.save({"Optimizer": optimizer.state_dict(), "Step": 1, "Args": args, "Config": config,
                "Distiller": model.state_dict()}, path)
    return path


def _melhubert_training_states(path: pathlib.Path) -> pathlib.Path:
    """A MelHuBERT checkpoint with what its runner saves (Optimizer: torch's Adam, Step, Args, Runner, ...)."""
    make_melhubert_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)  # the file just written (its Args is a Namespace)
    weights = [torch.nn.Parameter(t.clone()) for t in ckpt["model"].values()]
    optimizer = torch.optim.Adam(weights, lr=5e-4)
    sum(w.sum() for w in weights).backward()
    optimizer.step()
    ckpt["Optimizer"] = optimizer.state_dict()
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("kind", ["hubert", "distiller", "distiller_pretraining", "distiller_old_names",
                                  "melhubert"])
def test_real_format_checkpoints_load_with_no_opt_in_and_no_warning(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "hubert":
        make_hubert_checkpoint(path)
    elif kind == "distiller":
        make_distiller_checkpoint(path)
    elif kind == "melhubert":
        _melhubert_training_states(path)
    elif kind == "distiller_pretraining":
        _s3prl_distiller_pretraining_states(path)
    else:  # saved as S3PRL did before it was a package: its optimizers module was the top-level `optimizers`
        import s3prl.optimizers

        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "optimizers", s3prl.optimizers)
            patch.setattr(s3prl.optimizers.WarmupLinearSchedule, "__module__", "optimizers")
            _s3prl_distiller_pretraining_states(path)
        assert b"optimizers\nWarmupLinearSchedule" in _pickle_bytes(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrustedCheckpointWarning)
        base = load_base(path)
    assert base.config.num_layers == 2


def _pickle_bytes(path: pathlib.Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def test_the_allow_list_is_needed_for_s3prls_distiller_pretraining_states(tmp_path):
    path = _s3prl_distiller_pretraining_states(tmp_path / "d.ckpt")
    with pytest.raises(Exception, match="WarmupLinearSchedule"):
        torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- bad opt-in values
def test_bad_opt_in_values_are_refused_by_name(tmp_path, monkeypatch, s3prl_hub, evil_delta):
    options = tmp_path / "options.yaml"
    options.write_text("trust_checkpoint: 'yes'\n")  # a string, not a YAML boolean
    with pytest.raises(DeltaError, match="trust_checkpoint must be true or false, not 'yes'"):
        s3prl_hub.compressed_local(ckpt=str(evil_delta), model_config=str(options))
    monkeypatch.setenv(TRUST_ENV, "maybe")
    with pytest.raises(CheckpointError, match=f"{TRUST_ENV}='maybe'"):
        load_base(make_hubert_checkpoint(tmp_path / "plain.pt"))


def test_a_file_that_is_no_checkpoint_is_not_offered_the_opt_in(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        load_base(path)
    assert not isinstance(error.value, UntrustedCheckpointError) and "cannot read" in str(error.value)


def test_experiment_hands_the_opt_in_to_the_commands_it_starts():
    with trusting(True, inherit=True):
        assert os.environ[TRUST_ENV] == "1"
    assert TRUST_ENV not in os.environ
