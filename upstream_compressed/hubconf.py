"""The upstream entry functions that :func:`upstream_compressed.register` adds to ``s3prl.hub``.

Each is called by S3PRL's runner as ``fn(ckpt=<-k>, model_config=<-g>, refresh=<-r>)``. ``ckpt`` is a
delta file, or a self-contained file written by ``upstream-compressed export`` (which needs no base).
A delta's base checkpoint is found, in this order, from: the ``-g`` options yaml (``base: PATH``),
the ``UPSTREAM_COMPRESSED_BASE`` environment variable, the path recorded in the delta, a file of the
recorded name beside the delta, and finally S3PRL's own download of a known base name (needs network).

Weight-pruned Linears run dense or through a sparse kernel: the ``-g`` yaml's ``sparse_execution``
(``auto``, ``dense`` or ``sparse``), else the ``UPSTREAM_COMPRESSED_SPARSE_EXECUTION`` environment
variable, else ``auto`` (sparse where it is faster on the device).

The forward runs in the ``-g`` yaml's ``precision`` (``fp32``, ``bf16`` or ``fp16``), else the
``UPSTREAM_COMPRESSED_PRECISION`` environment variable, else ``fp32`` (no autocast); bf16/fp16 run under
``torch.autocast`` and return float32 hidden states (:mod:`upstream_compressed.expert` says per device).

``compile: true`` in the ``-g`` yaml (else ``UPSTREAM_COMPRESSED_COMPILE=1``; default false) runs the
model's forward through ``torch.compile(dynamic=True)``, compiled on the first forward; new lengths and
batch sizes reuse the graph (:mod:`upstream_compressed.expert` says which few shapes add one).

A MelHuBERT base also needs its fbank statistics file: the ``-g`` yaml's ``mean_std: PATH``, else
``UPSTREAM_COMPRESSED_MEAN_STD``, else the recorded path, else a file of the recorded name beside
the base or the delta. ``melhubert_local`` runs a MelHuBERT checkpoint itself (``-k``), uncompressed.
``dphubert_local`` runs a checkpoint in torchaudio's wav2vec2 layout (DPHuBERT's ``{"state_dict", "config"}``,
or torchaudio's own ``wav2vec2_model`` arguments) itself, with DPHuBERT's hidden states.

Base checkpoints are read weights-only (:mod:`upstream_compressed.model.trust`); one that pickles
more is refused unless the ``-g`` yaml says ``trust_checkpoint: true`` (or
``UPSTREAM_COMPRESSED_TRUST_CHECKPOINT=1`` is set).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from .bases import KNOWN_BASES, download_known_base
from .delta import Delta, DeltaError, build_compressed, read_delta
from .expert import UpstreamExpert, resolve_compile, resolve_precision
from .files import read_yaml
from .model.sparse import resolve_execution
from .model.trust import TRUST_OPTION, trusting

BASE_ENV = "UPSTREAM_COMPRESSED_BASE"
MEAN_STD_ENV = "UPSTREAM_COMPRESSED_MEAN_STD"
FAMILIES = ("hubert", "distilhubert", "melhubert", "dphubert", "wavlm", "wav2vec2")
OPTION_NAMES = ("base", "mean_std", "sparse_execution", "precision", "compile", TRUST_OPTION)  # what a -g yaml may set
# Techniques with a named entry per family (any other delta loads through ``compressed_local``).
TECHNIQUES = (
    "identity",
    "weightpruned",
    "headpruned",
    "rowpruned",
    "lowrank",
    "kd",
    "kd_head_lr",
    "kd_head",
    "kd_lr",
    "kd_head_row",
    "kd_head_row_lr",
    "head_row",
    "head_lr",
    "row_lr",
    "head_row_lr",
    "convpruned",
    "jointpruned",
)


def _options(model_config: str | None) -> dict:
    if not model_config:
        return {}
    path = Path(model_config)
    if not path.is_file():
        raise DeltaError(f"upstream options file (-g) {path} does not exist")
    data = read_yaml(path, DeltaError, f"upstream options file (-g) {path}") or {}
    if not isinstance(data, dict):
        raise DeltaError(f"upstream options file (-g) {path} must be a YAML mapping, e.g. `base: /path/to/base.pt`")
    unknown = set(data) - set(OPTION_NAMES)
    if unknown:  # a misspelt key would otherwise be ignored without a word
        raise DeltaError(f"upstream options file (-g) {path}: unknown option(s) {sorted(map(str, unknown))}; "
                         f"known: {list(OPTION_NAMES)}")
    for name in ("base", "mean_std"):  # files; null means not given
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not Path(value).expanduser().is_file()):
            raise DeltaError(f"upstream options file (-g) {path}: {name}: expected an existing file, got {value!r}")
    return data


def trust_option(model_config: str | None) -> bool:
    """The ``-g`` yaml's ``trust_checkpoint`` (true or false; absent means false)."""
    value = _options(model_config).get(TRUST_OPTION, False)
    if not isinstance(value, bool):
        raise DeltaError(
            f"upstream options file (-g) {model_config}: {TRUST_OPTION} must be true or false, not {value!r}"
        )
    return value


