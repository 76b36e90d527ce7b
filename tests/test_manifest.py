"""Audio manifests: lengths from headers, bad files named, fairseq's layout, a cache that notices changes."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from upstream_compressed.audio import manifest as manifest_module
from upstream_compressed.audio.manifest import ManifestError, cached_manifest, load_corpus, read_manifest, scan
from upstream_compressed.cli import main


def _write(path, samples: int, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(samples).uniform(-0.1, 0.1, (samples, channels)).astype(np.float32)
    soundfile.write(str(path), data, rate)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "19" / "198" / "19-198-0001.flac", 16000)
    _write(root / "19" / "198" / "19-198-0002.flac", 24000)
    _write(root / "26" / "496" / "26-496-0001.wav", 8000)
    return root


@pytest.fixture
def bad_corpus(corpus):
    (corpus / "bad").mkdir()
    (corpus / "bad" / "garbage.wav").write_bytes(b"not a wave file at all" * 10)
    _write(corpus / "bad" / "loud_cd.wav", 44100, rate=44100)
    _write(corpus / "bad" / "stereo.flac", 16000, channels=2)
    soundfile.write(str(corpus / "bad" / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    return corpus


def test_lengths_come_from_the_headers_in_fairseqs_layout(corpus, tmp_path):
    out = tmp_path / "train.tsv"
    assert main(["manifest", str(corpus), "-o", str(out), "--quiet"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == str(corpus.resolve())
    assert lines[1:] == ["19/198/19-198-0001.flac\t16000", "19/198/19-198-0002.flac\t24000", "26/496/26-496-0001.wav\t8000"]
    again = read_manifest(out)
    assert [again.path(i).is_file() for i in range(len(again))] == [True] * 3
    assert again.num_samples == [16000, 24000, 8000]


def test_every_bad_file_is_named_and_nothing_is_written_without_skip_bad(bad_corpus, tmp_path, capsys):
    out = tmp_path / "train.tsv"
    assert main(["manifest", str(bad_corpus), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "4 file(s) cannot be used" in err and "--skip-bad" in err
    assert "bad/garbage.wav: unreadable" in err
    assert "bad/empty.wav: empty" in err
    assert "bad/loud_cd.wav: not 16 kHz mono (44100 Hz, 1 channel(s))" in err
    assert "bad/stereo.flac: not 16 kHz mono (16000 Hz, 2 channel(s))" in err
    assert not out.exists()


def test_skip_bad_leaves_them_out_and_counts_them(bad_corpus, tmp_path, capsys):
    out = tmp_path / "train.tsv"
    assert main(["manifest", str(bad_corpus), "-o", str(out), "--quiet", "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "3 files" in printed and "4 bad file(s) left out" in printed
    assert len(read_manifest(out)) == 3 and "bad/" not in out.read_text()


def test_a_folder_with_bad_files_is_refused_as_audio_naming_them(bad_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("UPSTREAM_COMPRESSED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ManifestError, match=r"(?s)4 file\(s\).*garbage\.wav.*--skip-bad"):
        load_corpus(bad_corpus, progress=False)


def test_a_folder_is_scanned_once_and_rescanned_when_it_changes(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("UPSTREAM_COMPRESSED_CACHE", str(tmp_path / "cache"))
    opened = []
    real_header = manifest_module._header
    monkeypatch.setattr(manifest_module, "_header", lambda path: opened.append(path) or real_header(path))
    first = load_corpus(corpus, progress=False)
    assert len(opened) == 3
    second = load_corpus(corpus, progress=False)
    assert len(opened) == 3, "an unchanged folder must be read from the cache"
    assert second.files == first.files and second.num_samples == first.num_samples
    _write(corpus / "26" / "496" / "26-496-0002.wav", 4000)
    third = cached_manifest(corpus, progress=False)
    assert len(opened) == 7 and third.num_samples[-1] == 4000


def test_a_manifest_file_is_taken_as_it_is(corpus, tmp_path):
    out = tmp_path / "sub.tsv"
    out.write_text(f"{corpus}\n26/496/26-496-0001.wav\t8000\n")
    assert load_corpus(out).files == ["26/496/26-496-0001.wav"]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("/root\n", "lists no files"),
    ("/root\na.wav\n", ":2: expected"),
    ("/root\na.wav\t100\nb.wav\tmany\n", ":3: expected"),
    ("/root\na.wav\t0\n", ":2: expected"),
])
def test_malformed_manifests_name_the_line(tmp_path, text, message):
    path = tmp_path / "m.tsv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_scan_refuses_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        scan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no .wav or .flac"):
        scan(tmp_path / "empty")


def test_every_audio_option_takes_a_manifest_as_well_as_a_folder(corpus, tmp_path):
    from upstream_compressed.audio import list_audio
    from upstream_compressed.audio.manifest import load_corpus
    from upstream_compressed.train.stream import BatchPlan, BatchRule, batch_loader

    out = tmp_path / "two.tsv"
    out.write_text(f"{corpus}\n19/198/19-198-0002.flac\t24000\n26/496/26-496-0001.wav\t8000\n")
    assert list_audio(out) == [corpus / "19/198/19-198-0002.flac", corpus / "26/496/26-496-0001.wav"]
    assert len(list_audio(corpus)) == 3
    manifest = load_corpus(out)
    (batch,) = batch_loader(manifest, BatchPlan(manifest.num_samples, BatchRule(2, None, 1.0), 0), 0, 1, num_workers=0)
    assert sorted(batch.lengths.tolist()) == [8000, 16000]
