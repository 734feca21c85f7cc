"""The cached-features recipe: one procedure behind ``epalm quickstart``, ``quickstart-audio``,
``quickstart-caption`` and any ``epalm train`` config with a ``cached:`` section.

1. read the dataset's train and test splits through the registry (:mod:`epalm.data.registry`);
2. build the processor (the dataset's default preprocessing + the config's ``media`` overrides);
3. cache the frozen encoder's features of every media file (:func:`epalm.data.feature_cache.open_or_build`,
   fingerprinted by the processor);
4. compute, once per distinct token sequence, the frozen LM layers below the first injected one
   (:class:`TextStates`; variants without soft prompt or adapters);
5. train the connectors with :class:`epalm.training.trainer.Trainer` (only the injected layers run);
6. evaluate: greedy decoding through the upper layers (:func:`greedy_decode`, identical to
   ``EPALM.generate`` greedy) or beam search with ``generate``; the metric is the dataset's
   (exact match, or COCO caption metrics), broken down by any sample attribute (``group_by``);
7. measure the blind baseline the same way: same LM, prompt, recipe and decoding, all-zero features;
8. write ``metrics.json``, ``predictions.json``, ``curves.png`` (``blind/curves.png``),
   ``examples.html`` and ``model/`` (weights + processor: ``EPALM.from_pretrained`` and
   ``EPALMProcessor.from_pretrained`` load it anywhere; ``epalm predict`` / ``epalm demo`` answer
   as this evaluation did).

A run is a :class:`CachedRunConfig` (a dataclass, or the ``cached:`` section of a YAML) plus a
dataset reader; :class:`RunParts` injects already-loaded models (the tests use tiny ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epalm.core.config import EPALMConfig
from epalm.data.registry import DatasetSpec, get_dataset, group_keys
from epalm.data.text import encode_example, pad_sequences, pad_token_id_of
from epalm.data.feature_cache import encoder_fingerprint, open_or_build
from epalm.io import atomic_write_json, atomic_write_text
from epalm.evaluation.metrics import exact_match, grouped_exact_match
from epalm.core.model import EPALM
from epalm.data.processor import EPALMProcessor, MediaConfig, PromptTemplate, dataclass_from_dict

__all__ = ["CachedRunConfig", "RunParts", "TextStates", "greedy_decode", "load_parts", "run_cached",
           "build_processor", "media_features", "build_model", "train_connectors", "evaluate_rows", "score_rows",
           "flat_scores", "eval_every", "blind_cache_key", "load_blind_cache", "save_blind_cache",
           "resolve_device", "use_bf16", "cached_config_from_dict", "is_cached_config", "load_cached_config",
           "QuestionPrior", "prior_scores", "load_splits", "seeded_sample", "media_of", "evaluate_checkpoint"]

Log = Callable[[str], None]


@dataclass
class CachedRunConfig:
    """Everything a cached-features run needs; every field is a YAML key of the ``cached:`` section."""

    dataset: str = "easy_vqa"
    root: str | None = None  # default: the dataset's (installed package)
    dataset_options: dict = field(default_factory=dict)  # reader options (seed, test_fraction, include_svg, ...)
    train_split: str = "train"
    test_split: str = "test"
    num_test: int | None = None  # seeded sample of the test split (None: all of it)
    output_dir: str = "runs/cached"
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    threads: int | None = None
    # models: hub ids, registry names (weights:...) or paths
    lm: str = "weights:smollm2-135m-instruct"
    encoder: str = "weights:dinov2-small"
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"image_size": 56}, {"context_frames": 400}
    media: dict = field(default_factory=dict)  # MediaConfig overrides of the dataset's defaults
    # the model
    variant: str = "lin"
    num_encoder_layers: int = 6
    inject_start: int | None = None
    inject_end: int | None = None
    prompt_len: int | None = None  # None: 0 (soft prompts train below the cached layers)
    # DePALM's token connectors (variants qp-*, avgpool-*, linres-*): K tokens from every last-layer
    # encoder token (the cache then holds all tokens); None: the variant's K
    num_visual_tokens: int | None = None
    # training
    lr: float = 2e-2
    batch_size: int = 16
    steps: int | None = 800  # optimizer steps; None: ``epochs`` full passes
    epochs: int | None = None
    blind_steps: int | None = None  # default: as steps (or epochs)
    blind_epochs: int | None = None  # the blind run's budget in epochs instead (wins over blind_steps)
    bucket: bool = False  # batches of similar text length, formed once, shuffled each epoch (captions)
    max_length: int | None = None  # truncate training texts (tokens)
    bf16: str = "auto"  # training autocast: "auto" | "on" | "off"
    log_every: int | None = 10  # None: twice per epoch
    eval_every: int | None = None  # evaluate curve_samples every N steps (curves.png); None: ceil(steps / 8); 0: never
    curve_samples: int = 256  # seeded subset of the test sample evaluated during training (curves only)
    # evaluation
    max_new_tokens: int = 4
    num_beams: int = 1  # 1: greedy through the cached upper layers; >1: beam search with generate
    eval_batch_size: int = 128
    # sample attributes for per-group metrics: "answer_type", "answer_type,template" or a list (None: the dataset's)
    group_by: str | list[str] | None = None
    caption_metrics: list[str] = field(default_factory=lambda: ["BLEU", "ROUGE_L", "CIDEr"])
    blind: bool = True
    blind_cache: bool = True  # reuse the blind baseline from $EPALM_CACHE/blind when nothing it depends on changed
    # QA: stop the blind run once its answers to the distinct training questions score within
    # blind_tolerance (0.5 point) of the question-only prior on the training set (its plateau: see BlindPlateau),
    # checked every blind_check_every steps; blind_steps (default: steps) is the upper bound
    blind_stop_at_plateau: bool = True
    blind_check_every: int = 40
    blind_tolerance: float = 0.005
    html_examples: int = 100
    # caches
    cache_dir: str | None = None  # feature caches (default $EPALM_CACHE/features)
    feature_batch_size: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: no evaluation during training), got {self.eval_every}")
        if self.curve_samples < 1:
            raise ValueError(f"curve_samples must be >= 1, got {self.curve_samples}")
        if self.blind_epochs is not None and self.blind_epochs < 1:
            raise ValueError(f"blind_epochs must be >= 1, got {self.blind_epochs}")
        if self.blind_check_every < 1:
            raise ValueError(f"blind_check_every must be >= 1, got {self.blind_check_every}")
        if not 0 <= self.blind_tolerance < 1:
            raise ValueError(f"blind_tolerance must be in [0, 1), got {self.blind_tolerance}")
        group_keys(self.group_by)  # a bad group_by fails here, naming the field


def cached_config_from_dict(data: dict, source: str = "cached") -> CachedRunConfig:
    return dataclass_from_dict(CachedRunConfig, data, source)


def is_cached_config(path: str | Path) -> bool:
    """Whether a YAML file is a cached-features recipe (a top-level ``cached:`` section)."""
    from epalm.recipes.run import load_yaml

    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = load_yaml(path.read_text())
    except Exception:  # the regular loader reports YAML errors with the file name
        return False
    return isinstance(data, dict) and "cached" in data


def load_cached_config(path: str | Path, overrides: list[str] | None = None) -> CachedRunConfig:
    """``cached:`` section of a YAML (``cached.key=value`` overrides) -> :class:`CachedRunConfig`."""
    from epalm.recipes.run import apply_overrides, load_yaml

    path = Path(path)
    data = load_yaml(path.read_text()) or {}
    unknown = sorted(set(data) - {"cached"})
    if unknown:
        raise ValueError(f"{path}: a cached-features recipe has only a 'cached' section, found {unknown}")
    data = apply_overrides(data, overrides or [])
    return cached_config_from_dict(data.get("cached") or {}, source=f"{path}: cached")


@dataclass
class RunParts:
    """Models already loaded (tests inject tiny ones). ``lm_name`` / ``encoder_name`` are what the
    checkpoint records; ``None`` saves the model itself into the checkpoint (``save_base_models``)."""

    lm: Any
    tokenizer: Any
    encoder: Any
    lm_name: str | None = None
    encoder_name: str | None = None
    versions: dict[str, str] = field(default_factory=dict)


def load_parts(cfg: CachedRunConfig) -> RunParts:
    """The LM, tokenizer and encoder the config names."""
    from epalm.core.encoders import load_encoder
    from epalm.core.model import load_lm
    from epalm.data.processor import load_tokenizer
    from epalm.weights.registry import is_registry_name, load_registry_lm

    if is_registry_name(cfg.lm):
        lm, tokenizer = load_registry_lm(cfg.lm)
    else:
        lm, tokenizer = load_lm(EPALMConfig(lm=cfg.lm)), load_tokenizer(cfg.lm)
    lm.config._attn_implementation = "sdpa"
    encoder = load_encoder(cfg.encoder, num_layers=cfg.num_encoder_layers, **cfg.encoder_kwargs)
    return RunParts(lm, tokenizer, encoder, cfg.lm, cfg.encoder)


# ----------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(setting: str, device: torch.device) -> bool:
    """``"on"``/``"off"``, or ``"auto"``: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - private API
            pass
    return False


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def peak_rss_mb() -> float | None:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)
    except Exception:  # pragma: no cover - non-POSIX
        return None