T = TypeVar("T")


def _resolved(model_config: str | None, name: str, resolve: Callable[..., T]) -> T:
    """The ``-g`` yaml's option ``name`` through ``resolve`` (which falls back on its environment variable),
    a bad value refused naming the file and the field."""
    try:
        return resolve(_options(model_config).get(name), where=f"upstream options file (-g) {model_config}: {name}")
    except ValueError as error:
        raise DeltaError(str(error)) from error


def precision_option(model_config: str | None) -> str:
    """The ``-g`` yaml's ``precision``, else the environment variable's, else fp32; unknown values refused."""
    return _resolved(model_config, "precision", resolve_precision)


def compile_option(model_config: str | None) -> bool:
    """The ``-g`` yaml's ``compile`` (true/false), else ``UPSTREAM_COMPRESSED_COMPILE``, else false."""
    return _resolved(model_config, "compile", resolve_compile)


def _expert(model, manifest: dict | None, precision: str, compile_model: bool = False) -> UpstreamExpert:
    try:
        return UpstreamExpert(model.eval(), manifest, precision=precision, compile_model=compile_model)
    except ValueError as error:  # a precision this model cannot run in (fp16 on an fbank front end)
        raise DeltaError(str(error)) from error


def find_base(delta: Delta, delta_path: Path, model_config: str | None, refresh: bool) -> Path:
    """The local base checkpoint for ``delta`` (see the module docstring for the search order)."""
    explicit = _options(model_config).get("base") or os.environ.get(BASE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    recorded = delta.manifest["base"]
    for candidate in (recorded.get("path"), delta_path.parent / str(recorded.get("file_name", ""))):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    name = recorded.get("name")
    if name in KNOWN_BASES:
        return download_known_base(name, refresh)
    raise DeltaError(
        f"cannot find the base checkpoint of {delta_path} (recorded as {recorded.get('path')}); "
        f"pass it with -g OPTIONS.yaml containing `base: PATH`, or set {BASE_ENV}=PATH"
    )


def entries_for(delta: Delta) -> str:
    """The ``-u`` names that load ``delta``: its named entry where one is registered, else compressed_local only."""
    if delta.base_family in FAMILIES and delta.technique in TECHNIQUES:
        return f"-u {delta.base_family}_{delta.technique} or -u compressed_local"
    return f"-u compressed_local (technique {delta.technique!r} has no named entry)"


def load_upstream(
    ckpt: str, model_config: str | None = None, refresh: bool = False, family: str | None = None,
    technique: str | None = None,
) -> UpstreamExpert:
    """Build the upstream for a delta, checking that it is what the entry name promises."""
    if not ckpt:
        raise DeltaError("no delta given: pass the .safetensors file written by `upstream-compressed compress` as -k")
    precision = precision_option(model_config)  # before any work: a bad value costs nothing
    compile_model = compile_option(model_config)
    delta_path = Path(ckpt)
    delta = read_delta(delta_path)
    if family is not None and delta.base_family != family:
        raise DeltaError(
            f"{delta_path} compresses a {delta.base_family} base, but the upstream {family}_{technique} "
            f"expects {family}; use {entries_for(delta)}"
        )
    if technique is not None and delta.technique != technique:
        raise DeltaError(
            f"{delta_path} was made by technique {delta.technique!r}, but the upstream name says "
            f"{technique!r}; use {entries_for(delta)}"
        )
    trusted = trust_option(model_config)
    # A self-contained file (`upstream-compressed export`) carries every tensor: no base to find.
    base_path = None if delta.self_contained else find_base(delta, delta_path, model_config, refresh)
    execution = _options(model_config).get("sparse_execution")
    try:
        resolve_execution(execution, where=f"upstream options file (-g) {model_config}: sparse_execution")
    except ValueError as error:
        raise DeltaError(str(error)) from error
    mean_std = _options(model_config).get("mean_std") or os.environ.get(MEAN_STD_ENV)
    with trusting(trusted):
        model = build_compressed(delta, base_path, mean_std, search=[delta_path.parent])
    model.set_sparse_execution(execution)
    return _expert(model, delta.manifest, precision, compile_model)


def compressed_local(ckpt: str, model_config: str | None = None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """Any delta written by ``upstream-compressed compress`` (no check of its technique)."""
    return load_upstream(ckpt, model_config, refresh)


def melhubert_local(ckpt: str, model_config: str | None = None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """A MelHuBERT checkpoint as it is (-k); its fbank mean/std file from -g `mean_std: PATH` or beside it."""
    from .model import SpeechTransformer
    from .model.convert import CheckpointError, load_base

    if not ckpt:
        raise DeltaError("no checkpoint given: pass a MelHuBERT checkpoint (.ckpt) as -k")
    precision, compile_model = precision_option(model_config), compile_option(model_config)
    mean_std = _options(model_config).get("mean_std") or os.environ.get(MEAN_STD_ENV)
    try:
        base = load_base(ckpt, mean_std=mean_std, trust=trust_option(model_config))
    except CheckpointError as error:
        raise DeltaError(str(error)) from error
    if base.source_format != "melhubert":
        raise DeltaError(f"{ckpt} is a {base.source_format} checkpoint, not MelHuBERT; use hubert_local / distiller_local")
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    return _expert(model, None, precision, compile_model)


def dphubert_local(ckpt: str, model_config: str | None = None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """A torchaudio wav2vec2-layout checkpoint as it is (-k): DPHuBERT's hidden states, projected features first."""
    from .model import SpeechTransformer
    from .model.convert import TORCHAUDIO_FORMAT, CheckpointError, load_base

    if not ckpt:
        raise DeltaError("no checkpoint given: pass a DPHuBERT / torchaudio wav2vec2 checkpoint ({state_dict, config}) as -k")
    precision, compile_model = precision_option(model_config), compile_option(model_config)
    try:
        base = load_base(ckpt, trust=trust_option(model_config))
    except CheckpointError as error:
        raise DeltaError(str(error)) from error
    if base.source_format != TORCHAUDIO_FORMAT:
        raise DeltaError(f"{ckpt} is a {base.source_format} checkpoint, not in torchaudio's wav2vec2 layout; "
                         "use hubert_local / distiller_local / melhubert_local")
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    return _expert(model, None, precision, compile_model)


def _named_entry(family: str, technique: str) -> Callable[..., UpstreamExpert]:
    def entry(ckpt: str, model_config: str | None = None, refresh: bool = False, **kwargs) -> UpstreamExpert:
        return load_upstream(ckpt, model_config, refresh, family=family, technique=technique)

    entry.__name__ = f"{family}_{technique}"
    entry.__doc__ = f"A {family} base compressed by {technique}; -k is its delta file."
    return entry


def entries() -> dict[str, Callable[..., UpstreamExpert]]:
    """Every upstream entry of this plugin, by name."""
    named = {f"{f}_{t}": _named_entry(f, t) for f in FAMILIES for t in TECHNIQUES}
    from .embedded.hubconf import entries as embedded_entries

    return {**named, "compressed_local": compressed_local, "melhubert_local": melhubert_local,
            "dphubert_local": dphubert_local, **embedded_entries()}
