"""Paper recipes as data: one YAML file = model + data + training + evaluation.

    model:  EPALMConfig fields (lm, encoder, variant, ...)
    data:   DataConfig (dataset name, root, splits, media preprocessing, few-shot, feature cache)
    train:  TrainConfig (epochs, batch_size, optim, mixed_precision, ...)
    eval:   EvalConfig (metric, decoding)

``epalm train configs/vqa_epalm.yaml train.epochs=1 data.root=/data`` overrides any key; an
unknown or mistyped key is rejected naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epalm.core.config import EPALMConfig, check_fields, check_model_path
from epalm.errors import ConfigError, RunDirError, UserError
from epalm.evaluation.evaluate import DecodingConfig
from epalm.core.model import resolve_name
from epalm.training.trainer import TrainConfig, config_from_dict

from epalm.data.registry import DATASETS, get_dataset


def __getattr__(name: str):  # derived from the dataset registry (epalm.data.registry), never a second copy
    if name == "CAPTION_DATASETS":
        return {n for n, spec in DATASETS.items() if spec.task == "caption"}
    raise AttributeError(name)


@dataclass
class DataConfig:
    dataset: str = "vqa_v2"  # see epalm.data.load_samples
    root: str = "data"
    train_split: str = "karpathy_train"
    eval_split: str = "karpathy_test"
    eval_dataset: str | None = None  # out-of-distribution evaluation (e.g. train vqa_v2, evaluate gqa)
    eval_root: str | None = None
    fraction: float | None = None  # few-shot: 0.0012, 0.01, 0.1 (seeded)
    num_samples: int | None = None
    max_eval_samples: int | None = None
    image_size: int = 224
    mean: list[float] | None = None  # None: the release's normalisation
    std: list[float] | None = None
    augment: bool = True
    num_frames: int | None = None  # video: 8 for QA, 16 for captioning
    audio_features: str = "ast"  # "ast" | "whisper"
    loss_on: str = "answer"  # "answer" | "all" (the release)
    on_error: str = "raise"  # corrupt media: "raise" | "skip"
    feature_cache: str | None = None  # directory of the frozen-encoder feature cache (used when augment is off)
    feature_cache_dtype: str = "float16"  # storage of cached features; "float32" reproduces uncached training
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "data", ranges={"image_size": (">=", 1), "fraction": (">", 0), "num_samples": (">=", 1),
                                           "max_eval_samples": (">=", 1), "num_frames": (">=", 1)},
                     choices={"audio_features": ("ast", "whisper"), "loss_on": ("answer", "all"),
                              "on_error": ("raise", "skip"), "feature_cache_dtype": ("float16", "float32")})
        if self.fraction is not None and self.fraction > 1:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise ConfigError(f"data.{name} must be 3 numbers{' > 0' if name == 'std' else ''}, got {value}")


@dataclass
class EvalConfig:
    metric: str | None = None  # None: from the dataset (vqa / exact_match / caption)
    batch_size: int = 64
    generation: DecodingConfig = field(default_factory=DecodingConfig)
    html_examples: int = 100
    caption_metrics: list[str] | None = None  # None: all (BLEU, METEOR, ROUGE_L, CIDEr, SPICE)

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            self.generation = DecodingConfig(**self.generation)
        check_fields(self, "eval", ranges={"batch_size": (">=", 1), "html_examples": (">=", 0)})
        check_fields(self.generation, "eval.generation",
                     ranges={"max_new_tokens": (">=", 1), "num_beams": (">=", 1), "top_k": (">=", 1),
                             "top_p": (">", 0), "temperature": (">", 0)})


@dataclass
class RunConfig:
    model: EPALMConfig = field(default_factory=EPALMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def task(self) -> str:
        return get_dataset(self.data.dataset).task

    def metric_kind(self) -> str:
        if self.eval.metric:
            return self.eval.metric
        return get_dataset(self.data.eval_dataset or self.data.dataset).metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``, else a string)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str):
    """YAML with the safe loader (and ``1e-3`` read as a float): constructs plain data only."""
    loader = _YAMLLoader(text)  # a SafeLoader: no tags that build Python objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_keys(data: dict, cls: type, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")


def run_config_from_dict(data: dict, source: str = "config") -> RunConfig:
    data = copy.deepcopy(data or {})
    _check_keys(data, RunConfig, source)
    for name in ("model", "data", "train", "eval"):  # an empty section (``eval:``) is YAML null
        if data.get(name) is None:
            data[name] = {}
        elif not isinstance(data[name], dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {data[name]!r}")
    if data["eval"].get("generation") is None:
        data["eval"].pop("generation", None)
    model = EPALMConfig.from_dict(data.get("model", {}), source=f"{source}: model")
    _check_keys(data.get("data", {}), DataConfig, f"{source}: data")
    ev = data.get("eval", {})
    _check_keys(ev, EvalConfig, f"{source}: eval")
    gen = ev.pop("generation", {})
    _check_keys(gen, DecodingConfig, f"{source}: eval.generation")
    try:
        return RunConfig(model=model, data=DataConfig(**data.get("data", {})),
                         train=config_from_dict(data.get("train", {}), source=f"{source}: train"),
                         eval=EvalConfig(generation=DecodingConfig(**gen), **ev))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (values parsed as YAML) applied to a config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = load_yaml(value)
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping with model/data/train/eval sections")
    return run_config_from_dict(apply_overrides(data, overrides or []), source=str(path))


# ------------------------------------------------------------------ building blocks
def processor_for(cfg: RunConfig, tokenizer=None, dataset: str | None = None):
    """The recipe's :class:`~epalm.data.processor.EPALMProcessor` for ``dataset`` (default the training one):
    the registry's default preprocessing of the dataset, overridden by the ``data`` section."""
    from epalm.data.image import RELEASE_MEAN, RELEASE_STD
    from epalm.data.processor import EPALMProcessor, MediaConfig

    d = cfg.data
    spec = get_dataset(dataset or d.dataset)
    media = {"image_size": d.image_size, "audio_features": d.audio_features, **spec.preprocessing}
    media["image_size"] = d.image_size  # the data section's size wins (224 by default, as the paper)
    media["mean"] = list(d.mean or spec.preprocessing.get("mean") or RELEASE_MEAN)
    media["std"] = list(d.std or spec.preprocessing.get("std") or RELEASE_STD)
    if d.num_frames is not None:
        media["num_frames"] = d.num_frames
    return EPALMProcessor(tokenizer, MediaConfig(modality=spec.modality, **media))


