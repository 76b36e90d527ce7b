"""Hard-concrete (L0) pruning gates on a :class:`SpeechTransformer`, and the size constraint they train to.

A :class:`HardConcrete` gate holds one ``log_alpha`` per prunable group (a conv channel, an attention
head, an FFN unit, a whole sublayer). In train mode it samples a mask in [0, 1] (Louizos et al.'s
stretched, clamped concrete distribution: temperature 2/3, stretch limits -0.1 and 1.1, so a sample
is exactly 0 or 1 with non-zero probability); in eval mode it is deterministic: the
``round(expected kept count)`` groups with the largest ``log_alpha`` keep their expected gate value
E[z], the others are 0. ``probability_nonzero`` (differentiable) gives the expected kept count, from
which :mod:`..model.costs` gives the expected size.

:class:`Gates` holds the gates of a model's chosen structures and :func:`gated` applies them with
hooks, without touching the model class:
- heads: a forward pre-hook on each layer's ``attention.out_proj`` scales each head's slice of its
  (B, T, H * head_dim) input; FFN units: a pre-hook on ``feed_forward.fc2``;
- whole sublayers: forward hooks on ``layer.attention`` / ``layer.feed_forward`` scale the output;
- conv channels of conv i: a pre-hook on conv i + 1 (its input is gelu(conv i)); for the last conv, a
  hook on ``feature_norm`` whose LayerNorm statistics are weighted by the gates and whose output is
  scaled by them (without a feature norm, a hook on ``feature_extractor``); in ``layer_norm``
  extractor mode each conv's own LayerNorm gets the same gate-weighted statistics.
The statistics are weighted by the sampled gates in training and by presence (gate > 0) otherwise, so a
gated model in eval mode equals the physically pruned one whose kept groups carry the gate values
folded into the next weights (:func:`fold_and_prune`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..delta import Structure
from ..model import ModelConfig, SpeechTransformer
from ..model.config import FBANK
from ..model.costs import Counts, counts_of, mac_count, parameter_count
from ..model.layers import LowRankLinear

TEMPERATURE = 2.0 / 3.0
LIMITS = (-0.1, 1.1)
STRUCTURES = ("conv", "heads", "ffn", "attention_layers", "ffn_layers")
DEFAULT_STRUCTURES = ("conv", "heads", "ffn")
# DPHuBERT's initial drop rates: channels, heads and sublayers start almost surely open, FFN units at 1/2.
INITIAL_DROP = {"conv": 0.01, "heads": 0.01, "units": 0.5, "attention": 0.01, "ffn": 0.01}
_QUADRATURE = 512  # points of the deterministic estimate of E[z]


class HardConcrete(nn.Module):
    """``n`` hard-concrete gates; ``forward()`` returns a mask of shape (n,)."""

    def __init__(self, n: int, initial_drop: float = 0.5, init_std: float = 0.01,
                 temperature: float = TEMPERATURE, limits: tuple[float, float] = LIMITS, eps: float = 1e-6) -> None:
        super().__init__()
        self.n, self.temperature, self.limits, self.eps = n, temperature, limits, eps
        mean = math.log(1 - initial_drop) - math.log(initial_drop)
        self.log_alpha = nn.Parameter(torch.empty(n).normal_(mean, init_std))
        # log P(z > 0) = log sigmoid(log_alpha - temperature * log(-low / high)).
        self._shift = -temperature * math.log(-limits[0] / limits[1])

    def probability_nonzero(self) -> Tensor:
        """P(gate > 0) per group, differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha.float() + self._shift)

    def expected_count(self) -> Tensor:
        return self.probability_nonzero().sum()

    def _stretch(self, logits: Tensor) -> Tensor:
        low, high = self.limits
        return (torch.sigmoid(logits / self.temperature) * (high - low) + low).clamp(0.0, 1.0)

    def sample(self) -> Tensor:
        u = torch.empty_like(self.log_alpha, dtype=torch.float32).uniform_(self.eps, 1 - self.eps)
        return self._stretch(torch.log(u) - torch.log1p(-u) + self.log_alpha.float())

    @torch.no_grad()
    def expected_value(self) -> Tensor:
        """E[z] per group, by midpoint quadrature over the noise (deterministic)."""
        u = (torch.arange(_QUADRATURE, device=self.log_alpha.device, dtype=torch.float64) + 0.5) / _QUADRATURE
        noise = (torch.log(u) - torch.log1p(-u))[None, :]
        return self._stretch(noise + self.log_alpha.detach().double()[:, None]).mean(1).float()

    def ranking(self) -> list[int]:
        """Group indices by decreasing ``log_alpha`` (ties: lower index first)."""
        values = self.log_alpha.detach().cpu().tolist()
        return sorted(range(self.n), key=lambda i: (-values[i], i))

    def deterministic_kept(self) -> list[int]:
        """The ``round(expected count)`` groups with the largest ``log_alpha``, in index order."""
        k = int(round(float(self.expected_count().detach())))
        return sorted(self.ranking()[:k])

    @torch.no_grad()
    def mask_of(self, kept: Sequence[int]) -> Tensor:
        """E[z] on ``kept``, 0 elsewhere: the hard mask for a chosen set of groups."""
        mask = torch.zeros(self.n, device=self.log_alpha.device)
        index = torch.as_tensor(list(kept), dtype=torch.long, device=mask.device)
        mask[index] = self.expected_value()[index]
        return mask

    def forward(self) -> Tensor:
        return self.sample() if self.training else self.mask_of(self.deterministic_kept())

    def extra_repr(self) -> str:
        return f"n={self.n}, temperature={self.temperature:.3g}, limits={self.limits}"


