"""Training loop: accelerate (fp32/bf16/fp16, DDP, accumulation), exact resume, curves.

The paper's recipe is the default: AdamW (weight decay 0.02), lr warmed from 1e-5 to 2e-5 then
cosine-decayed to 1e-6, batch 64, 8 epochs, evaluation every epoch, best checkpoint kept.

Exact resume: the epoch order is a permutation seeded by ``seed + epoch`` and a checkpoint
stores the position inside it, with optimizer, scheduler and RNG states; so a resumed run
sees the same batches and produces the same weights as an uninterrupted one.

Data: a torch ``DataLoader`` (worker processes, pinned memory on CUDA, persistent workers,
prefetching) over a batch sampler that walks that epoch order; every sample's randomness is seeded
by (seed, epoch, index) (``epalm.data.loading``), so results do not depend on the number of workers.
Every tensor of a batch is moved to the accelerator's device before the model sees it.

Past one GPU: ``fsdp`` (or an accelerate FSDP launch config) shards the frozen LM's layers with
FSDP2; ``gradient_checkpointing`` recomputes them in the backward pass (``epalm.training.parallel``).

Loss normalisation is global: the summed token cross-entropy is divided by the number of
labelled tokens of the whole (all-process) batch, so 2 processes x 8 samples give the same
update as 1 process x 16 samples.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset

from epalm.training import checkpoint as ckpt
from epalm.core.config import check_fields
from epalm.errors import CheckpointError, ConfigError, UserError
from epalm.io import atomic_write_json, atomic_write_text
from epalm.data.loading import EpochBatchSampler, SeededSamples, default_num_workers, make_loader
from epalm.core.model import EPALM
from epalm.training.parallel import (
    enable_activation_checkpointing,
    full_trainable_state_dict,
    load_trainable_state_dict,
    shard_model,
)


@dataclass
class OptimConfig:
    lr: float = 2e-5  # peak learning rate of the connectors
    warmup_lr: float = 1e-5  # warmup starts here (paper: 1e-5 warmed up to 2e-5)
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 0  # 0: 5% of the total steps
    weight_decay: float = 0.02
    prompt_lr: float | None = None  # fixed lr for soft prompts / adapters (paper: 1e-5; pt-L: 1e-3)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_fields(self, "train.optim", ranges={"lr": (">", 0), "warmup_lr": (">=", 0), "min_lr": (">=", 0),
                                                  "warmup_steps": (">=", 0), "weight_decay": (">=", 0),
                                                  "prompt_lr": (">", 0), "max_grad_norm": (">", 0)})
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/epalm"
    epochs: int = 8
    batch_size: int = 64  # global batch (all processes, before accumulation)
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 42
    max_steps: int | None = None  # stop early (smoke runs)
    log_every: int = 10
    save_every: int | None = None  # optimizer steps between mid-epoch checkpoints
    on_nan: str = "stop"  # "stop" | "skip"
    num_workers: int | None = None  # DataLoader workers; None: min(8, cores - 1), 0 below 256 samples
    prefetch_factor: int = 4  # batches each worker loads ahead
    gradient_checkpointing: bool = False  # recompute the frozen LM's layers in the backward pass
    fsdp: bool = False  # shard the frozen LM's layers with FSDP2 (also on under an accelerate FSDP config)
    cpu: bool = False
    eval_every: int | None = None  # also evaluate every N optimizer steps (eval.csv / curves only: no best checkpoint)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError(f"train.optim must be a mapping, got {self.optim!r}")
        check_fields(self, "train", ranges={"epochs": (">=", 1), "batch_size": (">=", 1), "grad_accum": (">=", 1),
                                            "max_steps": (">=", 1), "log_every": (">=", 1), "save_every": (">=", 1),
                                            "eval_every": (">=", 1), "num_workers": (">=", 0), "prefetch_factor": (">=", 1)})
        check_fields(self, "train", choices={"on_nan": ("stop", "skip"), "mixed_precision": ("no", "bf16", "fp16")})


class TrainingDiverged(RuntimeError):
    """Raised when the loss is NaN/inf and ``on_nan='stop'``: weights are left as last saved."""


def lr_lambda(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr``: linear warmup from warmup_lr, then cosine to min_lr."""
    warmup = cfg.warmup_steps or max(1, int(0.05 * total))
    if step < warmup:
        start = cfg.warmup_lr / cfg.lr
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: EPALM, cfg: OptimConfig) -> tuple[list[dict], list[bool]]:
    """Connectors follow the schedule; prompts/adapters get a fixed lr when ``prompt_lr`` is set."""
    scheduled, fixed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_prompt = name.startswith(("prompt.", "deep_prompt.", "adapters."))
        (fixed if is_prompt and cfg.prompt_lr is not None else scheduled).append(p)
    groups, is_fixed = [], []
    if scheduled:
        groups.append({"params": scheduled, "lr": cfg.lr})
        is_fixed.append(False)
    if fixed:
        groups.append({"params": fixed, "lr": cfg.prompt_lr})
        is_fixed.append(True)
    return groups, is_fixed


