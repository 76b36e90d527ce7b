"""Tiny HuBERT pretraining: HuBERT's first iteration on a (synthetic) LibriSpeech tree.

1. Targets: MFCC frames of the training audio clustered by k-means (:mod:`.targets`), 100 Hz labels.
2. Model: S3PRL's own ``HubertModel`` (the class ``hubert_local`` loads), small: a narrow conv front
   end with HuBERT's 320x stride, a few Transformer layers.
3. Loss: HuBERT's masked prediction: cross-entropy of the cosine-similarity logits against the label
   embeddings on masked frames, plus 10 x the conv feature penalty, as in fairseq's HuBERT recipe.
4. Output: S3PRL's converted HuBERT checkpoint ``{task_cfg, model_cfg, model_weight,
   dictionaries_symbols}`` (optionally with fp16 weights, which ``hubert_local`` loads into its fp32
   model), written atomically, and a recipe JSON beside it that records how it was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import atomic_torch_save, atomic_write_json
from .targets import MFCC_RATE, assign, kmeans, mfcc_features

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FEATURE_PENALTY_WEIGHT = 10.0  # fairseq HuBERT's loss_weights: [10]


@dataclass(frozen=True)
class ModelShape:
    """The architecture (HubertConfig fields). Defaults: about 3.6 M parameters."""

    conv_feature_layers: str = "[(64,10,5)] + [(64,3,2)] * 4 + [(128,2,2)] * 2"  # HuBERT's strides, narrow
    encoder_layers: int = 4
    encoder_embed_dim: int = 256
    encoder_ffn_embed_dim: int = 1024
    encoder_attention_heads: int = 4
    conv_pos: int = 64
    conv_pos_groups: int = 16
    final_dim: int = 128

    def model_cfg(self, **training: Any) -> dict[str, Any]:
        """The ``model_cfg`` of the checkpoint: this shape plus HuBERT Base's other settings."""
        return {
            "label_rate": MFCC_RATE,
            "extractor_mode": "default",
            "conv_feature_layers": self.conv_feature_layers,
            "encoder_layers": self.encoder_layers,
            "encoder_embed_dim": self.encoder_embed_dim,
            "encoder_ffn_embed_dim": self.encoder_ffn_embed_dim,
            "encoder_attention_heads": self.encoder_attention_heads,
            "activation_fn": "gelu",
            "layer_norm_first": False,
            "conv_bias": False,
            "conv_pos": self.conv_pos,
            "conv_pos_groups": self.conv_pos_groups,
            "final_dim": self.final_dim,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0,
            "dropout_input": 0.1,
            "dropout_features": 0.1,
            "logit_temp": 0.1,
            "untie_final_proj": False,
            **training,
        }


@dataclass(frozen=True)
class TrainOptions:
    """Pretraining hyperparameters (HuBERT Base's recipe, scaled down for a small model and corpus)."""

    clusters: int = 100
    kmeans_iterations: int = 50
    steps: int = 2000
    batch_seconds: float = 32.0  # audio per batch (utterances of similar length, padded)
    max_seconds: float = 6.0  # longer utterances are randomly cropped
    lr: float = 1e-3
    warmup: float = 0.08  # fraction of steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    clip_norm: float = 10.0
    mask_prob: float = 0.8
    mask_length: int = 10
    feature_grad_mult: float = 0.1
    nomask_weight: float = 0.0  # weight of the unmasked-frame loss (HuBERT's 1 - alpha; Base uses 0)
    seed: int = 0
    threads: int = 1  # more threads slow small ops down badly on a shared CPU
    eval_every: int = 200
    fp16_weights: bool = True
    device: str = "cpu"  # "cuda" trains on a GPU; k-means and data preparation stay on the CPU


class PretrainError(ValueError):
    """Pretraining cannot start (missing data, bad options); the message says what to fix."""


