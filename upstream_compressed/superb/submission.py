"""``predict.zip`` for the SUPERB leaderboard from finished S3PRL test evaluations.

The upload holds ``predict/pr_public/predict.ark`` (phone recognition: the ``test-hyp.ark`` that
S3PRL's ctc downstream writes at ``-m evaluate``, lines ``<utterance id> <phones>``) and
``predict/sid_public/predict.txt`` (speaker identification: voxceleb1's ``test_predict.txt``,
lines ``<utterance id> id1xxxx``). The server reads ``key value`` lines and scores the keys present,
so a broken file does not fail loudly there: everything is checked here first, and the zip is
written (atomically) only when every given task passes.

An experiment directory holds a finished test evaluation when S3PRL's ``-m evaluate`` run recorded
itself there (``args_*.yaml`` with ``mode: evaluate`` and ``evaluate_split: test``) and both its
output files (hypotheses and references / truth) were written after that record, with the same keys.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..delta import atomic_write_bytes

DEFAULT_PHONE_VOCAB = Path(__file__).resolve().parents[1] / "corpus" / "phoneme.txt"  # SUPERB's 71 phones
UNKNOWN_TOKEN = "<unk>"  # S3PRL's tokenizer may emit it; the leaderboard scores it as a wrong phone
LIBRISPEECH_ID = re.compile(r"\d+-\d+-\d+")  # speaker-chapter-utterance
VOXCELEB1_ID = re.compile(r"id1\d{4}-\S+")  # S3PRL's name: speaker-video-clip
SPEAKER_LABEL = re.compile(r"id1(\d{4})")
SPEAKERS = range(10001, 10001 + 1251)  # VoxCeleb1's 1251 speakers, id10001..id11251
# Sizes of the public test sets; a different count is reported (the server scores the keys present).
PUBLIC_TEST_UTTERANCES = {"pr_public": 2620, "sid_public": 8251}


class SubmissionError(Exception):
    """An experiment directory that cannot go into predict.zip; the message says why and what to do."""


@dataclass
class TaskFile:
    """One task's validated prediction file, ready to go into the zip."""

    task: str  # pr_public / sid_public
    member: str  # its path inside predict.zip
    source: Path
    data: bytes
    lines: int


def _evaluation_time(expdir: Path) -> float:
    """mtime of the latest ``args_*.yaml`` recording a ``-m evaluate`` run on the test split."""
    latest = None
    for path in expdir.glob("args_*.yaml"):
        try:
            args = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(args, dict) and args.get("mode") == "evaluate" and args.get("evaluate_split", "test") == "test":
            mtime = path.stat().st_mtime
            latest = mtime if latest is None else max(latest, mtime)
    if latest is None:
        raise SubmissionError(
            f"{expdir} holds no test evaluation (no args_*.yaml with mode: evaluate); run "
            f"`run_downstream.py -m evaluate --device cpu -e {expdir}/dev-best.ckpt` first"
        )
    return latest


def _pairs(path: Path, what: str) -> list[tuple[str, str]]:
    """``key value`` lines of an S3PRL output file; refuses missing keys, values and duplicates."""
    text = path.read_bytes().decode("utf-8", errors="strict")
    if not text:
        raise SubmissionError(f"{path} is empty; the {what} evaluation wrote no lines")
    if not text.endswith("\n"):
        raise SubmissionError(f"{path} does not end with a newline: the evaluation was cut off; run it again")
    pairs, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        key, separator, value = line.partition(" ")
        if not key or not separator:
            raise SubmissionError(f"{path}:{number}: expected `<utterance id> <{what}>`, got {line!r}")
        if key in seen:
            raise SubmissionError(f"{path}:{number}: utterance {key} appears twice (first on line {seen[key]})")
        seen[key] = number
        pairs.append((key, value))
    return pairs


def _finished_outputs(expdir: Path, output: str, reference: str, what: str) -> list[tuple[str, str]]:
    """The evaluation's output lines, after checking it finished and matches its reference file."""
    if not expdir.is_dir():
        raise SubmissionError(f"experiment directory {expdir} does not exist")
    evaluated = _evaluation_time(expdir)
    paths = [expdir / output, expdir / reference]
    for path in paths:
        if not path.is_file():
            raise SubmissionError(f"{path} is missing: the test evaluation in {expdir} did not finish; run it again")
        if path.stat().st_mtime < evaluated:
            raise SubmissionError(
                f"{path} is older than the last test evaluation recorded in {expdir} (args_*.yaml): "
                "that evaluation did not finish; run it again"
            )
    pairs = _pairs(paths[0], what)
    references = _pairs(paths[1], "reference")
    if {k for k, _ in pairs} != {k for k, _ in references}:
        missing = sorted({k for k, _ in references} - {k for k, _ in pairs})[:3]
        raise SubmissionError(f"{paths[0]} and {paths[1]} list different utterances (e.g. {missing}); "
                              "the evaluation did not finish; run it again")
    return pairs