def forward_flops_per_token(model: EPALM) -> tuple[float, float]:
    """(forward, backward) FLOPs per text token of the frozen LM: 2N forward; backward through
    activations only (no weight grads) costs ~2N for the layers that gradients flow through."""
    layers = model.engine.anatomy.layers
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    first_grad_layer = 0 if (model.prompt is not None or model.deep_prompt is not None
                             or model.adapters is not None) else model.inject_start
    return 2.0 * sum(per_layer), 2.0 * sum(per_layer[first_grad_layer:])


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L4": 121e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class EpochOrder:
    """Deterministic sample order per epoch (seed + epoch), resumable at any batch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def indices(self, epoch: int, start_batch: int = 0) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)[start_batch * self.batch_size:].tolist()


class Trainer:
    """Train the trainable parts of an EPALM on batches ``dict(input_ids, attention_mask, labels,
    pixel_values | features, ...)`` produced by ``collate``.

    ``evaluate(model, epoch) -> dict`` runs after every epoch; its ``"score"`` (higher is better)
    selects the best checkpoint, saved to ``output_dir/best``.

    ``should_stop(model, step) -> bool`` runs every ``stop_every`` optimizer steps: True ends training
    there (``state["stopped_at"]``, checkpointed: a resumed run stays stopped). The cached recipe's blind
    baseline uses it to stop once it provably sits at its plateau.
    """

    # every batch key that EPALM.forward accepts is passed on (pixel_values, features, text_states, ...)
    MODEL_KEYS = tuple(name for name in inspect.signature(EPALM.forward).parameters
                       if name not in ("self", "return_logits"))

    def __init__(
        self,
        model: EPALM,
        train_dataset: Dataset,
        collate: Callable[[list], dict],
        config: TrainConfig,
        evaluate: Callable[[EPALM, int], dict] | None = None,
        fingerprint: dict | None = None,
        should_stop: Callable[[EPALM, int], bool] | None = None,
        stop_every: int = 1,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        if len(train_dataset) == 0:
            raise UserError("the training set is empty: nothing to train on (check the data root and split)")
        self.cfg = config
        self.out = Path(config.output_dir)
        # accumulation is done by hand (see train): the loss is normalised over the whole window.
        # Mixed precision is applied by this Trainer (autocast + grad scaler), not by accelerate, whose
        # precision state is process-wide: several Trainers with different precisions share a process.
        self.accelerator = Accelerator(cpu=config.cpu)
        acc = self.accelerator
        if config.batch_size % (acc.num_processes * config.grad_accum):
            raise ValueError(f"batch_size {config.batch_size} is not divisible by processes x grad_accum "
                             f"({acc.num_processes} x {config.grad_accum})")
        self.micro_batch = config.batch_size // (acc.num_processes * config.grad_accum)
        self.dataset, self.collate, self.evaluate_fn = train_dataset, collate, evaluate
        if stop_every < 1:
            raise ValueError(f"stop_every must be >= 1, got {stop_every}")
        self.should_stop, self.stop_every = should_stop, stop_every
        self.order = EpochOrder(len(train_dataset), config.batch_size // config.grad_accum, config.seed)
        self.steps_per_epoch = math.ceil(self.order.batches_per_epoch() / config.grad_accum)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.flops_fwd, self.flops_bwd = forward_flops_per_token(model)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        # FSDP: the Trainer shards the model itself (the same code on CPU/gloo and GPU/NCCL; accelerate
        # only handles FSDP on accelerators), then neither model nor optimizer goes through prepare.
        self.fsdp = config.fsdp or acc.distributed_type == DistributedType.FSDP
        if self.fsdp:
            model = shard_model(model, acc.device)
        groups, fixed = param_groups(model, config.optim)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(groups, betas=config.optim.betas, weight_decay=config.optim.weight_decay,
                                      fused=acc.device.type == "cuda" and not self.fsdp)
        lambdas = [(lambda s: 1.0) if f else (lambda s: lr_lambda(s, self.total_steps, config.optim))
                   for f in fixed]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        if self.fsdp:
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = scheduler
        self.num_workers = (default_num_workers(len(train_dataset)) if config.num_workers is None
                            else config.num_workers)
        self.sampler = EpochBatchSampler(self.order, acc.process_index, acc.num_processes)
        self._data = None  # the DataLoader, built on first use (its workers persist across epochs)
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best_score": None, "skipped_nan": 0}
        self.peak = _peak_flops(acc.device)
        self.amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
        self.scaler = (torch.amp.GradScaler(acc.device.type) if self.amp_dtype is torch.float16 else None)
        # what a resumed run must share with the run that wrote the checkpoint (train.*, model.*, data size)
        self.fingerprint = {"model": model.config.to_dict(), "dataset_size": len(train_dataset),
                            "train": {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE},
                            **(fingerprint or {})}

    def autocast(self):
        """The one mixed-precision context of training steps (and of evaluation callers that want it)."""
        return torch.autocast(self.accelerator.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def to_device(self, batch):
        """Every tensor of ``batch`` on the accelerator's device (non-blocking from pinned memory)."""
        return send_to_device(batch, self.accelerator.device, non_blocking=True)

    def no_sync(self):
        """No gradient synchronisation inside an accumulation window (DDP and FSDP)."""
        if self.fsdp:
            return _fsdp_no_sync(self.model)
        return self.accelerator.no_sync(self.model)

    # -------------------------------------------------------------- checkpointing
    @property
    def unwrapped(self) -> EPALM:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole (gathered from FSDP shards): call it on every process."""
        return full_trainable_state_dict(self.unwrapped)

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        load_trainable_state_dict(self.unwrapped, tensors)

    def optimizer_state_dict(self) -> dict:
        """The optimizer's state, whole under FSDP (a collective: call it on every process)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, state: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, name: str = "checkpoint") -> Path:
        """Trainable weights + optimizer + scheduler + RNG + data position, swapped in crash-safely
        (``epalm.training.checkpoint``: no pickle; a crash at any point leaves a complete checkpoint)."""
        acc = self.accelerator
        final = self.out / name
        weights, optimizer_state = self.trainable_state_dict(), self.optimizer_state_dict()  # every process
        if acc.is_main_process:
            def write(tmp: Path) -> dict:
                self.unwrapped.save_pretrained(tmp, state_dict=weights)
                trainer = ckpt.write_trainer_state(tmp, optimizer_state, self.scheduler.state_dict(),
                                                   self.state)
                return {"fingerprint": self.fingerprint, "trainer": trainer,
                        "scaler": self.scaler.state_dict() if self.scaler else None}

            try:
                ckpt.write_swapped(self.out, name, write)
            except OSError as err:
                raise CheckpointError(f"{self.out}: cannot write the {name} ({err.strerror or err}); the previous "
                                      f"{name} (if any) is intact") from err
        acc.wait_for_everyone()
        return final

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from the newest complete checkpoint in ``output_dir`` (or ``path``); False when
        there is none. A damaged checkpoint or one from a differently configured run is an error."""
        out, name = (Path(path).parent, Path(path).name) if path else (self.out, "checkpoint")
        folder = ckpt.recover(out, name) if self.accelerator.is_main_process else out / name
        self.accelerator.wait_for_everyone()
        if folder is None or not folder.is_dir():
            if (out / name).exists():  # a damaged checkpoint is an error; a half-written .tmp is no checkpoint
                raise CheckpointError(f"{out}: no complete checkpoint to resume from "
                                      f"({ckpt.describe_missing(out, name)})")
            return False
        manifest, why = ckpt.read_manifest(folder)
        if manifest is None:
            raise CheckpointError(f"{folder}: cannot resume: {why}")
        ckpt.check_fingerprint(folder, manifest.get("fingerprint"), self.fingerprint)
        weights = folder / "epalm_weights.safetensors"
        if self.fsdp:
            from safetensors.torch import load_file

            self.load_trainable_state_dict(load_file(str(weights)))
        else:
            self.unwrapped.load_trainable(weights)
        optimizer, scheduler, state = ckpt.read_trainer_state(folder, manifest)
        try:
            self.load_optimizer_state_dict(optimizer)
            self.scheduler.load_state_dict(scheduler)
            if self.scaler and manifest.get("scaler"):
                self.scaler.load_state_dict(manifest["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{folder}: the optimizer state does not fit this model ({err})") from err
        self.state = state
        if self.accelerator.is_main_process:
            ckpt.recover(self.out, "best")
            _truncate_csv(self.out / "metrics.csv", lambda row: int(row["step"]) <= state["step"])
            # rows of finished epochs, and mid-epoch rows (``eval_every``) up to the checkpoint's step;
            # not the evaluation of an epoch whose last batch the checkpoint holds (it runs again)
            epoch_done = state["batch"] >= self.order.batches_per_epoch()
            _truncate_csv(self.out / "eval.csv", lambda row: int(row["epoch"]) < state["epoch"]
                          or int(row["step"]) < state["step"]
                          or (int(row["step"]) == state["step"] and not epoch_done))
        return True

    def resume_or_start(self, allow_fresh: bool = False) -> bool:
        """:meth:`resume`, saying so; no checkpoint at all is an error unless ``allow_fresh``."""
        if self.resume():
            self.accelerator.print(f"resumed from {self.out / 'checkpoint'} at epoch {self.state['epoch']} "
                                   f"batch {self.state['batch']} (step {self.state['step']})")
            return True
        if not allow_fresh:
            raise CheckpointError(f"--resume: no checkpoint in {self.out} (is the output_dir right?); to start "
                                  "from scratch there, drop --resume (or pass --resume-or-start)")
        if self.accelerator.is_main_process:  # starting over: rows of a run that never saved go
            _truncate_csv(self.out / "metrics.csv", lambda row: False)
            _truncate_csv(self.out / "eval.csv", lambda row: False)
        return False

    # -------------------------------------------------------------- loop
    @property
    def data_loader(self):
        """The training DataLoader: ``(epoch, index)`` batches of :class:`EpochBatchSampler`."""
        if self._data is None:
            self._data = make_loader(SeededSamples(self.dataset, self.cfg.seed), batch_sampler=self.sampler,
                                     collate_fn=self.collate, num_workers=self.num_workers,
                                     pin_memory=self.accelerator.device.type == "cuda",
                                     prefetch_factor=self.cfg.prefetch_factor)
        return self._data

    def close(self) -> None:
        """Stop the DataLoader's worker processes (they are started again when needed)."""
        self._data = None

    def _loader(self, epoch: int, start_batch: int) -> Iterable:
        """Windows of ``grad_accum`` micro-batches ``[(batch, global_size), ...]`` for this process,
        every tensor on the accelerator's device."""
        acc = self.accelerator
        self.sampler.set_position(epoch, start_batch)
        sizes = self.sampler.global_sizes()
        window = []
        for batch, size in zip(self.data_loader, sizes):
            chunk = range(size)
            if batch is None:  # every sample was skipped (data.on_error=skip)
                if acc.num_processes > 1:
                    raise RuntimeError(f"every sample of a micro-batch was skipped on process {acc.process_index} "
                                       "(unreadable media): processes would fall out of step; fix the data or "
                                       "use a larger batch")
                window.append((None, len(chunk)))
            else:
                if len(chunk) < acc.num_processes and acc.process_index >= len(chunk):
                    # fewer samples than processes: stay in lock-step with a sample that has no labels
                    batch["labels"] = torch.full_like(batch["labels"], -100)
                window.append((self.to_device(batch), len(chunk)))
            if len(window) == self.cfg.grad_accum:
                yield window
                window = []
        if window:
            yield window

    @staticmethod
    def _label_tokens(batch: dict | None) -> int:
        return 0 if batch is None else int((batch["labels"][:, 1:] != -100).sum())

    def _step(self, window: list) -> tuple[float, bool]:
        """Forward/backward over one window and an optimizer step.

        Loss of micro-batch i = its summed token CE x processes / labelled tokens of the whole
        window on all processes: accumulated and DDP-averaged, that is exactly the global token
        mean. Returns (global mean loss, stepped); ``stepped`` is False when the window was skipped.
        """
        acc, cfg = self.accelerator, self.cfg
        device = acc.device
        total = acc.reduce(torch.tensor(float(sum(self._label_tokens(b) for b, _ in window)), device=device),
                           reduction="sum").clamp(min=1)
        official = self.unwrapped.config.loss_reduction == "official"
        ce_sum = torch.zeros((), device=device)
        live = [b for b, _ in window if b is not None]
        for i, batch in enumerate(live):
            sync = i == len(live) - 1
            ctx = contextlib.nullcontext() if sync else self.no_sync()
            with ctx:
                inputs = {k: v for k, v in batch.items() if k in self.MODEL_KEYS}
                with self.autocast():
                    out = self.model(**inputs, return_logits=False)
                if official:
                    loss = out.loss / len(live)
                else:
                    loss = out.loss_per_sample.sum() * acc.num_processes / total
                if not torch.isfinite(loss.detach()):
                    where = f"epoch {self.state['epoch']}, batch {self.state['batch'] + i}, step {self.state['step']}"
                    if cfg.on_nan == "stop":
                        raise TrainingDiverged(
                            f"non-finite loss ({loss.item()}) at {where}; weights not updated. Last checkpoint: "
                            f"{self.out / 'checkpoint'}. Lower the lr, use bf16 instead of fp16, or set on_nan=skip.")
                    acc.print(f"warning: non-finite loss at {where}: step skipped")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state["skipped_nan"] += 1
                    return float("nan"), False
                acc.backward(self.scaler.scale(loss) if self.scaler else loss)
                ce_sum += out.loss_per_sample.detach().sum()
        if not live:
            return float("nan"), False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.max_grad_norm:
            if self.fsdp:  # DTensor gradients: torch's clip works on them directly
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               cfg.optim.max_grad_norm)
            else:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step when the scaled grads overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(ce_sum, reduction="sum") / total), True

    def train(self, resume: bool = False, allow_fresh: bool = False) -> dict:
        """Train to the end. ``resume=True`` continues from the newest complete checkpoint; with no
        checkpoint at all it is an error, unless ``allow_fresh`` (then it starts from scratch)."""
        cfg, acc = self.cfg, self.accelerator
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"train.output_dir {self.out} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume_or_start(allow_fresh)
        tb = _tensorboard(self.out) if acc.is_main_process else None
        try:
            self._train_loop(tb)
        finally:
            self.close()
            if tb is not None:
                tb.close()
        if acc.is_main_process:
            plot_curves(self.out)
        return self.state

    def _train_loop(self, tb) -> None:
        cfg, acc = self.cfg, self.accelerator
        log_path = self.out / "metrics.csv"
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state["step"], disable=not acc.is_main_process,
                   desc="train", unit="step", dynamic_ncols=True)
        t0, samples, tokens_seen = time.perf_counter(), 0, 0
        self.model.train()
        # a checkpoint taken after an epoch's last batch but before its evaluation: close that epoch
        done = self.state["step"] >= self.total_steps and self.state["batch"] < self.order.batches_per_epoch()
        done = done or self.state.get("stopped_at") is not None
        while not done and self.state["epoch"] < cfg.epochs:
            epoch = self.state["epoch"]
            for window in self._loader(epoch, self.state["batch"]):
                loss, stepped = self._step(window)
                self.state["batch"] += len(window)
                samples += sum(size for _, size in window)
                tokens_seen += sum(int(b["attention_mask"].sum()) for b, _ in window if b is not None) * acc.num_processes
                if not stepped:
                    continue
                self.state["step"] += 1
                bar.update(1)
                step = self.state["step"]
                if step % cfg.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - t0
                    row = {"step": step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": samples / elapsed, "tokens_per_s": tokens_seen / elapsed}
                    flops = (self.flops_fwd + self.flops_bwd) * row["tokens_per_s"]
                    row["mfu"] = flops / self.peak if self.peak else None
                    bar.set_postfix(loss=f"{loss:.3f}", sps=f"{row['samples_per_s']:.1f}")
                    if acc.is_main_process:
                        _append_csv(log_path, row)
                        ckpt.fault("train.after_log_row")
                        if tb:
                            for k, v in row.items():
                                if isinstance(v, float):
                                    tb.add_scalar(f"train/{k}", v, step)
                if (cfg.eval_every and self.evaluate_fn is not None
                        and (step % cfg.eval_every == 0 or step == self.total_steps)
                        and self.state["batch"] < self.order.batches_per_epoch()):  # (the epoch's end evaluates)
                    self._record_eval(self.evaluate_fn(self.unwrapped, epoch), epoch, tb)
                    self.model.train()
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save_checkpoint()
                if step >= self.total_steps:
                    done = True
                    break
                if self.should_stop is not None and step % self.stop_every == 0:
                    stop = self.should_stop(self.unwrapped, step)
                    self.model.train()
                    if stop:
                        self.state["stopped_at"] = step
                        done = True
                        break
            if not done or self.state["batch"] >= self.order.batches_per_epoch():
                self.state["epoch"] += 1
                self.state["batch"] = 0
                self._end_of_epoch(epoch, tb)
            self.save_checkpoint()
            done = done or self.state["step"] >= self.total_steps
        bar.close()

    def _end_of_epoch(self, epoch: int, tb) -> None:
        if self.evaluate_fn is None:
            return
        metrics = self.evaluate_fn(self.unwrapped, epoch)
        ckpt.fault("train.during_eval")
        self._record_eval(metrics, epoch, tb)
        score = metrics.get("score")
        best = self.state["best_score"]
        if score is not None and (best is None or score > best):
            self.state["best_score"] = score
            weights = self.trainable_state_dict()  # every process (FSDP gathers)
            if self.accelerator.is_main_process:
                def write(tmp: Path) -> None:
                    self.unwrapped.save_pretrained(tmp, state_dict=weights)
                    atomic_write_json(tmp / "metrics.json", {"epoch": epoch, **metrics})

                try:
                    ckpt.write_swapped(self.out, "best", write)
                except OSError as err:
                    raise CheckpointError(f"{self.out}: cannot write best/ ({err.strerror or err}); the previous "
                                          "best/ (if any) is intact") from err

    def _record_eval(self, metrics: dict, epoch: int, tb) -> None:
        """One row of ``eval.csv`` (the numeric metrics, prefixed ``eval_``), plotted in ``curves.png``."""
        row = {"step": self.state["step"], "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()
                                                               if isinstance(v, (int, float))}}
        if self.accelerator.is_main_process:
            _append_csv(self.out / "eval.csv", row)
            ckpt.fault("train.after_eval_row")
            if tb:
                for k, v in row.items():
                    if k.startswith("eval_"):
                        tb.add_scalar(k.replace("eval_", "eval/"), v, self.state["step"])


