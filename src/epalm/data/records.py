"""Plain records produced by the readers: one per question (QA) or per media item (captions).

Every record carries ``id`` (the id that the official result formats use: VQA/GQA question id,
COCO ``cocoid``, MSR-VTT ``video_id``, ...) and ``media_id``, which is always the media file's
*stem* (``COCO_val2014_000000000042``, ``n356822``, ``video7010``, ``--L22BmDI6E``). Using the stem
everywhere gives one stable key for feature caches, whatever annotation format named the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Modality", "QASample", "CaptionSample"]

Modality = Literal["image", "video", "audio"]


@dataclass
class QASample:
    """One question about one media item.

    ``answers`` keeps every ground-truth answer (VQA v2: the 10 human answers, repeats included, so
    sampling from it is frequency-weighted); ``weights``, when given, are per-answer scores from
    formats that store ``{"answer": score}`` dicts instead (VL-T5/release ``label``).
    """

    id: int | str
    media_id: str
    media_path: Path
    question: str
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    weights: list[float] | None = None
    modality: Modality = "image"
    template: str | None = None  # the question's template family, where the data set has them (easy-VQA)

    def most_common_answer(self) -> str | None:
        """The reference answer used for deterministic targets (highest weight/count, first wins)."""
        if not self.answers:
            return None
        if self.weights is not None:
            best = max(range(len(self.answers)), key=lambda i: (self.weights[i], -i))
            return self.answers[best]
        counts: dict[str, int] = {}
        for a in self.answers:
            counts[a] = counts.get(a, 0) + 1
        return max(counts, key=lambda a: counts[a])  # dicts keep first-seen order on ties


@dataclass
class CaptionSample:
    """One media item with all of its reference captions."""

    id: int | str
    media_id: str
    media_path: Path
    captions: list[str] = field(default_factory=list)
    modality: Modality = "image"
