"""One-file inference shared by ``epalm predict`` and ``epalm demo``: load a checkpoint with the
processor saved next to its weights, answer a question about one image / video / audio file."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from epalm.data.processor import MODALITIES, EPALMProcessor

__all__ = ["MODALITIES", "answer_question", "decoding_defaults", "load_checkpoint", "modality_of"]


def modality_of(model, processor: EPALMProcessor | None = None) -> str:
    """``"image"``, ``"video"`` or ``"audio"``: what the checkpoint reads (its processor's modality)."""
    modality = processor.media.modality if processor is not None else (
        getattr(model.encoder, "modality", "image") if model.encoder is not None else None)
    if modality not in MODALITIES:
        raise ValueError(f"cannot demo a model whose encoder modality is {modality!r} "
                         f"(the demo needs an encoder; one of {', '.join(MODALITIES)})")
    return modality


def load_checkpoint(checkpoint: str | os.PathLike, image_size: int | None = None,
                    device: str | None = None) -> tuple[Any, EPALMProcessor]:
    """``(model, processor)`` for a ``save_pretrained`` folder.

    The preprocessing, tokenizer and prompt template are the processor saved with the weights
    (``epalm_processor.json``), exactly those of training and of the run's evaluation;
    ``image_size`` overrides the processor's on purpose. ``device``: default CUDA when available.
    """
    import torch

    from epalm.core.model import EPALM

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder (a save_pretrained folder, e.g. RUN/best)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EPALM.from_pretrained(checkpoint, device=device).eval()
    processor = EPALMProcessor.from_pretrained(checkpoint)
    if image_size is not None:
        processor.media.image_size = int(image_size)
    if model.encoder is None:
        raise ValueError(f"{checkpoint}: the model has no encoder (trained on cached features only); "
                         "its epalm_config.json must name one")
    modality_of(model, processor)
    return model, processor


DEFAULT_DECODING = {"num_beams": 3, "max_new_tokens": 10}


def decoding_defaults(processor: EPALMProcessor) -> dict[str, int]:
    """The decoding the checkpoint's run evaluated with (saved in its processor), else 3 beams / 10 tokens."""
    return {**DEFAULT_DECODING, **processor.decoding}


def answer_question(model, processor: EPALMProcessor, media_path: str | os.PathLike, question: str = "",
                    num_beams: int | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """``{"answer": str, "seconds": float}`` for one media file; an empty question asks for a caption.

    ``num_beams`` / ``max_new_tokens``: default :func:`decoding_defaults` (the run's evaluation).
    ``seconds`` covers decoding the file, the encoder and generation.
    """
    import torch

    from epalm.data.text import text_token_limit

    defaults = decoding_defaults(processor)
    num_beams = defaults["num_beams"] if num_beams is None else num_beams
    max_new_tokens = defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    num_beams, max_new_tokens = int(num_beams), int(max_new_tokens)
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    inputs = {k: v.to(device) for k, v in processor(media_path, question).items()}
    tok = processor.tokenizer
    limit = text_token_limit(model)
    length = inputs["input_ids"].shape[1]
    if limit is not None and length + max_new_tokens > limit:
        raise ValueError(f"the question is too long: {length} tokens + {max_new_tokens} new tokens, but this "
                         f"model's LM takes at most {limit} text tokens; shorten the question or max_new_tokens")
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             pad_token_id=processor.pad_token_id, eos_token_id=tok.eos_token_id)
    return {"answer": processor.decode(new[0]), "seconds": round(time.perf_counter() - t0, 3)}
