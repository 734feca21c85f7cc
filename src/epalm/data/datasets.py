"""Torch datasets tying a reader's records, a media loader (or a feature cache) and the text side.

Each item is a dict::

    sample_id, media_id          ids for official result files and feature caches
    media | features             the loaded media tensor, or feature_lookup(media_id) (a callable or a mapping)
    prompt_ids                   [BOS] + prompt tokens, for generation
    input_ids, labels            the full training example (absent when there is no reference)
    question, answers, answer, answer_type   (QA)   or   references, caption   (captions)

Use :func:`~epalm.data.text.make_collate_fn` as the ``DataLoader``'s ``collate_fn``.

With ``on_error="raise"`` a broken media file or a missing cached feature raises
:class:`~epalm.errors.MediaError` naming it; with ``"skip"`` the item becomes ``None`` (the
collator drops it), a :class:`SkippedSampleWarning` names the sample and the file, and the sample
id is appended to ``dataset.skipped`` (in the process that loaded it). A sample is never replaced by
another one.
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from epalm.errors import MediaError
from epalm.data.records import CaptionSample, QASample
from epalm.data.text import DEFAULT_SEPARATOR, encode_example, encode_prompt, truncate_prompt, vqa_prompt
from epalm.data.text import add_separator_token as _add_separator_token

__all__ = [
    "SkippedSampleWarning",
    "few_shot_indices",
    "default_media_loader",
    "load_samples",
    "VQADataset",
    "CaptionDataset",
]

OnError = Literal["raise", "skip"]
MediaLoaderFn = Callable[[Path, bool], torch.Tensor]
FeatureLookup = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]  # e.g. a FeatureCache


class SkippedSampleWarning(UserWarning):
    """A sample was skipped because its media (or cached feature) could not be loaded."""


def few_shot_indices(
    n: int, fraction: float | None = None, *, num_samples: int | None = None, seed: int = 0
) -> list[int]:
    """Sorted indices of a seeded random subset: ``max(1, int(fraction * n))`` or ``num_samples`` items.

    Deterministic for a given (n, fraction/num_samples, seed), so few-shot runs are reproducible.
    """
    if fraction is not None and num_samples is not None:
        raise ValueError("pass either fraction or num_samples, not both")
    if n == 0:
        return []
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], not {fraction}")
        k = max(1, int(fraction * n))
    elif num_samples is not None:
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        k = min(num_samples, n)
    else:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def default_media_loader(modality: str, task: Literal["qa", "caption"] = "qa") -> MediaLoaderFn:
    """The paper's defaults: 224px images; 8 (QA) or 16 (captioning) 224px video frames; AST fbanks."""
    if modality == "image":
        from epalm.data.image import ImageLoader

        return ImageLoader()
    if modality == "video":
        from epalm.data.video import VideoLoader

        return VideoLoader(num_frames=16 if task == "caption" else 8)
    if modality == "audio":
        from epalm.data.audio import AudioLoader

        return AudioLoader("ast")
    raise ValueError(f"unknown modality {modality!r}")


