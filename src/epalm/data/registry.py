"""The dataset registry: a new dataset is one reader + one :class:`DatasetSpec` entry + a YAML file.

Each entry says what the data is (modality, task), how it is scored (metric), how its media are
preprocessed by default (``preprocessing``: :class:`epalm.data.processor.MediaConfig` fields) and how
to read a split (``read(root, split, **options) -> samples``). :func:`load_samples`, the recipes
(``epalm train``, the quickstarts) and the processor defaults all look datasets up here.

    from epalm.data.registry import DatasetSpec, register
    register(DatasetSpec("my_vqa", "image", "qa", "exact_match", read=my_reader))
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epalm.data import readers
from epalm.data.records import CaptionSample, QASample

__all__ = ["DatasetSpec", "DATASETS", "group_keys", "register", "get_dataset", "load_samples", "grouped_split",
           "random_split"]

TASKS = ("qa", "caption")
METRICS = ("vqa", "exact_match", "caption")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str  # "image" | "video" | "audio"
    task: str  # "qa" | "caption"
    metric: str  # "vqa" | "exact_match" | "caption"
    read: Callable[..., list]  # read(root, split, **options) -> list[QASample] | list[CaptionSample]
    preprocessing: dict[str, Any] = field(default_factory=dict)  # MediaConfig defaults
    splits: tuple[str, ...] = ()  # the split names, when fixed (documentation and errors)
    default_root: str | None = None  # where the data lives when no root is given ("package": the reader's own)
    # sample attributes to break accuracy down by: one ("answer_type"), several ("answer_type,template"
    # or a list); see group_keys
    group_by: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("image", "video", "audio"):
            raise ValueError(f"dataset {self.name!r}: unknown modality {self.modality!r}")
        if self.task not in TASKS:
            raise ValueError(f"dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.metric not in METRICS:
            raise ValueError(f"dataset {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")

    def group_keys(self) -> list[str]:
        return group_keys(self.group_by)

    def load(self, root: str | Path | None, split: str, **options: Any) -> list:
        """Samples of ``split``; ``root=None``: the dataset's default location."""
        root = root if root is not None else self.default_root
        if root is None:
            raise ValueError(f"dataset {self.name!r} needs a data root")
        return self.read(None if root == "package" else Path(root), split, **options)


def group_keys(group_by: str | Sequence[str] | None) -> list[str]:
    """``"answer_type,template"`` / ``["answer_type", "template"]`` / ``None`` -> the attribute names."""
    if group_by is None:
        return []
    parts = group_by.split(",") if isinstance(group_by, str) else list(group_by)
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"group_by must be a name, a comma-separated string or a list of names, got {group_by!r}")
    keys = [p.strip() for p in parts if p.strip()]
    return list(dict.fromkeys(keys))


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    if spec.name in DATASETS and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass replace=True)")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(DATASETS))}") from None


def load_samples(name: str, root: str | Path | None, split: str, **options: Any) -> list[QASample] | list[CaptionSample]:
    """Read split ``split`` of a registered dataset (the release's ``data/`` layout for the benchmarks)."""
    return get_dataset(name).load(root, split, **options)


# ----------------------------------------------------------------------------------------- splits
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


def random_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted indices ``(train, test)`` of a seeded random split with ``round(test_fraction * n)`` test items."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * n))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _pick(samples: list, split: str, train: list[int], test: list[int], name: str) -> list:
    if split == "all":
        return samples
    if split not in ("train", "test"):
        raise ValueError(f"{name} split must be 'train', 'test' or 'all', got {split!r}")
    return [samples[i] for i in (train if split == "train" else test)]


# ----------------------------------------------------------------------------------------- readers
def _first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.is_file():
            return p
    raise FileNotFoundError(f"none of these annotation files exists: {', '.join(str(p) for p in paths)}")


def _vqa_v2(root: Path, split: str):
    return readers.read_vqa_karpathy(root / "vqa" / f"{split}.json", root / "COCO" / "images",
                                     vg_root=root / "VG" / "VG_100K")


def _vqa_v2_standard(root: Path, split: str):
    sub = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}.get(split, split)
    q = root / "vqa" / f"v2_OpenEnded_mscoco_{sub}_questions.json"
    a = root / "vqa" / f"v2_mscoco_{sub}_annotations.json"
    return readers.read_vqa_v2(q, a if a.is_file() else None, root / "COCO" / "images")


def _gqa(root: Path, split: str):
    q = _first_existing(root / "GQA" / "questions" / f"{split}_balanced_questions.json", root / "GQA" / f"{split}.json")
    return readers.read_gqa(q, root / "GQA" / "images")


def _coco(root: Path, split: str):
    return readers.read_coco_karpathy(root / "COCO" / "dataset_coco.json", root / "COCO" / "images", split)


def _msrvtt_qa(root: Path, split: str):
    return readers.read_msrvtt_qa(root / "MSRVTT" / "annotation" / f"msrvtt_vqa_{split}.json",
                                  root / "MSRVTT" / "videos" / "all")