@dataclass(frozen=True)
class GateKey:
    """Which groups a gate covers: ``kind`` in conv / heads / units / attention / ffn, and its layer."""

    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.layer}"


_KINDS_OF = {"conv": ("conv",), "heads": ("heads",), "ffn": ("units",), "attention_layers": ("attention",),
             "ffn_layers": ("ffn",)}


class GateError(ValueError):
    """Structures that cannot be gated on this model; the message says which and why."""


def gate_keys(config: ModelConfig, structures: Sequence[str]) -> list[GateKey]:
    """The gates for ``structures`` on a model of ``config`` (groups that exist and can be pruned)."""
    unknown = set(structures) - set(STRUCTURES)
    if unknown:
        raise GateError(f"unknown structure(s) {sorted(unknown)}; known: {list(STRUCTURES)}")
    keys: list[GateKey] = []
    if "conv" in structures:
        if config.frontend == FBANK:
            raise GateError("conv: the model has an fbank front end, no conv channels to prune")
        last = len(config.conv_layers) - 1
        for i in range(len(config.conv_layers)):
            if i == last and not config.has_feature_projection:
                continue  # its channels feed the encoder directly: their number is fixed by embed_dim
            keys.append(GateKey("conv", i))
    for i, layer in enumerate(config.layers):
        if "heads" in structures and layer.attention and layer.num_heads > 0:
            keys.append(GateKey("heads", i))
        if "ffn" in structures and layer.ffn and layer.ffn_dim > 0:
            keys.append(GateKey("units", i))
        if "attention_layers" in structures and layer.attention:
            keys.append(GateKey("attention", i))
        if "ffn_layers" in structures and layer.ffn:
            keys.append(GateKey("ffn", i))
    if not keys:
        raise GateError(f"the model has nothing to prune in {list(structures)}")
    return keys


def _group_count(config: ModelConfig, key: GateKey) -> int:
    if key.kind == "conv":
        return config.conv_layers[key.layer][0]
    layer = config.layers[key.layer]
    return {"heads": layer.num_heads, "units": layer.ffn_dim, "attention": 1, "ffn": 1}[key.kind]


