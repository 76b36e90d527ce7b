"""Audio manifests: the list of a corpus's files and their lengths, read from headers only.

The layout is fairseq's (``wav2vec_manifest.py``), so manifests made by fairseq or DPHuBERT's data
preparation work here and ours work there: the first line is the root folder, every other line
``relative/path<TAB>num_samples``. Training and scoring take a manifest instead of a folder so that
nothing reads 281,241 LibriSpeech files at start-up: a folder given as ``audio:`` is scanned once and
its manifest cached (see :func:`cached_manifest`).

Only 16 kHz mono files are accepted: ``num_samples`` is then the number of samples the model sees,
which length-based batching (``seconds_per_batch``) needs to be exact. Other files are listed as bad,
with what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import AUDIO_SUFFIXES, SAMPLE_RATE, missing_hint
from ..files import atomic_write_json, atomic_write_text

MANIFEST_SUFFIX = ".tsv"
CACHE_VARIABLE = "UPSTREAM_COMPRESSED_CACHE"


class ManifestError(ValueError):
    """An audio folder or manifest that cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class BadFile:
    path: str  # relative to the root
    reason: str


@dataclass
class Manifest:
    """A corpus: its root folder and (relative path, number of 16 kHz samples) per file."""

    root: Path
    files: list[str] = field(default_factory=list)
    num_samples: list[int] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)  # left out by a scan; not written to the file

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    @property
    def hours(self) -> float:
        return sum(self.num_samples) / SAMPLE_RATE / 3600

    def to_text(self) -> str:
        return "".join([f"{self.root}\n", *(f"{f}\t{n}\n" for f, n in zip(self.files, self.num_samples))])

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_text())


# ------------------------------------------------------------------------------------ scanning
def _header(path: Path) -> tuple[int, str | None]:
    """(num_samples, None) for a usable file, or (0, why it is not)."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as error:  # noqa: BLE001 - every unreadable file is reported, whatever the cause
        return 0, f"unreadable ({type(error).__name__}: {str(error).strip() or 'no message'})"
    if info.frames <= 0:
        return 0, "empty (0 samples)"
    if info.samplerate != SAMPLE_RATE or info.channels != 1:
        return 0, (f"not 16 kHz mono ({info.samplerate} Hz, {info.channels} channel(s)); convert it, e.g. "
                   f"`sox IN -r 16000 -c 1 OUT`")
    return int(info.frames), None


def audio_files(root: Path) -> list[Path]:
    """Every .wav/.flac file below ``root`` (following links), sorted so manifests are reproducible."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found += [Path(folder) / n for n in names if Path(n).suffix.lower() in AUDIO_SUFFIXES]
    return sorted(found)


def scan(directory: str | os.PathLike, jobs: int = 16, progress: bool = True) -> Manifest:
    """A manifest of every audio file below ``directory`` from headers only, ``jobs`` files at a time.

    Bad files are left out and listed in ``Manifest.bad``. Threads, not processes: the time goes in
    opening files (network file systems especially) and libsndfile releases the GIL meanwhile.
    """
    root = _folder(directory)
    return _scan_files(root, audio_files(root), jobs, progress)


def _folder(directory: str | os.PathLike) -> Path:
    root = Path(os.path.expandvars(os.path.expanduser(str(directory)))).resolve()
    if not root.is_dir():
        raise ManifestError(f"audio folder {root} does not exist (or is not a folder)")
    return root


def _scan_files(root: Path, paths: list[Path], jobs: int, progress: bool) -> Manifest:
    if not paths:
        raise ManifestError(f"no .wav or .flac files below {root}")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        headers = list(tqdm(pool.map(_header, paths, chunksize=64), total=len(paths), desc=f"scanning {root.name}",
                            unit="file", disable=not progress, leave=False))
    manifest = Manifest(root)
    for path, (samples, problem) in zip(paths, headers):
        relative = str(path.relative_to(root))
        if problem is None:
            manifest.files.append(relative)
            manifest.num_samples.append(samples)
        else:
            manifest.bad.append(BadFile(relative, problem))
    return manifest


