"""Every shim that s3prl 0.4.18 needs on today's torch/torchaudio, in one place.

Call :func:`apply` before importing ``s3prl.hub`` or ``s3prl.downstream``. It is idempotent and
cheap on the second call. ``upstream_compressed.run_downstream`` also passes ``sys.argv`` so that
torchrun's ``--local-rank`` / ``LOCAL_RANK`` reach s3prl in the form it parses.

The shims (DESIGN.md section 3), each a small function below:

* torchaudio >= 2.9: ``set_audio_backend`` and ``sox_effects`` gone (touched by ``import s3prl.hub``);
  ``load`` needs torchcodec and ``info`` is gone: both fall back to soundfile.
* huggingface_hub >= 1.0: ``HfFolder`` and ``Repository`` gone (imported by ``run_downstream``).
* torch >= 2.6: ``torch.load`` is weights-only; s3prl's ``states-*.ckpt`` pickle an ``argparse.Namespace``.
* ``s3prl.downstream.ctc.corpus`` is not packaged: serve our ``upstream_compressed.corpus`` under that name.
* ctc's ``load_dataset`` pops ``num_workers`` from the shared config: give it a copy.
* voxceleb1's file-list cache is keyed by split only: key it by the data it lists.
* torchrun passes ``--local-rank=N`` or ``LOCAL_RANK``; s3prl parses only ``--local_rank``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, MutableMapping, MutableSequence

import torch

_applied = False

# Set this to a folder to keep voxceleb1's file-list caches out of site-packages (tests do).
VOXCELEB1_CACHE_ENV = "UPSTREAM_COMPRESSED_VOXCELEB1_CACHE"


# --------------------------------------------------------------------------------------------
# torchaudio
# --------------------------------------------------------------------------------------------


def _shim_torchaudio_backend() -> None:
    """torchaudio >= 2.9 dropped ``set_audio_backend`` and ``sox_effects``, which ``import s3prl.hub`` touches.

    ``set_audio_backend`` becomes a no-op (there is one backend now). ``sox_effects`` becomes a
    module whose functions raise a clear error: no PR/SID code path calls them, they are only imported.
    """
    import torchaudio

    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda backend=None: None
    if "torchaudio.sox_effects" not in sys.modules:
        try:
            import torchaudio.sox_effects  # noqa: F401
        except ImportError:
            module = types.ModuleType("torchaudio.sox_effects")

            def _unavailable(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError(
                    "torchaudio.sox_effects is not available in this torchaudio; "
                    "this S3PRL code path needs an older torchaudio (< 2.9)"
                )

            module.apply_effects_tensor = _unavailable
            module.apply_effects_file = _unavailable
            sys.modules["torchaudio.sox_effects"] = module
            torchaudio.sox_effects = module


@dataclass(frozen=True)
class AudioMetaData:
    """What ``torchaudio.info`` used to return (the fields S3PRL reads)."""

    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64}
# soundfile dtypes that keep the stored integers when ``normalize=False`` (old torchaudio semantics).
_RAW_DTYPES = {"PCM_16": "int16", "PCM_32": "int32"}


def soundfile_load(
    uri: str | os.PathLike | BinaryIO,
    frame_offset: int = 0,
    num_frames: int = -1,
    normalize: bool = True,
    channels_first: bool = True,
    format: str | None = None,
    buffer_size: int = 4096,
    backend: str | None = None,
) -> tuple[torch.Tensor, int]:
    """``torchaudio.load`` with the pre-2.9 signature, read by soundfile (wav, flac, ogg, ...)."""
    import soundfile

    if not hasattr(uri, "read"):
        uri = os.fspath(uri)
    dtype = "float32"
    if not normalize:
        subtype = soundfile.info(uri).subtype if isinstance(uri, str) else None
        dtype = _RAW_DTYPES.get(subtype, "float32")
    stop = None if num_frames is None or num_frames < 0 else frame_offset + num_frames
    data, sample_rate = soundfile.read(
        uri, start=frame_offset, stop=stop, dtype=dtype, always_2d=True, format=format
    )
    wav = torch.from_numpy(data)  # (time, channel)
    return (wav.T.contiguous() if channels_first else wav), int(sample_rate)


def soundfile_info(uri: str | os.PathLike | BinaryIO, format: str | None = None, **_: Any) -> AudioMetaData:
    """``torchaudio.info`` (removed in torchaudio 2.9), read by soundfile."""
    import soundfile

    info = soundfile.info(uri if hasattr(uri, "read") else os.fspath(uri))
    return AudioMetaData(
        sample_rate=int(info.samplerate),
        num_frames=int(info.frames),
        num_channels=int(info.channels),
        bits_per_sample=_BITS.get(info.subtype, 0),
        encoding=info.subtype,
    )


def _torchcodec_available() -> bool:
    return importlib.util.find_spec("torchcodec") is not None


def _shim_torchaudio_io(torchaudio_module: types.ModuleType | None = None) -> None:
    """torchaudio >= 2.9 ``load`` needs torchcodec and ``info`` is gone: fall back to soundfile.

    The ctc (libriphone) collate function and voxceleb1's dataset call ``torchaudio.load``; both
    look it up on the module at call time, so replacing the attribute is enough (voxceleb1's
    ``from torchaudio import load`` binding is unused). With torchcodec installed ``load`` is kept.
    """
    if torchaudio_module is None:
        import torchaudio as torchaudio_module

    if not _torchcodec_available() and getattr(torchaudio_module.load, "__module__", "") != __name__:
        torchaudio_module.load = soundfile_load
    if not hasattr(torchaudio_module, "info"):
        torchaudio_module.info = soundfile_info


# --------------------------------------------------------------------------------------------
# huggingface_hub
# --------------------------------------------------------------------------------------------


class _HfFolder:
    """Stand-in for ``huggingface_hub.HfFolder`` (removed in 1.0): token get/save only."""

    @staticmethod
    def get_token() -> str | None:
        from huggingface_hub import get_token

        return get_token()

    @staticmethod
    def save_token(token: str) -> None:
        from huggingface_hub import login

        login(token=token)

    @staticmethod
    def delete_token() -> None:
        from huggingface_hub import logout

        logout()


class _Repository:
    """Stand-in for ``huggingface_hub.Repository`` (removed in 1.0); only ``--push_to_hf_hub`` uses it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "huggingface_hub.Repository was removed in huggingface_hub 1.0, so s3prl's "
            "--push_to_hf_hub cannot work; install 'huggingface_hub<1.0' or upload the expdir yourself"
        )