class Gates(nn.Module):
    """The hard-concrete gates of a model's chosen structures; initialised from ``seed`` alone."""

    def __init__(self, config: ModelConfig, structures: Sequence[str] = DEFAULT_STRUCTURES, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.keys = gate_keys(config, structures)
        self.gates = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for key in self.keys:
                self.gates[key.name] = HardConcrete(_group_count(config, key), INITIAL_DROP[key.kind])
        self.fixed: dict[str, Tensor] | None = None  # hard masks once the structure is chosen

    def gate(self, key: GateKey) -> HardConcrete:
        return self.gates[key.name]

    def masks(self) -> dict[str, Tensor]:
        """One mask per gate: sampled (train mode), deterministic (eval) or the fixed ones."""
        if self.fixed is not None:
            return self.fixed
        return {key.name: self.gate(key)() for key in self.keys}

    def counts(self, kept: dict[str, Sequence[int] | int] | None = None) -> Counts:
        """Expected counts (tensors, differentiable) or, given ``kept`` groups (or their number) per gate,
        the integer counts."""
        counts = counts_of(self.config)
        lists = {"conv": counts.channels, "heads": counts.heads, "units": counts.units,
                 "attention": counts.attention, "ffn": counts.ffn}
        for key in self.keys:
            if kept is None:
                value = self.gate(key).expected_count()
            else:
                value = kept[key.name] if isinstance(kept[key.name], int) else len(kept[key.name])
            lists[key.kind][key.layer] = value
        return counts

    def fix(self, kept: dict[str, Sequence[int]]) -> None:
        """Make the gates hard: E[z] on ``kept`` groups, 0 elsewhere (whatever the mode)."""
        self.fixed = {key.name: self.gate(key).mask_of(kept[key.name]) for key in self.keys}


def _weighted_layer_norm(x: Tensor, norm: nn.LayerNorm, weights: Tensor) -> Tensor:
    """LayerNorm over the last dimension with per-feature ``weights`` in the mean and variance."""
    xf, w = x.float(), weights.float()
    total = w.sum().clamp_min(1e-6)
    mean = (xf * w).sum(-1, keepdim=True) / total
    var = ((xf - mean) ** 2 * w).sum(-1, keepdim=True) / total
    y = (xf - mean) * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight.float() + norm.bias.float()
    return y.to(x.dtype)


@contextlib.contextmanager
def gated(model: SpeechTransformer, gates: Gates) -> Iterator[None]:
    """Apply ``gates`` to ``model`` by hooks while inside; every forward samples (or fixes) the masks once."""
    current: dict[str, Tensor] = {}
    handles = []

    def sample(module: nn.Module, args: Any) -> None:
        current.clear()
        current.update(gates.masks())

    def statistics_weights(name: str) -> Tensor:
        mask = current[name]
        return mask if gates.training and gates.fixed is None else (mask > 0).to(mask.dtype)

    def scale_heads(name: str, head_dim: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            heads = x.unflatten(-1, (-1, head_dim)) * current[name][:, None].to(x.dtype)
            return (heads.flatten(-2), *args[1:])
        return hook

    def scale_input(name: str, channel_axis: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            shape = [1] * x.dim()
            shape[channel_axis] = -1
            return (x * current[name].view(shape).to(x.dtype), *args[1:])
        return hook

    def scale_output(name: str, channel_axis: int | None = None):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            mask = current[name]
            if channel_axis is not None:
                shape = [1] * output.dim()
                shape[channel_axis] = -1
                mask = mask.view(shape)
            return output * mask.to(output.dtype)
        return hook

    def weighted_norm(name: str, scale: bool):
        def hook(module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor:
            y = _weighted_layer_norm(args[0], module, statistics_weights(name))
            return y * current[name].to(y.dtype) if scale else y
        return hook

    handles.append(model.register_forward_pre_hook(sample))
    config = model.config
    for key in gates.keys:
        name = key.name
        if key.kind == "heads":
            handles.append(model.layers[key.layer].attention.out_proj.register_forward_pre_hook(
                scale_heads(name, config.head_dim)))
        elif key.kind == "units":
            handles.append(model.layers[key.layer].feed_forward.fc2.register_forward_pre_hook(scale_input(name, -1)))
        elif key.kind == "attention":
            handles.append(model.layers[key.layer].attention.register_forward_hook(scale_output(name)))
        elif key.kind == "ffn":
            handles.append(model.layers[key.layer].feed_forward.register_forward_hook(scale_output(name)))
        elif key.kind == "conv":
            extractor = model.feature_extractor
            if config.extractor_mode == "layer_norm":  # this conv's own LayerNorm (B, T, C) sees only kept channels
                handles.append(extractor.norms[key.layer].register_forward_hook(weighted_norm(name, scale=False)))
            if key.layer + 1 < len(extractor.convs):
                handles.append(extractor.convs[key.layer + 1].register_forward_pre_hook(scale_input(name, 1)))
            elif model.feature_norm is not None:
                handles.append(model.feature_norm.register_forward_hook(weighted_norm(name, scale=True)))
            else:
                handles.append(extractor.register_forward_hook(scale_output(name, channel_axis=1)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------ size constraint
class _FlipGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward: a descent optimizer then ascends."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


PARAMS, MACS = "params", "macs"


class SizeConstraint(nn.Module):
    """The gates plus DPHuBERT's Lagrangian ``l1 (s - t) + l2 (s - t)^2`` on the expected size.

    ``s`` and ``t`` are sizes relative to the model's own (so the learning rates do not depend on its
    scale); the target ramps linearly from the model's size to ``target`` over ``warmup_steps``. The
    multipliers l1, l2 are trained by gradient ascent (their gradient is flipped), the gates by descent.
    Training calls it as ``constraint(step)`` inside the trainee's forward and adds the penalty to the loss.
    """

    def __init__(self, gates: Gates, measure: str, target: float, warmup_steps: int, gate_lr: float,
                 lagrangian_lr: float, seconds: float = 10.0) -> None:
        super().__init__()
        if measure not in (PARAMS, MACS):
            raise ValueError(f"measure must be {PARAMS!r} or {MACS!r}, not {measure!r}")
        self.gates, self.measure, self.target, self.seconds = gates, measure, float(target), seconds
        self.warmup_steps, self.gate_lr, self.lagrangian_lr = warmup_steps, gate_lr, lagrangian_lr
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.full = float(self.size(counts_of(gates.config)))
        self.last: dict[str, float] = {}

    def size(self, counts: Counts) -> Tensor | int:
        if self.measure == PARAMS:
            return parameter_count(self.gates.config, counts)
        return mac_count(self.gates.config, self.seconds, counts)

    def expected_size(self) -> Tensor:
        return torch.as_tensor(self.size(self.gates.counts()), dtype=torch.float32)

    def target_at(self, step: int) -> float:
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        return self.full - (self.full - self.target) * ramp

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.gates.parameters()), "lr": self.gate_lr, "weight_decay": 0.0},
                {"params": [self.lambdas], "lr": self.lagrangian_lr, "weight_decay": 0.0}]

    def forward(self, step: int) -> Tensor:
        with torch.autocast(self.lambdas.device.type, enabled=False):
            expected = self.expected_size()
            target = self.target_at(step)
            gap = (expected - target) / self.full
            l1, l2 = _FlipGradient.apply(self.lambdas).unbind()
            penalty = l1 * gap + l2 * gap * gap
        self.last = {"expected": float(expected.detach()), "target": target}
        return penalty

    def postfix(self) -> dict[str, str]:
        if not self.last:
            return {}
        unit = "M" if self.measure == PARAMS else "G"
        scale = 1e6 if self.measure == PARAMS else 1e9
        return {self.measure: f"{self.last['expected'] / scale:.3f}{unit}/{self.last['target'] / scale:.3f}{unit}"}


# ------------------------------------------------------------------------ choosing the structure
def minimum_kept(key: GateKey) -> int:
    return 1 if key.kind == "conv" else 0  # a conv layer keeps at least one channel


def choose_structure(constraint: SizeConstraint, tolerance: float) -> tuple[dict[str, list[int]], int]:
    """Kept groups per gate whose analytic size is within ``tolerance`` (relative) of the target.

    Starts from the deterministic gates (each gate's ``round(expected count)`` best groups), then
    removes the kept groups with the lowest ``log_alpha`` (or adds back the closed ones with the
    highest), across all gates. The score is not divided by the group's cost: training already
    priced the cost in (the penalty pushes each ``log_alpha`` down in proportion to its group's
    size), and P(gate > 0) per parameter would remove whole sublayers and heads before any unit.
    A gate always keeps a prefix of its ranking, so a state is a count per gate. Steps move half
    the remaining distance, then single groups (one that lands in the band if any), so with fine
    groups (FFN units) the band is always reached; with coarse ones only (whole sublayers) the
    closest state seen is returned. Returns (kept, size).
    """
    gates, target = constraint.gates, constraint.target
    low, high = target * (1 - tolerance), target * (1 + tolerance)
    rankings = {key.name: constraint.gates.gate(key).ranking() for key in gates.keys}
    scores = {key.name: gates.gate(key).log_alpha.detach().cpu().tolist() for key in gates.keys}
    counts = {key.name: len(gates.gate(key).deterministic_kept()) for key in gates.keys}

    def kept(state: dict[str, int]) -> dict[str, list[int]]:
        return {name: sorted(rankings[name][:k]) for name, k in state.items()}

    def size(state: dict[str, int]) -> int:
        return int(constraint.size(gates.counts(state)))

    seen: dict[tuple[int, ...], int] = {}
    while True:
        current = size(counts)
        if low <= current <= high:
            return kept(counts), current
        signature = tuple(counts.values())
        if signature in seen:  # coarse groups only: the band lies between two reachable sizes
            best = min(seen, key=lambda s: abs(seen[s] - target))
            state = dict(zip(counts, best))
            return kept(state), seen[best]
        seen[signature] = current
        remove = current > high
        candidates = []  # (priority, gate order, order within the gate, cost, gate name, position)
        for order, key in enumerate(gates.keys):
            name, k = key.name, counts[key.name]
            if (remove and k <= minimum_kept(key)) or (not remove and k >= gates.gate(key).n):
                continue
            cost = abs(size({**counts, name: k - 1 if remove else k + 1}) - current)
            if cost == 0:
                continue  # e.g. heads of a removed attention sublayer
            positions = range(k - 1, minimum_kept(key) - 1, -1) if remove else range(k, gates.gate(key).n)
            for step, position in enumerate(positions):
                score = scores[name][rankings[name][position]]
                candidates.append((score if remove else -score, order, step, cost, name, position))
        if not candidates:
            return kept(counts), current
        candidates.sort(key=lambda c: c[:3])
        room = current - low if remove else high - current  # a single step that stays inside the band
        if candidates[0][3] * 2 > abs(current - target):  # near the band: one group, one that lands in it if any
            fitting = [c for c in candidates if c[3] <= room and c[2] == 0]  # the next group of its gate
            chosen = [fitting[0] if fitting else candidates[0]]
        else:
            chosen, moved = [], 0
            for candidate in candidates:
                if moved + candidate[3] > abs(current - target) / 2:
                    break
                chosen.append(candidate)
                moved += candidate[3]
        for *_, name, _ in chosen:
            counts[name] += -1 if remove else 1


# --------------------------------------------------------------------------- physical pruning
def _scale_columns(linear: nn.Module, scale: Tensor) -> None:
    """Multiply a Linear's input features by ``scale`` (folded into its weight)."""
    weight = linear.down.weight if isinstance(linear, LowRankLinear) else linear.weight
    weight.mul_(scale.to(weight)[None, :])


def _scale_outputs(linear: nn.Module, scale: Tensor) -> None:
    """Multiply a Linear's whole output (weight and bias) by the scalar ``scale``."""
    target = linear.up if isinstance(linear, LowRankLinear) else linear
    target.weight.mul_(scale.to(target.weight))
    if target.bias is not None:
        target.bias.mul_(scale.to(target.bias))


@torch.no_grad()
def fold_and_prune(model: SpeechTransformer, structure: Structure, gates: Gates, kept: dict[str, Sequence[int]],
                   base_config: ModelConfig) -> None:
    """Make ``model`` what the gated model with hard masks ``kept`` computes, physically, in place.

    Kept groups keep their gate value E[z], folded into the weights that read them (out_proj or fc2
    columns, the next conv's input channels, the feature projection's columns; a sublayer gate into
    its output Linear), so the outputs equal the gated model's in eval mode; closed groups are removed
    (``keep_heads`` / ``keep_units`` / ``keep_channels``, ``remove_attention`` / ``remove_ffn``) and
    ``structure`` records it against ``base_config``.
    """
    gates.fix(kept)
    masks = gates.fixed
    head_dim = model.config.head_dim
    for key in gates.keys:  # fold first: the indices below still address the unpruned model
        mask = masks[key.name].to(next(model.parameters()).device)
        if key.kind == "heads":
            _scale_columns(model.layers[key.layer].attention.out_proj, mask.repeat_interleave(head_dim))
        elif key.kind == "units":
            _scale_columns(model.layers[key.layer].feed_forward.fc2, mask)
        elif key.kind == "attention" and mask.item() > 0:
            _scale_outputs(model.layers[key.layer].attention.out_proj, mask[0])
        elif key.kind == "ffn" and mask.item() > 0:
            _scale_outputs(model.layers[key.layer].feed_forward.fc2, mask[0])
        elif key.kind == "conv":
            convs = model.feature_extractor.convs
            if key.layer + 1 < len(convs):
                convs[key.layer + 1].weight.mul_(mask.to(convs[key.layer + 1].weight)[None, :, None])
            else:
                _scale_columns(model.feature_projection, mask)
    by_key = {(key.kind, key.layer): kept[key.name] for key in gates.keys}
    for i, layer in enumerate(structure.layers):
        base_layer = base_config.layers[layer.source_layer]
        if ("attention", i) in by_key and not by_key[("attention", i)]:
            model.remove_attention(i)
            structure.remove_attention(i)
        elif ("heads", i) in by_key and len(by_key[("heads", i)]) < model.config.layers[i].num_heads:
            model.keep_heads(i, by_key[("heads", i)])
            structure.keep_heads(i, by_key[("heads", i)], base_layer.num_heads)
        if ("ffn", i) in by_key and not by_key[("ffn", i)]:
            model.remove_ffn(i)
            structure.remove_ffn(i)
        elif ("units", i) in by_key and len(by_key[("units", i)]) < model.config.layers[i].ffn_dim:
            model.keep_units(i, by_key[("units", i)])
            structure.keep_units(i, by_key[("units", i)], base_layer.ffn_dim)
    for key in gates.keys:
        if key.kind == "conv" and len(kept[key.name]) < model.config.conv_layers[key.layer][0]:
            model.keep_channels(key.layer, kept[key.name])
            structure.keep_channels(key.layer, kept[key.name], base_config.conv_layers[key.layer][0])
