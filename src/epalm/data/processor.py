"""EPALMProcessor: everything between a media file + a question and the model's inputs, saved with the weights.

Like transformers' ``LlavaProcessor`` / ``AutoProcessor``, one object holds

* the media preprocessing (:class:`MediaConfig`): modality, image size, mean/std, resize rule,
  transparency background, video frames, audio feature kind and its parameters;
* the tokenizer;
* the prompt template (:class:`PromptTemplate`): ``question?</a>`` for QA, a fixed (usually
  empty) prompt for captions;
* the decoding the run evaluated with (``decoding``: beams, new tokens), the defaults of
  ``epalm predict`` and ``epalm demo``.

``save_pretrained(folder)`` writes ``epalm_processor.json`` and the tokenizer's files next to the
weights (``EPALM.save_pretrained(folder, processor=...)`` calls it); ``from_pretrained(folder)``
restores it. Training, the feature cache's fingerprint, evaluation, ``epalm predict`` and
``epalm demo`` all preprocess through it, so a checkpoint answers exactly as its run evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epalm.data.image import RELEASE_MEAN, RELEASE_STD, RESIZE_RULES
from epalm.data.text import DEFAULT_SEPARATOR, encode_prompt, pad_token_id_of, vqa_prompt
from epalm.io import atomic_write_json

__all__ = ["PROCESSOR_NAME", "MediaConfig", "PromptTemplate", "EPALMProcessor", "dataclass_from_dict", "load_tokenizer"]

PROCESSOR_NAME = "epalm_processor.json"
MODALITIES = ("image", "video", "audio")


@dataclass
class MediaConfig:
    """How a media file becomes encoder input (the feature cache fingerprints all of it)."""

    modality: str = "image"  # "image" | "video" | "audio"
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(RELEASE_MEAN))
    std: list[float] = field(default_factory=lambda: list(RELEASE_STD))
    resize: str = "bicubic"  # "bicubic" | "pad-square" (pad to a white square first)
    background: str | None = None  # "white": transparent pixels on white
    num_frames: int | None = None  # video (default 8)
    audio_features: str = "ast"  # "ast" | "whisper"
    audio_kwargs: dict = field(default_factory=dict)  # e.g. {"context_frames": 400} (Whisper clips)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"media.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"media.resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.audio_features not in ("ast", "whisper"):
            raise ValueError(f"media.audio_features must be 'ast' or 'whisper', got {self.audio_features!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"media.image_size must be a positive integer, got {self.image_size!r}")
        self.mean, self.std = [float(x) for x in self.mean], [float(x) for x in self.std]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"media.mean and media.std need 3 values (RGB), got {self.mean} and {self.std}")

    def fingerprint(self) -> dict[str, Any]:
        """The entries that change encoder input, for :func:`epalm.data.feature_cache.encoder_fingerprint`."""
        out: dict[str, Any] = {"modality": self.modality}
        if self.modality in ("image", "video"):
            out.update(image_size=self.image_size, mean=self.mean, std=self.std, resize=self.resize,
                       background=self.background)
        if self.modality == "video":
            out["num_frames"] = self.num_frames or 8
        if self.modality == "audio":
            out.update(audio_features=self.audio_features, audio_kwargs=self.audio_kwargs)
        return out


@dataclass
class PromptTemplate:
    """QA prompt ``question?<separator>`` (the release's); a question-less prompt for captions."""

    separator: str = DEFAULT_SEPARATOR
    question_mark: str = "auto"  # "auto" | "always"
    caption_prompt: str = ""

    def __post_init__(self) -> None:
        if self.question_mark not in ("auto", "always"):
            raise ValueError(f"prompt.question_mark must be 'auto' or 'always', got {self.question_mark!r}")

    def text(self, question: str | None = None) -> str:
        """The prompt for ``question`` (empty or None: the caption prompt)."""
        question = (question or "").strip()
        if not question:
            return self.caption_prompt
        return vqa_prompt(question, self.separator, question_mark=self.question_mark)


def dataclass_from_dict(cls, data: Any, where: str):
    """``cls(**data)`` with an error naming ``where`` and the valid keys for a non-mapping or unknown key."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


class EPALMProcessor:
    """Media preprocessing + tokenizer + prompt template of one model (see the module doc)."""

    def __init__(self, tokenizer: Any = None, media: MediaConfig | None = None,
                 prompt: PromptTemplate | None = None, decoding: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.media = media or MediaConfig()
        self.prompt = prompt or PromptTemplate()
        # the decoding the run evaluated with ({"num_beams", "max_new_tokens"}): predict / demo defaults
        self.decoding = dict(decoding or {})
        unknown = sorted(set(self.decoding) - {"num_beams", "max_new_tokens"})
        if unknown:
            raise ValueError(f"decoding: unknown key(s) {unknown}; valid keys: ['max_new_tokens', 'num_beams']")
        self._loaders: dict[bool, Any] = {}

    def __repr__(self) -> str:
        return (f"EPALMProcessor(media={self.media}, prompt={self.prompt}, "
                f"tokenizer={type(self.tokenizer).__name__})")

    # ------------------------------------------------------------------ media
    def media_loader(self, augment: bool = False):
        """``loader(path, train) -> tensor`` for this modality (``augment``: training augmentation)."""
        if augment not in self._loaders:
            m = self.media
            if m.modality == "image":
                from epalm.data.image import ImageLoader

                loader = ImageLoader(m.image_size, m.mean, m.std, augment=augment, resize=m.resize,
                                     background=m.background)
            elif m.modality == "video":
                from epalm.data.video import VideoLoader

                loader = VideoLoader(num_frames=m.num_frames or 8, size=m.image_size, mean=m.mean, std=m.std,
                                     augment=augment)
            else:
                from epalm.data.audio import AudioLoader

                loader = AudioLoader(m.audio_features, augment=augment, **m.audio_kwargs)
            self._loaders[augment] = loader
        return self._loaders[augment]

    def load_media(self, path: str | os.PathLike, train: bool = False) -> torch.Tensor:
        """One file as encoder input, without batch dimension (no augmentation unless ``train``)."""
        return self.media_loader(augment=train)(path, train)

    def fingerprint(self) -> dict[str, Any]:
        return self.media.fingerprint()

    # ------------------------------------------------------------------ text
    def prompt_text(self, question: str | None = None) -> str:
        return self.prompt.text(question)

    def encode_prompt(self, question: str | None = None) -> list[int]:
        """``[BOS] + prompt`` token ids for generation."""
        return encode_prompt(self.tokenizer, self.prompt_text(question))

    @property
    def pad_token_id(self) -> int:
        return pad_token_id_of(self.tokenizer)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def __call__(self, media_path: str | os.PathLike | None = None, question: str | None = None,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """Model inputs for one example: ``media`` (1, ...), ``input_ids`` and ``attention_mask`` (1, T)."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        ids = torch.tensor([self.encode_prompt(question)])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if media_path is not None:
            out["media"] = self.load_media(media_path).unsqueeze(0)
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"media": dataclasses.asdict(self.media), "prompt": dataclasses.asdict(self.prompt),
                "decoding": dict(self.decoding)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], tokenizer: Any = None, source: str = "processor") -> "EPALMProcessor":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: must be a mapping with 'media' and 'prompt'")
        unknown = sorted(set(data) - {"media", "prompt", "decoding"})
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: ['decoding', 'media', 'prompt']")
        return cls(tokenizer, dataclass_from_dict(MediaConfig, data.get("media"), f"{source}: media"),
                   dataclass_from_dict(PromptTemplate, data.get("prompt"), f"{source}: prompt"), data.get("decoding"))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``epalm_processor.json`` (atomic) and the tokenizer's files into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            if not hasattr(self.tokenizer, "save_pretrained"):
                raise TypeError(f"cannot save a {type(self.tokenizer).__name__} tokenizer (no save_pretrained); "
                                "use a transformers tokenizer")
            self.tokenizer.save_pretrained(path)
        atomic_write_json(path / PROCESSOR_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer: Any = None) -> "EPALMProcessor":
        """Restore a processor saved by :meth:`save_pretrained` (``tokenizer``: use this one instead)."""
        path = Path(path)
        file = path / PROCESSOR_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no processor saved with this checkpoint (a checkpoint written by "
                                    "epalm saves one; for an older one build an EPALMProcessor and save it there)")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: cannot read the processor: {err}") from err
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        return cls.from_dict(data, tokenizer, source=str(file))


def load_tokenizer(name_or_path: str | os.PathLike):
    """``AutoTokenizer`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
