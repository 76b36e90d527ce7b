"""A distillation run in its own process, for the kill/resume and torchrun tests.

    python distill_run.py TEACHER_CKPT AUDIO_DIR CHECKPOINT OUT_STATE STEPS [--kill-after STEP] [--objective NAME]
"""

import argparse
import os
import signal

import torch

from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.train.cluster_head import cluster_head_of
from upstream_compressed.train.distill import CLUSTER_KL, TrainOptions, train_distillation


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("teacher_ckpt", "audio", "checkpoint", "out_state"):
        parser.add_argument(name)
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-after", type=int, help="SIGKILL this process after that step")
    parser.add_argument("--objective", default="hidden_states")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_base(args.teacher_ckpt)
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    student = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    student.keep_heads(0, [0, 1])  # a compressed student, with dropout active while training
    student.keep_units(1, list(range(0, 128, 4)))
    options = TrainOptions(audio=args.audio, steps=args.steps, batch_size=2, max_seconds=1.0, lr=1e-3,
                           checkpoint_every=2, device="cpu", seed=3, objective=args.objective)
    head = cluster_head_of(base) if args.objective == CLUSTER_KL else None

    def stop_after(step: int) -> bool:
        if step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no flush: a real crash
        return False

    result = train_distillation(student, teacher, options, args.checkpoint, stop_after=stop_after, teacher_head=head)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"state": student.state_dict(), "history": result.history, "resumed_from": result.resumed_from},
               f"{args.out_state}.rank{rank}")


if __name__ == "__main__":
    main()
