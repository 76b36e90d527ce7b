"""The libriphone dataset (s3prl's missing ``ctc/corpus/libriphone``) and the tiny corpus maker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile

from upstream_compressed import s3prl_compat
from upstream_compressed.corpus import PHONE_VOCAB, arpabet_phones
from upstream_compressed.corpus.libriphone import CorpusError, LibriPhoneDataset, read_lexicon
from upstream_compressed.testing.corpus import LEXICON, SAMPLE_RATE, make_tiny_corpus

s3prl_compat.apply()

TRAIN, DEV, TEST = ["train-clean-100"], ["dev-clean"], ["test-clean"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    from s3prl.downstream.ctc.text import load_text_encoder

    return load_text_encoder("word", str(corpus.phone_vocab))


def _transcripts(root: Path) -> dict[str, list[str]]:
    out = {}
    for trans in root.rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, *words = line.split()
            out[utt] = words
    return out


# -- the dataset ----------------------------------------------------------------------------


def test_items_are_paths_and_phone_ids(corpus, tokenizer):
    dataset = LibriPhoneDataset(TRAIN, tokenizer, 1, path=corpus.librispeech, lexicon=[corpus.lexicon])
    transcripts = _transcripts(corpus.librispeech / "train-clean-100")
    assert len(dataset) == len(transcripts) == 8
    lengths = []
    for index in range(len(dataset)):
        path, ids = dataset[index]
        assert isinstance(path, str) and path.endswith(".flac") and Path(path).is_file()
        phones = [p for word in transcripts[Path(path).stem] for p in LEXICON[word]]
        assert ids[-1] == tokenizer.eos_idx and tokenizer.unk_idx not in ids
        assert tokenizer.decode(ids) == " ".join(phones)
        lengths.append(len(ids))
    assert lengths == sorted(lengths, reverse=True)  # longest first, for bucketing


def test_buckets_hold_neighbours_and_stay_full(corpus, tokenizer):
    dataset = LibriPhoneDataset("train-clean-100", tokenizer, 3, path=str(corpus.librispeech),
                                lexicon=str(corpus.lexicon), ascending=True)
    assert [p for p, _ in dataset[0]] == list(dataset.file_list[:3])
    assert [p for p, _ in dataset[len(dataset) - 1]] == list(dataset.file_list[-3:])
    lengths = [len(t) for t in dataset.text]
    assert lengths == sorted(lengths)
    big = LibriPhoneDataset(TRAIN, tokenizer, 100, path=corpus.librispeech, lexicon=corpus.lexicon)
    assert len(big[3]) == len(big)  # a bucket larger than the corpus: everything, once


def test_several_splits(corpus, tokenizer):
    dataset = LibriPhoneDataset(DEV + TEST, tokenizer, 1, path=corpus.librispeech, lexicon=corpus.lexicon)
    assert len(dataset) == 8


def test_s3prl_ctc_loader_reads_it(corpus, tokenizer):
    """Through s3prl's own ``data.py`` (bucketing, collate, audio reading through torchaudio.load)."""
    from s3prl.downstream.ctc.data import load_dataset

    config = dict(name="libriphone", path=str(corpus.librispeech), lexicon=[str(corpus.lexicon)],
                  train=TRAIN, dev=DEV, test=TEST, bucketing=True, batch_size=2, num_workers=0)
    wavs, texts, names = next(iter(load_dataset("train", tokenizer, config)))
    assert len(wavs) == len(texts) == len(names) == 2
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) > SAMPLE_RATE for w in wavs)
    assert all(name.count("-") == 2 for name in names)
    wavs, texts, names = next(iter(load_dataset("test", tokenizer, config)))
    assert len(wavs) == 1