def _shim_huggingface_hub(module: types.ModuleType | None = None) -> None:
    """huggingface_hub >= 1.0 removed ``HfFolder``/``Repository``, which s3prl's runner imports by name.

    We pin ``<1.0``; this keeps ``import s3prl.run_downstream`` working if someone upgrades.
    """
    if module is None:
        try:
            import huggingface_hub as module
        except ImportError:  # s3prl will fail with its own clear ImportError
            return
    for name, stand_in in (("HfFolder", _HfFolder), ("Repository", _Repository)):
        try:
            getattr(module, name)
        except (AttributeError, ImportError):  # lazy modules may raise either
            setattr(module, name, stand_in)


# --------------------------------------------------------------------------------------------
# torch.load (weights-only by default since torch 2.6)
# --------------------------------------------------------------------------------------------

# What s3prl's runner pickles into states-*.ckpt beyond tensors and plain containers: the parsed
# command line. Optimizer/scheduler state dicts, the yaml config and model states are all plain.
STATES_CKPT_SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def _shim_torch_load() -> None:
    """torch >= 2.6 ``torch.load`` is weights-only; s3prl's ``states-*.ckpt`` hold ``args`` (a Namespace).

    ``-m evaluate -e`` and resuming call ``torch.load`` without ``weights_only``; allow-listing the
    class keeps the safe unpickler (no arbitrary code) instead of turning weights-only off.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # torch < 2.4: torch.load is not weights-only by default
        return
    known = set(torch.serialization.get_safe_globals())
    missing = [cls for cls in STATES_CKPT_SAFE_GLOBALS if cls not in known]
    if missing:
        add_safe_globals(missing)


# --------------------------------------------------------------------------------------------
# s3prl.downstream.ctc.corpus
# --------------------------------------------------------------------------------------------

CTC_CORPUS_PACKAGE = "s3prl.downstream.ctc.corpus"


def _shim_ctc_corpus() -> None:
    """s3prl 0.4.18 from PyPI lacks ``s3prl/downstream/ctc/corpus/``: ``-d ctc`` cannot import libriphone.

    We register ``upstream_compressed.corpus`` (and its ``libriphone``) under the names that
    ``s3prl.downstream.ctc.data`` imports, through ``sys.modules``. Better than appending a folder to
    ``s3prl.downstream.ctc.__path__``: there is one module object (one ``LibriPhoneDataset`` class,
    not two copies), it exposes only the corpus package, and pickles (DataLoader workers) name
    ``upstream_compressed.corpus.libriphone``, which imports anywhere. Corpora we do not provide
    (``librispeech``, ``snips``, ...) still fail with s3prl's own "No module named" error.
    """
    import s3prl.downstream.ctc as ctc
    import upstream_compressed.corpus as corpus
    import upstream_compressed.corpus.libriphone as libriphone

    existing = sys.modules.get(CTC_CORPUS_PACKAGE)
    if existing is not None and existing is not corpus:
        return  # a real s3prl checkout ships its own corpus package: keep it
    if existing is None and importlib.util.find_spec(CTC_CORPUS_PACKAGE) is not None:
        return  # same, not yet imported
    sys.modules[CTC_CORPUS_PACKAGE] = corpus
    sys.modules[f"{CTC_CORPUS_PACKAGE}.libriphone"] = libriphone
    ctc.corpus = corpus


def _shim_ctc_num_workers() -> None:
    """s3prl's ctc ``load_dataset`` pops ``num_workers`` out of the shared corpus config.

    So only the first loader (train) honours it: dev and test, and ``-m evaluate`` from a
    checkpoint (whose saved config lost the key), silently start 12 worker processes. We hand
    it a copy of the config instead; s3prl's code is otherwise unchanged.
    """
    from s3prl.downstream.ctc import data

    original = data.load_dataset
    if getattr(original, "_upstream_compressed_copies_config", False):
        return

    @functools.wraps(original)
    def load_dataset(split, tokenizer, corpus):
        return original(split, tokenizer, dict(corpus))

    load_dataset._upstream_compressed_copies_config = True
    data.load_dataset = load_dataset
    expert = sys.modules.get("s3prl.downstream.ctc.expert")  # bound its own name at import
    if expert is not None and getattr(expert, "load_dataset", None) is original:
        expert.load_dataset = load_dataset


# --------------------------------------------------------------------------------------------
# voxceleb1 file-list cache
# --------------------------------------------------------------------------------------------


def voxceleb1_cache_key(file_path: str | os.PathLike, meta_data: str | os.PathLike) -> str:
    """A key for one data set: the resolved data root, the split file's path and its contents."""
    digest = hashlib.sha256()
    digest.update(str(Path(file_path).resolve()).encode())
    digest.update(b"\0")
    meta = Path(meta_data).resolve()
    digest.update(str(meta).encode())
    digest.update(b"\0")
    if meta.is_file():
        digest.update(meta.read_bytes())
    return digest.hexdigest()[:16]


