"""The checkpoint delta: what a compressed model changes relative to its base checkpoint.

A delta is one safetensors file (no pickle: reading it cannot run code). Its metadata holds a JSON
manifest: format version, base identity (name, path, sha256), recipe, the resulting model config,
the structure (which base layer / heads / FFN units each layer keeps) and parameter counts.
Its tensors are only those that differ from the base after slicing by that structure.

A weight-pruned (masked) Linear weight ``W`` is stored sparse (format version 2): ``W.__mask``, its
mask bit-packed into uint8 (numpy.packbits, row-major), and ``W.__values``, the kept values in
row-major order, only if they differ from the sliced base's (pruning without recovery stores bits
only). The manifest's ``sparse_tensors`` gives each one's shape and number of kept values.

Loading = read base, verify its sha256, slice by the kept indices, overwrite with the delta tensors.

A self-contained file (format version 3, ``upstream-compressed export``) holds every tensor of the
compressed model (masked weights still as mask + kept values) and needs no base; its manifest keeps
the base identity as provenance only.

Every problem is reported as one :class:`DeltaError` whose message names it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write_bytes  # noqa: F401 - re-exported: callers import it from here
from .model import ModelConfig, SpeechTransformer
from .model.convert import CheckpointError, Converted, load_base
from .model.sparse import masked_linears

FORMAT_NAME = "upstream_compressed.delta"
FORMAT_VERSION = 1  # written when no tensor is stored sparse, so dense deltas stay readable by older code
SPARSE_FORMAT_VERSION = 2  # adds sparse (mask + kept values) tensors
SELF_CONTAINED_FORMAT_VERSION = 3  # every tensor stored: no base needed (older readers refuse it)
READABLE_VERSIONS = (FORMAT_VERSION, SPARSE_FORMAT_VERSION, SELF_CONTAINED_FORMAT_VERSION)
MASK_SUFFIX = ".__mask"
VALUES_SUFFIX = ".__values"
MANIFEST_KEY = "upstream_compressed.manifest"
MANIFEST_DIGEST_KEY = "upstream_compressed.manifest_sha256"


class DeltaError(Exception):
    """A delta (or its base) that cannot be loaded; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------ structure
@dataclass
class LayerOrigin:
    """Where a layer of the compressed model comes from in the base: which layer, heads and units."""

    source_layer: int
    kept_heads: list[int] | None = None  # None: all of the source layer's heads, in order
    kept_units: list[int] | None = None  # None: all FFN units
    attention: bool = True  # False: the attention sublayer is removed
    ffn: bool = True  # False: the FFN sublayer is removed