def test_first_pronunciation_wins(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("READ\tR IY1 D\nREAD\tR EH1 D\n")
    second.write_text("READ R EH1 D\nRED  R EH1 D\n\n")
    assert read_lexicon([first, second]) == {"READ": ["R", "IY1", "D"], "RED": ["R", "EH1", "D"]}


# -- clear errors ---------------------------------------------------------------------------


def _copy_split(corpus, tmp_path: Path) -> Path:
    """A writable one-chapter copy of the tiny corpus's dev split."""
    chapter = next((corpus.librispeech / "dev-clean").glob("*/*"))
    target = tmp_path / "LS" / "dev-clean" / chapter.parent.name / chapter.name
    target.mkdir(parents=True)
    for file in chapter.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_missing_split_names_the_folder(corpus, tokenizer):
    with pytest.raises(CorpusError, match=r"train-other-500 does not exist.*corpus.path"):
        LibriPhoneDataset(["train-other-500"], tokenizer, 1, path=corpus.librispeech, lexicon=corpus.lexicon)


def test_word_missing_from_lexicon(corpus, tokenizer, tmp_path):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{w}\t{' '.join(p)}\n" for w, p in LEXICON.items() if w != "MOON"))
    with pytest.raises(CorpusError, match=r"word 'MOON' of utterance \d+-\d+-\d{4} .*trans.txt.*not in the lexicon"):
        LibriPhoneDataset(TRAIN + DEV + TEST, tokenizer, 1, path=corpus.librispeech, lexicon=lexicon)


def test_phone_missing_from_vocab(corpus, tokenizer, tmp_path):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("SEE\tS IY1\nTEA\tT XX9 IY1\n")
    with pytest.raises(CorpusError, match=r"lexicon.txt:2: phones \['XX9'\] of 'TEA' are not in the phone vocabulary"):
        LibriPhoneDataset(DEV, tokenizer, 1, path=corpus.librispeech, lexicon=lexicon)


def test_missing_lexicon_file(corpus, tokenizer, tmp_path):
    with pytest.raises(CorpusError, match=r"nope.txt does not exist"):
        LibriPhoneDataset(DEV, tokenizer, 1, path=corpus.librispeech, lexicon=[corpus.lexicon, tmp_path / "nope.txt"])


def test_missing_transcript_file_and_utterance(corpus, tokenizer, tmp_path):
    chapter = _copy_split(corpus, tmp_path)
    trans = next(chapter.glob("*.trans.txt"))
    lines = trans.read_text().splitlines()
    trans.write_text(lines[0] + "\n")
    missing_utt = lines[1].split()[0]
    with pytest.raises(CorpusError, match=rf"utterance {missing_utt} is not listed in .*{trans.name}"):
        LibriPhoneDataset(DEV, tokenizer, 1, path=tmp_path / "LS", lexicon=corpus.lexicon)
    trans.unlink()
    with pytest.raises(CorpusError, match=rf"has no transcript file {trans.name}"):
        LibriPhoneDataset(DEV, tokenizer, 1, path=tmp_path / "LS", lexicon=corpus.lexicon)


# -- the packaged vocabulary and the tiny corpus maker --------------------------------------


def test_packaged_vocab_is_arpabet():
    phones = PHONE_VOCAB.read_text().splitlines()
    assert phones == arpabet_phones() and len(phones) == 71 and "" not in phones
    assert {p for pron in LEXICON.values() for p in pron} <= set(phones)


def test_tiny_corpus_layout(corpus):
    ls = corpus.librispeech
    for split, count in (("train-clean-100", 8), ("dev-clean", 4), ("test-clean", 4)):
        flacs = sorted((ls / split).rglob("*.flac"))
        assert len(flacs) == count
        for flac in flacs:
            speaker, chapter, _ = flac.stem.split("-")
            assert flac.parent == ls / split / speaker / chapter
            assert (flac.parent / f"{speaker}-{chapter}.trans.txt").is_file()
            info = soundfile.info(str(flac))
            assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "FLAC")
            assert 1.0 < info.duration < 4.0

    lines = [line.split() for line in corpus.voxceleb1_split.read_text().splitlines()]
    speakers_by_split = {s: {rel.split("/")[0] for split, rel in lines if split == s} for s in "123"}
    assert speakers_by_split["1"] == speakers_by_split["2"] == speakers_by_split["3"] == {"id10001", "id10002"}
    folders = set()
    for split, relative in lines:
        found = list(corpus.voxceleb1.glob(f"*/wav/{relative}"))
        assert len(found) == 1 and found[0].suffix == ".wav"
        folders.add(found[0].relative_to(corpus.voxceleb1).parts[0])
        assert soundfile.info(str(found[0])).samplerate == SAMPLE_RATE
    assert folders == {"dev", "test"}


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_tiny_corpus_is_deterministic_and_speakers_differ(tmp_path):
    a = make_tiny_corpus(tmp_path / "a", num_speakers=2)
    b = make_tiny_corpus(tmp_path / "b", num_speakers=2)
    c = make_tiny_corpus(tmp_path / "c", num_speakers=2, seed=1)
    assert _digest(a.root) == _digest(b.root) != _digest(c.root)

    def pitch(flac: Path) -> float:
        """The fundamental from the autocorrelation peak between 60 and 400 Hz."""
        wav, _ = soundfile.read(str(flac))
        power = np.abs(np.fft.rfft(wav, 2 * len(wav))) ** 2
        autocorrelation = np.fft.irfft(power)[: len(wav)]
        lags = np.arange(SAMPLE_RATE // 400, SAMPLE_RATE // 60)
        return SAMPLE_RATE / float(lags[autocorrelation[lags].argmax()])

    first = pitch(next((a.librispeech / "dev-clean" / "100").rglob("*.flac")))
    second = pitch(next((a.librispeech / "dev-clean" / "101").rglob("*.flac")))
    assert first == pytest.approx(90, rel=0.1) and second == pytest.approx(130, rel=0.1)
