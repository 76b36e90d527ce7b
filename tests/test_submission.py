"""``upstream-compressed submission``: predict.zip from real S3PRL PR and SID evaluations.

The experiment directories come from S3PRL's unchanged runner (a few training steps on the tiny
corpus, then ``-m evaluate`` on its test split), run by the end-to-end test's helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_end_to_end import PR, SID, UPSTREAMS, Case, train_then_evaluate
from upstream_compressed.cli import main
from upstream_compressed.testing.corpus import make_tiny_corpus

LAYOUT = ["predict/", "predict/pr_public/", "predict/pr_public/predict.ark",
          "predict/sid_public/", "predict/sid_public/predict.txt"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(corpus, PR expdir, SID expdir) of hubert_identity, trained a few steps and evaluated on test."""
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    upstream = UPSTREAMS[0]
    jobs = []
    for task in (PR, SID):
        workdir = tmp_path_factory.mktemp(f"submission-{task}")
        jobs.append((Case(upstream, task), upstream.make_ckpt(workdir), workdir))
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = [pool.submit(train_then_evaluate, case, ckpt, corpus, workdir) for case, ckpt, workdir in jobs]
        pr, sid = (future.result().expdir for future in outcomes)
    return corpus, pr, sid


def lines(data: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in data.decode().splitlines()]


def test_zip_layout_and_line_formats(tmp_path, evaluated, capsys):
    corpus, pr, sid = evaluated
    output = tmp_path / "predict.zip"
    assert main(["submission", "--pr", str(pr), "--sid", str(sid), "-o", str(output)]) == 0
    printed = capsys.readouterr()
    assert "pr_public" in printed.out
    assert "the public pr_public test set has 2620 utterances" in printed.err  # the tiny corpus has fewer
    with zipfile.ZipFile(output) as archive:
        assert archive.namelist() == LAYOUT
        ark, txt = archive.read(LAYOUT[2]), archive.read(LAYOUT[4])
    assert ark == (pr / "test-hyp.ark").read_bytes() and txt == (sid / "test_predict.txt").read_bytes()

    phones = set(corpus.phone_vocab.read_text().split()) | {"<unk>"}
    test_ids = {p.stem for p in (corpus.librispeech / "test-clean").rglob("*.flac")}
    pr_lines = lines(ark)
    assert {key for key, _ in pr_lines} == test_ids and len(pr_lines) == len(test_ids)
    assert all(set(hyp.split()) <= phones for _, hyp in pr_lines)

    test_clips = [line.split()[1] for line in corpus.voxceleb1_split.read_text().splitlines() if line.startswith("3 ")]
    sid_lines = lines(txt)
    assert sorted(key for key, _ in sid_lines) == sorted(Path(c.replace("/", "-")).stem for c in test_clips)
    assert all(re.fullmatch(r"id1\d{4}", label) and 10001 <= int(label[2:]) <= 11251 for _, label in sid_lines)


def test_tasks_are_optional(tmp_path, evaluated):
    _, _, sid = evaluated
    output = tmp_path / "predict.zip"
    assert main(["submission", "--sid", str(sid), "-o", str(output)]) == 0
    with zipfile.ZipFile(output) as archive:
        assert archive.namelist() == ["predict/", "predict/sid_public/", "predict/sid_public/predict.txt"]
    assert main(["submission", "-o", str(tmp_path / "none.zip")]) == 2
    assert not (tmp_path / "none.zip").exists()


def _edit(path: Path, change) -> None:
    path.write_text(change(path.read_text()))


def _first_line_twice(text: str) -> str:
    return text + text.splitlines(keepends=True)[0]


def _stale(expdir: Path) -> None:
    evaluated_at = max(p.stat().st_mtime for p in expdir.glob("args_*.yaml"))
    os.utime(expdir / "test-hyp.ark", (evaluated_at - 60, evaluated_at - 60))


def _not_evaluated(expdir: Path) -> None:
    for args in expdir.glob("args_*.yaml"):
        if "mode: evaluate" in args.read_text():
            args.unlink()


BREAKAGES = {
    "no hypotheses": ("pr", lambda d: (d / "test-hyp.ark").unlink(), "test-hyp.ark is missing"),
    "never evaluated": ("pr", _not_evaluated, "holds no test evaluation"),
    "stale hypotheses": ("pr", _stale, "older than the last test evaluation"),
    "cut off": ("pr", lambda d: _edit(d / "test-hyp.ark", str.rstrip), "cut off"),
    "duplicate key": ("pr", lambda d: _edit(d / "test-hyp.ark", _first_line_twice), "appears twice"),
    "unknown phone": ("pr", lambda d: _edit(d / "test-hyp.ark", lambda t: re.sub(r" .*", " XX9 AA1", t, count=1)),
                      r"\['XX9'\] are not in the vocabulary"),
    "bad speaker label": ("sid", lambda d: _edit(d / "test_predict.txt",
                                                 lambda t: re.sub(r" id1\d{4}$", " spk7", t, 1, re.M)),
                          "'spk7' is not one of id10001..id11251"),
    "lost reference": ("sid", lambda d: _edit(d / "test_truth.txt", lambda t: "".join(t.splitlines(True)[1:])),
                       "list different utterances"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_a_broken_expdir_gets_a_clear_error_and_no_zip(tmp_path, evaluated, capsys, breakage):
    _, pr, sid = evaluated
    task, breaker, message = BREAKAGES[breakage]
    dirs = {"pr": tmp_path / "pr", "sid": tmp_path / "sid"}
    shutil.copytree(pr, dirs["pr"])  # copy2 keeps the files' times
    shutil.copytree(sid, dirs["sid"])
    breaker(dirs[task])
    output = tmp_path / "predict.zip"
    assert main(["submission", "--pr", str(dirs["pr"]), "--sid", str(dirs["sid"]), "-o", str(output)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists() and not list(tmp_path.glob(".predict.zip.*"))