def _msvd_qa(root: Path, split: str):
    mapping = root / "MSVD" / "youtube_mapping.txt"
    return readers.read_msvd_qa(root / "MSVD" / "annotation" / f"msvd_vqa_{split}.json", root / "MSVD" / "videos" / "all",
                                video_name_map=mapping if mapping.is_file() else None)


def _msrvtt_caption(root: Path, split: str):
    release = root / "MSRVTT" / "annotation" / f"msrvtt_caption_{split}.json"
    if release.is_file():
        return readers.read_msrvtt_captions(release, root / "MSRVTT" / "videos" / "all")
    info = _first_existing(root / "MSRVTT" / "train_val_videodatainfo.json", root / "MSRVTT" / "test_videodatainfo.json")
    return readers.read_msrvtt_captions(info, root / "MSRVTT" / "videos" / "all", split)


def _audiocaps(root: Path, split: str):
    release = root / "audiocaps" / "annotation" / f"audiocaps_caption_{split}.json"
    if release.is_file():
        return readers.read_audiocaps(release, root / "audiocaps" / "audios")
    csv_path = _first_existing(root / "audiocaps" / "dataset" / f"{split}.csv", root / "audiocaps" / f"{split}.csv")
    return readers.read_audiocaps(csv_path, root / "audiocaps" / "audios" / split)


def _easy_vqa(root: Path | None, split: str):
    from epalm.data.easy_vqa import read_easy_vqa

    return read_easy_vqa(split, root)


def _drumkits(root: Path, split: str, *, seed: int = 0, test_fraction: float = 0.25):
    """Seeded split grouped by (kit, instrument): velocity layers of one drum never straddle train and test."""
    from epalm.data.drumkits import read_drumkits

    samples = read_drumkits(root)
    train, test = grouped_split([(s.media_id.split("/")[0], s.answer_type) for s in samples], test_fraction, seed)
    return _pick(samples, split, train, test, "drumkits")


def _tuxpaint(root: Path, split: str, *, seed: int = 0, test_fraction: float = 0.15, include_svg: bool | None = None,
              render_dir: str | Path | None = None, render_size: int = 224):
    """Seeded random split; SVG stamps (when ``rsvg-convert`` is installed, or ``include_svg``) are
    rendered once to PNG under ``render_dir`` (default ``$EPALM_CACHE/features/tuxpaint-svg-png``)."""
    import dataclasses

    from epalm.data.tuxpaint import read_tuxpaint_stamps, render_svg

    if include_svg is None:
        include_svg = shutil.which("rsvg-convert") is not None
    samples = read_tuxpaint_stamps(root, include_svg=include_svg)
    if any(s.media_path.suffix == ".svg" for s in samples):
        if render_dir is None:
            from epalm.weights.cache import cache_dir

            render_dir = cache_dir() / "features" / "tuxpaint-svg-png"
        rendered = []
        for s in samples:
            if s.media_path.suffix == ".svg":
                png = Path(render_dir) / f"{s.media_id}.png"
                if not png.is_file():
                    render_svg(s.media_path, png, size=render_size)
                s = dataclasses.replace(s, media_path=png)
            rendered.append(s)
        samples = rendered
    train, test = random_split(len(samples), test_fraction, seed)
    return _pick(samples, split, train, test, "tuxpaint")


_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
for _spec in (
    DatasetSpec("vqa_v2", "image", "qa", "vqa", _vqa_v2, group_by="answer_type",
                splits=("karpathy_train", "karpathy_val", "karpathy_test")),
    DatasetSpec("vqa_v2_standard", "image", "qa", "vqa", _vqa_v2_standard, group_by="answer_type",
                splits=("train", "val", "test", "test-dev")),
    DatasetSpec("gqa", "image", "qa", "exact_match", _gqa),
    DatasetSpec("coco", "image", "caption", "caption", _coco, splits=("train", "val", "test")),
    DatasetSpec("msrvtt_qa", "video", "qa", "exact_match", _msrvtt_qa, {"num_frames": 8}),
    DatasetSpec("msvd_qa", "video", "qa", "exact_match", _msvd_qa, {"num_frames": 8}),
    DatasetSpec("msrvtt_caption", "video", "caption", "caption", _msrvtt_caption, {"num_frames": 16}),
    DatasetSpec("audiocaps", "audio", "caption", "caption", _audiocaps, {"audio_features": "ast"}),
    # the offline quickstarts' data (PyPI / Debian packages)
    DatasetSpec("easy_vqa", "image", "qa", "exact_match", _easy_vqa, {"image_size": 56, **_IMAGENET},
                splits=("train", "test"), default_root="package", group_by="answer_type,template"),
    DatasetSpec("drumkits", "audio", "qa", "exact_match", _drumkits,
                {"audio_features": "whisper", "audio_kwargs": {"context_frames": 400}},
                splits=("train", "test", "all"), default_root="/usr/share/hydrogen/data/drumkits",
                group_by="answer"),
    DatasetSpec("tuxpaint", "image", "caption", "caption", _tuxpaint,
                {"image_size": 112, **_IMAGENET, "resize": "pad-square", "background": "white"},
                splits=("train", "test", "all"), default_root="/usr/share/tuxpaint/stamps"),
):
    register(_spec)