def media_loader(cfg: RunConfig, for_cache: bool = False, dataset: str | None = None):
    """The media loader of ``dataset``'s processor (no augmentation when filling a feature cache)."""
    return processor_for(cfg, dataset=dataset).media_loader(augment=cfg.data.augment and not for_cache)


def preprocessing_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    return processor_for(cfg).fingerprint()


def build_datasets(cfg: RunConfig, tokenizer, feature_lookup=None, max_length: int | None = None, processor=None):
    """(train, eval) datasets of the recipe. ``max_length``: text tokens the LM can take (see
    ``epalm.data.text.text_token_limit``); longer training texts are cut (answer kept), longer
    evaluation prompts keep their end, leaving room for the generated tokens. ``processor``: a
    checkpoint's (``epalm eval``), used for the evaluation media when its modality is the
    evaluation dataset's."""
    from epalm.data import CaptionDataset, VQADataset, load_samples

    d = cfg.data
    cls = CaptionDataset if cfg.task == "caption" else VQADataset
    spec = get_dataset(d.dataset)
    root = None if (d.root == DataConfig.root and spec.default_root) else d.root  # "data": the default layout
    common = dict(on_error=d.on_error, loss_on=d.loss_on, feature_lookup=feature_lookup)
    loader = None if feature_lookup is not None else media_loader(cfg)
    train = cls(load_samples(d.dataset, root, d.train_split), tokenizer, split=d.train_split, train=True,
                media_loader=loader, fraction=d.fraction, num_samples=d.num_samples, seed=d.seed,
                max_length=max_length, **common)
    eval_name = d.eval_dataset or d.dataset
    eval_cls = CaptionDataset if get_dataset(eval_name).task == "caption" else VQADataset
    eval_samples = load_samples(eval_name, d.eval_root or root, d.eval_split)
    eval_loader = None
    if feature_lookup is None:
        same = processor is not None and processor.media.modality == get_dataset(eval_name).modality
        eval_loader = processor.media_loader(augment=False) if same else media_loader(cfg, dataset=eval_name)
    eval_length = None if max_length is None else max(2, max_length - cfg.eval.generation.max_new_tokens)
    evaluation = eval_cls(eval_samples, tokenizer, split=d.eval_split, train=False, media_loader=eval_loader,
                          num_samples=d.max_eval_samples, seed=d.seed, max_length=eval_length, **common)
    return train, evaluation


