"""S3PRL checkpoints <-> (ModelConfig, state_dict) of :class:`SpeechTransformer`.

Two formats, the ones S3PRL's own loaders read:
- HuBERT converted (``hubert_local``): ``{task_cfg, model_cfg, model_weight, dictionaries_symbols}``;
- distiller (``distiller_local``): ``{"Config": {"distiller": {...}}, "Distiller": state_dict}``;
and MelHuBERT's own (``{"model", "Upstream_Config": {"melhubert": ...}}`` plus a mean/std file; see
:mod:`.convert_melhubert`), and torchaudio's wav2vec2 layout (``{"state_dict", "config"}``, DPHuBERT's;
see :mod:`.convert_torchaudio`, which also writes it back).
Tensors that only pre-training uses (HuBERT's ``final_proj``, ``label_embs_concat``, ``mask_emb``)
are kept aside as ``extras`` so converting back gives a checkpoint S3PRL loads.
Files are read weights-only, with the allow-list and opt-in of :mod:`.trust`.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .config import DISTILLER, HUBERT, MELHUBERT, LayerConfig, ModelConfig
from .convert_melhubert import MELHUBERT_FORMAT, find_mean_std, from_melhubert, is_melhubert, to_melhubert
from .convert_torchaudio import TORCHAUDIO_FORMAT, from_torchaudio, is_torchaudio
from .trust import (
    TrustedCheckpointWarning,
    allowed_globals,
    is_trusted,
    refusal_message,
    refused_global,
    trusted_warning,
)

HUBERT_FORMAT = "s3prl_hubert"
DISTILLER_FORMAT = "s3prl_distiller"


class CheckpointError(ValueError):
    """A base checkpoint that is missing, unreadable or in a format we do not know."""


class UntrustedCheckpointError(CheckpointError):
    """A base checkpoint that pickles more than :mod:`.trust` allows, loaded without an opt-in."""

    def __init__(self, path: str | os.PathLike, found: str) -> None:
        super().__init__(refusal_message(path, found))
        self.path, self.found = Path(path), found


@dataclass
class Converted:
    """A checkpoint in our terms, plus what is needed to write it back in its own format."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    source_format: str
    extras: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- reading
def _weights_only_load(path: Path) -> tuple[Any, str | None]:
    """``(checkpoint, None)``, or ``(None, what torch refused)`` when it pickles more than :mod:`.trust` allows."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as error:
        found = refused_global(str(error))
        if found is None:  # not an object it refused: a file that is no checkpoint
            raise
        return None, found


def _reason(error: Exception) -> str:
    """torch's error in one line (its weights-only messages wrap the reason in advice that does not apply)."""
    text = str(error).strip()
    match = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return match.group(1).strip() if match else f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _require_trust(path: Path, found: str, trust: bool | None) -> None:
    """Refuse ``path`` unless the user opted in; warn, naming it, when they did."""
    if not is_trusted(trust):
        raise UntrustedCheckpointError(path, found)
    warnings.warn(trusted_warning(path, found), TrustedCheckpointWarning, stacklevel=3)


