"""One-file inference shared by ``epalm predict`` and ``epalm demo``: load a checkpoint with the
training run's preprocessing, answer a question about one image / video / audio file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MODALITIES = ("image", "video", "audio")
_DATASET_OF = {"image": "coco", "video": "msrvtt_qa", "audio": "audiocaps"}  # picks recipe.media_loader's kind


def modality_of(model) -> str:
    """``"image"``, ``"video"`` or ``"audio"``: what the model's encoder reads."""
    modality = getattr(model.encoder, "modality", "image") if model.encoder is not None else None
    if modality not in MODALITIES:
        raise ValueError(f"cannot demo a model whose encoder modality is {modality!r} "
                         f"(the demo needs an encoder; one of {', '.join(MODALITIES)})")
    return modality


def load_checkpoint(checkpoint: str | os.PathLike, image_size: int | None = None,
                    device: str | None = None):
    """``(model, tokenizer, media_loader, modality)`` for a ``save_pretrained`` folder.

    Preprocessing is the training run's (``RUN/run_config.json`` next to ``RUN/best``), as in
    ``epalm predict``; ``image_size`` overrides it. ``device``: default CUDA when available.
    """
    import torch

    from .model import EPALM
    from .recipe import DataConfig, RunConfig, load_tokenizer, media_loader

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder (a save_pretrained folder, e.g. RUN/best)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EPALM.from_pretrained(checkpoint, device=device).eval()
    modality = modality_of(model)
    run_config = checkpoint.parent / "run_config.json"
    trained = json.loads(run_config.read_text()).get("data", {}) if run_config.is_file() else {}
    encoder_size = getattr(getattr(model.encoder, "image_encoder", model.encoder), "image_size", None)
    size = image_size or trained.get("image_size") or (encoder_size[0] if encoder_size else 224)
    keep = {k: trained[k] for k in ("mean", "std", "num_frames", "audio_features") if trained.get(k) is not None}
    cfg = RunConfig(model=model.config, data=DataConfig(dataset=_DATASET_OF[modality], image_size=size, **keep))
    return model, load_tokenizer(cfg), media_loader(cfg, for_cache=True), modality


def answer_question(model, tokenizer, media_loader, media_path: str | os.PathLike, question: str = "",
                    num_beams: int = 3, max_new_tokens: int = 10) -> dict[str, Any]:
    """``{"answer": str, "seconds": float}`` for one media file; an empty question asks for a caption.

    ``seconds`` covers decoding the file, the encoder and generation.
    """
    import torch

    from .data import vqa_prompt
    from .data.text import encode_prompt, text_token_limit

    num_beams, max_new_tokens = int(num_beams), int(max_new_tokens)
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    media = media_loader(media_path, False).unsqueeze(0).to(device)
    question = (question or "").strip()
    ids = torch.tensor([encode_prompt(tokenizer, vqa_prompt(question) if question else "")], device=device)
    limit = text_token_limit(model)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"the question is too long: {ids.shape[1]} tokens + {max_new_tokens} new tokens, but this "
                         f"model's LM takes at most {limit} text tokens; shorten the question or max_new_tokens")
    new = model.generate(media=media, input_ids=ids, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(new[0], skip_special_tokens=True).strip()
    return {"answer": answer, "seconds": round(time.perf_counter() - t0, 3)}