def load_tokenizer(cfg: RunConfig | EPALMConfig):
    """The tokenizer of the LM a recipe (or a model config) names."""
    from epalm.data.processor import load_tokenizer as load
    from epalm.weights.registry import is_registry_name, load_registry_lm

    lm = cfg.model.lm if isinstance(cfg, RunConfig) else cfg.lm
    if is_registry_name(lm):
        _, tok = load_registry_lm(lm)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    name = resolve_name(lm)
    check_model_path(name, "model.lm")
    return load(name)


def build_feature_cache(cfg: RunConfig, encoder, datasets, progress: bool = True):
    """Fill (or reuse, after checking its fingerprint) the frozen-encoder cache for ``datasets``.

    The one open-or-build policy (:func:`epalm.data.feature_cache.open_or_build`): a stale cache
    (other encoder, weights or preprocessing) raises, never reused nor silently replaced.
    """
    from epalm.data.feature_cache import encoder_fingerprint, open_or_build

    fingerprint = encoder_fingerprint(encoder, cfg.model.encoder, preprocessing_fingerprint(cfg),
                                      all_tokens=cfg.model.needs_all_tokens, token_layers=cfg.model.token_layers)
    names = [cfg.data.dataset, cfg.data.eval_dataset or cfg.data.dataset]  # the (train, eval) datasets
    items = {}
    for k, ds in enumerate(datasets):  # each with the loader of its own modality (zero-shot video eval)
        loader = media_loader(cfg, for_cache=True, dataset=names[min(k, 1)])
        for sample in ds.samples:
            items.setdefault(str(sample.media_id), (sample.media_path, loader))
    cache, _ = open_or_build(cfg.data.feature_cache, encoder,
                             [(mid, (lambda p=p, f=f: f(p, False))) for mid, (p, f) in items.items()],
                             fingerprint, batch_size=cfg.eval.batch_size, dtype=cfg.data.feature_cache_dtype,
                             progress=progress)
    return cache