def load_checkpoint_file(path: str | os.PathLike, trust: bool | None = None) -> dict[str, Any]:
    """``torch.load`` a base checkpoint weights-only, with :mod:`.trust`'s allow-list.

    A file that needs more is refused (:class:`UntrustedCheckpointError`) before anything else is
    done, unless ``trust`` or an opt-in (:func:`.trust.is_trusted`) says to unpickle it fully.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"base checkpoint {path} does not exist (or is not a file)")
    is_trusted(trust)  # a malformed opt-in value is refused even for a plain file
    try:
        ckpt, found = _weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        raise CheckpointError(f"cannot read base checkpoint {path} (is it a PyTorch checkpoint?): "
                              f"{_reason(error)}") from error
    if found is None:
        return ckpt
    _require_trust(path, found, trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - as above
        raise CheckpointError(f"cannot read base checkpoint {path}: {error}") from error


def check_checkpoint_file(path: str | os.PathLike, trust: bool | None = None) -> bool:
    """For a file that S3PRL's own loader will read: refuse it as :func:`load_checkpoint_file` would.

    True when it is trusted and needs full unpickling (run that loader in
    :func:`.trust.full_unpickling_by_s3prl`). A file torch cannot read at all is left to that loader.
    """
    is_trusted(trust)
    try:
        _, found = _weights_only_load(Path(path))
    except Exception:  # noqa: BLE001 - not a torch checkpoint: the loader reports its own error
        return False
    if found is None:
        return False
    _require_trust(Path(path), found, trust)
    return True


def detect_format(ckpt: dict[str, Any]) -> str:
    if all(key in ckpt for key in ("task_cfg", "model_cfg", "model_weight")):
        return HUBERT_FORMAT
    if "Distiller" in ckpt and "distiller" in ckpt.get("Config", {}):
        return DISTILLER_FORMAT
    if is_melhubert(ckpt):
        return MELHUBERT_FORMAT
    if is_torchaudio(ckpt):
        return TORCHAUDIO_FORMAT
    raise CheckpointError(
        f"unknown checkpoint format with keys {sorted(ckpt)[:8]}; expected S3PRL's converted HuBERT "
        "format (task_cfg, model_cfg, model_weight), the distiller format (Config, Distiller) or "
        "MelHuBERT's (model, Upstream_Config) or torchaudio's wav2vec2 layout (state_dict, config: DPHuBERT's). "
        "Convert a fairseq HuBERT checkpoint with s3prl.upstream.hubert.convert first."
    )


def load_base(path: str | os.PathLike, mean_std: str | os.PathLike | None = None,
              trust: bool | None = None) -> Converted:
    """Read an S3PRL HuBERT or distiller checkpoint, or a MelHuBERT one, into our config and state dict.

    ``mean_std``: a MelHuBERT checkpoint's fbank statistics file; by default the one beside the
    checkpoint (``<stem>.mean-std.npy``, ``<stem>-mean-std.npy`` or ``mean-std.npy``).
    ``trust``: unpickle it fully if it needs more than :mod:`.trust` allows (else the user's opt-in decides).
    """
    ckpt = load_checkpoint_file(path, trust)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dictionary")
    fmt = detect_format(ckpt)
    if mean_std is not None and fmt != MELHUBERT_FORMAT:
        raise CheckpointError(f"{path} is a {fmt} checkpoint; a fbank mean/std file applies only to MelHuBERT")
    stats = mean_std if mean_std is not None else (find_mean_std(path) if fmt == MELHUBERT_FORMAT else None)
    if fmt == MELHUBERT_FORMAT and stats is None:
        raise CheckpointError(
            f"MelHuBERT checkpoint {path} needs its fbank mean/std file (the .npy MelHuBERT's upstream "
            f"uses, e.g. libri-960-mean-std.npy): put it beside the checkpoint as "
            f"{Path(path).stem}.mean-std.npy or mean-std.npy, or name it with `mean_std:`"
        )
    try:
        if fmt == MELHUBERT_FORMAT:
            config, state, extras = from_melhubert(ckpt, stats)
            converted = Converted(config, state, MELHUBERT_FORMAT, extras)
        elif fmt == TORCHAUDIO_FORMAT:
            config, state, extras = from_torchaudio(ckpt)
            converted = Converted(config, state, TORCHAUDIO_FORMAT, extras)
        else:
            converted = from_hubert(ckpt) if fmt == HUBERT_FORMAT else from_distiller(ckpt)
    except (KeyError, ValueError, SyntaxError) as error:
        raise CheckpointError(f"{path}: malformed {fmt} checkpoint: {error}") from error
    # Half-precision storage (e.g. the bundled tiny HuBERT) runs in fp32, as S3PRL's loaders do.
    converted.state_dict = {k: v.float() if v.is_floating_point() else v for k, v in converted.state_dict.items()}
    return converted


def _parse_conv_layers(spec: str | list) -> list[tuple[int, int, int]]:
    # The spec is a Python expression like "[(512,10,5)] + [(512,3,2)] * 4"; evaluate it without eval().
    if not isinstance(spec, str):
        return [tuple(layer) for layer in spec]
    tree = ast.parse(spec, mode="eval")

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return value(node.left) * value(node.right)
        return ast.literal_eval(node)

    return [tuple(layer) for layer in value(tree.body)]


def _common_renames(layer_count: int, conv_count: int, extractor_mode: str) -> dict[str, str]:
    """S3PRL key -> our key, for the parts HuBERT and the distiller share (encoder prefix ``encoder.``)."""
    names: dict[str, str] = {}
    for i in range(conv_count):
        names[f"feature_extractor.conv_layers.{i}.0.weight"] = f"feature_extractor.convs.{i}.weight"
        names[f"feature_extractor.conv_layers.{i}.0.bias"] = f"feature_extractor.convs.{i}.bias"
        norm = f"feature_extractor.conv_layers.{i}.2.1" if extractor_mode == "layer_norm" else (
            "feature_extractor.conv_layers.0.2" if i == 0 else None
        )
        if norm:
            names[f"{norm}.weight"] = f"feature_extractor.norms.{i}.weight"
            names[f"{norm}.bias"] = f"feature_extractor.norms.{i}.bias"
    for p in ("weight", "bias"):
        names[f"post_extract_proj.{p}"] = f"feature_projection.{p}"
    return {**names, **encoder_renames(layer_count)}


def encoder_options(get: Callable[[str, Any], Any]) -> dict[str, Any]:
    """ModelConfig fields read alike from a distiller's or MelHuBERT's config (``get(key, default)``)."""
    return {
        "conv_pos": int(get("conv_pos", 128)),
        "conv_pos_groups": int(get("conv_pos_groups", 16)),
        "layer_norm_first": bool(get("layer_norm_first", False)),
        "feature_layer_norm": False,
        "activation": str(get("activation_fn", "gelu")),
        "dropout": float(get("dropout", 0.1)),
        "attention_dropout": float(get("attention_dropout", 0.1)),
        "activation_dropout": float(get("activation_dropout", 0.1)),
    }


def encoder_renames(layer_count: int) -> dict[str, str]:
    """fairseq-style Transformer encoder key (``encoder.`` prefix) -> our key; HuBERT, distiller, MelHuBERT."""
    names: dict[str, str] = {}
    for p in ("weight", "bias"):
        names[f"encoder.layer_norm.{p}"] = f"encoder_norm.{p}"
    for p in ("weight_g", "weight_v", "bias"):
        names[f"encoder.pos_conv.0.{p}"] = f"positional_conv.{p}"
    for i in range(layer_count):
        src, dst = f"encoder.layers.{i}", f"layers.{i}"
        for p in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{src}.self_attn.{proj}.{p}"] = f"{dst}.attention.{proj}.{p}"
            names[f"{src}.self_attn_layer_norm.{p}"] = f"{dst}.attention_norm.{p}"
            names[f"{src}.fc1.{p}"] = f"{dst}.feed_forward.fc1.{p}"
            names[f"{src}.fc2.{p}"] = f"{dst}.feed_forward.fc2.{p}"
            names[f"{src}.final_layer_norm.{p}"] = f"{dst}.final_norm.{p}"
    return names


def _rename(state: dict[str, Tensor], names: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    ours, rest = {}, {}
    for key, tensor in state.items():
        if key in names:
            ours[names[key]] = tensor
        else:
            rest[key] = tensor
    return ours, rest


def _uniform_layers(count: int, dim: int, heads: int, ffn: int) -> tuple[int, list[LayerConfig]]:
    if dim % heads:
        raise ValueError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
    return dim // heads, [LayerConfig(num_heads=heads, ffn_dim=ffn) for _ in range(count)]


def from_hubert(ckpt: dict[str, Any]) -> Converted:
    model_cfg, task_cfg = dict(ckpt["model_cfg"]), dict(ckpt["task_cfg"])
    defaults = _hubert_defaults()
    cfg = {**defaults, **{k: v for k, v in model_cfg.items() if k in defaults}}
    if cfg.get("layer_type", "transformer") != "transformer":
        raise ValueError(f"layer_type {cfg['layer_type']!r} (conformer) is not supported")
    if cfg.get("pos_conv_depth", 1) != 1:
        raise ValueError("multi-layer positional convolutions (pos_conv_depth > 1) are not supported")
    head_dim, layers = _uniform_layers(
        cfg["encoder_layers"], cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["encoder_ffn_embed_dim"]
    )
    conv_layers = _parse_conv_layers(cfg["conv_feature_layers"])
    config = ModelConfig(
        kind=HUBERT,
        embed_dim=cfg["encoder_embed_dim"],
        head_dim=head_dim,
        layers=layers,
        conv_layers=conv_layers,
        extractor_mode=cfg["extractor_mode"],
        conv_bias=cfg["conv_bias"],
        conv_pos=cfg["conv_pos"],
        conv_pos_groups=cfg["conv_pos_groups"],
        layer_norm_first=cfg["layer_norm_first"],
        feature_layer_norm=True,
        normalize_waveform=bool(task_cfg.get("normalize", False)),
        activation=cfg["activation_fn"],
        dropout=cfg["dropout"],
        attention_dropout=cfg["attention_dropout"],
        activation_dropout=cfg["activation_dropout"],
    )
    names = _common_renames(len(layers), len(conv_layers), config.extractor_mode)
    names["layer_norm.weight"], names["layer_norm.bias"] = "feature_norm.weight", "feature_norm.bias"
    state, rest = _rename(ckpt["model_weight"], names)
    extras = {
        "task_cfg": task_cfg,
        "model_cfg": model_cfg,
        "dictionaries_symbols": ckpt.get("dictionaries_symbols"),
        "pretraining_weights": rest,  # mask_emb, final_proj, label_embs_concat: unused by upstreams
    }
    return Converted(config, state, HUBERT_FORMAT, extras)


def _hubert_defaults() -> dict[str, Any]:
    """The HubertConfig fields we read, with fairseq's defaults (checkpoints may omit any of them)."""
    return {
        "extractor_mode": "default",
        "encoder_layers": 12,
        "encoder_embed_dim": 768,
        "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "layer_norm_first": False,
        "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        "conv_bias": False,
        "conv_pos": 128,
        "conv_pos_groups": 16,
        "pos_conv_depth": 1,
    }


def from_distiller(ckpt: dict[str, Any]) -> Converted:
    raw = dict(ckpt["Config"]["distiller"])
    get = raw.get
    if get("task_emb_type", "expand-last") != "expand-last" or get("out_layer_type", "expand-last") != "expand-last":
        raise ValueError("only DistilHuBERT's expand-last prediction heads are supported")
    if get("attention_type", "original") != "original":
        raise ValueError(f"attention_type {get('attention_type')!r} is not supported")
    layers_count = int(get("encoder_layers", 1))
    dim = int(get("encoder_embed_dim", 768))
    head_dim, layers = _uniform_layers(
        layers_count, dim, int(get("encoder_attention_heads", 12)), int(get("encoder_ffn_embed_dim", 3072))
    )
    n_tasks = int(get("n_tasks", 12))
    pred_layer_id = list(get("pred_layer_id", range(1, n_tasks + 1)))
    inter_dim = int(get("out_layer_inter_dim", -1))
    conv_layers = _parse_conv_layers(
        get("extractor_conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
    )
    config = ModelConfig(
        kind=DISTILLER,
        embed_dim=dim,
        head_dim=head_dim,
        layers=layers,
        conv_layers=conv_layers,
        extractor_mode=str(get("extractor_mode", "default")),
        conv_bias=False,
        **encoder_options(get),
        pred_layer_id=pred_layer_id,
        pred_inter_dim=inter_dim if inter_dim > 0 else dim,
        pred_out_dim=int(get("final_dim", 768)),
    )
    names = _common_renames(layers_count, len(conv_layers), config.extractor_mode)
    names["output_layer.0.weight"] = "prediction_heads.shared.weight"
    names["output_layer.0.bias"] = "prediction_heads.shared.bias"
    state, rest = _rename(ckpt["Distiller"], names)
    if "output_layer.2.weight" in rest:  # SplitLinear with several heads: (N, in, out) and (1, 1, N, out)
        state["prediction_heads.weight"] = rest.pop("output_layer.2.weight")
        state["prediction_heads.bias"] = rest.pop("output_layer.2.bias").reshape(n_tasks, -1)
    else:  # a single head is stored as a plain Linear
        state["prediction_heads.weight"] = rest.pop("output_layer.2.layer.weight").t()[None].contiguous()
        state["prediction_heads.bias"] = rest.pop("output_layer.2.layer.bias")[None]
    if rest:
        raise ValueError(f"unexpected distiller tensors {sorted(rest)[:5]}")
    return Converted(config, state, DISTILLER_FORMAT, {"config": raw})


# --------------------------------------------------------------------------------------- writing
def _invert(names: dict[str, str]) -> dict[str, str]:
    return {ours: theirs for theirs, ours in names.items()}


def _require_uniform(config: ModelConfig) -> LayerConfig:
    first = config.layers[0] if config.layers else LayerConfig(num_heads=1, ffn_dim=0)
    if any(layer != first for layer in config.layers):
        raise ValueError(
            "S3PRL's own model classes need every layer to have the same heads, FFN width and no "
            "low-rank factors; this structure differs per layer, so it is only loadable as a delta upstream"
        )
    if first.ranks:
        raise ValueError("S3PRL's model classes have no low-rank layers; use the delta upstream")
    return first


def to_s3prl_checkpoint(converted: Converted) -> dict[str, Any]:
    """The inverse of :func:`load_base`: a dict that ``torch.save`` writes as an S3PRL checkpoint.

    Weight-pruning masks are left out: the weights are already zero where a mask prunes them, and
    S3PRL's formats have no place for masks (the file then runs dense in S3PRL's own upstreams).
    Conv-pruned front ends convert (fairseq's ``conv_feature_layers`` lists every layer's channels).
    """
    config = converted.config
    state = {key: tensor for key, tensor in converted.state_dict.items() if not key.endswith(".mask")}
    removed = [i for i, layer in enumerate(config.layers) if not (layer.attention and layer.ffn)]
    if removed:
        raise ValueError(
            f"layers {removed} have a removed attention or FFN sublayer, which S3PRL's HuBERT/distiller/MelHuBERT "
            "model classes cannot express; load the delta through compressed_local instead"
        )
    if config.has_feature_projection and config.conv_dim == config.embed_dim:
        raise ValueError(
            f"the pruned front end is as wide as the encoder ({config.embed_dim}) but keeps its feature projection; "
            "S3PRL's model classes build that projection only when the widths differ, so use compressed_local"
        )
    layer = _require_uniform(config)
    if config.kind == MELHUBERT:
        return to_melhubert(config, state, converted.extras, layer)
    if config.kind == HUBERT:
        names = _common_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
        names["layer_norm.weight"], names["layer_norm.bias"] = "feature_norm.weight", "feature_norm.bias"
        back = _invert(names)
        weights = {back[key]: tensor for key, tensor in state.items()}
        weights.update(converted.extras.get("pretraining_weights", {}))
        model_cfg = dict(converted.extras.get("model_cfg", {"label_rate": 50}))
        model_cfg.update(
            encoder_layers=config.num_layers,
            encoder_embed_dim=config.embed_dim,
            encoder_ffn_embed_dim=layer.ffn_dim,
            encoder_attention_heads=layer.num_heads,
            layer_norm_first=config.layer_norm_first,
            conv_feature_layers=repr(config.conv_layers),
            extractor_mode=config.extractor_mode,
            conv_bias=config.conv_bias,
            conv_pos=config.conv_pos,
            conv_pos_groups=config.conv_pos_groups,
        )
        task_cfg = dict(converted.extras.get("task_cfg", {"label_rate": 50, "sample_rate": 16000}))
        task_cfg["normalize"] = config.normalize_waveform
        return {
            "task_cfg": task_cfg,
            "model_cfg": model_cfg,
            "model_weight": weights,
            "dictionaries_symbols": converted.extras.get("dictionaries_symbols"),
        }
    names = _common_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
    names["output_layer.0.weight"] = "prediction_heads.shared.weight"
    names["output_layer.0.bias"] = "prediction_heads.shared.bias"
    back = _invert(names)
    n_tasks = len(config.pred_layer_id)
    weights = {back[key]: tensor for key, tensor in state.items() if key in back}
    if n_tasks > 1:
        weights["output_layer.2.weight"] = state["prediction_heads.weight"]
        weights["output_layer.2.bias"] = state["prediction_heads.bias"].reshape(1, 1, n_tasks, -1)
    else:
        weights["output_layer.2.layer.weight"] = state["prediction_heads.weight"][0].t().contiguous()
        weights["output_layer.2.layer.bias"] = state["prediction_heads.bias"][0]
    raw = dict(converted.extras.get("config", {}))
    raw.update(
        encoder_layers=config.num_layers,
        encoder_embed_dim=config.embed_dim,
        encoder_ffn_embed_dim=layer.ffn_dim,
        encoder_attention_heads=layer.num_heads,
        layer_norm_first=config.layer_norm_first,
        extractor_conv_feature_layers=repr(config.conv_layers),
        extractor_mode=config.extractor_mode,
        conv_pos=config.conv_pos,
        conv_pos_groups=config.conv_pos_groups,
        n_tasks=n_tasks,
        pred_layer_id=list(config.pred_layer_id),
        final_dim=config.pred_out_dim,
        out_layer_inter_dim=config.pred_inter_dim,
        task_emb_type="expand-last",
        out_layer_type="expand-last",
    )
    return {"Config": {"distiller": raw}, "Distiller": weights}
