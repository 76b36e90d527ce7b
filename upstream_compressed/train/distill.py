"""Distillation training: a student learns to reproduce a teacher, with no labels.

Three objectives (``TrainOptions.objective``):
- ``hidden_states`` (default): per (student state, teacher state) pair, DistilHuBERT's L1 plus a
  cosine term ``-log sigmoid(cos)``, over valid frames;
- ``temporal_relation``: STaRHuBERT's temporal Gram matrices (frame-by-frame relations, layer-wise
  and intra-layer) on the same pairs (see :mod:`.temporal_relation`);
- ``cluster_kl``: logit distillation, KL(teacher || student) of HuBERT's cluster posteriors on the
  encoder outputs (see :mod:`.cluster_head`); needs the teacher's cluster head.
Used for recovery after compression (teacher = the uncompressed model) and for training distilled
students.

Production concerns live here too: a progress bar, checkpoints written atomically every K steps,
``resume`` after a kill that continues to the same weights (the batches depend only on the step,
and the RNG state is saved; a checkpoint written for other work, by its ``origin`` or training
options, is not resumed: training starts afresh and says what differs), gradient accumulation,
AMP on GPU, and DistributedDataParallel when launched by ``torchrun`` (each process takes its own
slice of every step's batches).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..delta import atomic_write_bytes
from ..model import SpeechTransformer
from .cluster_head import ClusterHead, cluster_kl_loss
from .temporal_relation import temporal_relation_loss
from ..audio.manifest import load_corpus
from .stream import BatchPlan, BatchRule, batch_loader, warn_skipped

HIDDEN_STATES, CLUSTER_KL, TEMPORAL_RELATION = "hidden_states", "cluster_kl", "temporal_relation"
OBJECTIVES = (HIDDEN_STATES, CLUSTER_KL, TEMPORAL_RELATION)


@dataclass
class TrainOptions:
    """What a recipe's ``recovery:`` (or a distillation step) may set."""

    audio: str  # a folder or a manifest (upstream-compressed manifest)
    steps: int = 200
    batch_size: int = 4  # files per batch (per process), unless seconds_per_batch is given
    seconds_per_batch: float | None = None  # or: as many files as fit this much padded audio (fairseq's max_tokens)
    max_seconds: float = 4.0
    num_workers: int | None = None  # DataLoader workers decoding ahead; default min(4, cores)
    lr: float = 2e-4
    warmup_steps: int | None = None  # default: 10% of steps
    weight_decay: float = 0.0
    grad_accumulation: int = 1
    clip_norm: float = 10.0
    checkpoint_every: int = 50
    seed: int = 0
    cosine_weight: float = 1.0
    pairs: list[list[int]] | None = None  # [[student_state, teacher_state], ...]; default: all, one to one
    freeze_front_end: bool = False
    amp: bool = True  # autocast on CUDA only
    device: str = "auto"
    objective: str = HIDDEN_STATES  # or cluster_kl (logit distillation)
    logit_temperature: float | None = None  # cluster_kl: cos / temperature; default the teacher's logit_temp (0.1)
    intra_layer_weight: float = 1.0  # temporal_relation: weight of the intra-layer TGM term (0: layer-wise only)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def distillation_loss(
    student: list[Tensor], teacher: list[Tensor], pairs: list[list[int]], padding_mask: Tensor, cosine_weight: float
) -> Tensor:
    """Sum over pairs of mean L1 + cosine_weight * mean(-log sigmoid(cos)) over valid frames."""
    valid = ~padding_mask
    total = student[0].new_zeros(())
    for s, t in pairs:
        prediction, target = student[s][valid].float(), teacher[t][valid].float()
        l1 = (prediction - target).abs().mean()
        cosine = -F.logsigmoid(F.cosine_similarity(prediction, target, dim=-1)).mean()
        total = total + l1 + cosine_weight * cosine
    return total


def default_pairs(student: SpeechTransformer, teacher: SpeechTransformer) -> list[list[int]]:
    """Which student hidden state learns which teacher state, when a recipe does not say.

    The same layout: one to one. A student with prediction heads (a distilled one): each head
    learns the teacher layer it predicts.
    """
    if student.config.num_hidden_states == teacher.config.num_hidden_states:
        return [[i, i] for i in range(student.config.num_hidden_states)]
    if student.config.pred_layer_id and max(student.config.pred_layer_id) <= teacher.config.num_layers:
        first_head = student.config.num_layers + 1
        return [[first_head + j, layer] for j, layer in enumerate(student.config.pred_layer_id)]
    raise ValueError(
        f"student has {student.config.num_hidden_states} hidden states and the teacher "
        f"{teacher.config.num_hidden_states}: give `pairs: [[student, teacher], ...]`"
    )