# ------------------------------------------------------------------------------------ data
def list_audio(root: str | os.PathLike, split: str) -> list[Path]:
    """Sorted ``.flac``/``.wav`` files under ``root/LibriSpeech/split`` (a corpus) or ``root/split``."""
    root = Path(root)
    for folder in (root / "LibriSpeech" / split, root / split):
        files = sorted([*folder.rglob("*.flac"), *folder.rglob("*.wav")]) if folder.is_dir() else []
        if files:
            return files
    raise PretrainError(
        f"no .flac/.wav files under {root / 'LibriSpeech' / split} or {root / split}; "
        "make a corpus first: upstream-compressed make-corpus DIR"
    )


def load_wav(path: Path) -> Tensor:
    import soundfile

    wav, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE or wav.ndim != 1:
        raise PretrainError(f"{path}: need 16 kHz mono audio, got {rate} Hz with shape {wav.shape}")
    return torch.from_numpy(wav)


@dataclass
class Utterance:
    wav: Tensor
    labels: Tensor  # (T100,) cluster ids at 100 Hz


def prepare_data(files: list[Path], progress: bool) -> tuple[list[Tensor], list[Tensor]]:
    from tqdm import tqdm

    wavs, features = [], []
    for path in tqdm(files, desc="mfcc", unit="utt", disable=not progress, dynamic_ncols=True):
        wav = load_wav(path)
        wavs.append(wav)
        features.append(mfcc_features(wav))
    return wavs, features