def group_value(sample: Any, key: str) -> Any:
    """``sample.<key>``; ``"answer"`` is the first reference answer."""
    if key == "answer":
        return sample.answers[0] if sample.answers else None
    return getattr(sample, key, None)


# ----------------------------------------------------------------------------------- text states
class TextStates:
    """Lower-layer LM states per distinct token sequence (media-independent), computed on demand."""

    def __init__(self, model, pad_id: int, device: torch.device, bf16: bool, batch_size: int = 64) -> None:
        self.model, self.pad_id, self.device, self.bf16, self.batch_size = model, pad_id, device, bf16, batch_size
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    def ensure(self, keys, progress: bool = False, desc: str = "text states") -> None:
        from tqdm.auto import tqdm

        todo = sorted({tuple(k) for k in keys if tuple(k) not in self.states}, key=len)
        bar = tqdm(total=len(todo), desc=desc, unit="seq", disable=not progress or not todo, dynamic_ncols=True)
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b:b + self.batch_size]
            ids, mask = pad_sequences(chunk, self.pad_id)
            with torch.no_grad(), _autocast(self.device, self.bf16):
                st = self.model.text_states(ids.to(self.device), mask.to(self.device))
            prefix = st.shape[1] - ids.shape[1]
            for i, k in enumerate(chunk):
                self.states[k] = st[i, :prefix + len(k)].float().clone()
            bar.update(len(chunk))
        bar.close()

    def batch(self, keys: Sequence[tuple[int, ...]], length: int) -> torch.Tensor:
        keys = [tuple(k) for k in keys]
        self.ensure(keys)
        first = self.states[keys[0]]
        prefix = first.shape[0] - len(keys[0])
        out = first.new_zeros(len(keys), prefix + length, first.shape[-1])
        for i, k in enumerate(keys):
            out[i, :prefix + len(k)] = self.states[k]
        return out


