"""The espeak-ng corpus maker: deterministic bytes, both layouts well formed, readable by S3PRL's datasets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import soundfile

from upstream_compressed.corpus import arpabet_phones
from upstream_compressed.embedded import commands, espeak
from upstream_compressed.embedded.phones import PhoneMappingError, espeak_to_arpabet
from upstream_compressed.embedded.synth_corpus import (
    LIBRISPEECH_SPLITS,
    CorpusOptions,
    CorpusOptionsError,
    SynthCorpus,
    make_corpus,
)

REPO = Path(__file__).resolve().parents[1]
TINY = CorpusOptions(speakers=3, utterances=2, sid_utterances=5, seed=3, max_words=6)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SynthCorpus:
    return make_corpus(tmp_path_factory.mktemp("embedded") / "corpus", TINY, progress=False)


def test_same_seed_gives_identical_files(corpus, tmp_path):
    again = make_corpus(tmp_path / "again", TINY, progress=False)
    first, second = tree_digest(corpus.root), tree_digest(again.root)
    # 6 flac + 3 trans.txt + 15 wav + lexicon, phoneme.txt, iden_split.txt, corpus.json
    assert len(first) == 6 + 3 + 15 + 4
    assert first == second


def test_other_seed_gives_other_audio(corpus, tmp_path):
    other = make_corpus(tmp_path / "other", CorpusOptions(**{**TINY.__dict__, "seed": 4}), progress=False)
    first, second = tree_digest(corpus.root), tree_digest(other.root)
    assert first["lexicon.txt"] == second["lexicon.txt"]  # the vocabulary is fixed...
    flacs = [k for k in first if k.endswith(".flac")]
    assert all(first[k] != second.get(k) for k in flacs)  # ...the sentences and voices are not


def test_librispeech_tree(corpus):
    lexicon = dict(line.split("\t") for line in corpus.lexicon.read_text().splitlines())
    vocab = corpus.phone_vocab.read_text().split("\n")[:-1]
    assert vocab == arpabet_phones()
    assert all(phone in vocab for phones in lexicon.values() for phone in phones.split())
    speakers_by_split = {}
    for split in LIBRISPEECH_SPLITS:
        flacs = sorted((corpus.librispeech / split).rglob("*.flac"))
        assert len(flacs) == TINY.utterances  # one speaker per split at 3 speakers
        speakers_by_split[split] = {f.parts[-3] for f in flacs}
        for flac in flacs:
            assert re.fullmatch(r"\d+-\d+-\d{4}", flac.stem)
            trans = flac.with_name(flac.stem.rsplit("-", 1)[0] + ".trans.txt")
            lines = dict(line.split(" ", 1) for line in trans.read_text().splitlines())
            assert all(word in lexicon for word in lines[flac.stem].split())
            info = soundfile.info(str(flac))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration > 0.5
    # LibriSpeech's splits have disjoint speakers.
    assert sum(len(s) for s in speakers_by_split.values()) == len(set().union(*speakers_by_split.values()))


def test_voxceleb1_tree(corpus):
    lines = [line.split() for line in corpus.voxceleb1_split.read_text().splitlines()]
    assert len(lines) == TINY.speakers * TINY.sid_utterances
    splits_of = {}
    for split, relative in lines:
        assert split in {"1", "2", "3"}
        assert re.fullmatch(r"id1\d{4}/[A-Za-z0-9]{11}/\d{5}\.wav", relative)
        found = list(corpus.voxceleb1.glob("*/wav/" + relative))  # how S3PRL finds the file
        assert len(found) == 1
        assert soundfile.info(str(found[0])).samplerate == 16000
        splits_of.setdefault(relative.split("/")[0], set()).add(split)
    # Every speaker is in train, dev and test, with labels 0..N-1 (S3PRL: int(id[2:]) - 10001).
    assert all(splits == {"1", "2", "3"} for splits in splits_of.values())
    assert sorted(int(s[2:]) - 10001 for s in splits_of) == list(range(TINY.speakers))
    manifest = json.loads(corpus.manifest.read_text())
    ls_voices = {(s["variant"], s["pitch"]) for s in manifest["librispeech"]["speakers"]}
    vox_voices = {(s["variant"], s["pitch"]) for s in manifest["voxceleb1"]["speakers"]}
    assert not ls_voices & vox_voices  # the two trees never share a voice


def test_s3prl_datasets_read_the_trees(corpus, s3prl_hub, tmp_path, monkeypatch):
    from s3prl.downstream.ctc.text import load_text_encoder
    from s3prl.downstream.voxceleb1.dataset import SpeakerClassifiDataset

    from upstream_compressed import s3prl_compat
    from upstream_compressed.corpus.libriphone import LibriPhoneDataset

    tokenizer = load_text_encoder("word", vocab_file=str(corpus.phone_vocab))
    train = LibriPhoneDataset(["train-clean-100"], tokenizer, 1, path=corpus.librispeech, lexicon=[corpus.lexicon])
    path, tokens = train[0]
    assert Path(path).is_file() and tokens and tokenizer.unk_idx not in tokens

    monkeypatch.setenv(s3prl_compat.VOXCELEB1_CACHE_ENV, str(tmp_path / "vox_cache"))
    for mode, count in (("train", 3), ("dev", 1), ("test", 1)):
        dataset = SpeakerClassifiDataset(mode, corpus.voxceleb1, str(corpus.voxceleb1_split), max_timestep=16000)
        assert len(dataset) == count * TINY.speakers
        wav, label, name = dataset[0]
        assert wav.ndim == 1 and 0 <= label < TINY.speakers


def test_phone_mapping():
    assert espeak_to_arpabet(["h", "@", "l", "'oU"], "hello") == ["HH", "AH0", "L", "OW1"]
    assert espeak_to_arpabet(["k", "'A@"], "car") == ["K", "AA1", "R"]
    assert espeak_to_arpabet(["'E", "n", "I2", "T", ",I", "N"], "anything") == ["EH1", "N", "IH0", "TH", "IH2", "NG"]
    with pytest.raises(PhoneMappingError, match="'Q'.*'odd'"):
        espeak_to_arpabet(["Q"], "odd")


def test_espeak_phonemes_through_the_child_process():
    with espeak.EspeakProcess() as engine:
        assert engine.sample_rate == 22050
        assert espeak_to_arpabet(engine.phonemes("hello"), "hello") == ["HH", "AH0", "L", "OW1"]
        with pytest.raises(espeak.EspeakError, match="no voice"):
            engine.synthesize("hi.", espeak.Voice("no_such_variant", 50, 50, 175), seed=1)


def test_missing_espeak_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(espeak.EspeakError, match="pip install espeakng-loader"):
        espeak.espeak_paths()


def test_bad_options_and_existing_corpus_are_clear_errors(corpus, capsys):
    with pytest.raises(CorpusOptionsError, match="--speakers"):
        CorpusOptions(speakers=2).validate()
    with pytest.raises(CorpusOptionsError, match="--sid-utterances"):
        CorpusOptions(sid_utterances=4).validate()
    assert commands.main(["make-corpus", str(corpus.root), "--speakers", "3", "--quiet"]) == 2
    assert "already holds a corpus" in capsys.readouterr().err


def _run_downstream(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "upstream_compressed.run_downstream", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_s3prl_downstreams_train_on_the_trees(corpus, tmp_path):
    """S3PRL's own run_downstream trains -d ctc and -d voxceleb1 on the corpus with the embedded configs."""
    steps = "config.runner.total_steps=2,,config.runner.eval_step=2,,config.runner.save_step=2,,config.runner.log_step=1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UPSTREAM_COMPRESSED_VOXCELEB1_CACHE": str(tmp_path / "vox_cache")}
    runs = {
        "ctc": ["-m", "train", "--device", "cpu", "-u", "fbank", "-d", "ctc",
                "-c", "downstream_configs/ctc_libriphone_embedded.yaml", "-p", str(tmp_path / "pr"),
                "-o", f"{steps},,{corpus.ctc_override()}"],
        "voxceleb1": ["-m", "train", "--device", "cpu", "-u", "fbank", "-d", "voxceleb1",
                      "-c", "downstream_configs/voxceleb1_embedded.yaml", "-p", str(tmp_path / "sid"),
                      "-o", f"{steps},,{corpus.voxceleb1_override()}"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:  # each run is mostly S3PRL imports
        results = dict(zip(runs, pool.map(lambda args: _run_downstream(args, env), runs.values())))
    for name, metric, folder in (("ctc", "dev per", "pr"), ("voxceleb1", "dev acc", "sid")):
        result = results[name]
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.search(rf"{metric}: [0-9.]+", result.stdout + result.stderr), (result.stdout + result.stderr)[-3000:]
        assert (tmp_path / folder / "states-2.ckpt").is_file()
