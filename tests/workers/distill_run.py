"""A distillation run in its own process, for the kill/resume and torchrun tests.

    python distill_run.py TEACHER_CKPT AUDIO_DIR CHECKPOINT OUT_STATE STEPS [KILL_AFTER_STEP]
"""

import os
import signal
import sys

import torch

from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.train.distill import TrainOptions, train_distillation


def main() -> None:
    teacher_ckpt, audio, checkpoint, out_state, steps = sys.argv[1:6]
    kill_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    base = load_base(teacher_ckpt)
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    student = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    student.keep_heads(0, [0, 1])  # a compressed student, with dropout active while training
    student.keep_units(1, list(range(0, 128, 4)))
    options = TrainOptions(audio=audio, steps=int(steps), batch_size=2, max_seconds=1.0, lr=1e-3,
                           checkpoint_every=2, device="cpu", seed=3)

    def stop_after(step: int) -> bool:
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no flush: a real crash
        return False

    result = train_distillation(student, teacher, options, checkpoint, stop_after=stop_after)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"state": student.state_dict(), "history": result.history, "resumed_from": result.resumed_from},
               f"{out_state}.rank{rank}")


if __name__ == "__main__":
    main()