def voxceleb1_cache_dir(file_path: str | os.PathLike, meta_data: str | os.PathLike, default_root: str) -> str:
    """Where one data set's voxceleb1 file lists are cached (``$UPSTREAM_COMPRESSED_VOXCELEB1_CACHE`` wins)."""
    root = os.environ.get(VOXCELEB1_CACHE_ENV) or default_root
    return os.path.join(root, voxceleb1_cache_key(file_path, meta_data)) + os.sep


def _shim_voxceleb1_cache() -> None:
    """voxceleb1 caches its file lists in ``<site-packages>/s3prl/downstream/voxceleb1/.cache/{split}.pkl``.

    The key is the split name only, so a toy run poisons a later real run (and vice versa): it
    silently trains on the other data set's files. We point the module's ``CACHE_PATH`` at a
    sub-folder keyed by the data root and split file for the duration of each dataset's
    ``__init__``; the s3prl code itself is unchanged. Old un-keyed ``*.pkl`` files are never read.
    """
    from s3prl.downstream.voxceleb1 import dataset as vox

    cls = vox.SpeakerClassifiDataset
    if getattr(cls.__init__, "_upstream_compressed_keyed", False):
        return
    original_init = cls.__init__
    default_root = getattr(vox, "_upstream_compressed_default_cache", vox.CACHE_PATH)
    vox._upstream_compressed_default_cache = default_root

    @functools.wraps(original_init)
    def keyed_init(self, mode, file_path, meta_data, *args, **kwargs):
        vox.CACHE_PATH = voxceleb1_cache_dir(file_path, meta_data, default_root)
        original_init(self, mode, file_path, meta_data, *args, **kwargs)

    keyed_init._upstream_compressed_keyed = True
    cls.__init__ = keyed_init


