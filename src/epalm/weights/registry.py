"""Registry names of the packaged weights: what a portable ``epalm_config.json`` may record.

A checkpoint names its frozen parts ``"weights:<name>"`` (e.g. ``weights:smollm2-135m-instruct``,
``weights:dinov2-small``) instead of the path of its converted copy in the user's cache, so it
loads on any machine that has the package installed: the weights are converted on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PREFIX = "weights:"


def _smollm2(**kwargs):
    from epalm.weights.gguf_lm import load_smollm2

    return load_smollm2(**kwargs)


def _gemma3(**kwargs):
    from epalm.weights.gguf_lm import load_gemma3_270m

    return load_gemma3_270m(**kwargs)


def _dinov2_small(num_layers: int, image_size: int | None = None):
    from epalm.core.encoders import wrap_hf_encoder
    from epalm.weights.onnx_dinov2 import load_dinov2_small

    model, _ = load_dinov2_small(image_size=image_size)
    return wrap_hf_encoder(model, num_layers=min(num_layers, model.config.num_hidden_layers))


def _whisper_base(num_layers: int, context_frames: int = 3000, pooling: str = "audio"):
    from epalm.core.encoders import WhisperClipEncoder
    from epalm.weights.ctranslate2_whisper import load_whisper_base

    model, _, _ = load_whisper_base(for_generation=False)
    return WhisperClipEncoder(model, num_layers, context_frames, pooling)


LMS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "smollm2-135m-instruct": _smollm2,
    "gemma3-270m": _gemma3,
}
ENCODERS: dict[str, Callable[..., Any]] = {
    "dinov2-small": _dinov2_small,
    "whisper-base": _whisper_base,
}


def is_registry_name(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _lookup(table: dict, name: str, what: str):
    key = name.removeprefix(PREFIX)
    if key not in table:
        raise ValueError(f"unknown registry {what} {name!r}; known: {', '.join(PREFIX + k for k in table)}")
    return table[key]


def load_registry_lm(name: str, **kwargs) -> tuple[Any, Any]:
    """``(causal LM, tokenizer)`` of a registry name (``weights:smollm2-135m-instruct``)."""
    return _lookup(LMS, name, "LM")(**kwargs)


def load_registry_encoder(name: str, num_layers: int = 6, **kwargs):
    """An :class:`epalm.core.encoders.Encoder` of a registry name (``weights:dinov2-small``, ``weights:whisper-base``);
    ``kwargs``: ``image_size`` (DINOv2), ``context_frames`` / ``pooling`` (Whisper)."""
    return _lookup(ENCODERS, name, "encoder")(num_layers=num_layers, **kwargs)