@torch.no_grad()
def greedy_decode(model, prompts: Sequence[Sequence[int]], features: torch.Tensor, states: TextStates,
                  eos_id: int, max_new_tokens: int, batch_size: int = 128, progress: bool = False,
                  desc: str = "evaluate", bf16: bool = False) -> list[list[int]]:
    """Greedy decoding through the upper layers only: exactly ``model.generate(num_beams=1)``.

    Each step runs the injected layers over the whole (short) sequence, starting from the cached
    lower-layer states of that sequence; ``forward(last_logits_only=True)`` applies the LM head
    at each row's last token only.
    """
    from tqdm.auto import tqdm

    n = len(prompts)
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    device = features.device
    bar = tqdm(total=n, desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for _ in range(max_new_tokens):
        active = [i for i in range(n) if not done[i]]
        if not active:
            break
        for b in range(0, len(active), batch_size):
            rows = active[b:b + batch_size]
            keys = [tuple(seqs[i]) for i in rows]
            ids, mask = pad_sequences(keys, states.pad_id)
            ts = states.batch(keys, ids.shape[1])
            with _autocast(device, bf16):
                out = model(features=features[rows], input_ids=ids.to(device), attention_mask=mask.to(device),
                            text_states=ts, last_logits_only=True)
            tokens = out.logits[:, -1].float().argmax(-1).tolist()  # softcapping keeps the argmax
            for i, t in zip(rows, tokens):
                if t == eos_id:
                    done[i] = True
                else:
                    seqs[i].append(t)
                    new[i].append(t)
                    if len(new[i]) >= max_new_tokens:
                        done[i] = True
                if done[i]:
                    bar.update(1)
    bar.update(n - bar.n)
    bar.close()
    return new


# ----------------------------------------------------------------------------------- the procedure
def build_processor(cfg: CachedRunConfig, spec: DatasetSpec, tokenizer) -> EPALMProcessor:
    media = {**spec.preprocessing, **cfg.media}
    return EPALMProcessor(tokenizer, MediaConfig(modality=spec.modality, **media), PromptTemplate(),
                          decoding={"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens})


def model_config(cfg: CachedRunConfig, parts: RunParts, encoder_tokens: int | None = None) -> EPALMConfig:
    """The EPALMConfig the recipe trains (``encoder_tokens``: the cached features' token count, which
    the linear resampler needs)."""
    extra: dict[str, Any] = {} if cfg.variant == "lin" else {"prompt_len": cfg.prompt_len or 0}
    if cfg.num_visual_tokens is not None:
        extra["num_visual_tokens"] = cfg.num_visual_tokens
    config = EPALMConfig(lm=parts.lm_name or "./lm", encoder=parts.encoder_name or "./encoder", variant=cfg.variant,
                         num_encoder_layers=cfg.num_encoder_layers, inject_start=cfg.inject_start,
                         inject_end=cfg.inject_end, encoder_kwargs=dict(cfg.encoder_kwargs), **extra)
    if config.connector == "linear_resampler" and encoder_tokens is not None:
        config.encoder_tokens = int(encoder_tokens)
    return config


def media_features(cfg: CachedRunConfig, parts: RunParts, processor: EPALMProcessor, media: dict[str, Path],
                   device: torch.device, log: Log,
                   model: EPALMConfig | None = None) -> tuple[torch.Tensor, dict[str, int], dict[str, Any]]:
    """All media's encoder features (from the cache, built on first use), float32 on device: ``(N, k, d)``
    [CLS] of the last k layers, or ``(N, tokens, d)`` every token for a model that reads them all
    (``model``, default the recipe's: token connectors, all_patch_tokens)."""
    from epalm.weights.cache import cache_dir

    model = model or model_config(cfg, parts)
    name = parts.encoder_name or type(getattr(parts.encoder, "model", parts.encoder)).__name__
    fingerprint = encoder_fingerprint(parts.encoder, name, processor.fingerprint(), all_tokens=model.needs_all_tokens,
                                      token_layers=model.token_layers if model.needs_all_tokens else 1)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.removeprefix("weights:"))[-40:]
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "features"
    path = root / f"{cfg.dataset}-{slug}-k{parts.encoder.num_layers}-{digest}"
    t0 = time.perf_counter()
    load = processor.media_loader(augment=False)
    items = [(m, (lambda p=p: load(p, False))) for m, p in media.items()]
    log(f"features of {len(items)} media files -> {path}")
    # float32 storage: the features are those the encoder computes at inference (predict / demo)
    cache, reused = open_or_build(path, parts.encoder, items, fingerprint, rebuild_stale=True,
                                  batch_size=cfg.feature_batch_size, device=device, progress=cfg.progress,
                                  dtype="float32")
    ids = list(media)
    feats = cache.get_batch(ids, device=device, dtype=torch.float32)
    info = {"path": str(path), "reused": reused, "seconds": round(time.perf_counter() - t0, 1), "items": len(ids)}
    return feats, {m: i for i, m in enumerate(ids)}, info


def build_model(cfg: CachedRunConfig, parts: RunParts, encoder_dim: int, device: torch.device,
                encoder_tokens: int | None = None) -> EPALM:
    """The recipe's model on cached features (``encoder_tokens``: their token count, ``feats.shape[1]``)."""
    config = model_config(cfg, parts, encoder_tokens)
    torch.manual_seed(cfg.seed)
    return EPALM(parts.lm, None, config, encoder_dim=encoder_dim).to(device)


def train_connectors(cfg: CachedRunConfig, model: EPALM,
                     encoded: list[tuple[tuple[int, ...], tuple[int, ...], int]], feats: torch.Tensor,
                     states: TextStates, out_dir: Path, blind: bool, device: torch.device,
                     bf16: bool, pad_id: int, evaluate: Callable[[EPALM, int], dict] | None = None,
                     should_stop: Callable[[EPALM, int], bool] | None = None, stop_every: int = 1) -> dict[str, Any]:
    """Train the connectors; ``evaluate(model, epoch)`` runs every ``eval_every`` steps (eval.csv, curves.png);
    ``should_stop(model, step)`` every ``stop_every`` steps may end training early."""
    import csv

    from epalm.training.trainer import OptimConfig, TrainConfig, Trainer

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "eval.csv", "curves.png"):  # the Trainer appends: start the curves afresh
        (out_dir / name).unlink(missing_ok=True)

    def collate(indices: list[int]) -> dict:
        keys = [encoded[i][0] for i in indices]
        ids, mask = pad_sequences(keys, pad_id)
        labels, _ = pad_sequences([encoded[i][1] for i in indices], -100)
        f = feats[[encoded[i][2] for i in indices]]
        if blind:
            f = torch.zeros_like(f)
        return {"features": f, "input_ids": ids.to(device), "attention_mask": mask.to(device),
                "labels": labels.to(device), "text_states": states.batch(keys, ids.shape[1])}

    items: list = list(range(len(encoded)))
    batch_size = cfg.batch_size
    per_epoch = math.ceil(len(encoded) / batch_size)
    if cfg.bucket:  # batches of similar length, formed once (the Trainer shuffles their order each epoch)
        rng = random.Random(cfg.seed)
        order = sorted(items, key=lambda i: (len(encoded[i][0]), rng.random()))
        items = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
        collate, batch_size = (lambda batches, base=collate: base(batches[0])), 1
    steps = cfg.blind_steps if (blind and cfg.blind_steps is not None) else cfg.steps
    epochs = cfg.epochs
    if blind and cfg.blind_epochs is not None:
        steps, epochs = None, cfg.blind_epochs
    epochs = epochs if steps is None else max(1, math.ceil(steps / per_epoch))
    total = steps if steps is not None else epochs * per_epoch
    every = eval_every(cfg, total) if evaluate is not None else None
    tcfg = TrainConfig(output_dir=str(out_dir), epochs=epochs, batch_size=batch_size, seed=cfg.seed, max_steps=steps,
                       log_every=cfg.log_every or max(1, per_epoch // 2), cpu=device.type == "cpu",
                       eval_every=every,
                       mixed_precision="bf16" if bf16 else "no",
                       num_workers=0,  # in-memory features and text states: no loader processes
                       optim=OptimConfig(lr=cfg.lr, warmup_lr=cfg.lr / 10, min_lr=cfg.lr / 100))
    t0 = time.perf_counter()
    # mid-epoch evaluations only: evaluate_fn would also run at each epoch's end, so it is given
    # to the Trainer only when eval_every is on (and then the epoch ends evaluate as well)
    state = Trainer(model, items, collate, tcfg, evaluate=evaluate if every else None, should_stop=should_stop,
                    stop_every=stop_every).train()
    seconds = time.perf_counter() - t0
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # optimizer state: not needed afterwards
    rows = list(csv.DictReader((out_dir / "metrics.csv").open())) if (out_dir / "metrics.csv").exists() else []
    return {"steps": state["step"], "max_steps": total, "stopped_early": state.get("stopped_at") is not None,
            "batch_size": cfg.batch_size, "epochs": epochs, "seconds": round(seconds, 1),
            "final_loss": float(rows[-1]["loss"]) if rows else None}


def eval_every(cfg: CachedRunConfig, total_steps: int) -> int | None:
    """Steps between evaluations during training: ``cfg.eval_every``, or ``ceil(total_steps / 8)`` (8
    evaluations, the last where training ends, not a ninth a few steps before it); None: never."""
    every = cfg.eval_every if cfg.eval_every is not None else max(1, math.ceil(total_steps / 8))
    return every or None


def decode(cfg: CachedRunConfig, model: EPALM, processor: EPALMProcessor, prompts: list[tuple[int, ...]],
           feats: torch.Tensor, states: TextStates, desc: str = "evaluate") -> list[str]:
    """The evaluation's decoding (greedy through the cached upper layers, or beam search), in fp32."""
    tok = processor.tokenizer
    if cfg.num_beams == 1:
        new = greedy_decode(model, prompts, feats, states, tok.eos_token_id, cfg.max_new_tokens,
                            cfg.eval_batch_size, cfg.progress, desc=desc)
    else:
        new = []
        model.eval()
        for b in range(0, len(prompts), cfg.eval_batch_size):
            chunk = prompts[b:b + cfg.eval_batch_size]
            ids, mask = pad_sequences(chunk, processor.pad_token_id, side="left")
            with torch.no_grad():
                out = model.generate(features=feats[b:b + len(chunk)], input_ids=ids.to(feats.device),
                                     attention_mask=mask.to(feats.device), max_new_tokens=cfg.max_new_tokens,
                                     num_beams=cfg.num_beams, do_sample=False, pad_token_id=processor.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
            new += out.tolist()
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def evaluate_rows(cfg, model, processor, spec, test, feats, row, states, blind: bool) -> list[dict]:
    prompts = [tuple(processor.encode_prompt(getattr(s, "question", ""))) for s in test]
    if blind:  # no media: the output depends on the prompt only, so decode each distinct prompt once
        unique = list(dict.fromkeys(prompts))
        zeros = feats.new_zeros((len(unique), *feats.shape[1:]))
        by_prompt = dict(zip(unique, decode(cfg, model, processor, unique, zeros, states, "evaluate blind")))
        texts = [by_prompt[p] for p in prompts]
    else:
        texts = decode(cfg, model, processor, prompts, feats[[row[s.media_id] for s in test]], states)
    rows = []
    for s, t in zip(test, texts):
        r = {"sample_id": s.id, "media_id": s.media_id, "media_path": str(s.media_path), "prediction": t}
        if spec.task == "qa":
            r.update(question=s.question, answers=list(s.answers), answer_type=s.answer_type)
        else:
            r.update(question="", references=list(s.captions))
        rows.append(r)
    return rows


def score_rows(spec: DatasetSpec, rows: list[dict], test: Sequence, group_by: str | Sequence[str] | None,
               caption_metrics: Sequence[str]) -> dict[str, Any]:
    """The dataset's metric: exact match (fraction, with a breakdown ``per_<key>`` for every key of
    ``group_by``, and ``group_sizes[key][group]``) or caption scores."""
    if spec.task == "caption":
        from epalm.evaluation.metrics import caption_scores

        return caption_scores({r["sample_id"]: r["prediction"] for r in rows},
                              {r["sample_id"]: r["references"] for r in rows}, metrics=list(caption_metrics))
    preds, gts = [r["prediction"] for r in rows], [r["answers"] for r in rows]
    out: dict[str, Any] = {"accuracy": grouped_exact_match(preds, gts)["accuracy"]}
    sizes = {}
    for key in group_keys(group_by):
        groups = [group_value(s, key) for s in test]
        out[f"per_{key}"] = grouped_exact_match(preds, gts, groups)["groups"]
        counts = Counter(g for g in groups if g is not None)
        sizes[key] = {g: counts[g] for g in out[f"per_{key}"]}
    if sizes:
        out["group_sizes"] = sizes
    return out


def flat_scores(scores: dict[str, Any], group_by: str | Sequence[str] | None) -> dict[str, float]:
    """The numbers of a curve evaluation: the metric(s), and accuracy per group of the first key."""
    out = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = group_keys(group_by)
    if keys:
        out.update({f"accuracy_{g}": v for g, v in scores.get(f"per_{keys[0]}", {}).items()})
    return out


# ----------------------------------------------------------------------------------- blind cache
def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def source_digest() -> str:
    """Hash of every source file of the epalm package in use (any code change invalidates)."""
    import epalm

    root = Path(epalm.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in ("transformers", "accelerate", "numpy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# CachedRunConfig fields that cannot change the blind baseline's predictions or curves: where it is
# written, what is shown, how it is scored (stored predictions are re-scored), and the encoder
# (blind features are zeros: their shape is in the key); the data is keyed by its content
BLIND_IRRELEVANT = ("output_dir", "progress", "html_examples", "blind", "blind_cache", "cache_dir",
                    "feature_batch_size", "caption_metrics", "group_by", "root", "num_test", "encoder",
                    "encoder_kwargs", "media")


def blind_cache_key(cfg: CachedRunConfig, parts: RunParts, encoded: Sequence[tuple], test: Sequence,
                    feats: torch.Tensor, device: torch.device, bf16: bool) -> tuple[str, dict[str, Any]]:
    """``(sha256, what it hashes)``: training sequences, test prompts, LM weights, every recipe field
    that can change the result, device, bf16, threads, epalm's source and the library versions."""
    from epalm.data.feature_cache import weights_digest

    depends_on = {
        "train_sequences": _sha256([[list(e[0]), list(e[1])] for e in encoded]),
        "test_samples": _sha256([[s.id, getattr(s, "question", "")] for s in test]),
        "lm": [parts.lm_name, *weights_digest(parts.lm)],
        "feature_shape": list(feats.shape[1:]),
        "recipe": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BLIND_IRRELEVANT},
        "device": device.type, "bf16": bf16,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "epalm_source": source_digest(),
        "versions": {**parts.versions, **library_versions()},
    }
    return _sha256(depends_on), depends_on


def blind_cache_path(cfg: CachedRunConfig, key: str) -> Path:
    """``$EPALM_CACHE/blind/KEY.json`` (``CACHE_DIR/blind/`` when ``cfg.cache_dir`` is set)."""
    from epalm.weights.cache import cache_dir

    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir()
    return root / "blind" / f"{key}.json"


CURVE_FILES = ("metrics.csv", "eval.csv")


def load_blind_cache(path: Path, key: str, test: Sequence, blind_dir: Path,
                     log: Log) -> tuple[list[dict], dict] | None:
    """``(prediction rows, train info)`` of the cached blind run, its curves restored into ``blind_dir``;
    None when there is none. A damaged or mismatching file is ignored with a warning (retrained)."""
    from epalm.training.trainer import plot_curves

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != key:
            raise ValueError("not a blind baseline of this key")
        rows, info, files = data["rows"], data["train"], data["files"]
        if (not isinstance(rows, list) or len(rows) != len(test) or not isinstance(info, dict)
                or not isinstance(files, dict) or set(files) - set(CURVE_FILES)
                or not all(isinstance(v, str) for v in files.values())):
            raise ValueError("unexpected structure")
        for r, s in zip(rows, test):
            if not isinstance(r, dict) or r.get("sample_id") != s.id or not isinstance(r.get("prediction"), str):
                raise ValueError("its predictions are not those of this test sample")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        msg = f"{path}: damaged blind-baseline cache ({err}); ignoring it and training the blind baseline again"
        warnings.warn(msg, stacklevel=2)
        log(msg)
        return None
    blind_dir.mkdir(parents=True, exist_ok=True)
    for name in (*CURVE_FILES, "curves.png"):
        (blind_dir / name).unlink(missing_ok=True)
    for name, text in files.items():
        atomic_write_text(blind_dir / name, text)
    plot_curves(blind_dir)
    return rows, {**info, "reused_from": str(path)}


def save_blind_cache(path: Path, key: str, depends_on: dict, blind_dir: Path, rows: list[dict],
                     info: dict) -> None:
    files = {name: (blind_dir / name).read_text(encoding="utf-8") for name in CURVE_FILES
             if (blind_dir / name).is_file()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "depends_on": depends_on, "rows": rows, "train": info, "files": files},
                      default=str)


class QuestionPrior:
    """The question-only prior of a QA training set: each distinct prompt answered with the training
    answer that scores best on that prompt's training samples (its most frequent answer; ties: the
    first seen), scored with the dataset's exact match.

    No model that sees the question alone can do better on the training set (``train_accuracy``):
    it is the blind baseline's plateau (:class:`BlindPlateau`), and ``predict`` gives the prior's
    answers to test prompts ("" for a prompt never seen in training), the column against which
    yes/no accuracy is read in ``metrics.json`` (``question_prior``).
    """

    def __init__(self, processor: EPALMProcessor, train: Sequence) -> None:
        encoded: dict[str, tuple[int, ...]] = {}  # each distinct question tokenized once
        groups: dict[tuple[int, ...], list] = {}  # prompt -> every training answer list
        for s in train:
            q = getattr(s, "question", "")
            if q not in encoded:
                encoded[q] = tuple(processor.encode_prompt(q))
            groups.setdefault(encoded[q], []).append(s.answers)
        self.processor, self._encoded = processor, encoded
        self.prompts = list(groups)
        self.answers = list(groups.values())
        self.total = len(train)
        self.best: dict[tuple[int, ...], str] = {}
        correct = 0
        for prompt, answers in groups.items():
            scored = [(sum(exact_match(c, refs) for refs in answers), c)
                      for c in dict.fromkeys(a[0] for a in answers if a)]
            if scored:
                n, answer = max(scored, key=lambda t: t[0])  # max keeps the first of equal counts
                self.best[prompt] = answer
                correct += n
        self.train_accuracy = correct / max(self.total, 1)

    def predict(self, samples: Sequence) -> list[str]:
        out = []
        for s in samples:
            q = getattr(s, "question", "")
            if q not in self._encoded:
                self._encoded[q] = tuple(self.processor.encode_prompt(q))
            out.append(self.best.get(self._encoded[q], ""))
        return out


class BlindPlateau:
    """When the blind baseline has reached its plateau, checked on the training set (QA datasets).

    The blind model sees all-zero features, so its answer is a function of the question alone. On
    the training set the best any such function can score is the *question-only prior*: for each
    distinct question, its most frequent training answer (scored with the dataset's exact match).
    Next-token training minimises cross-entropy, whose minimiser answers exactly that: it is the
    plateau. A call decodes each distinct training question once (greedy, fp32, as the evaluation)
    and scores the answers against every training answer of that question; once that accuracy is
    within ``tolerance`` of the prior's, no further training can raise it by more than
    ``tolerance``, and the run stops (``Trainer(should_stop=...)``). ``history`` keeps every check.
    A dataset with more than ``MAX_QUESTIONS`` distinct questions (VQA v2: nearly one per sample) is
    not checked (:meth:`applicable`): each check would decode all of them, and such a prior is memorised
    rather than reached.
    """

    MAX_QUESTIONS = 5000

    @classmethod
    def applicable(cls, train: Sequence) -> bool:
        return len({getattr(s, "question", "") for s in train}) <= cls.MAX_QUESTIONS

    def __init__(self, cfg: CachedRunConfig, processor: EPALMProcessor, train: Sequence, states: TextStates,
                 feature_shape: Sequence[int], device: torch.device, log: Log,
                 prior: "QuestionPrior | None" = None) -> None:
        prior = prior or QuestionPrior(processor, train)
        self.prompts = prior.prompts
        self.answers = prior.answers
        self.total = prior.total
        self.prior = prior.train_accuracy
        self.cfg, self.processor, self.states, self.log = dataclasses.replace(cfg, progress=False), processor, states, log
        self.zeros = torch.zeros((len(self.prompts), *feature_shape), device=device)
        self.tolerance = cfg.blind_tolerance
        self.history: list[dict[str, float]] = []
        self.reached = False

    def accuracy(self, model: EPALM) -> float:
        """The blind model's accuracy on the training set (each distinct question decoded once)."""
        was_training = model.training
        model.eval()
        try:
            texts = decode(self.cfg, model, self.processor, self.prompts, self.zeros, self.states, "blind plateau")
        finally:
            model.train(was_training)
        correct = sum(sum(exact_match(t, refs) for refs in answers) for t, answers in zip(texts, self.answers))
        return correct / max(self.total, 1)

    def __call__(self, model: EPALM, step: int) -> bool:
        acc = self.accuracy(model)
        self.history.append({"step": step, "train_accuracy": round(acc, 5)})
        self.reached = done = acc >= self.prior - self.tolerance
        if done:
            self.log(f"blind baseline at its plateau at step {step}: training accuracy {acc:.2%}, question-only "
                     f"prior {self.prior:.2%} (tolerance {self.tolerance:.2%})")
        return done

    def report(self) -> dict[str, Any]:
        return {"criterion": "training-set accuracy of the blind answers >= question-only prior - tolerance",
                "prior_train_accuracy": round(self.prior, 5), "tolerance": self.tolerance,
                "distinct_questions": len(self.prompts), "checks": self.history,
                "reached": self.reached}


def seeded_sample(samples: Sequence, n: int | None, seed: int) -> list:
    """``n`` of ``samples`` drawn with ``random.Random(seed)``, in their original order (all when ``n``
    is None or not smaller): the test sample every evaluation of a recipe uses."""
    samples = list(samples)
    if n is None or n >= len(samples):
        return samples
    return [samples[i] for i in sorted(random.Random(seed).sample(range(len(samples)), n))]


def load_splits(cfg: CachedRunConfig, spec: DatasetSpec) -> tuple[Sequence, list, list]:
    """``(train, all of the test split, the test sample)``: ``num_test`` seeded samples (or all)."""
    options = dict(cfg.dataset_options)
    train = spec.load(cfg.root, cfg.train_split, **options)
    test_all = list(spec.load(cfg.root, cfg.test_split, **options))
    return train, test_all, seeded_sample(test_all, cfg.num_test, cfg.seed)


def media_of(*splits: Sequence) -> dict[str, Path]:
    """Each distinct media file of the splits, in order of first appearance."""
    media: dict[str, Path] = {}
    for split in splits:
        for s in split:
            media.setdefault(s.media_id, s.media_path)
    return media


def prior_scores(spec: DatasetSpec, processor: EPALMProcessor, train: Sequence, test: Sequence,
                 group_by, prior: QuestionPrior | None = None) -> dict[str, Any]:
    """The question-only prior's scores on the test sample (same metric and groups as the model's)."""
    prior = prior or QuestionPrior(processor, train)
    rows = [{"prediction": p, "answers": list(s.answers)} for p, s in zip(prior.predict(test), test)]
    scores = score_rows(spec, rows, test, group_by, [])
    scores.pop("group_sizes", None)
    return {**scores, "train_accuracy": round(prior.train_accuracy, 5),
            "definition": "each test question answered with its most frequent training answer"}


def run_cached(cfg: CachedRunConfig, parts: RunParts | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run the recipe (see the module doc); returns the metrics also written to ``RUN/metrics.json``."""
    from epalm.evaluation.evaluate import write_examples_html

    log = log or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.progress else (lambda msg: None))
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    spec = get_dataset(cfg.dataset)
    group_by = cfg.group_by or spec.group_by

    t = time.perf_counter()
    train, test_all, test = load_splits(cfg, spec)
    if parts is None:
        parts = load_parts(cfg)
    timings["load"] = time.perf_counter() - t
    parts.lm.to(device)
    parts.encoder.to(device)
    bf16 = use_bf16(cfg.bf16, device)
    processor = build_processor(cfg, spec, parts.tokenizer)
    tok = parts.tokenizer
    pad_id = pad_token_id_of(tok)

    # 1. encoder features of every media file (all of the test split, so a larger sample reuses them)
    t = time.perf_counter()
    feats, row, feature_info = media_features(cfg, parts, processor, media_of(train, test_all), device, log)
    timings["features"] = time.perf_counter() - t

    # 2. tokenization and the media-independent lower LM layers, once per distinct sequence
    cache: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    encoded = []
    for s in train:
        prompt = processor.prompt_text(getattr(s, "question", ""))
        target = s.answers[0] if spec.task == "qa" else s.captions[0]
        if (prompt, target) not in cache:
            e = encode_example(tok, prompt, target, max_length=cfg.max_length)
            cache[(prompt, target)] = (tuple(e.input_ids), tuple(e.labels))
        encoded.append((*cache[(prompt, target)], row[s.media_id]))
    model = build_model(cfg, parts, feats.shape[-1], device, feats.shape[1])
    states = TextStates(model, pad_id, device, bf16)
    t = time.perf_counter()
    test_prompts = [tuple(processor.encode_prompt(getattr(s, "question", ""))) for s in test]
    states.ensure([e[0] for e in encoded], progress=cfg.progress)
    fp32_states = TextStates(model, pad_id, device, bf16=False)  # evaluation runs in fp32, as inference
    if cfg.num_beams == 1:
        fp32_states.ensure(test_prompts)
    timings["text_states"] = time.perf_counter() - t

    # 3. train, evaluating a seeded subset of the test sample now and then (eval.csv, curves.png only)
    curve = seeded_sample(test, cfg.curve_samples, cfg.seed + 1)
    quiet = dataclasses.replace(cfg, progress=False)

    def curve_eval(blind_run: bool, run_states: TextStates) -> Callable[[EPALM, int], dict]:
        def evaluate(m: EPALM, _epoch: int) -> dict:
            was_training = m.training
            m.eval()
            try:
                got = evaluate_rows(quiet, m, processor, spec, curve, feats, row, run_states, blind=blind_run)
            finally:
                m.train(was_training)
            return flat_scores(score_rows(spec, got, curve, group_by, cfg.caption_metrics), group_by)
        return evaluate

    t = time.perf_counter()
    train_info = train_connectors(cfg, model, encoded, feats, states, out, False, device, bf16, pad_id,
                                  evaluate=curve_eval(False, fp32_states))
    timings["train"] = time.perf_counter() - t

    # 4. evaluate
    t = time.perf_counter()
    rows = evaluate_rows(cfg, model, processor, spec, test, feats, row, fp32_states, blind=False)
    scores = score_rows(spec, rows, test, group_by, cfg.caption_metrics)
    timings["evaluate"] = time.perf_counter() - t
    model.save_pretrained(out / "model", processor=processor,
                          save_base_models=parts.lm_name is None or parts.encoder_name is None,
                          encoder=parts.encoder)
    model.engine.remove()  # the blind model hooks the same frozen LM

    # 5. the blind baseline: same LM, prompt, recipe and decoding; all-zero features (reused from
    #    $EPALM_CACHE/blind when nothing it depends on changed: see blind_cache_key)
    blind_scores = blind_info = blind_rows = blind_reuse = None
    prior = QuestionPrior(processor, train) if spec.task == "qa" else None
    if cfg.blind:
        t = time.perf_counter()
        blind_dir = out / "blind"
        key, depends_on = blind_cache_key(cfg, parts, encoded, test, feats, device, bf16)
        path = blind_cache_path(cfg, key)
        cached = load_blind_cache(path, key, test, blind_dir, log) if cfg.blind_cache else None
        if cached is not None:
            blind_rows, blind_info = cached
            log(f"blind baseline: reused {path} (same data, LM, recipe and code)")
        else:
            blind = build_model(cfg, parts, feats.shape[-1], device, feats.shape[1])
            blind_states = TextStates(blind, pad_id, device, bf16)
            blind_states.states = states.states  # identical frozen lower layers
            blind_fp32 = TextStates(blind, pad_id, device, bf16=False)
            blind_fp32.states = fp32_states.states
            plateau = None
            if cfg.blind_stop_at_plateau and spec.task == "qa":
                if BlindPlateau.applicable(train):
                    plateau = BlindPlateau(cfg, processor, train, blind_fp32, feats.shape[1:], device, log,
                                           prior=prior)
                else:
                    log(f"blind baseline: more than {BlindPlateau.MAX_QUESTIONS} distinct training questions, no "
                        "plateau check; it trains its whole budget (blind_steps)")
            blind_info = train_connectors(cfg, blind, encoded, feats, blind_states, blind_dir, True, device, bf16,
                                          pad_id, evaluate=curve_eval(True, blind_fp32), should_stop=plateau,
                                          stop_every=cfg.blind_check_every)
            if plateau is not None:
                if not blind_info["stopped_early"]:  # certify where the whole budget ended, too
                    plateau(blind, blind_info["steps"])
                blind_info["plateau"] = plateau.report()
            blind_rows = evaluate_rows(cfg, blind, processor, spec, test, feats, row, blind_fp32, blind=True)
            blind.engine.remove()
            save_blind_cache(path, key, depends_on, blind_dir, blind_rows, blind_info)
        blind_reuse = {"reused": cached is not None, "key": key, "path": str(path)}
        blind_scores = score_rows(spec, blind_rows, test, group_by, cfg.caption_metrics)  # the same code, always
        timings["blind"] = time.perf_counter() - t

    # 6. outputs
    if blind_rows is not None:
        for r, b in zip(rows, blind_rows):
            r["blind_prediction"] = b["prediction"]
    atomic_write_json(out / "predictions.json", rows)
    html_rows = [dict(r, question=(r.get("question") or "") + (f"  [blind: {r['blind_prediction']}]"
                                                              if "blind_prediction" in r else "")) for r in rows]
    headline = (f"{scores['accuracy']:.1%}" if "accuracy" in scores else f"CIDEr {scores.get('CIDEr', 0):.3f}")
    write_examples_html(out / "examples.html", html_rows, media_paths={r["sample_id"]: r["media_path"] for r in rows},
                        title=f"eP-ALM on {cfg.dataset}: {headline} on {len(test)} test samples",
                        limit=cfg.html_examples)
    metrics = {
        "dataset": cfg.dataset,
        "task": spec.task,
        "metric": spec.metric,
        **scores,
        **{f"blind_{k}": (blind_scores or {}).get(k) for k in scores if k != "group_sizes"},
        "blind_cache": blind_reuse,
        "test_samples": len(test),
        "test_sample": ("all" if len(test) == len(test_all) else f"seeded random sample (seed {cfg.seed})"),
        "train_samples": len(train),
        "minutes": round((time.perf_counter() - t_start) / 60, 2),
        "peak_rss_mb": peak_rss_mb(),
        "timings_s": {**{k: round(v, 1) for k, v in timings.items()},
                      "total": round(time.perf_counter() - t_start, 1)},
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "bf16": bf16,
        "features": feature_info,
        "train": train_info,
        "blind_train": blind_info,
        "model": {"lm": parts.lm_name, "encoder": parts.encoder_name, "variant": cfg.variant,
                  "inject_layers": [model.inject_start, model.inject_end], "encoder_layers": parts.encoder.num_layers,
                  **model.parameter_report()},
        "processor": processor.to_dict(),
        "decoding": {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens},
        "config": dataclasses.asdict(cfg),
        "versions": parts.versions,
        "outputs": {"metrics": str(out / "metrics.json"), "curves": str(out / "curves.png"),
                    "examples": str(out / "examples.html"), "predictions": str(out / "predictions.json"),
                    "weights": str(out / "model")},
    }
    if spec.task == "qa":
        metrics["question_prior"] = prior_scores(spec, processor, train, test, group_by, prior)
        train_counts = Counter(s.answers[0] for s in train)
        majority = train_counts.most_common(1)[0][0]
        metrics["majority_answer"] = majority
        metrics["majority_accuracy"] = sum(exact_match(majority, s.answers) for s in test) / max(len(test), 1)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_checkpoint(cfg: CachedRunConfig, checkpoint: str | Path, out_dir: str | Path | None = None,
                        parts: RunParts | None = None, log: Log | None = None) -> dict[str, Any]:
    """Evaluate a run's ``model/`` folder on the recipe's test sample, as the run's own evaluation did.

    The checkpoint's processor (preprocessing, tokenizer, prompt) and weights are used, the recipe
    only says which data, which test sample (``num_test``; None: the whole split) and how to decode;
    features come from the same cache. So ``epalm eval configs/quickstart/easy_vqa.yaml
    cached.num_test=null --checkpoint runs/quickstart/model`` scores the quickstart's model on all
    9,673 questions without training again. Writes ``metrics.json`` and ``predictions.json`` to
    ``out_dir`` (default ``CHECKPOINT/../eval``) and returns the metrics.
    """
    from epalm.core.model import CONFIG_NAME
    from epalm.data.processor import PROCESSOR_NAME
    from epalm.errors import UserError

    log = log or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.progress else (lambda msg: None))
    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    for name in (CONFIG_NAME, PROCESSOR_NAME):
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"{checkpoint / name}: no such file; --checkpoint must be a run's model/ folder "
                                    "(save_pretrained with its processor)")
    saved = EPALMConfig.load(checkpoint / CONFIG_NAME)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = get_dataset(cfg.dataset)
    group_by = cfg.group_by or spec.group_by
    train, test_all, test = load_splits(cfg, spec)
    parts = parts or load_parts(cfg)
    if parts.lm_name is not None and saved.lm != parts.lm_name:  # (None: the run saved its LM in the checkpoint)
        raise UserError(f"{checkpoint}: trained on LM {saved.lm!r}, but the recipe names {parts.lm_name!r} (cached.lm)")
    parts.lm.to(device)
    parts.encoder.to(device)
    processor = EPALMProcessor.from_pretrained(checkpoint)
    model = EPALM.from_pretrained(checkpoint, device=device, lm=parts.lm, encoder=parts.encoder).eval()
    try:
        feats, row, feature_info = media_features(cfg, parts, processor, media_of(test), device, log, model.config)
        states = TextStates(model, pad_token_id_of(processor.tokenizer), device, bf16=False)
        rows = evaluate_rows(cfg, model, processor, spec, test, feats, row, states, blind=False)
    finally:
        model.engine.remove()
    scores = score_rows(spec, rows, test, group_by, cfg.caption_metrics)
    out = Path(out_dir) if out_dir is not None else checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"dataset": cfg.dataset, "task": spec.task, "metric": spec.metric, "checkpoint": str(checkpoint),
               **scores,
               "test_samples": len(test),
               "test_sample": ("all" if len(test) == len(test_all) else f"seeded random sample (seed {cfg.seed})"),
               "minutes": round((time.perf_counter() - t_start) / 60, 2), "peak_rss_mb": peak_rss_mb(),
               "device": str(device), "features": feature_info,
               "decoding": {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens},
               "outputs": {"metrics": str(out / "metrics.json"), "predictions": str(out / "predictions.json")}}
    if spec.task == "qa":
        metrics["question_prior"] = prior_scores(spec, processor, train, test, group_by)
    atomic_write_json(out / "predictions.json", rows)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