# TrainConfig fields that may change when resuming (they do not change the weights)
RESUMABLE = ("output_dir", "log_every", "eval_every", "save_every", "num_workers", "prefetch_factor",
             "gradient_checkpointing", "cpu", "on_nan")


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: the CSV and PNG are always written
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop the rows a resumed run will write again (those after its checkpoint), atomically."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = []
    for row in rows:
        try:
            if keep(row):
                kept.append(row)
        except (TypeError, ValueError):  # a half-written last line from a crash
            continue
    if len(kept) == len(rows) or not fields:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buf.getvalue())


def plot_curves(out: Path) -> Path | None:
    """``curves.png``: training loss (and eval metrics) against steps."""
    train_csv = out / "metrics.csv"
    if not train_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with train_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    evals = []
    if (out / "eval.csv").exists():
        with (out / "eval.csv").open(newline="") as f:
            evals = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        for key in [k for k in evals[0] if k.startswith("eval_")]:
            ax.plot([int(r["step"]) for r in evals], [float(r[key]) for r in evals], marker="o", label=key[5:])
        ax.set_xlabel("step")
        ax.set_ylabel("evaluation")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "curves.png"
    tmp = out / ".curves.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def config_from_dict(data: dict, source: str = "train") -> TrainConfig:
    """TrainConfig from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown training key(s) {unknown}; valid: {sorted(names)}")
    optim = data.get("optim", {})
    if isinstance(optim, dict):
        onames = {f.name for f in dataclasses.fields(OptimConfig)}
        bad = sorted(set(optim) - onames)
        if bad:
            raise ValueError(f"{source}.optim: unknown key(s) {bad}; valid: {sorted(onames)}")
    return TrainConfig(**data)
