"""espeak-ng through ctypes: phonemes for a word and 22.05 kHz speech for a sentence.

The library and its data come from the ``espeakng-loader`` wheel (``libespeak-ng.so`` plus
``espeak-ng-data``), so nothing needs to be installed system-wide.

espeak-ng keeps global synthesis state (wave phase, flutter, echo buffers) that carries over from one
utterance to the next and is not reset by ``espeak_Initialize``; it also seeds its noise generator
from the clock. So the same text gives different samples depending on what was spoken before.
:class:`EspeakProcess` therefore runs the library in a fresh child process: a fixed sequence of calls
from a fresh start, each with a fixed noise seed, gives the same bytes every time.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LANGUAGE = "en-us"

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() when the data is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_EE_OK = 0
_PHONEME_SEPARATOR = "|"


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded or refused a request; the message says which and why."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice setting: a variant of the en-us voice plus pitch, range, rate and volume."""

    variant: str  # a file name in espeak-ng-data/voices/!v, e.g. "m3"; "" for the plain voice
    pitch: int  # base pitch, 0-100 (espeak's default 50)
    range: int  # pitch range, 0-100 (default 50)
    rate: int  # words per minute, 80-450 (default 175)
    volume: int = 60  # 0-200 (default 100); lower keeps loud variants from clipping

    @property
    def name(self) -> str:
        return f"{LANGUAGE}+{self.variant}" if self.variant else LANGUAGE


def espeak_paths() -> tuple[Path, Path]:
    """(shared library, folder that holds ``espeak-ng-data``) of the ``espeakng-loader`` wheel."""
    try:
        import espeakng_loader
    except ImportError as error:
        raise EspeakError(
            "espeak-ng is not available: the Python package 'espeakng-loader' (which ships libespeak-ng "
            "and its data) is not installed; run `pip install espeakng-loader`"
        ) from error
    library = Path(espeakng_loader.get_library_path())
    data = Path(espeakng_loader.__file__).parent
    if not library.is_file():
        raise EspeakError(f"espeak-ng library {library} (from espeakng-loader) does not exist")
    if not (data / "espeak-ng-data").is_dir():
        raise EspeakError(f"espeak-ng data folder {data / 'espeak-ng-data'} (from espeakng-loader) does not exist")
    return library, data


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """espeak-ng loaded into this process (its state is process-global: one instance per process)."""

    def __init__(self) -> None:
        library, data = espeak_paths()
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as error:
            raise EspeakError(f"cannot load the espeak-ng library {library}: {error}") from error
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        self._lib = lib
        self._variants = data / "espeak-ng-data" / "voices" / "!v"

        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}) with data path {data}")
        self.sample_rate: int = rate
        self._chunks: list[np.ndarray] = []
        # ctypes must keep the callback object alive as long as the library may call it.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._set_voice(LANGUAGE)

    def _collect(self, samples: Any, count: int, events: Any) -> int:
        if samples and count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0 = continue synthesis

    def _set_voice(self, name: str) -> None:
        # espeak-ng silently ignores an unknown "+variant" and speaks with the plain voice: check first.
        variant = name.partition("+")[2]
        if variant and not (self._variants / variant).is_file():
            raise EspeakError(f"espeak-ng has no voice {name!r}: no variant file {self._variants / variant}")
        status = self._lib.espeak_SetVoiceByName(name.encode())
        if status != _EE_OK:
            raise EspeakError(f"espeak-ng has no voice {name!r} (espeak_SetVoiceByName returned {status})")

    def _set_parameter(self, parameter: int, value: int) -> None:
        status = self._lib.espeak_SetParameter(parameter, int(value), 0)
        if status != _EE_OK:
            raise EspeakError(f"espeak_SetParameter({parameter}, {value}) failed with status {status}")

    def phonemes(self, word: str) -> list[str]:
        """espeak-ng's ASCII phoneme names for one word (en-us), stress marks attached: ``hello`` -> ``['h', '@', 'l', "'oU"]``."""
        self._set_voice(LANGUAGE)
        buffer = ctypes.create_string_buffer(word.encode())
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        mode = ord(_PHONEME_SEPARATOR) << 8  # bits 8-23: separator between phonemes; bit 1 clear: ASCII names
        pieces = []
        while pointer.value:
            result = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, mode)
            if result is None:
                break
            pieces.append(result.decode())
        tokens = [t for piece in pieces for t in piece.replace(" ", _PHONEME_SEPARATOR).split(_PHONEME_SEPARATOR) if t]
        if not tokens:
            raise EspeakError(f"espeak-ng gave no phonemes for {word!r}")
        return tokens

    def synthesize(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        """Speak ``text`` with ``voice``: int16 samples at :attr:`sample_rate` (22.05 kHz)."""
        self._set_voice(voice.name)
        self._set_parameter(_PARAM_RATE, voice.rate)
        self._set_parameter(_PARAM_PITCH, voice.pitch)
        self._set_parameter(_PARAM_RANGE, voice.range)
        self._set_parameter(_PARAM_VOLUME, voice.volume)
        self._lib.espeak_ng_SetRandSeed(seed)  # espeak-ng seeds its noise from the clock otherwise
        self._chunks = []
        data = text.encode()
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise EspeakError(f"espeak_Synth failed with status {status} for {text!r}")
        if not self._chunks:
            raise EspeakError(f"espeak-ng produced no audio for {text!r} with voice {voice}")
        return np.concatenate(self._chunks)


def _serve(connection: Any) -> None:
    """Child process: answer ``(method, args)`` requests with ``("ok", result)`` or ``("error", message)``."""
    try:
        engine = Espeak()
    except EspeakError as error:
        connection.send(("error", str(error)))
        return
    connection.send(("ok", engine.sample_rate))
    while True:
        request = connection.recv()
        if request is None:
            return
        method, args = request
        try:
            connection.send(("ok", getattr(engine, method)(*args)))
        except Exception as error:  # noqa: BLE001 - the parent re-raises it with the message
            connection.send(("error", f"{type(error).__name__}: {error}"))


class EspeakProcess:
    """espeak-ng in a fresh child process, so a fixed sequence of requests gives the same bytes every time.

        with EspeakProcess() as engine:
            engine.phonemes("hello"); engine.synthesize("hello world.", Voice("m3", 50, 50, 175), seed=1)
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would inherit a used espeak state
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True, name="espeak-ng")
        self._process.start()
        child.close()
        self.sample_rate: int = self._receive("starting espeak-ng")

    def _receive(self, what: str) -> Any:
        try:
            status, value = self._connection.recv()
        except EOFError as error:
            raise EspeakError(f"the espeak-ng child process died while {what}") from error
        if status != "ok":
            raise EspeakError(value)
        return value

    def _call(self, method: str, *args: Any) -> Any:
        self._connection.send((method, args))
        return self._receive(f"running {method}{args!r}")

    def phonemes(self, word: str) -> list[str]:
        return self._call("phonemes", word)

    def synthesize(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        return self._call("synthesize", text, voice, seed)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
        self._connection.close()

    def __enter__(self) -> "EspeakProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