def read_phone_vocab(path: Path) -> set[str]:
    if not path.is_file():
        raise SubmissionError(f"phone vocabulary {path} does not exist; "
                              "pass the vocab_file of the PR config with --vocab")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _configured_vocab(expdir: Path) -> Path | None:
    """The ``text.vocab_file`` of the newest ``config_*.yaml`` S3PRL saved in ``expdir``."""
    for path in sorted(expdir.glob("config_*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            config = yaml.safe_load(path.read_text()) or {}
            vocab = config["downstream_expert"]["text"]["vocab_file"]
        except (yaml.YAMLError, KeyError, TypeError):
            continue
        if vocab and Path(vocab).is_file():
            return Path(vocab)
    return None


def check_pr(expdir: str | Path, vocab: str | Path | None = None) -> TaskFile:
    """PR: ``test-hyp.ark`` of a finished evaluation, every phone in the vocabulary."""
    expdir = Path(expdir)
    pairs = _finished_outputs(expdir, "test-hyp.ark", "test-ref.ark", "phones")
    vocab_path = Path(vocab) if vocab else (_configured_vocab(expdir) or DEFAULT_PHONE_VOCAB)
    phones = read_phone_vocab(vocab_path) | {UNKNOWN_TOKEN}
    source = expdir / "test-hyp.ark"
    for number, (key, hypothesis) in enumerate(pairs, start=1):
        if not LIBRISPEECH_ID.fullmatch(key):
            raise SubmissionError(f"{source}:{number}: {key!r} is not a LibriSpeech utterance id "
                                  "(speaker-chapter-utterance)")
        unknown = [p for p in hypothesis.split() if p not in phones]
        if unknown:
            raise SubmissionError(f"{source}:{number}: phones {unknown[:5]} are not in the vocabulary {vocab_path}")
    return TaskFile("pr_public", "predict/pr_public/predict.ark", source, source.read_bytes(), len(pairs))


def check_sid(expdir: str | Path) -> TaskFile:
    """SID: ``test_predict.txt`` of a finished evaluation, every label a VoxCeleb1 speaker ``id1xxxx``."""
    expdir = Path(expdir)
    pairs = _finished_outputs(expdir, "test_predict.txt", "test_truth.txt", "speaker")
    source = expdir / "test_predict.txt"
    for number, (key, label) in enumerate(pairs, start=1):
        if not VOXCELEB1_ID.fullmatch(key):
            raise SubmissionError(f"{source}:{number}: {key!r} is not a VoxCeleb1 utterance name (id1xxxx-video-clip)")
        match = SPEAKER_LABEL.fullmatch(label)
        if not match or int(label[2:]) not in SPEAKERS:
            raise SubmissionError(f"{source}:{number}: speaker label {label!r} is not one of id10001..id11251")
    return TaskFile("sid_public", "predict/sid_public/predict.txt", source, source.read_bytes(), len(pairs))


def zip_bytes(files: list[TaskFile]) -> bytes:
    """The zip S3PRL's submit script makes (``zip -r predict.zip predict/``): folders, then files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("predict/"), b"")
        for task in files:
            archive.writestr(zipfile.ZipInfo(f"predict/{task.task}/"), b"")
            archive.writestr(task.member, task.data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def write_submission(output: str | Path, pr: str | Path | None = None, sid: str | Path | None = None,
                     vocab: str | Path | None = None) -> list[TaskFile]:
    """Validate the given experiment directories and write ``output`` (nothing is written on any error)."""
    if pr is None and sid is None:
        raise SubmissionError("nothing to submit: give --pr EXPDIR and/or --sid EXPDIR")
    files = []
    if pr is not None:
        files.append(check_pr(pr, vocab))
    if sid is not None:
        files.append(check_sid(sid))
    atomic_write_bytes(output, zip_bytes(files))
    return files