class _Trainee(nn.Module):
    """The student plus, for cluster_kl, its training-only cluster head: one module for DDP.

    The head's logits are computed inside ``forward`` so that DistributedDataParallel sees its
    parameters used and averages their gradients like the student's.
    """

    def __init__(self, student: SpeechTransformer, head: ClusterHead | None, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.head, self.extra = student, head, extra

    def forward(self, wavs: Tensor, lengths: Tensor, step: int = 0) -> tuple[list[Tensor], Tensor, Tensor | None, Tensor | None]:
        states, padding_mask = self.student(wavs, lengths)
        logits = self.head(states[self.student.config.num_layers]) if self.head is not None else None
        # The extra term is computed here too, so that DDP sees its parameters used by this forward.
        return states, padding_mask, logits, self.extra(step) if self.extra is not None else None


# ------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    steps: int
    final_loss: float
    resumed_from: int
    seconds: float
    history: list[float] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # files that failed to decode, left out of their batch


class TrainingError(RuntimeError):
    """A training run that cannot continue as asked; the message says what to do."""


# Options that change how fast batches arrive, never which: a run resumes across a change of them.
NOT_IN_RECORD = ("num_workers",)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    # The checkpoint is loaded onto the training device; RNG states must be CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded: Any, wanted: Any, where: str = "") -> list[str]:
    """Where two nested dicts/lists differ, as ``path: recorded -> wanted`` lines."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return [line for key in sorted(set(recorded) | set(wanted), key=str)
                for line in differences(recorded.get(key), wanted.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(recorded, list) and isinstance(wanted, list) and len(recorded) == len(wanted):
        return [line for i, (a, b) in enumerate(zip(recorded, wanted)) for line in differences(a, b, f"{where}[{i}]")]
    return [] if recorded == wanted else [f"{where or 'value'}: {_short(recorded)} -> {_short(wanted)}"]


def _resumable_state(path: Path, device: torch.device, wanted: dict[str, Any], description: str,
                     announce: bool) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it continues this very run (same origin and options), else None."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    changed = differences({key: state.get(key) for key in wanted}, wanted)
    if not changed:
        return state
    if announce:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        print(f"{description}: not resuming {path}, it was written for other work ({shown}); "
              "training from scratch", file=sys.stderr, flush=True)
    return None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_distillation(
    student: SpeechTransformer,
    teacher: SpeechTransformer,
    options: TrainOptions,
    checkpoint_path: str | os.PathLike,
    description: str = "distilling",
    stop_after: Callable[[int], bool] | None = None,
    teacher_head: ClusterHead | None = None,
    origin: dict[str, Any] | None = None,
    extra: nn.Module | None = None,
) -> TrainResult:
    """Train ``student`` in place to match ``teacher``; resume from ``checkpoint_path`` if it is this run's.

    ``teacher_head`` (objective cluster_kl): the teacher's cluster head; the student trains a copy of
    it, which is saved in the checkpoint but not returned (it is not part of the student model).
    ``origin`` (JSON-like): what is being trained (recipe, base, structure), recorded in the checkpoint;
    a checkpoint with another origin or other options is ignored (training restarts, with a message).
    ``stop_after(step)`` (tests) ends the run early after that step's checkpoint logic.
    ``extra`` (e.g. pruning gates and their size constraint, :class:`.gates.SizeConstraint`): a module
    trained along, called as ``extra(step)`` for a loss term added to the distillation loss; it gives
    its own optimizer groups (``param_groups()``, with their learning rates) and progress-bar fields
    (``postfix()``); its state is saved in the checkpoint and restored on resume.
    Prints ``training: DESCRIPTION start=S end=N`` to stderr (S > 0: resumed at training step S).
    """
    if options.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {options.objective!r}; known: {OBJECTIVES}")
    if options.objective == CLUSTER_KL and teacher_head is None:
        raise ValueError("objective cluster_kl needs the teacher's cluster head (teacher_head)")
    started = time.perf_counter()
    checkpoint_path = Path(checkpoint_path)
    device = pick_device(options.device)
    dist = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # What trains follows from these options alone, never from an earlier run on the same modules.
    student.to(device).train().requires_grad_(True)
    teacher.to(device).eval().requires_grad_(False)
    if options.freeze_front_end:
        student.feature_extractor.requires_grad_(False)

    student_head = None
    if options.objective == CLUSTER_KL:
        teacher_head = teacher_head.to(device).eval().requires_grad_(False)
        student_head = copy.deepcopy(teacher_head).requires_grad_(True).train()
        pairs: list[list[int]] = []
    else:
        pairs = options.pairs if options.pairs is not None else default_pairs(student, teacher)
    for s, t in pairs:
        if not (0 <= s < student.config.num_hidden_states and 0 <= t < teacher.config.num_hidden_states):
            raise ValueError(f"pair {[s, t]} names a hidden state that does not exist")
    if extra is not None:
        extra.to(device).train().requires_grad_(True)
    trainee = _Trainee(student, student_head, extra)

    manifest = load_corpus(options.audio, progress=dist.main)
    rule = BatchRule(None if options.seconds_per_batch is not None else options.batch_size,
                     options.seconds_per_batch, options.max_seconds)
    plan = BatchPlan(manifest.num_samples, rule, options.seed, dist.world_size)
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    extra_groups = extra.param_groups() if extra is not None else []
    in_extra = {id(p) for group in extra_groups for p in group["params"]}
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if id(p) not in in_extra]}, *extra_groups],
                                  lr=options.lr, weight_decay=options.weight_decay)
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, options.steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, options.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start_step, history, skipped = 0, [], []
    torch.manual_seed(options.seed + dist.rank)
    record = {"origin": origin, "options": {k: v for k, v in asdict(options).items() if k not in NOT_IN_RECORD}}
    state = _resumable_state(checkpoint_path, device, record, description, dist.main)
    if state is not None:
        student.load_state_dict(state["student"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
        if student_head is not None:
            student_head.load_state_dict(state["cluster_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("world_size", 1) != dist.world_size:
            raise TrainingError(
                f"{checkpoint_path} was written by a run on {state.get('world_size', 1)} process(es) and this run "
                f"has {dist.world_size}: every process takes its own slice of each step's batches, so another "
                f"count would not continue the same run. Resume with the same count (torchrun "
                f"--nproc-per-node/--nnodes), or delete the file to train this step afresh."
            )
        start_step, history = state["step"], list(state["history"])
        skipped = list(state.get("skipped_files", []))
        _set_rng_state(state["rng"][dist.rank] if isinstance(state["rng"], list) else state["rng"], device)

    model: torch.nn.Module = trainee
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    use_amp = options.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    if dist.main:
        print(f"training: {description} start={start_step} end={options.steps}", file=sys.stderr, flush=True)
    progress = tqdm(total=options.steps, initial=start_step, desc=description, unit="step",
                    disable=not dist.main, dynamic_ncols=True)
    loss_value = float("nan")
    accumulation = options.grad_accumulation
    loader = iter(batch_loader(manifest, plan, start_step * accumulation, options.steps * accumulation, dist.rank,
                               options.num_workers, pin_memory=device.type == "cuda"))
    for step in range(start_step, options.steps):
        step_start = time.perf_counter()
        utterances = 0
        loss_value = 0.0
        for micro in range(accumulation):
            batch = next(loader)
            if batch.skipped:
                warn_skipped(batch, step)
                skipped += [path for path, _ in batch.skipped]
            if len(batch) == 0:
                if dist.world_size > 1:  # the other processes would wait for this one's gradients forever
                    raise TrainingError(f"step {step}: every file of this process's batch failed to decode "
                                        f"({', '.join(p for p, _ in batch.skipped)}); fix or remove them")
                continue
            wavs, lengths = batch.wavs.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                with torch.no_grad():
                    target, _ = teacher(wavs, lengths)
                states, padding_mask, logits, extra_loss = model(wavs, lengths, step)
                if student_head is not None:
                    with torch.no_grad():
                        target_logits = teacher_head(target[teacher.config.num_layers])
                    loss = cluster_kl_loss(logits, target_logits, padding_mask)
                elif options.objective == TEMPORAL_RELATION:
                    loss = temporal_relation_loss(states, target, pairs, padding_mask, student.config.num_layers,
                                                  teacher.config.num_layers, options.intra_layer_weight)
                else:
                    loss = distillation_loss(states, target, pairs, padding_mask, options.cosine_weight)
                if extra_loss is not None:
                    loss = loss + extra_loss
            scaler.scale(loss / options.grad_accumulation).backward()
            loss_value += loss.item() / options.grad_accumulation
            utterances += len(lengths)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, options.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history.append(loss_value)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}",
                             utt_per_s=f"{utterances * dist.world_size / (time.perf_counter() - step_start):.1f}",
                             **({"skipped": len(skipped)} if skipped else {}),
                             **(extra.postfix() if extra is not None else {}))

        done = step + 1
        if done % options.checkpoint_every == 0 or done == options.steps:
            rng = _rng_state(device)
            if dist.world_size > 1:
                gathered: list[Any] = [None] * dist.world_size
                torch_dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
                rng = gathered
            if dist.main:
                save_checkpoint(checkpoint_path, {
                    "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                    **({"extra": extra.state_dict()} if extra is not None else {}),
                    "scheduler": scheduler.state_dict(), "step": done, "history": history,
                    "rng": rng, "world_size": dist.world_size, "skipped_files": skipped, **record,
                    **({"cluster_head": student_head.state_dict()} if student_head is not None else {}),
                })
            if dist.world_size > 1:
                torch_dist.barrier()
        if stop_after is not None and stop_after(done):
            break
    progress.close()
    student.eval()  # the student's cluster head (cluster_kl) stays behind: only the checkpoint keeps it
    if extra is not None:
        extra.eval()
    seconds = time.perf_counter() - started
    if dist.main:
        print(f"training: {description} done steps={len(history) - start_step} seconds={seconds:.1f} "
              f"skipped_files={len(skipped)}", file=sys.stderr, flush=True)
    return TrainResult(len(history), loss_value, start_step, seconds, history, skipped)
