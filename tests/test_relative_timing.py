"""``time-vs-base``: upstreams timed interleaved with a base in one process, ratios paired per round.

No assertion here depends on how fast this machine is: call orders are exact, and the only timing
claims are directions with a wide margin (a model that runs the base four times is more than twice
as slow as the base; the base against itself lies between half and twice), on medians of rounds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from upstream_compressed.relative_timing import (
    rotated_order,
    time_against_base,
    time_models_against_base,
    torch_threads,
)
from upstream_compressed.relative_timing_command import parse_model
from upstream_compressed.upstream_profile import ProfileError, load_upstream

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"timed_beside", "time_ratio_to_base", "time_ratio_iqr", "rounds", "median_seconds_interleaved",
          "rtf_interleaved"}


class Recorder(nn.Module):
    """Appends its name to ``log`` at every call: the order the timing loop ran the models in."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, wavs):
        self.log.append(self.name)
        return wavs


class Repeated(nn.Module):
    """``upstream`` called ``times`` times per forward: a model known to be about that much slower."""

    def __init__(self, upstream: nn.Module, times: int) -> None:
        super().__init__()
        self.upstream, self.times = upstream, times

    def forward(self, wavs):
        for _ in range(self.times):
            out = self.upstream(wavs)
        return out


def test_rounds_rotate_and_warmup_comes_first():
    log: list[str] = []
    models = {name: Recorder(name, log) for name in "abc"}
    result = time_against_base(models, "b", torch.zeros(160), rounds=4, warmup=2)
    assert log == list("aabbcc") + list("abc" "bca" "cab" "abc")
    assert [rotated_order(r, 3) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert set(result) == set("abc") and all(set(row) == FIELDS for row in result.values())
    assert result["b"]["time_ratio_to_base"] == 1.0 and result["b"]["time_ratio_iqr"] == [1.0, 1.0]
    for row in result.values():
        q25, q75 = row["time_ratio_iqr"]
        assert row["timed_beside"] == "b" and row["rounds"] == 4 and q25 <= row["time_ratio_to_base"] <= q75
        assert row["rtf_interleaved"] == pytest.approx(row["median_seconds_interleaved"] / 0.01)


def test_benchmarks_interleaved_medians_uses_the_same_loop():
    spec = importlib.util.spec_from_file_location("benchmarks_common", REPO / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    log: list[str] = []
    medians = common.interleaved_medians([Recorder("a", log), Recorder("b", log)], torch.zeros(1, 160), rounds=3)
    assert log == list("ab" "ab" "ba" "ab") and len(medians) == 2 and all(m >= 0 for m in medians)
    log.clear()  # weight_pruning.py passes a list of waveforms, as S3PRL calls an upstream
    assert len(common.interleaved_medians([Recorder("a", log)], [torch.zeros(160)], rounds=2, warmup=0)) == 1
    assert log == ["a", "a"]


def test_a_model_four_times_the_base_is_slower_and_the_base_matches_itself(hubert_ckpt):
    upstream = load_upstream("hubert_local", str(hubert_ckpt))
    models = {"base": upstream, "same": upstream, "four_times": Repeated(upstream, 4)}
    threads = torch.get_num_threads()
    with torch_threads(1):  # one thread: on a busy 2-core machine more threads wait for each other
        result = time_against_base(models, "base", 4.0, rounds=11, warmup=1)
    assert torch.get_num_threads() == threads  # restored
    same, slow = result["same"], result["four_times"]
    assert result["base"]["time_ratio_to_base"] == 1.0
    assert 0.5 < same["time_ratio_to_base"] < 2.0 and same["time_ratio_iqr"][0] <= same["time_ratio_iqr"][1]
    assert slow["time_ratio_to_base"] > 2.0 and slow["time_ratio_to_base"] > 1.5 * same["time_ratio_to_base"]
    assert slow["median_seconds_interleaved"] > result["base"]["median_seconds_interleaved"]


def test_the_command_prints_one_json_line(hubert_ckpt, capsys):
    from upstream_compressed.cli import main

    threads = torch.get_num_threads()
    assert main(["time-vs-base", "--base-upstream", "hubert_local", "--base-ckpt", str(hubert_ckpt),
                 "-u", f"again=hubert_local:{hubert_ckpt}", "-u", "fbank", "--seconds", "0.5", "--rounds", "3",
                 "--threads", "1", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and torch.get_num_threads() == threads
    run = json.loads(lines[0])
    assert run["base"] == "base" and run["threads"] == 1 and run["rounds"] == 3 and run["seconds_audio"] == 0.5
    assert list(run["models"]) == ["base", "again", "fbank"]
    assert run["models"]["again"]["ckpt"] == str(hubert_ckpt) and run["models"]["fbank"]["ckpt"] is None
    assert all(FIELDS <= set(row) for row in run["models"].values())
    assert run["models"]["base"]["time_ratio_to_base"] == 1.0


def test_the_command_prints_a_table(hubert_ckpt, capsys):
    from upstream_compressed.cli import main

    assert main(["time-vs-base", "--base-upstream", "fbank", "--base-name", "fb", "-u", "fbank",
                 "--seconds", "0.2", "--rounds", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "beside fb (fbank)" in out and "IQR" in out and "\nfbank " in out


def test_model_entries_parse_with_and_without_labels():
    assert parse_model("fbank") == {"model": "fbank", "upstream": "fbank", "ckpt": None}
    assert parse_model("h50=hubert_headpruned:out/h50.safetensors") == {
        "model": "h50", "upstream": "hubert_headpruned", "ckpt": "out/h50.safetensors"}
    assert parse_model("hubert_local:/data/a=b.pt") == {  # '=' inside the path is no label
        "model": "hubert_local:/data/a=b.pt", "upstream": "hubert_local", "ckpt": "/data/a=b.pt"}


def test_bad_input_is_refused_naming_it(hubert_ckpt, capsys):
    from upstream_compressed.cli import main

    base = ["time-vs-base", "--base-upstream", "hubert_local", "--base-ckpt", str(hubert_ckpt), "--seconds", "0.2"]
    assert main([*base, "-u", "hubert_headprune"]) == 2
    err = capsys.readouterr().err
    assert "time-vs-base: error: unknown upstream 'hubert_headprune'" in err and "did you mean" in err
    assert main([*base, "-u", "fbank", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1, not 0" in capsys.readouterr().err
    assert main([*base, "-u", "base=fbank"]) == 2
    assert "labelled 'base', the base's label" in capsys.readouterr().err
    # Checked before any model is loaded: these upstream names would fail to load.
    with pytest.raises(ProfileError, match="the base 'nope' is not among the models timed \\(a, b\\)"):
        time_models_against_base([{"model": "a", "upstream": "no_such"}, {"model": "b", "upstream": "x"}], "nope")
    with pytest.raises(ProfileError, match="repeated: a"):
        time_models_against_base([{"model": "a", "upstream": "fbank"}] * 2, "a")
    with pytest.raises(ProfileError, match="--threads must be at least 1"):
        time_models_against_base([{"model": "a", "upstream": "fbank"}], "a", seconds=0.2, threads=0)


def test_the_experiment_merges_the_ratios_into_profiles_once(hubert_ckpt, tmp_path):
    from upstream_compressed.experiments import time_beside_base

    prepared = {name: {"model": name, "method": method, "upstream": "hubert_local", "ckpt": str(hubert_ckpt)}
                for name, method in (("base", "base"), ("copy", "checkpoint"), ("unprofiled", "checkpoint"))}
    for name in ("base", "copy"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "profile.json").write_text(json.dumps({"rtf": 0.5}))
    time_beside_base(prepared, tmp_path, seconds=0.5, rounds=3, threads=1)
    base = json.loads((tmp_path / "models" / "base" / "profile.json").read_text())
    copy = json.loads((tmp_path / "models" / "copy" / "profile.json").read_text())
    assert base["rtf"] == 0.5 and base["time_ratio_to_base"] == 1.0 and base["timed_beside"] == "base"
    assert FIELDS <= set(copy) and copy["rounds"] == 3
    assert not (tmp_path / "models" / "unprofiled").exists()  # only profiled models are timed
    before = (tmp_path / "models" / "copy" / "profile.json").stat().st_mtime_ns
    time_beside_base(prepared, tmp_path, seconds=0.5, rounds=3, threads=1)  # nothing new: nothing timed again
    assert (tmp_path / "models" / "copy" / "profile.json").stat().st_mtime_ns == before