def describe_bad(manifest: Manifest, limit: int = 20) -> str:
    lines = [f"  {bad.path}: {bad.reason}" for bad in manifest.bad[:limit]]
    if len(manifest.bad) > limit:
        lines.append(f"  ... and {len(manifest.bad) - limit} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a fairseq-layout manifest; every malformed line is named with its number."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read manifest {path}: {error}") from error
    if not lines or not lines[0].strip():
        raise ManifestError(f"manifest {path} is empty: its first line must be the audio root folder")
    root = Path(os.path.expandvars(os.path.expanduser(lines[0].strip())))
    if not root.is_absolute():  # fairseq writes absolute roots; a relative one is taken from the manifest's folder
        root = (path.parent / root).resolve()
    manifest = Manifest(root)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip().isdigit() or int(parts[1]) <= 0:
            raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples' (a positive "
                                f"integer), found {line[:120]!r}")
        manifest.files.append(parts[0])
        manifest.num_samples.append(int(parts[1]))
    if not manifest.files:
        raise ManifestError(f"manifest {path} lists no files")
    return manifest


# -------------------------------------------------------------------------------------- caching
def cache_folder() -> Path:
    """Where manifests of scanned folders are kept: $UPSTREAM_COMPRESSED_CACHE, else the XDG cache."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]) / "manifests"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "upstream_compressed" / "manifests"


def _fingerprint(root: Path, paths: list[Path]) -> str:
    """Names, sizes and modification times: a changed, added or removed file means a new scan."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_manifest(directory: str | os.PathLike, jobs: int = 16, progress: bool = True) -> Manifest:
    """``scan(directory)``, done once: a rerun over an unchanged folder reads the cached manifest.

    Listing and stat-ing the files is cheap next to opening every one, so the cache is checked against
    a fingerprint of names, sizes and times rather than trusted blindly.
    """
    root = _folder(directory)
    key = hashlib.sha256(str(root).encode()).hexdigest()[:20]
    tsv, meta = cache_folder() / f"{root.name}-{key}{MANIFEST_SUFFIX}", cache_folder() / f"{root.name}-{key}.json"
    paths = audio_files(root)  # listed once: for the fingerprint and, on a miss, for the scan
    fingerprint = _fingerprint(root, paths)
    if tsv.is_file() and meta.is_file():
        try:
            recorded = json.loads(meta.read_text())
            if recorded.get("fingerprint") == fingerprint:
                manifest = read_manifest(tsv)
                manifest.bad = [BadFile(**bad) for bad in recorded.get("bad", [])]
                return manifest
        except (ValueError, TypeError, ManifestError):
            pass  # a damaged cache is rebuilt
    manifest = _scan_files(root, paths, jobs, progress)
    try:
        manifest.write(tsv)
        atomic_write_json(meta, {"root": str(root), "fingerprint": fingerprint,
                                 "bad": [vars(bad) for bad in manifest.bad]})
    except OSError:
        pass  # a read-only cache only costs the next run a scan
    return manifest


def load_corpus(spec: str | os.PathLike, progress: bool = True) -> Manifest:
    """An ``audio:`` value, a folder or a manifest file, as a manifest with only usable files.

    A folder with bad files is refused naming them, since silently training on less than the user
    named would be a surprise; the message says how to leave them out on purpose.
    """
    path = Path(os.path.expandvars(os.path.expanduser(str(spec))))
    if path.is_file():
        return read_manifest(path)
    if not path.exists():
        raise ManifestError(f"audio {path} does not exist ({missing_hint(path)})")
    manifest = cached_manifest(path, progress=progress)
    if manifest.bad:
        raise ManifestError(
            f"{len(manifest.bad)} file(s) below {manifest.root} cannot be used:\n{describe_bad(manifest)}\n"
            f"Fix or remove them, or write a manifest without them and name it instead of the folder:\n"
            f"  upstream-compressed manifest {manifest.root} -o audio.tsv --skip-bad"
        )
    if not manifest.files:
        raise ManifestError(f"no usable audio below {manifest.root}")
    return manifest
