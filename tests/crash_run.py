"""The run that tests/test_checkpoint.py kills at every fault point (``EPALM_FAULT``) and resumes.

Tiny model, 3 epochs x 3 steps, a checkpoint every 3 steps (so the last mid-epoch checkpoint falls
on the final step, before the final evaluation), an evaluation per epoch that selects ``best/``.
Every batch draws from the torch, Python and NumPy RNGs, so a resume is exact only if all three
states are restored.

    python tests/crash_run.py OUT [--resume]      (CRASH_EVAL_EVERY=N: also evaluate every N steps)
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from epalm.recipes.tiny import ColourDataset, collate, tiny_model
from epalm.training.trainer import OptimConfig, TrainConfig, Trainer

EPOCHS, STEPS_PER_EPOCH = 3, 3


def noisy_collate(items):
    batch = collate(items)
    jitter = 0.05 * torch.randn_like(batch["pixel_values"]) + 0.01 * random.random() + 0.01 * float(np.random.rand())
    batch["pixel_values"] = batch["pixel_values"] + jitter
    return batch


def make_trainer(out: str) -> Trainer:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = tiny_model(seed=0)
    data = ColourDataset(24)
    probe = collate([data[i] for i in range(len(data))])

    def evaluate(m, epoch):
        with torch.no_grad():
            loss = m(**probe).loss.item()
        return {"score": -loss, "loss": loss}

    eval_every = int(os.environ.get("CRASH_EVAL_EVERY", "0")) or None  # mid-epoch evaluations (eval.csv rows)
    cfg = TrainConfig(output_dir=out, epochs=EPOCHS, batch_size=8, cpu=True, log_every=1, save_every=3,
                      eval_every=eval_every,
                      optim=OptimConfig(lr=1e-2, warmup_lr=3e-3, min_lr=1e-3, prompt_lr=1e-2))
    return Trainer(model, data, noisy_collate, cfg, evaluate=evaluate)


def run(out: str, resume: bool = False) -> dict:
    return make_trainer(out).train(resume=resume)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], resume="--resume" in sys.argv)
