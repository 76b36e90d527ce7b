"""``run_downstream.py`` without ``-c``: the bundled SUPERB config, data paths from the environment.

S3PRL opens ``./downstream/<task>/config.yaml`` when ``-c`` is missing, a file its PyPI package
lacks. The end-to-end cases below run ``python -m upstream_compressed.run_downstream`` as a user
would (side by side, one per core: each process is mostly S3PRL imports): PR and SID train and
evaluate with no ``-c``, unset data paths stop the run with our message before training, and with
``-c`` or S3PRL's default file present S3PRL's own choice stands. In-process tests cover the pieces.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from upstream_compressed.bundled import bundled_config
from upstream_compressed.corpus import PHONE_VOCAB
from upstream_compressed.overrides import (
    SUPERB_LEXICON_NAMES,
    DataPathError,
    complete_data_paths,
    lexicon_files,
)
from upstream_compressed.run_downstream import supplied_config
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.testing.corpus import TinyCorpus, make_tiny_corpus

from test_end_to_end import check_accuracy, check_per, make_delta, printed_metric

DATA_ENV = ("LIBRISPEECH", "LIBRISPEECH_LEXICON", "VOXCELEB1")
RUN_TIMEOUT_S = 400
# Two optimizer steps with one dev evaluation; every other hyper-parameter stays SUPERB's.
TINY_RUN = ",,".join([
    "config.runner.total_steps=2", "config.runner.save_step=2", "config.runner.eval_step=2",
    "config.runner.log_step=1", "config.runner.gradient_accumulate_steps=1",
])
PR_TINY = TINY_RUN + ",,config.downstream_expert.corpus.num_workers=0"
SID_TINY = TINY_RUN + ",,config.downstream_expert.datarc.num_workers=0"
NOTE = "using the SUPERB config shipped with upstream_compressed"


def run_downstream(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One ``run_downstream`` process with only the given data variables set."""
    environ = {k: v for k, v in os.environ.items() if k not in DATA_ENV}
    environ.update(env, OMP_NUM_THREADS="1", UPSTREAM_COMPRESSED_VOXCELEB1_CACHE=str(cwd / "voxceleb1_cache"))
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "upstream_compressed.run_downstream", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def succeeded(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"run_downstream {' '.join(result.args[3:])} failed:\n{output[-6000:]}"
    return output


def train_then_evaluate(train: list[str], work: Path, expdir: Path, **env: str) -> tuple[str, str]:
    """Train with no ``-c``, then ``-m evaluate`` its last checkpoint (no data variables: the config has the paths)."""
    trained = succeeded(run_downstream(train, work, **env))
    states = expdir / "states-2.ckpt"
    assert states.is_file(), sorted(p.name for p in expdir.iterdir())
    evaluated = succeeded(run_downstream(["-m", "evaluate", "--device", "cpu", "-e", str(states)], work))
    return trained, evaluated


class Cases:
    """Every subprocess case, started together on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corpus = make_tiny_corpus(root / "corpus")
        self.delta = make_delta(make_hubert_checkpoint(root / "tiny_hubert.pt"), [{"method": "head_pruning", "ratio": 0.5}])
        self.upstream = ["--device", "cpu", "-u", "hubert_headpruned", "-k", str(self.delta)]
        corpus, work = self.corpus, root / "work"
        tiny_pr = yaml.safe_load(bundled_config("ctc_libriphone_tiny").read_text())  # placeholders /path/to/tiny/...
        s3prl_default = work / "s3prl_default" / "downstream" / "ctc" / "config.yaml"
        s3prl_default.parent.mkdir(parents=True)
        s3prl_default.write_text(yaml.safe_dump(tiny_pr))
        real_pr = {"LIBRISPEECH": str(corpus.librispeech), "LIBRISPEECH_LEXICON": str(corpus.lexicon)}
        # Relative to the folder the run starts in: the recorded config must hold them absolute.
        relative_pr = {"LIBRISPEECH": "../../corpus/LibriSpeech", "LIBRISPEECH_LEXICON": "../../corpus/lexicon.txt"}
        jobs = {
            "pr": lambda: train_then_evaluate(self.train("ctc", "pr", "-o", PR_TINY), work / "pr", work / "pr/result/downstream/pr",
                                              **relative_pr),
            "sid": lambda: train_then_evaluate(self.train("voxceleb1", "sid", "-o", SID_TINY), work / "sid",
                                               work / "sid/result/downstream/sid", VOXCELEB1=str(corpus.voxceleb1)),
            "pr_unset": lambda: run_downstream(self.train("ctc", "x"), work / "pr_unset"),
            "sid_unset": lambda: run_downstream(self.train("voxceleb1", "x"), work / "sid_unset"),
            "with_c": lambda: run_downstream(
                self.train("ctc", "x", "-c", str(bundled_config("ctc_libriphone"))), work / "with_c", **real_pr),
            "s3prl_default": lambda: run_downstream(self.train("ctc", "x"), s3prl_default.parents[2], **real_pr),
        }
        self.pool = ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1))
        self.futures: dict[str, Future] = {name: self.pool.submit(job) for name, job in jobs.items()}

    def train(self, downstream: str, name: str, *extra: str) -> list[str]:
        """``-m train -u hubert_headpruned -k DELTA -d <downstream> -n <name>``, S3PRL's documented form."""
        return ["-m", "train", *self.upstream, "-d", downstream, "-n", name, *extra]

    def __getitem__(self, name: str):
        return self.futures[name].result()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    cases = Cases(tmp_path_factory.mktemp("defaults"))
    yield cases
    cases.pool.shutdown(wait=True)


def saved(expdir: Path, kind: str) -> dict:
    """The ``args_*.yaml`` or ``config_*.yaml`` S3PRL wrote for training (the first; evaluate adds its own)."""
    return yaml.safe_load(sorted(expdir.glob(f"{kind}_*.yaml"))[0].read_text())


# ------------------------------------------------------------------------------ end to end


def test_pr_without_c_trains_and_evaluates_on_the_bundled_superb_config(cases: Cases):
    trained, evaluated = cases["pr"]
    assert NOTE in trained and "corpus.path = " in trained and "(from $LIBRISPEECH)" in trained
    expdir = cases.root / "work/pr/result/downstream/pr"
    assert saved(expdir, "args")["config"] == str(bundled_config("ctc_libriphone"))
    config = saved(expdir, "config")
    corpus = config["downstream_expert"]["corpus"]
    assert corpus["path"] == str(cases.corpus.librispeech) and corpus["lexicon"] == str(cases.corpus.lexicon)
    assert config["downstream_expert"]["text"]["vocab_file"] == str(PHONE_VOCAB)
    # SUPERB's PR hyper-parameters, only the step counts cut by -o.
    assert (config["optimizer"]["lr"], corpus["batch_size"], config["downstream_expert"]["model"]["project_dim"]) \
        == (1.0e-2, 16, 256)
    assert config["runner"]["total_steps"] == 2
    printed_metric(trained, "dev", "per")
    per = printed_metric(evaluated, "test", "per")
    check_per(expdir, per, utterances=len(list((cases.corpus.librispeech / "test-clean").rglob("*.flac"))))


def test_sid_without_c_trains_and_evaluates_with_voxceleb1_from_the_environment(cases: Cases):
    trained, evaluated = cases["sid"]
    assert NOTE in trained
    expdir = cases.root / "work/sid/result/downstream/sid"
    datarc = saved(expdir, "config")["downstream_expert"]["datarc"]
    assert datarc["file_path"] == str(cases.corpus.voxceleb1)
    assert datarc["meta_data"] == str(cases.corpus.voxceleb1_split)  # found inside $VOXCELEB1
    assert datarc["max_timestep"] == 128000  # SUPERB's SID config
    accuracy = printed_metric(evaluated, "test", "acc")
    test_lines = [line for line in cases.corpus.voxceleb1_split.read_text().splitlines() if line.startswith("3 ")]
    check_accuracy(expdir, accuracy, utterances=len(test_lines))


@pytest.mark.parametrize("case,expected", [
    ("pr_unset", ["set LIBRISPEECH, or give -o config.downstream_expert.corpus.path=PATH",
                  "set LIBRISPEECH_LEXICON, or give -o config.downstream_expert.corpus.lexicon=PATH"]),
    ("sid_unset", ["set VOXCELEB1, or give -o config.downstream_expert.datarc.file_path=PATH",
                   "-o config.downstream_expert.datarc.meta_data=PATH"]),
])
def test_placeholder_data_paths_stop_the_run_before_training(cases: Cases, case, expected):
    result = cases[case]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "run_downstream.py: error: " in result.stderr and "Traceback" not in result.stderr
    for line in expected:
        assert line in result.stderr
    expdir = cases.root / "work" / case / "result/downstream/x"
    assert not list(expdir.glob("args_*.yaml")) and not list(expdir.glob("states-*"))  # S3PRL's main never went on


def test_with_c_s3prl_reads_that_file_and_ignores_the_environment(cases: Cases):
    """-c the SUPERB yaml (placeholders) with the variables set: S3PRL fails on the placeholder itself."""
    result = cases["with_c"]
    assert result.returncode != 0 and NOTE not in result.stderr
    assert "No such file or directory: '/path/to/phoneme.txt'" in result.stderr  # not our vocabulary either


def test_s3prl_default_config_file_is_used_when_it_exists(cases: Cases):
    result = cases["s3prl_default"]
    assert result.returncode != 0 and NOTE not in result.stderr
    assert "No such file or directory: '/path/to/tiny/phoneme.txt'" in result.stderr  # that file's placeholder


# ------------------------------------------------------------------------------ in process


@pytest.mark.parametrize("args,expected", [
    (["-d", "ctc"], "ctc_libriphone"),
    (["-m", "train", "--downstream=voxceleb1", "-n", "x"], "voxceleb1"),
    (["-dctc", "-o", "config.runner.total_steps=2"], "ctc_libriphone"),
    (["-d", "ctc", "-c", "mine.yaml"], None),
    (["--config=mine.yaml", "-d", "ctc"], None),
    (["-d", "voxceleb1", "-cmine.yaml"], None),
    (["-m", "evaluate", "-e", "exp/states-2.ckpt"], None),
    (["-d", "ctc", "-e", "exp"], None),
    (["-d", "asr"], None),
    (["-m", "train", "-n", "x"], None),
])
def test_which_command_lines_get_the_bundled_config(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    found = supplied_config(["run_downstream.py", *args])
    assert found == (bundled_config(expected) if expected else None)


def test_s3prl_default_file_in_the_current_folder_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downstream/ctc").mkdir(parents=True)
    (tmp_path / "downstream/ctc/config.yaml").write_text("runner: {}\n")
    assert supplied_config(["run_downstream.py", "-d", "ctc"]) is None
    assert supplied_config(["run_downstream.py", "-d", "voxceleb1"]) == bundled_config("voxceleb1")


def superb_config(name: str, override: str | None = None) -> dict:
    """A bundled SUPERB yaml with ``-o`` applied by S3PRL's own ``override``, as its runner does."""
    from s3prl.utility.helper import override as s3prl_override

    config = yaml.safe_load(bundled_config(name).read_text())
    if override:
        s3prl_override(override, argparse.Namespace(), config)
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> TinyCorpus:
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def test_o_wins_over_the_environment(corpus, tmp_path):
    config = superb_config("ctc_libriphone", f"config.downstream_expert.corpus.path={corpus.librispeech}")
    notes = complete_data_paths("ctc", config, {"LIBRISPEECH": str(tmp_path / "other"),
                                                "LIBRISPEECH_LEXICON": str(corpus.lexicon)})
    assert config["downstream_expert"]["corpus"]["path"] == str(corpus.librispeech)
    assert config["downstream_expert"]["corpus"]["lexicon"] == str(corpus.lexicon)
    assert [note.split(" = ")[0] for note in notes] == ["corpus.lexicon", "text.vocab_file"]


def test_a_missing_path_is_named_with_where_it_came_from(corpus, tmp_path):
    config = superb_config("ctc_libriphone", f"config.downstream_expert.corpus.path={tmp_path / 'gone'}")
    with pytest.raises(DataPathError, match=r"gone \(from -o config.downstream_expert.corpus.path\) does not exist"):
        complete_data_paths("ctc", config, {"LIBRISPEECH_LEXICON": str(corpus.lexicon)})
    config = superb_config("voxceleb1")
    (tmp_path / "VoxCeleb1").mkdir()
    with pytest.raises(DataPathError, match=r"iden_split.txt \(from \$VOXCELEB1/iden_split.txt\) does not exist"):
        complete_data_paths("voxceleb1", config, {"VOXCELEB1": str(tmp_path / "VoxCeleb1")})


def test_lexicon_variable_takes_a_file_a_list_or_superbs_folder(tmp_path):
    first, second = (tmp_path / name for name in SUPERB_LEXICON_NAMES)
    assert lexicon_files(str(first)) == str(first)
    assert lexicon_files(f"{first}{os.pathsep}{second}") == [str(first), str(second)]
    with pytest.raises(DataPathError, match="a folder without SUPERB's lexicon files"):
        lexicon_files(str(tmp_path))
    first.write_text("A\tAH0\n"), second.write_text("B\tB IY1\n")
    assert lexicon_files(str(tmp_path)) == [str(first), str(second)]