class _MediaTextDataset(Dataset):
    """Shared machinery: subset selection, media/feature loading and the on_error policy."""

    task: Literal["qa", "caption"] = "qa"

    def __init__(
        self,
        tokenizer: Any,
        *,
        split: str | None,
        train: bool,
        media_loader: MediaLoaderFn | None,
        feature_lookup: FeatureLookup | None,
        on_error: OnError,
        loss_on: Literal["answer", "all"],
        max_length: int | None,
        add_bos: bool | None,
        modality: str,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.tokenizer = tokenizer
        self.split, self.train, self.on_error = split, train, on_error
        self.loss_on, self.max_length, self.add_bos = loss_on, max_length, add_bos
        self.feature_lookup = feature_lookup
        if feature_lookup is None and media_loader is None:
            media_loader = default_media_loader(modality, self.task)
        self.media_loader = media_loader
        try:
            self._loader_takes_generator = "generator" in inspect.signature(media_loader).parameters
        except (TypeError, ValueError):
            self._loader_takes_generator = False
        self.skipped: list[Any] = []

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.get(index)

    def get(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any] | None:
        """Item ``index`` with every random draw (augmentation, answer choice) taken from ``generator``
        (the global torch RNG when None). The trainer seeds it by (seed, epoch, index)."""
        raise NotImplementedError

    def _load_media(self, sample: QASample | CaptionSample,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if self.feature_lookup is not None:
            try:
                lookup = self.feature_lookup
                feats = lookup(sample.media_id) if callable(lookup) else lookup[sample.media_id]
            except MediaError:
                raise
            except Exception as e:  # a cache miss must name the media id, whatever the cache raises
                raise MediaError(sample.media_id, f"no cached feature ({type(e).__name__}: {e})") from e
            if not isinstance(feats, torch.Tensor):
                raise MediaError(sample.media_id, f"feature_lookup returned {type(feats).__name__}, not a Tensor")
            return {"features": feats}
        if self._loader_takes_generator:
            return {"media": self.media_loader(sample.media_path, self.train, generator=generator)}
        return {"media": self.media_loader(sample.media_path, self.train)}

    def _encode(self, prompt: str, target: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_ids": torch.tensor(self._prompt_ids(prompt), dtype=torch.long)
        }
        if target is not None:
            enc = encode_example(
                self.tokenizer, prompt, target, loss_on=self.loss_on, add_bos=self.add_bos, max_length=self.max_length
            )
            out["input_ids"] = torch.tensor(enc.input_ids, dtype=torch.long)
            out["labels"] = torch.tensor(enc.labels, dtype=torch.long)
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt, add_bos=self.add_bos)
        bos = int(self.add_bos if self.add_bos is not None else self.tokenizer.bos_token_id is not None)
        return truncate_prompt(ids, self.max_length, keep_first=bos)

    def _guard(self, sample: QASample | CaptionSample, build: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            return build()
        except MediaError as e:
            if self.on_error == "raise":
                raise
            self.skipped.append(sample.id)
            warnings.warn(
                f"skipping sample {sample.id!r} (media {sample.media_id!r}): {e}", SkippedSampleWarning, stacklevel=3
            )
            return None


class VQADataset(_MediaTextDataset):
    """Question answering on images, videos or audio (VQA v2, GQA, MSRVTT-QA, MSVD-QA).

    ``answer_choice`` picks the training target: ``"sample"`` draws one of the reference answers
    (frequency- or weight-proportional, as the release does), ``"most_common"`` takes the majority
    answer; the default is ``"sample"`` when ``train`` else ``"most_common"``.
    ``fraction``/``num_samples`` keep a seeded few-shot subset of the questions.
    ``add_separator_token=True`` registers the separator in ``tokenizer`` itself (see
    :func:`~epalm.data.text.add_separator_token`), so the model must use that same tokenizer.
    """

    task = "qa"

    def __init__(
        self,
        samples: Sequence[QASample],
        tokenizer: Any,
        *,
        split: str | None = None,
        train: bool = False,
        media_loader: MediaLoaderFn | None = None,
        feature_lookup: FeatureLookup | None = None,
        fraction: float | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        on_error: OnError = "raise",
        separator: str = DEFAULT_SEPARATOR,
        add_separator_token: bool = False,
        num_embeddings: int | None = None,
        question_mark: Literal["auto", "always"] = "auto",
        answer_choice: Literal["sample", "most_common"] | None = None,
        loss_on: Literal["answer", "all"] = "answer",
        max_length: int | None = None,
        add_bos: bool | None = None,
    ) -> None:
        samples = list(samples)
        super().__init__(
            tokenizer,
            split=split,
            train=train,
            media_loader=media_loader,
            feature_lookup=feature_lookup,
            on_error=on_error,
            loss_on=loss_on,
            max_length=max_length,
            add_bos=add_bos,
            modality=samples[0].modality if samples else "image",
        )
        self.samples = [
            samples[i] for i in few_shot_indices(len(samples), fraction, num_samples=num_samples, seed=seed)
        ]
        self.separator, self.question_mark = separator, question_mark
        if add_separator_token:
            _add_separator_token(tokenizer, separator, num_embeddings)
        self.answer_choice = answer_choice or ("sample" if train else "most_common")
        if self.answer_choice not in ("sample", "most_common"):
            raise ValueError(f"answer_choice must be 'sample' or 'most_common', not {answer_choice!r}")

    @classmethod
    def from_name(cls, name: str, root: str | Path, split: str, tokenizer: Any, **kwargs: Any) -> VQADataset:
        """Build from the release's ``data/`` layout (:func:`load_samples`).

        Example: ``VQADataset.from_name("vqa_v2", "data", "karpathy_train", tok, train=True)``.
        """
        return cls(load_samples(name, root, split), tokenizer, split=split, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def choose_answer(self, sample: QASample, generator: torch.Generator | None = None) -> str | None:
        """The training target for this access (random when ``answer_choice == "sample"``)."""
        if not sample.answers:
            return None
        if self.answer_choice == "most_common":
            return sample.most_common_answer()
        if sample.weights is not None:
            w = torch.tensor(sample.weights, dtype=torch.float)
            if float(w.sum()) <= 0:
                return sample.most_common_answer()
            return sample.answers[int(torch.multinomial(w, 1, generator=generator))]
        return sample.answers[int(torch.randint(0, len(sample.answers), (), generator=generator))]

    def get(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any] | None:
        sample = self.samples[index]

        def build() -> dict[str, Any]:
            item: dict[str, Any] = {
                "sample_id": sample.id,
                "media_id": sample.media_id,
                **self._load_media(sample, generator),
                "question": sample.question,
                "answers": list(sample.answers),
                "answer_type": sample.answer_type,
            }
            answer = self.choose_answer(sample, generator)
            prompt = vqa_prompt(sample.question, self.separator, question_mark=self.question_mark)
            item.update(self._encode(prompt, answer))
            if answer is not None:
                item["answer"] = answer
            return item

        return self._guard(sample, build)


class CaptionDataset(_MediaTextDataset):
    """Captioning of images, videos or audio (COCO, MSR-VTT, AudioCaps).

    With ``expand_captions`` (default: when ``train``) every (media, caption) pair is one item, as in
    the release; otherwise one item per media, whose target is a random caption when training and
    the first caption otherwise. ``fraction``/``num_samples`` subsample the items after expansion.
    ``prompt`` is an optional task prompt placed before the caption, separated by a space (the
    release's default: no prompt, so generation starts from BOS alone).
    """

    task = "caption"

    def __init__(
        self,
        samples: Sequence[CaptionSample],
        tokenizer: Any,
        *,
        split: str | None = None,
        train: bool = False,
        media_loader: MediaLoaderFn | None = None,
        feature_lookup: FeatureLookup | None = None,
        fraction: float | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        on_error: OnError = "raise",
        expand_captions: bool | None = None,
        prompt: str = "",
        loss_on: Literal["answer", "all"] = "answer",
        max_length: int | None = None,
        add_bos: bool | None = None,
    ) -> None:
        samples = list(samples)
        super().__init__(
            tokenizer,
            split=split,
            train=train,
            media_loader=media_loader,
            feature_lookup=feature_lookup,
            on_error=on_error,
            loss_on=loss_on,
            max_length=max_length,
            add_bos=add_bos,
            modality=samples[0].modality if samples else "image",
        )
        self.samples = samples
        self.prompt = prompt
        expand = train if expand_captions is None else expand_captions
        index: list[tuple[int, int | None]] = []
        for i, s in enumerate(samples):
            if expand and s.captions:
                index.extend((i, k) for k in range(len(s.captions)))
            else:
                index.append((i, None))
        self.index = [index[i] for i in few_shot_indices(len(index), fraction, num_samples=num_samples, seed=seed)]

    @classmethod
    def from_name(cls, name: str, root: str | Path, split: str, tokenizer: Any, **kwargs: Any) -> CaptionDataset:
        """Build from the release's ``data/`` layout (:func:`load_samples`).

        Example: ``CaptionDataset.from_name("coco", "data", "train", tok, train=True)``.
        """
        return cls(load_samples(name, root, split), tokenizer, split=split, **kwargs)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any] | None:
        si, ci = self.index[index]
        sample = self.samples[si]

        def build() -> dict[str, Any]:
            item: dict[str, Any] = {
                "sample_id": sample.id,
                "media_id": sample.media_id,
                **self._load_media(sample, generator),
                "references": list(sample.captions),
            }
            caption = None
            if ci is not None:
                caption = sample.captions[ci]
            elif sample.captions:
                k = int(torch.randint(0, len(sample.captions), (), generator=generator)) if self.train else 0
                caption = sample.captions[k]
            target = None
            if caption is not None:  # after a task prompt, the caption follows a space (release: prompt + " " + t)
                target = caption.strip()
                if self.prompt and not self.prompt[-1].isspace():
                    target = " " + target
            item.update(self._encode(self.prompt, target))
            if caption is not None:
                item["caption"] = caption
            return item

        return self._guard(sample, build)


# --------------------------------------------------------------------------- named datasets
def load_samples(name: str, root: str | Path | None, split: str, **options: Any) -> list[QASample] | list[CaptionSample]:
    """Read a registered dataset (:mod:`epalm.data.registry`; the benchmarks in the release's
    ``data/`` layout, see :mod:`epalm.data.readers`).

    ``name``: ``vqa_v2`` (Karpathy files ``vqa/<split>.json``, e.g. ``karpathy_train``),
    ``vqa_v2_standard`` (``split`` = ``train``/``val``/``test``), ``gqa``, ``coco``,
    ``msrvtt_qa``, ``msvd_qa``, ``msrvtt_caption``, ``audiocaps``, ``easy_vqa``, ``drumkits``,
    ``tuxpaint``, or any dataset added with :func:`epalm.data.registry.register`.
    """
    from epalm.data.registry import load_samples as load

    return load(name, root, split, **options)