# what a training run keeps in its folder: ``epalm train`` never replaces them without --overwrite
RUN_ARTEFACTS = ("checkpoint", "best", ".checkpoint.tmp", ".checkpoint.old", ".best.tmp", ".best.old")
# logs appended to by a run: a fresh run starts them again (also removed by --overwrite: the rest)
RUN_LOGS = ("metrics.csv", "eval.csv")
REPLACED = ("run_config.json", "curves.png", "tensorboard")
# data fields a resumed run may change (where the files are; evaluation only)
DATA_RESUMABLE = ("root", "eval_root", "feature_cache", "eval_dataset", "eval_split", "max_eval_samples")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds another run's checkpoints, unless resuming it or
    ``overwrite``. A fresh run starts its logs (metrics.csv, eval.csv) from scratch."""
    import shutil

    if out.exists() and not out.is_dir():
        raise RunDirError(f"train.output_dir {out} is a file, not a folder")
    if resume or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if p.name in RUN_ARTEFACTS)
    if found and not overwrite:
        raise RunDirError(f"train.output_dir {out} already holds a run ({', '.join(found)}): pass --resume to "
                          "continue it, or --overwrite to start again and replace it")
    if int(os.environ.get("RANK", "0")) != 0:  # distributed: the main process cleans up, once
        return
    extra = (*RUN_LOGS, *REPLACED) if overwrite else RUN_LOGS
    for name in [*found, *(n for n in extra if (out / n).exists())]:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if overwrite:
        for path in out.glob("eval_epoch*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_train(cfg: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
              allow_fresh: bool = False) -> dict[str, Any]:
    """Train the recipe; evaluate each epoch; keep ``best/``; write curves, predictions and HTML.

    A folder that already holds a run is refused unless ``resume`` (continue it; with no checkpoint
    that is an error unless ``allow_fresh``) or ``overwrite`` (its run artefacts are removed)."""
    from accelerate.utils import set_seed

    from epalm.data import make_collate_fn
    from epalm.data.text import text_token_limit
    from epalm.io import atomic_write_json
    from epalm.core.model import EPALM
    from epalm.training.trainer import Trainer

    out = Path(cfg.train.output_dir)
    prepare_run_dir(out, resume, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"train.output_dir {out}: cannot create it ({err.strerror or err})") from err
    set_seed(cfg.train.seed)  # the connectors' initialisation must not depend on what ran before
    tokenizer = load_tokenizer(cfg)
    model = EPALM.from_config(cfg.model)
    model.processor = processor_for(cfg, tokenizer)  # saved with every checkpoint (best/, checkpoint/)
    lookup = None
    if cfg.data.feature_cache and not cfg.data.augment:
        train_plain, eval_plain = build_datasets(cfg, tokenizer)
        lookup = build_feature_cache(cfg, model.encoder, [train_plain, eval_plain], progress)
    train_ds, eval_ds = build_datasets(cfg, tokenizer, feature_lookup=lookup, max_length=text_token_limit(model))
    d = cfg.data
    for ds, split, root in ((train_ds, d.train_split, d.root), (eval_ds, d.eval_split, d.eval_root or d.root)):
        if len(ds) == 0:
            raise UserError(f"data: split {split!r} of {d.eval_dataset if ds is eval_ds and d.eval_dataset else d.dataset}"
                            f" in {root} has no samples: nothing to {'train on' if ds is train_ds else 'evaluate'}")
    collate = make_collate_fn(tokenizer)

    def evaluate(m, epoch):  # sharded over the processes of a distributed run, gathered on each
        return evaluate_and_write(cfg, m, eval_ds, collate, tokenizer, out / f"eval_epoch{epoch}", progress,
                                  accelerator=trainer.accelerator)

    data_fp = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in DATA_RESUMABLE}
    trainer = Trainer(model, train_ds, collate, cfg.train, evaluate=evaluate, fingerprint={"data": data_fp})
    if resume:
        trainer.resume_or_start(allow_fresh)  # checks the checkpoint fits before anything is written
    atomic_write_json(out / "run_config.json", cfg.to_dict())
    state = trainer.train()
    return state


def evaluate_and_write(cfg: RunConfig, model, dataset, collate, tokenizer, out_dir: Path,
                       progress: bool = True, accelerator=None) -> dict[str, Any]:
    from epalm.evaluation.evaluate import predict, score, write_examples_html, write_predictions

    rows = predict(model, dataset, collate, tokenizer, cfg.eval.generation, cfg.eval.batch_size,
                   accelerator=accelerator, progress=progress, num_workers=cfg.train.num_workers)
    kind = cfg.metric_kind()
    scores = score(kind, rows, cfg.eval.caption_metrics)
    if accelerator is None or accelerator.is_main_process:
        write_predictions(out_dir, kind, rows, scores)
        paths = {s.id: str(s.media_path) for s in getattr(dataset, "samples", [])}
        write_examples_html(out_dir / "examples.html", rows, paths, limit=cfg.eval.html_examples)
    return scores


def run_eval(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved model (``save_pretrained`` folder) on the recipe's evaluation split."""
    from epalm.data import make_collate_fn
    from epalm.core.model import EPALM

    from epalm.data.processor import PROCESSOR_NAME, EPALMProcessor

    model = EPALM.from_pretrained(checkpoint)
    cfg = dataclasses.replace(cfg, model=model.config)
    processor = None
    if (Path(checkpoint) / PROCESSOR_NAME).is_file():  # the preprocessing and tokenizer saved with the weights
        processor = EPALMProcessor.from_pretrained(checkpoint)
        tokenizer = processor.tokenizer
    else:
        tokenizer = load_tokenizer(dataclasses.replace(cfg.model, lm=resolve_name(cfg.model.lm, checkpoint)))
    _, eval_ds = build_datasets(cfg, tokenizer, processor=processor)
    out = Path(out_dir or Path(checkpoint) / "eval")
    return evaluate_and_write(cfg, model, eval_ds, make_collate_fn(tokenizer), tokenizer, out, progress)