# --------------------------------------------------------------------------------------------
# torchrun local rank
# --------------------------------------------------------------------------------------------


def fix_local_rank_argv(
    argv: MutableSequence[str], environ: MutableMapping[str, str] | None = None
) -> MutableSequence[str]:
    """Make torchrun's local rank reach s3prl, which parses only ``--local_rank``; edits ``argv`` in place.

    * ``--local-rank=N`` / ``--local-rank N`` (``torch.distributed.launch`` since torch 2.0) become
      ``--local_rank=N`` / ``--local_rank N``; nothing else in ``argv`` changes.
    * torchrun passes no flag, only the ``LOCAL_RANK`` variable: then ``--local_rank=$LOCAL_RANK``
      is appended, unless a ``--local_rank`` is already there.
    """
    environ = os.environ if environ is None else environ
    for index, token in enumerate(argv):
        if index == 0:
            continue  # the program name
        if token == "--":
            break
        if token == "--local-rank":
            argv[index] = "--local_rank"
        elif token.startswith("--local-rank="):
            argv[index] = "--local_rank=" + token.split("=", 1)[1]
    has_flag = any(t == "--local_rank" or t.startswith("--local_rank=") for t in argv[1:])
    local_rank = environ.get("LOCAL_RANK")
    if not has_flag and local_rank not in (None, ""):
        argv.append(f"--local_rank={int(local_rank)}")
    return argv


# --------------------------------------------------------------------------------------------


def apply(argv: MutableSequence[str] | None = None) -> None:
    """Install all shims (idempotent; later calls only redo the cheap ``argv`` fix).

    ``argv``: pass ``sys.argv`` only from an entry point that hands it to s3prl's
    ``run_downstream`` (it gets torchrun's local rank rewritten). Library callers leave it out,
    so importing this package under torchrun never adds a flag to another program's command line.
    """
    global _applied
    if not _applied:
        _shim_torchaudio_backend()
        _shim_torchaudio_io()
        _shim_huggingface_hub()
        _shim_torch_load()
        _shim_ctc_corpus()
        _shim_ctc_num_workers()
        _shim_voxceleb1_cache()
        _applied = True
    if argv is not None:
        fix_local_rank_argv(argv)