def batches(lengths: list[int], batch_samples: int, rng: random.Random) -> list[list[int]]:
    """Utterance indices grouped by similar length, at most ``batch_samples`` padded samples each, shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    groups, current = [], []
    for index in order:
        if current and lengths[index] * (len(current) + 1) > batch_samples:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    rng.shuffle(groups)
    return groups


def collate(utterances: list[Utterance], indices: list[int], max_samples: int, rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
    """(wav (B, L), padding mask (B, L), labels (B, L // 160 ...)) with random crops of long utterances."""
    wavs, labels = [], []
    for index in indices:
        wav, label = utterances[index].wav, utterances[index].labels
        if len(wav) > max_samples:
            # Crop on the 320-sample grid so that label frames stay aligned with the conv frames.
            start = rng.randrange(0, (len(wav) - max_samples) // 320 + 1) * 320
            wav = wav[start : start + max_samples]
            label = label[start // 160 :]
        wavs.append(wav)
        labels.append(label)
    length = max(len(w) for w in wavs)
    frames = (length - 400) // 160 + 1
    batch = torch.zeros(len(wavs), length)
    padding = torch.ones(len(wavs), length, dtype=torch.bool)
    targets = torch.zeros(len(wavs), frames, dtype=torch.long)
    for row, (wav, label) in enumerate(zip(wavs, labels)):
        batch[row, : len(wav)] = wav
        padding[row, : len(wav)] = False
        label = label[:frames]
        targets[row, : len(label)] = label
        targets[row, len(label) :] = label[-1]  # padded frames are never scored; any label will do
    return batch, padding, targets


# ------------------------------------------------------------------------------------ model
def build_model(shape: ModelShape, options: TrainOptions) -> tuple[torch.nn.Module, dict, dict, list]:
    """A randomly initialised S3PRL ``HubertModel`` and the configs that rebuild it."""
    from .. import s3prl_compat

    s3prl_compat.apply()
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    model_cfg = shape.model_cfg(
        mask_prob=options.mask_prob, mask_length=options.mask_length, feature_grad_mult=options.feature_grad_mult
    )
    task_cfg = {"label_rate": MFCC_RATE, "sample_rate": SAMPLE_RATE, "normalize": False}
    symbols = [[str(i) for i in range(options.clusters)]]
    model = HubertModel(HubertConfig(**model_cfg), HubertPretrainingConfig(**task_cfg), symbols)
    return model, model_cfg, task_cfg, symbols


def checkpoint_dict(model: torch.nn.Module, model_cfg: dict, task_cfg: dict, symbols: list, fp16: bool) -> dict:
    weights = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": weights, "dictionaries_symbols": symbols}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


# ------------------------------------------------------------------------------------ training
def masked_prediction_loss(
    model: torch.nn.Module, wav: Tensor, padding: Tensor, targets: Tensor, nomask_weight: float = 0.0
) -> tuple[Tensor, dict]:
    """HuBERT's loss: CE on masked frames (+ ``nomask_weight`` x CE on unmasked frames) + 10 x feature penalty."""
    device = next(model.parameters()).device
    wav, padding, targets = wav.to(device), padding.to(device), targets.to(device)
    output = model(wav, target_list=[targets], padding_mask=padding, mask=True, features_only=False)
    logits = output["logit_m_list"][0].float()  # (masked frames, 1 + clusters); column 0 is the true label
    prediction = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=device))
    loss = prediction + FEATURE_PENALTY_WEIGHT * output["features_pen"]
    stats = {"masked_ce": prediction.item(), "masked_acc": (logits.argmax(1) == 0).float().mean().item()}
    if nomask_weight > 0:
        unmasked = output["logit_u_list"][0].float()
        unmasked_ce = F.cross_entropy(unmasked, torch.zeros(len(unmasked), dtype=torch.long, device=device))
        loss = loss + nomask_weight * unmasked_ce
        stats.update(unmasked_ce=unmasked_ce.item(), unmasked_acc=(unmasked.argmax(1) == 0).float().mean().item())
    return loss, {"loss": loss.item(), **stats}


def _lr_at(step: int, options: TrainOptions) -> float:
    warmup = max(1, int(options.warmup * options.steps))
    if step < warmup:
        return options.lr * (step + 1) / warmup
    return options.lr * max(0.0, (options.steps - step) / max(1, options.steps - warmup))


def evaluate(model: torch.nn.Module, utterances: list[Utterance], options: TrainOptions) -> dict:
    """Masked-prediction loss/accuracy on held-out audio (fixed masks: numpy's RNG is saved and restored)."""
    state = np.random.get_state()
    np.random.seed(options.seed + 12345)
    rng = random.Random(options.seed + 12345)
    model.eval()
    totals: dict[str, float] = {}
    groups = batches([len(u.wav) for u in utterances], int(options.batch_seconds * SAMPLE_RATE), rng)
    with torch.no_grad():
        for group in groups:
            wav, padding, targets = collate(utterances, group, int(options.max_seconds * SAMPLE_RATE), rng)
            _, stats = masked_prediction_loss(model, wav, padding, targets, options.nomask_weight)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value * len(group)
    model.train()
    np.random.set_state(state)
    return {f"dev_{k}": v / len(utterances) for k, v in totals.items()}


@dataclass
class PretrainResult:
    checkpoint: Path
    recipe: Path
    parameters: int
    history: list[dict] = field(default_factory=list)


def pretrain(
    corpus: str | os.PathLike,
    output: str | os.PathLike,
    shape: ModelShape = ModelShape(),
    options: TrainOptions = TrainOptions(),
    *,
    train_split: str = "train-clean-100",
    dev_split: str | None = "dev-clean",
    command: list[str] | None = None,
    progress: bool = True,
    init_only: bool = False,
) -> PretrainResult:
    """Run HuBERT's first iteration on ``corpus`` and write ``output`` (+ its recipe JSON). See the module docstring."""
    from tqdm import tqdm

    started = time.time()
    output = Path(output)
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)  # S3PRL's mask sampler draws from numpy's global RNG
    rng = random.Random(options.seed)

    model, model_cfg, task_cfg, symbols = build_model(shape, options)
    if options.device != "cpu" and not init_only:
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise PretrainError(f"--device {options.device} asked for, but torch sees no CUDA device; use --device cpu")
        model.to(options.device)
    parameters = sum(p.numel() for p in model.parameters())
    recipe: dict[str, Any] = {
        "what": "tiny HuBERT, first iteration (MFCC k-means targets, masked prediction)",
        "command": command if command is not None else sys.argv,
        "seed": options.seed,
        "model_shape": asdict(shape),
        "train_options": asdict(options),
        "parameters": parameters,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "s3prl": _version("s3prl"),
            "torchaudio": _version("torchaudio"),
        },
    }
    if init_only:  # the same architecture with random weights (a baseline for the evidence)
        recipe["what"] = "tiny HuBERT architecture with random weights (no training)"
        atomic_torch_save(checkpoint_dict(model, model_cfg, task_cfg, symbols, options.fp16_weights), output)
        recipe["sha256"] = sha256(output)
        atomic_write_json(recipe_path(output), recipe)
        return PretrainResult(output, recipe_path(output), parameters)

    corpus = Path(corpus)
    manifest = corpus / "corpus.json"
    recipe["data"] = {
        "corpus": str(corpus),
        "train_split": train_split,
        "dev_split": dev_split,
        "corpus_manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }
    for key in ("librispeech", "voxceleb1"):  # the speaker tables are long; keep options and sizes
        if recipe["data"]["corpus_manifest"]:
            recipe["data"]["corpus_manifest"].pop(key, None)

    train_files = list_audio(corpus, train_split)
    wavs, features = prepare_data(train_files, progress)
    frames = torch.cat(features)
    mean, std = frames.mean(0), frames.std(0).clamp_min(1e-5)
    logger.info("k-means: %d clusters on %d MFCC frames", options.clusters, len(frames))
    centroids, inertia = kmeans((frames - mean) / std, options.clusters, iterations=options.kmeans_iterations, seed=options.seed)
    recipe["kmeans"] = {"frames": len(frames), "inertia": inertia, "features": "kaldi mfcc 13 + delta + delta-delta, standardised"}
    train = [Utterance(w, assign((f - mean) / std, centroids)) for w, f in zip(wavs, features)]
    del frames, features
    dev: list[Utterance] = []
    if dev_split:
        dev_wavs, dev_features = prepare_data(list_audio(corpus, dev_split), progress=False)
        dev = [Utterance(w, assign((f - mean) / std, centroids)) for w, f in zip(dev_wavs, dev_features)]

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=options.weight_decay
    )
    batch_samples, max_samples = int(options.batch_seconds * SAMPLE_RATE), int(options.max_seconds * SAMPLE_RATE)
    lengths = [min(len(u.wav), max_samples) for u in train]
    history: list[dict] = []
    if dev:
        history.append({"step": 0, **evaluate(model, dev, options)})
    epoch_batches: list[list[int]] = []
    running: dict[str, float] = {}
    model.train()
    bar = tqdm(range(options.steps), desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if not epoch_batches:
            epoch_batches = batches(lengths, batch_samples, rng)
        wav, padding, targets = collate(train, epoch_batches.pop(), max_samples, rng)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, options)
        loss, stats = masked_prediction_loss(model, wav, padding, targets, options.nomask_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_norm)
        if not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"pretrain: non-finite gradient at step {step}; lower --lr")
        optimizer.step()
        for key, value in stats.items():
            running[key] = 0.9 * running.get(key, value) + 0.1 * value
        bar.set_postfix(loss=f"{running['loss']:.3f}", acc=f"{running['masked_acc']:.3f}")
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            entry = {"step": step + 1, "lr": _lr_at(step, options), **{f"train_{k}": v for k, v in running.items()}}
            if dev:
                entry.update(evaluate(model, dev, options))
            history.append(entry)
            logger.info("pretrain %s", entry)
            bar.write(json.dumps(entry))
            atomic_torch_save(checkpoint_dict(model, model_cfg, task_cfg, symbols, options.fp16_weights), output)
    bar.close()

    atomic_torch_save(checkpoint_dict(model, model_cfg, task_cfg, symbols, options.fp16_weights), output)
    recipe["history"] = history
    recipe["wall_seconds"] = round(time.time() - started, 1)
    recipe["sha256"] = sha256(output)
    recipe["size_bytes"] = output.stat().st_size
    atomic_write_json(recipe_path(output), recipe)
    return PretrainResult(output, recipe_path(output), parameters, history)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