@dataclass
class Structure:
    """Per compressed layer, its origin in the base; per conv layer, the base channels it keeps.

    Composes over repeated pruning steps.
    """

    layers: list[LayerOrigin] = field(default_factory=list)
    conv_channels: list[list[int] | None] | None = None  # per conv layer; None: all channels, in order

    @classmethod
    def identity(cls, config: ModelConfig) -> "Structure":
        return cls([LayerOrigin(i) for i in range(config.num_layers)])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Structure":
        return cls([LayerOrigin(**layer) for layer in data["layers"]], data.get("conv_channels"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for layer in data["layers"]:  # unpruned parts are left out: older manifests stay as they were
            for name in ("attention", "ffn"):
                if layer[name]:
                    del layer[name]
        if self.conv_channels is None:
            del data["conv_channels"]
        return data

    def keep_channels(self, conv_layer: int, channels: Sequence[int], base_channels: int) -> None:
        """Conv ``conv_layer`` keeps ``channels`` (indices into its current channels) of its ``base_channels``."""
        kept = list(self.conv_channels or [])
        kept += [None] * (conv_layer + 1 - len(kept))  # the list may stop at the last pruned conv layer
        current = kept[conv_layer] or list(range(base_channels))
        kept[conv_layer] = [current[c] for c in channels]
        self.conv_channels = kept

    def remove_attention(self, layer: int) -> None:
        self.layers[layer].attention = False
        self.layers[layer].kept_heads = []

    def remove_ffn(self, layer: int) -> None:
        self.layers[layer].ffn = False
        self.layers[layer].kept_units = []

    def keep_heads(self, layer: int, heads: Sequence[int], base_heads: int) -> None:
        current = self.layers[layer].kept_heads or list(range(base_heads))
        self.layers[layer].kept_heads = [current[h] for h in heads]

    def keep_units(self, layer: int, units: Sequence[int], base_units: int) -> None:
        current = self.layers[layer].kept_units or list(range(base_units))
        self.layers[layer].kept_units = [current[u] for u in units]


def slice_base(base: Converted, structure: Structure) -> dict[str, Tensor]:
    """The base's tensors after applying ``structure``: what a delta is stored relative to."""
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict, share=True)
    sources = [origin.source_layer for origin in structure.layers]
    if any(not 0 <= s < base.config.num_layers for s in sources):
        raise DeltaError(f"structure names base layers {sources}, but the base has {base.config.num_layers}")
    model.layers = torch.nn.ModuleList(model.layers[s] for s in sources)
    model.config.layers = [copy.deepcopy(base.config.layers[s]) for s in sources]
    for i, origin in enumerate(structure.layers):
        try:
            if not origin.attention:
                model.remove_attention(i)
            elif origin.kept_heads is not None:
                model.keep_heads(i, origin.kept_heads)
            if not origin.ffn:
                model.remove_ffn(i)
            elif origin.kept_units is not None:
                model.keep_units(i, origin.kept_units)
        except ValueError as error:
            raise DeltaError(f"structure of layer {i} does not fit the base: {error}") from error
    channels = structure.conv_channels or []
    if len(channels) > len(base.config.conv_layers):
        raise DeltaError(f"structure names {len(channels)} conv layers, but the base has {len(base.config.conv_layers)}")
    for i, kept in enumerate(channels):
        if kept is not None:
            try:
                model.keep_channels(i, kept)
            except ValueError as error:
                raise DeltaError(f"conv channels of conv layer {i} do not fit the base: {error}") from error
    return model.state_dict()


# ---------------------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------- sparse tensors
def pack_mask(mask: Tensor) -> Tensor:
    """A boolean mask as bits, 8 to a uint8 (row-major, last byte zero-padded)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def unpack_mask(packed: Tensor, shape: Sequence[int], name: str) -> Tensor:
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise DeltaError(
            f"mask of sparse tensor {name} has {packed.numel()} {packed.dtype} entries; a packed mask of shape "
            f"{tuple(shape)} needs {(numel + 7) // 8} uint8"
        )
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def _masked_weight_names(model: SpeechTransformer) -> list[str]:
    return [f"{name}.weight" for name, _ in masked_linears(model)]


def _mask_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "mask"


def _sparsity_summary(model: SpeechTransformer) -> dict[str, Any]:
    """What weight pruning covers and how sparse each masked Linear is (for the manifest)."""
    linears = {name: {"shape": list(m.mask.shape), "kept": m.mask.numel() - m.num_pruned}
               for name, m in masked_linears(model)}
    weights = sum(math.prod(v["shape"]) for v in linears.values())
    kept = sum(v["kept"] for v in linears.values())
    return {
        "scope": "weights of the masked encoder Linears listed here (config layers[].sparse); biases, the conv "
                 "front end, the positional conv, feature projection and prediction heads are dense",
        "linears": linears,
        "weights": weights,
        "kept": kept,
        "sparsity": 1 - kept / weights if weights else 0.0,
        "params_nonzero": model.num_parameters() - (weights - kept),
    }


@dataclass
class Delta:
    """A delta in memory: its manifest and its tensors."""

    manifest: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])

    @property
    def structure(self) -> Structure:
        return Structure.from_dict(self.manifest["structure"])

    @property
    def technique(self) -> str:
        return self.manifest["technique"]

    @property
    def base_family(self) -> str:
        return self.manifest["base"]["family"]

    @property
    def self_contained(self) -> bool:
        return self.manifest.get("format_version") == SELF_CONTAINED_FORMAT_VERSION


def make_delta(
    base: Converted,
    base_identity: dict[str, Any],
    model: SpeechTransformer,
    structure: Structure,
    recipe: dict[str, Any],
    technique: str,
    extra: dict[str, Any] | None = None,
) -> Delta:
    """Describe ``model`` relative to ``base``: keep only the tensors that slicing the base does not give.

    Masked weights are stored sparse: packed mask bits, plus kept values where they differ from the base.
    """
    reference = slice_base(base, structure)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for name in _masked_weight_names(model):
        weight, mask = state.pop(name).detach().cpu(), state.pop(_mask_name(name)).detach().cpu()
        kept = mask.flatten().nonzero().squeeze(1)
        values = weight.flatten()[kept]
        tensors[name + MASK_SUFFIX] = pack_mask(mask)
        ref = reference.get(name)
        if ref is None or ref.shape != weight.shape or not torch.equal(ref.flatten()[kept], values):
            tensors[name + VALUES_SUFFIX] = values
        sparse[name] = {"shape": list(weight.shape), "kept": len(kept)}
    for name, tensor in state.items():
        ref = reference.get(name)
        if ref is None or ref.shape != tensor.shape or not torch.equal(ref, tensor.detach().cpu()):
            tensors[name] = tensor.detach().cpu().contiguous()
    if sparse:
        extra = {**(extra or {}), "sparse_tensors": sparse, "sparsity": _sparsity_summary(model)}
        macs = extra.get("macs")
        if isinstance(macs, dict) and "seconds" in macs:  # dense MACs count the zeros; say what is really multiplied
            from .profile import count_effective_macs

            extra["macs"] = {**macs, "compressed_effective": count_effective_macs(model, macs["seconds"])}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": SPARSE_FORMAT_VERSION if sparse else FORMAT_VERSION,
        "base": base_identity,
        "recipe": recipe,
        "technique": technique,
        "config": model.config.to_dict(),
        "structure": structure.to_dict(),
        # Parameters only: buffers (MelHuBERT's fbank statistics) are not weights of either model.
        "params": {"base": SpeechTransformer.from_state_dict(base.config, base.state_dict, share=True).num_parameters(),
                   "compressed": model.num_parameters()},
        "tensors_sha256": _tensor_digest(tensors),
        **(extra or {}),
    }
    return Delta(manifest, tensors)


def write_delta(delta: Delta, path: str | os.PathLike) -> Path:
    """Write ``delta`` atomically as safetensors with the manifest in its metadata."""
    from safetensors.torch import save

    manifest_json = json.dumps(delta.manifest, sort_keys=True)
    metadata = {
        MANIFEST_KEY: manifest_json,
        MANIFEST_DIGEST_KEY: hashlib.sha256(manifest_json.encode()).hexdigest(),
    }
    atomic_write_bytes(path, save(delta.tensors, metadata=metadata))
    return Path(path)


def read_delta(path: str | os.PathLike) -> Delta:
    """Read and verify a delta file (manifest digest, format version, tensor digest)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"delta file {path} does not exist; pass the .safetensors written by "
                         "`upstream-compressed compress` as -k")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise DeltaError(f"{path} is not a readable safetensors delta (truncated or corrupted?): {error}") from error
    if MANIFEST_KEY not in metadata:
        raise DeltaError(f"{path} is a safetensors file but not an upstream_compressed delta (no manifest)")
    manifest_json = metadata[MANIFEST_KEY]
    if hashlib.sha256(manifest_json.encode()).hexdigest() != metadata.get(MANIFEST_DIGEST_KEY):
        raise DeltaError(f"{path}: the manifest does not match its checksum; the file is corrupted")
    try:
        manifest = json.loads(manifest_json)
    except json.JSONDecodeError as error:
        raise DeltaError(f"{path}: the manifest is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT_NAME:
        raise DeltaError(f"{path}: unknown format {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DeltaError(
            f"{path}: delta format version {version} is not supported by this upstream_compressed "
            f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade the package or re-create the delta"
        )
    if (version == SELF_CONTAINED_FORMAT_VERSION) != bool(manifest.get("self_contained")):
        raise DeltaError(f"{path}: format version {version} and self_contained={manifest.get('self_contained')} disagree")
    if manifest.get("sparse_tensors") and version < SPARSE_FORMAT_VERSION:
        raise DeltaError(f"{path}: sparse tensors need format version {SPARSE_FORMAT_VERSION}, the file says {version}")
    if _tensor_digest(tensors) != manifest.get("tensors_sha256"):
        raise DeltaError(f"{path}: tensor data does not match the manifest's checksum; the file is corrupted")
    missing = {"base", "config", "structure", "technique"} - set(manifest)
    if missing:
        raise DeltaError(f"{path}: manifest lacks {sorted(missing)}")
    return Delta(manifest, tensors)


# ---------------------------------------------------------------------------------- application
def check_base(delta: Delta, base_path: str | os.PathLike) -> None:
    """Refuse a base file that is missing or is not the one the delta was made from."""
    base_path = Path(base_path)
    expected = delta.manifest["base"].get("sha256")
    if not base_path.is_file():
        raise DeltaError(
            f"base checkpoint {base_path} not found; the delta was made from "
            f"{delta.manifest['base'].get('name')!r}. Pass its path with -g (yaml `base: PATH`) or "
            "UPSTREAM_COMPRESSED_BASE"
        )
    actual = sha256_file(base_path)
    if actual != expected:
        raise DeltaError(
            f"base checkpoint {base_path} has sha256 {actual[:16]}..., but the delta was made from a base "
            f"with sha256 {str(expected)[:16]}... ({delta.manifest['base'].get('name')!r}); wrong base file"
        )


def apply_delta(delta: Delta, base: Converted | None) -> SpeechTransformer:
    """Build the compressed model: slice the base by the structure, then overwrite with the delta tensors.

    A self-contained delta needs no base (pass None): all its tensors are in the file.
    """
    try:
        config = delta.config
        structure = delta.structure
    except (TypeError, ValueError, KeyError) as error:
        raise DeltaError(f"the delta's config/structure is invalid: {error}") from error
    if len(structure.layers) != config.num_layers:
        raise DeltaError(f"structure has {len(structure.layers)} layers but the config {config.num_layers}")
    if base is None and not delta.self_contained:
        raise DeltaError("this delta stores only what differs from its base: the base checkpoint is needed")
    reference = {} if delta.self_contained else slice_base(base, structure)
    with torch.device("meta"):
        target = SpeechTransformer(config).state_dict()
    sparse = _sparse_tensors(delta, reference, target)
    stored_sparse = {n + suffix for n in sparse for suffix in (MASK_SUFFIX, VALUES_SUFFIX)}
    unknown = set(delta.tensors) - set(target) - stored_sparse
    if unknown:
        raise DeltaError(f"delta tensors {sorted(unknown)[:5]} do not exist in the model its config describes")
    state = {}
    for name, expected in target.items():
        tensor = sparse.get(name, delta.tensors.get(name, reference.get(name)))
        if tensor is None:
            raise DeltaError(f"tensor {name} is neither in the delta nor derivable from the base")
        if tensor.shape != expected.shape:
            where = "delta" if name in delta.tensors else "sliced base"
            raise DeltaError(
                f"tensor {name} from the {where} has shape {tuple(tensor.shape)}, but the structure "
                f"needs {tuple(expected.shape)}"
            )
        state[name] = tensor
    return SpeechTransformer.from_state_dict(config, state)


def _sparse_tensors(delta: Delta, reference: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Dense weights and masks rebuilt from the delta's sparse tensors (name -> tensor)."""
    specs = delta.manifest.get("sparse_tensors") or {}
    if not isinstance(specs, dict):
        raise DeltaError("the manifest's sparse_tensors is not a mapping")
    rebuilt: dict[str, Tensor] = {}
    for name, spec in specs.items():
        mask_name = _mask_name(name)
        if not name.endswith(".weight") or name not in target or mask_name not in target:
            raise DeltaError(f"sparse tensor {name} is not a masked Linear weight of the model its config describes "
                             "(config layers[].sparse lists the masked Linears)")
        if name in delta.tensors:
            raise DeltaError(f"tensor {name} is stored both dense and sparse")
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or tuple(shape) != tuple(target[name].shape):
            raise DeltaError(f"sparse tensor {name} has shape {shape}, but the structure needs {tuple(target[name].shape)}")
        if name + MASK_SUFFIX not in delta.tensors:
            raise DeltaError(f"sparse tensor {name} has no mask ({name + MASK_SUFFIX}) in the delta")
        mask = unpack_mask(delta.tensors[name + MASK_SUFFIX], shape, name)
        values = delta.tensors.get(name + VALUES_SUFFIX)
        if values is None:  # unchanged since pruning: the sliced base holds the kept values
            ref = reference.get(name)
            if ref is None or tuple(ref.shape) != tuple(shape):
                raise DeltaError(f"kept values of sparse tensor {name} are neither in the delta nor in the sliced base")
            values = ref[mask]
        kept = int(mask.count_nonzero())
        if values.dim() != 1 or values.numel() != kept:
            raise DeltaError(f"sparse tensor {name} has {values.numel()} kept values but its mask keeps {kept}")
        rebuilt[name] = torch.zeros(shape, dtype=values.dtype).masked_scatter_(mask, values)
        rebuilt[mask_name] = mask
    return rebuilt


def find_mean_std(delta: Delta, base_path: str | os.PathLike, explicit: str | os.PathLike | None = None,
                  search: Sequence[str | os.PathLike] = ()) -> Path | None:
    """The fbank statistics file of a MelHuBERT delta's base, verified by sha256 (None for other bases).

    Looked for in this order: ``explicit``, the recorded path, a file of the recorded name beside the
    base or in any of the ``search`` folders.
    """
    recorded = delta.manifest["base"].get("mean_std")
    if not recorded:
        return None
    name = str(recorded.get("file_name", ""))
    candidates = [explicit, recorded.get("path"), Path(base_path).parent / name, *(Path(d) / name for d in search)]
    path = next((Path(c) for c in candidates if c and name and Path(c).is_file()), None)
    if explicit and (path is None or path != Path(explicit)):
        raise DeltaError(f"fbank mean/std file {explicit} does not exist")
    if path is None:
        raise DeltaError(
            f"cannot find the fbank mean/std file of this MelHuBERT delta's base (recorded as {recorded.get('path')}); "
            "put it beside the base checkpoint, or pass it with -g OPTIONS.yaml containing `mean_std: PATH`"
        )
    actual = sha256_file(path)
    if actual != recorded.get("sha256"):
        raise DeltaError(
            f"fbank mean/std file {path} has sha256 {actual[:16]}..., but the delta was made with "
            f"{str(recorded.get('sha256'))[:16]}... ({recorded.get('file_name')}); wrong statistics file"
        )
    return path


def build_compressed(delta: Delta, base_path: str | os.PathLike | None, mean_std: str | os.PathLike | None = None,
                     search: Sequence[str | os.PathLike] = ()) -> SpeechTransformer:
    """Verify ``base_path`` (and a MelHuBERT base's statistics file) and build the compressed model.

    A self-contained delta needs no base: ``base_path`` is then ignored.
    """
    if delta.self_contained:
        return apply_delta(delta, None)
    check_base(delta, base_path)
    stats = find_mean_std(delta, base_path, mean_std, search)
    try:
        base = load_base(base_path, mean_std=stats)
    except CheckpointError as error:
        raise DeltaError(str(error)) from error
    return apply_delta(delta, base)


def load_compressed(delta_path: str | os.PathLike, base_path: str | os.PathLike,
                    mean_std: str | os.PathLike | None = None) -> tuple[SpeechTransformer, Delta]:
    """Read a delta, verify its base file, and build the compressed model."""
    delta = read_delta(delta_path)
    return build_compressed(delta, base_path, mean_std, search=[Path(delta_path).parent]), delta


def export_self_contained(delta: Delta, base: Converted) -> Delta:
    """``delta`` with every tensor of its compressed model stored, so loading it needs no base.

    Masked (weight-pruned) weights stay sparse: packed mask plus all kept values.
    """
    if delta.self_contained:
        return delta
    model = apply_delta(delta, base)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    for name in _masked_weight_names(model):
        weight, mask = state.pop(name), state.pop(_mask_name(name))
        tensors[name + MASK_SUFFIX] = pack_mask(mask)
        tensors[name + VALUES_SUFFIX] = weight.flatten()[mask.flatten().nonzero().squeeze(1)]
    tensors.update(state)
    manifest = {
        **copy.deepcopy(delta.manifest),
        "format_version": SELF_CONTAINED_FORMAT_VERSION,
        "self_contained": True,
        "tensors_sha256": _tensor_digest(tensors),
    }
    return Delta(manifest, tensors)
