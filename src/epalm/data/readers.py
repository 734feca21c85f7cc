"""Readers for the official on-disk formats of the eP-ALM benchmarks.

Every reader returns a list of :class:`~epalm.data.records.QASample` or
:class:`~epalm.data.records.CaptionSample`. Readers only parse annotations: media files are opened
later by the datasets (pass ``check_files=True`` to verify every media path up front). A missing
annotation file raises ``FileNotFoundError`` naming the path; a malformed one raises
:class:`~epalm.errors.AnnotationError` (a ``ValueError``) naming the file, the entry and the
missing field, e.g. ``"annotations.json: entry 3 has no 'answers'"``.

``media_id`` is always the media file's stem; ``id`` is the id of the official result format.

Expected layouts
----------------
Paths below are what the readers are given; the folder names are the usual ones (and those of the
authors' release, ``data/`` in github.com/mshukor/eP-ALM ``docs/datasets.md``) but any may be
passed explicitly.

**VQA v2, standard split** -- :func:`read_vqa_v2`::

    vqa/v2_OpenEnded_mscoco_val2014_questions.json   {"data_subtype": "val2014",
                                                      "questions": [{"image_id", "question", "question_id"}]}
    vqa/v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "image_id",
                                                      "answers": [{"answer"}, ...], "multiple_choice_answer",
                                                      "answer_type"}]}     (absent for test2015)
    COCO/images/val2014/COCO_val2014_000000000042.jpg   image_root/<subtype>/COCO_<subtype>_<image_id:012d>.jpg

**VQA v2, Karpathy split** -- :func:`read_vqa_karpathy`, one JSON list per split, in either format::

    vqa/karpathy_train.json   ALBEF style: [{"question_id", "question", "answer": [..] | "..",
                                             "image": "train2014/COCO_train2014_....jpg", "dataset": "vqa"|"vg"}]
                              release (VL-T5) style: [{"question_id", "sent", "img_id": "COCO_train2014_...",
                                             "label": {"answer": score}, "answer_type", "question_type"}]
    COCO/images/train2014/...    "image" paths are relative to image_root; "img_id" -> image_root/train2014/<img_id>.jpg
    VG/VG_100K/...               Visual Genome questions ("dataset": "vg", or non-COCO img_id) need vg_root

**GQA** -- :func:`read_gqa`::

    GQA/questions/testdev_balanced_questions.json   {"<qid>": {"imageId", "question", "answer", "types", ...}}
                                                    or the release's list [{"question_id", "img_id", "sent", "label"}]
    GQA/images/n356822.jpg                          image_dir/<imageId>.jpg

**COCO captions, Karpathy split** -- :func:`read_coco_karpathy`::

    COCO/dataset_coco.json   {"images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg",
                              "split": "train"|"restval"|"val"|"test", "cocoid", "sentences": [{"raw"}]}]}
    COCO/images/val2014/...  image_root/<filepath>/<filename>;  split "train" includes "restval"

**MSRVTT-QA** -- :func:`read_msrvtt_qa`::

    MSRVTT/annotation/msrvtt_vqa_train.json   [{"question", "answer", "video_id": 0, "id"}]  (official;
                                              video_id N -> video<N>) or [{"question_id", "question"|"sent",
                                              "answer"|"label", "video": "video0.mp4"}]  (release)
    MSRVTT/videos/all/video0.mp4              video_dir/<filename_pattern>, default "{video_id}.mp4"

**MSVD-QA** -- :func:`read_msvd_qa`::

    MSVD/annotation/msvd_vqa_train.json   [{"question", "answer", "video_id": 1, "id"}]  (official) or
                                          [{..., "video": "00jrXRMlZOY_0_10.avi"}]  (release)
    MSVD/youtube_mapping.txt              optional video_name_map: lines "<youtube clip name> vid<N>"
    MSVD/videos/all/00jrXRMlZOY_0_10.avi  video_dir/<filename_pattern>, default "{video_id}.avi"

**MSR-VTT captions** -- :func:`read_msrvtt_captions`::

    MSRVTT/train_val_videodatainfo.json   {"videos": [{"video_id": "video0", "split": "train"|"validate"|"test"}],
                                           "sentences": [{"video_id", "caption"}]}
                                          or the release's per-split list [{"video": "video0.mp4", "caption": [..]}]
    MSRVTT/videos/all/video0.mp4          video_dir/<filename_pattern>, default "{video_id}.mp4"

**AudioCaps** -- :func:`read_audiocaps`::

    audiocaps/dataset/train.csv    header "audiocap_id,youtube_id,start_time,caption"; rows sharing a file are
                                   grouped (val/test: 5 captions per clip), or the release's JSON list
                                   [{"audio": "--L22BmDI6E.wav", "caption": [..] | ".."}]
    audiocaps/audios/train/--L22BmDI6E.wav   audio_dir/<filename_pattern>, default "{youtube_id}.wav"
                                   (fields: audiocap_id, youtube_id, start_time as written in the CSV)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from epalm.errors import AnnotationError, missing_file
from epalm.data.records import CaptionSample, QASample

__all__ = [
    "read_vqa_v2",
    "read_vqa_karpathy",
    "read_gqa",
    "read_coco_karpathy",
    "read_video_qa",
    "read_msrvtt_qa",
    "read_msvd_qa",
    "read_msrvtt_captions",
    "read_audiocaps",
    "load_video_name_map",
]

PathLike = str | Path


# --------------------------------------------------------------------------- helpers


def _load_json(path: PathLike, what: str) -> Any:
    """Parse a JSON file, turning every failure into an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, what)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e.reason})") from e


def _field(entry: Any, key: str, path: Path, where: str) -> Any:
    """``entry[key]``, or an :class:`AnnotationError` naming file, entry and field."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is not a JSON object")
    value = entry.get(key)
    if value is None:
        raise AnnotationError(f"{path}: {where} has no '{key}'")
    return value


def _first_field(entry: Any, keys: tuple[str, ...], path: Path, where: str) -> Any:
    """The first of ``keys`` present in ``entry`` (formats differ in naming, e.g. question/sent)."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is not a JSON object")
    for key in keys:
        if entry.get(key) is not None:
            return entry[key]
    names = " or ".join(f"'{k}'" for k in keys)
    raise AnnotationError(f"{path}: {where} has no {names}")


def _as_list(data: Any, path: Path, key: str | None = None) -> list:
    """The top-level list of a file (or ``data[key]``), checked."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise AnnotationError(f"{path}: top level has no '{key}'")
        data = data[key]
    if not isinstance(data, list):
        where = f"'{key}'" if key else "top level"
        raise AnnotationError(f"{path}: {where} is not a JSON list")
    return data


def _text(value: Any, path: Path, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise AnnotationError(f"{path}: {where} has a non-string '{key}' ({value!r})")
    return value


def _answers_of(entry: dict, path: Path, where: str) -> tuple[list[str], list[float] | None]:
    """Answers of an entry in any of the supported shapes; ``([], None)`` when there are none.

    ``answer`` may be a string or a list of strings (ALBEF, MSRVTT-QA), ``answers`` a list of strings
    or of ``{"answer": ..}`` objects (VQA v2), ``label`` a dict ``{answer: score}`` (VL-T5/release).
    """
    if entry.get("answer") is not None:
        a = entry["answer"]
        if isinstance(a, str):
            return [a], None
        if isinstance(a, list) and all(isinstance(x, str) for x in a):
            return list(a), None
        raise AnnotationError(f"{path}: {where} has an 'answer' that is neither a string nor a list of strings")
    if entry.get("answers") is not None:
        out = []
        for k, a in enumerate(_as_answers_list(entry["answers"], path, where)):
            out.append(
                a
                if isinstance(a, str)
                else _text(_field(a, "answer", path, f"{where} answer {k}"), path, where, "answer")
            )
        return out, None
    if entry.get("label") is not None:
        label = entry["label"]
        if not isinstance(label, dict):
            raise AnnotationError(f"{path}: {where} has a 'label' that is not an {{answer: score}} object")
        try:
            return list(label), [float(s) for s in label.values()]
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{path}: {where} has a non-numeric score in 'label'") from e
    return [], None


def _as_answers_list(value: Any, path: Path, where: str) -> list:
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: {where} has an 'answers' that is not a list")
    return value


def _check_files(samples: Iterable[QASample | CaptionSample], what: str) -> None:
    seen: set[Path] = set()
    for s in samples:
        if s.media_path not in seen:
            seen.add(s.media_path)
            if not s.media_path.is_file():
                raise missing_file(s.media_path, f"{what} for sample {s.id!r}")


def _finish(samples: list, check_files: bool, what: str) -> list:
    if check_files:
        _check_files(samples, what)
    return samples


# --------------------------------------------------------------------------- VQA v2


def read_vqa_v2(
    questions_path: PathLike,
    annotations_path: PathLike | None,
    image_root: PathLike,
    *,
    image_subdir: str | None = None,
    check_files: bool = False,
) -> list[QASample]:
    """VQA v2 standard split: official questions + annotations JSON (annotations optional for test).

    Images are ``image_root/<subtype>/COCO_<subtype>_<image_id:012d>.jpg`` where ``subtype``
    (``"train2014"``, ``"val2014"``, ``"test2015"``) is ``image_subdir`` or the questions file's
    ``data_subtype``. ``answers`` holds the 10 human answers; ``id`` is ``question_id``.
    """
    qpath = Path(questions_path)
    qdata = _load_json(qpath, "VQA questions file")
    questions = _as_list(qdata, qpath, "questions")
    subtype = image_subdir or qdata.get("data_subtype")
    if not subtype:
        raise AnnotationError(f"{qpath}: top level has no 'data_subtype'; pass image_subdir= (e.g. 'val2014')")

    by_qid: dict[Any, dict] | None = None
    apath = Path(annotations_path) if annotations_path is not None else None
    if apath is not None:
        adata = _load_json(apath, "VQA annotations file")
        by_qid = {}
        for j, ann in enumerate(_as_list(adata, apath, "annotations")):
            where = f"entry {j}"
            qid = _field(ann, "question_id", apath, where)
            answers = _as_answers_list(_field(ann, "answers", apath, where), apath, where)
            for k, a in enumerate(answers):
                _text(_field(a, "answer", apath, f"{where} answer {k}"), apath, where, "answer")
            by_qid[qid] = ann

    root = Path(image_root)
    samples = []
    for i, q in enumerate(questions):
        where = f"entry {i}"
        qid = _field(q, "question_id", qpath, where)
        image_id = _field(q, "image_id", qpath, where)
        question = _text(_field(q, "question", qpath, where), qpath, where, "question")
        try:
            image_num = int(image_id)
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{qpath}: {where} has a non-integer 'image_id' ({image_id!r})") from e
        stem = f"COCO_{subtype}_{image_num:012d}"
        answers: list[str] = []
        answer_type = None
        if by_qid is not None:
            ann = by_qid.get(qid)
            if ann is None:
                raise AnnotationError(f"{apath}: no annotation for question_id {qid!r} (from {qpath.name} {where})")
            answers = [a["answer"] for a in ann["answers"]]
            answer_type = ann.get("answer_type")
        samples.append(QASample(qid, stem, root / subtype / f"{stem}.jpg", question, answers, answer_type))
    return _finish(samples, check_files, "image")


def read_vqa_karpathy(
    path: PathLike,
    image_root: PathLike,
    *,
    vg_root: PathLike | None = None,
    check_files: bool = False,
) -> list[QASample]:
    """VQA v2 Karpathy split file (one per split), ALBEF style or the release's VL-T5 style.

    ALBEF entries name their image relative to ``image_root`` (``"val2014/COCO_val2014_...jpg"``,
    or relative to ``vg_root`` when ``"dataset": "vg"``); VL-T5 entries give ``img_id`` and live in
    ``image_root/<train2014|val2014>/<img_id>.jpg`` (non-COCO ids under ``vg_root``).
    """
    path = Path(path)
    data = _as_list(_load_json(path, "VQA Karpathy split file"), path)
    root = Path(image_root)
    vg = Path(vg_root) if vg_root is not None else None
    samples = []
    for i, e in enumerate(data):
        where = f"entry {i}"
        qid = _field(e, "question_id", path, where)
        question = _text(_first_field(e, ("question", "sent"), path, where), path, where, "question")
        answers, weights = _answers_of(e, path, where)
        if e.get("image") is not None:
            rel = _text(e["image"], path, where, "image")
            if e.get("dataset", "vqa") == "vg":
                if vg is None:
                    raise ValueError(f"{path}: {where} is a Visual Genome question; pass vg_root=")
                media_path = vg / rel
            else:
                media_path = root / rel
        elif e.get("img_id") is not None:
            img_id = str(e["img_id"])
            if img_id.startswith("COCO_"):
                media_path = root / img_id.split("_")[1] / f"{img_id}.jpg"
            else:
                if vg is None:
                    raise ValueError(f"{path}: {where} has non-COCO img_id {img_id!r}; pass vg_root=")
                media_path = vg / f"{img_id}.jpg"
        else:
            raise AnnotationError(f"{path}: {where} has no 'image' or 'img_id'")
        samples.append(QASample(qid, media_path.stem, media_path, question, answers, e.get("answer_type"), weights))
    return _finish(samples, check_files, "image")


# --------------------------------------------------------------------------- GQA


def read_gqa(questions_path: PathLike, image_dir: PathLike, *, check_files: bool = False) -> list[QASample]:
    """GQA questions: the official ``{qid: {...}}`` dict (balanced or all) or the release's list.

    Images are ``image_dir/<imageId>.jpg``. Questions without an answer (submission split) get
    ``answers == []``; ``answer_type`` is the official ``types["structural"]`` when present.
    """
    path = Path(questions_path)
    data = _load_json(path, "GQA questions file")
    root = Path(image_dir)
    samples = []
    if isinstance(data, dict):
        for qid, e in data.items():
            where = f"question {qid}"
            image_id = str(_field(e, "imageId", path, where))
            question = _text(_field(e, "question", path, where), path, where, "question")
            answers = [_text(e["answer"], path, where, "answer")] if e.get("answer") is not None else []
            types = e.get("types")
            answer_type = types.get("structural") if isinstance(types, dict) else None
            samples.append(QASample(qid, image_id, root / f"{image_id}.jpg", question, answers, answer_type))
    elif isinstance(data, list):
        for i, e in enumerate(data):
            where = f"entry {i}"
            qid = _field(e, "question_id", path, where)
            image_id = str(_first_field(e, ("img_id", "imageId"), path, where))
            question = _text(_first_field(e, ("sent", "question"), path, where), path, where, "question")
            answers, weights = _answers_of(e, path, where)
            samples.append(QASample(qid, image_id, root / f"{image_id}.jpg", question, answers, None, weights))
    else:
        raise AnnotationError(f"{path}: top level is neither a JSON object nor a list")
    return _finish(samples, check_files, "image")


# --------------------------------------------------------------------------- COCO captions

_COCO_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "restval": ("restval",)}


def read_coco_karpathy(
    dataset_coco_path: PathLike, image_root: PathLike, split: str, *, check_files: bool = False
) -> list[CaptionSample]:
    """COCO captions from Karpathy's ``dataset_coco.json``; ``split="train"`` includes ``restval``.

    Images are ``image_root/<filepath>/<filename>``; ``id`` is ``cocoid`` (the ``image_id`` of the
    official caption results format).
    """
    if split not in _COCO_SPLITS:
        raise ValueError(f"unknown COCO Karpathy split {split!r}; expected one of {sorted(_COCO_SPLITS)}")
    path = Path(dataset_coco_path)
    images = _as_list(_load_json(path, "COCO Karpathy file (dataset_coco.json)"), path, "images")
    wanted = _COCO_SPLITS[split]
    root = Path(image_root)
    samples = []
    for i, e in enumerate(images):
        where = f"entry {i}"
        s = _field(e, "split", path, where)
        filepath = _field(e, "filepath", path, where)
        filename = _field(e, "filename", path, where)
        cocoid = _field(e, "cocoid", path, where)
        sentences = _field(e, "sentences", path, where)
        if not isinstance(sentences, list):
            raise AnnotationError(f"{path}: {where} has a 'sentences' that is not a list")
        captions = [
            _text(_field(x, "raw", path, f"{where} sentence {k}"), path, where, "raw").strip()
            for k, x in enumerate(sentences)
        ]
        if s not in wanted:
            continue
        media_path = root / filepath / filename
        samples.append(CaptionSample(cocoid, media_path.stem, media_path, captions, "image"))
    return _finish(samples, check_files, "image")


# --------------------------------------------------------------------------- video QA


def load_video_name_map(source: PathLike | Mapping[str, str]) -> dict[str, str]:
    """A video-id -> file-name map: a mapping, a JSON object file, or ``youtube_mapping.txt``.

    The text format (MSVD's official ``youtube_mapping.txt``) has one ``<name> <key>`` pair per
    line, e.g. ``-4wsuPCjDBc_5_15 vid1``.
    """
    if isinstance(source, Mapping):
        return {str(k): str(v) for k, v in source.items()}
    path = Path(source)
    if path.suffix.lower() == ".json":
        data = _load_json(path, "video name map")
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: top level is not a JSON object")
        return {str(k): str(v) for k, v in data.items()}
    if not path.is_file():
        raise missing_file(path, "video name map")
    out = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AnnotationError(f"{path}: line {n} is not '<video name> <id>'")
            out[parts[1]] = parts[0]
    return out


def read_video_qa(
    path: PathLike,
    video_dir: PathLike,
    *,
    filename_pattern: str = "{video_id}.mp4",
    video_name_map: PathLike | Mapping[str, str] | None = None,
    normalize_id: Callable[[str], str] | None = None,
    map_keys: Callable[[str], Iterable[str]] | None = None,
    check_files: bool = False,
) -> list[QASample]:
    """Video QA JSON list (MSRVTT-QA / MSVD-QA and the release's variants).

    An entry's video is ``video_dir/<entry["video"]>`` when it has ``"video"`` (a file name), else
    ``video_dir/filename_pattern.format(video_id=...)`` from ``"video_id"``, after
    ``normalize_id`` and, when ``video_name_map`` is given, a lookup of the keys ``map_keys(id)``.
    ``id`` is ``question_id`` or ``id`` (else the entry index).
    """
    path = Path(path)
    data = _as_list(_load_json(path, "video QA file"), path)
    root = Path(video_dir)
    name_map = load_video_name_map(video_name_map) if video_name_map is not None else None
    samples = []
    for i, e in enumerate(data):
        where = f"entry {i}"
        question = _text(_first_field(e, ("question", "sent"), path, where), path, where, "question")
        answers, weights = _answers_of(e, path, where)
        qid = e.get("question_id", e.get("id", i))
        if e.get("video") is not None:
            media_path = root / _text(e["video"], path, where, "video")
        else:
            vid = str(_first_field(e, ("video_id", "video"), path, where))
            if normalize_id is not None:
                vid = normalize_id(vid)
            if name_map is not None:
                keys = list(map_keys(vid)) if map_keys is not None else [vid]
                for k in keys:
                    if k in name_map:
                        vid = name_map[k]
                        break
                else:
                    raise AnnotationError(f"{path}: {where} has video_id {vid!r}, which the video name map lacks")
            media_path = root / filename_pattern.format(video_id=vid)
        samples.append(QASample(qid, media_path.stem, media_path, question, answers, None, weights, "video"))
    return _finish(samples, check_files, "video")


def read_msrvtt_qa(
    path: PathLike, video_dir: PathLike, *, filename_pattern: str = "{video_id}.mp4", check_files: bool = False
) -> list[QASample]:
    """MSRVTT-QA (official ``video_id: N`` -> ``video<N>.mp4``, or the release's ``"video"`` names)."""
    return read_video_qa(
        path,
        video_dir,
        filename_pattern=filename_pattern,
        normalize_id=lambda v: f"video{v}" if v.isdigit() else v,
        check_files=check_files,
    )


def read_msvd_qa(
    path: PathLike,
    video_dir: PathLike,
    *,
    video_name_map: PathLike | Mapping[str, str] | None = None,
    filename_pattern: str = "{video_id}.avi",
    check_files: bool = False,
) -> list[QASample]:
    """MSVD-QA; official ids (``video_id: 1``) go through ``video_name_map`` (keys ``"1"`` or ``"vid1"``)."""
    return read_video_qa(
        path,
        video_dir,
        filename_pattern=filename_pattern,
        video_name_map=video_name_map,
        map_keys=lambda v: (v, f"vid{v}"),
        check_files=check_files,
    )


# --------------------------------------------------------------------------- video / audio captions

_MSRVTT_SPLITS = {"train": "train", "val": "validate", "validate": "validate", "test": "test"}


def _captions_of(e: dict, path: Path, where: str) -> list[str]:
    cap = _first_field(e, ("caption", "captions"), path, where)
    if isinstance(cap, str):
        return [cap.strip()]
    if isinstance(cap, list) and all(isinstance(c, str) for c in cap):
        return [c.strip() for c in cap]
    raise AnnotationError(f"{path}: {where} has a 'caption' that is neither a string nor a list of strings")


def read_msrvtt_captions(
    path: PathLike,
    video_dir: PathLike,
    split: str | None = None,
    *,
    filename_pattern: str = "{video_id}.mp4",
    check_files: bool = False,
) -> list[CaptionSample]:
    """MSR-VTT captions: official ``videodatainfo.json`` (filtered by ``split``) or the release's list.

    ``split`` is ``"train"``, ``"val"``/``"validate"``, ``"test"`` or None (all); the release's files
    are already per split, so ``split`` is ignored for them. ``id`` is the ``video_id`` (``"video0"``).
    """
    path = Path(path)
    data = _load_json(path, "MSR-VTT caption file")
    root = Path(video_dir)
    samples: list[CaptionSample] = []
    if isinstance(data, dict):
        if split is not None and split not in _MSRVTT_SPLITS:
            raise ValueError(f"unknown MSR-VTT split {split!r}; expected one of {sorted(_MSRVTT_SPLITS)}")
        videos = _as_list(data, path, "videos")
        sentences = _as_list(data, path, "sentences")
        captions: dict[str, list[str]] = {}
        keep: list[str] = []
        for i, v in enumerate(videos):
            vid = str(_field(v, "video_id", path, f"video {i}"))
            s = _field(v, "split", path, f"video {i}")
            captions[vid] = []
            if split is None or s == _MSRVTT_SPLITS[split]:
                keep.append(vid)
        for i, s in enumerate(sentences):
            where = f"sentence {i}"
            vid = str(_field(s, "video_id", path, where))
            cap = _text(_field(s, "caption", path, where), path, where, "caption")
            if vid not in captions:
                raise AnnotationError(f"{path}: {where} refers to video_id {vid!r}, which 'videos' lacks")
            captions[vid].append(cap.strip())
        for vid in keep:
            media_path = root / filename_pattern.format(video_id=vid)
            samples.append(CaptionSample(vid, media_path.stem, media_path, captions[vid], "video"))
    elif isinstance(data, list):
        for i, e in enumerate(data):
            where = f"entry {i}"
            media_path = root / _text(_field(e, "video", path, where), path, where, "video")
            samples.append(
                CaptionSample(media_path.stem, media_path.stem, media_path, _captions_of(e, path, where), "video")
            )
    else:
        raise AnnotationError(f"{path}: top level is neither a JSON object nor a list")
    return _finish(samples, check_files, "video")


_AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def read_audiocaps(
    path: PathLike,
    audio_dir: PathLike,
    *,
    filename_pattern: str = "{youtube_id}.wav",
    check_files: bool = False,
) -> list[CaptionSample]:
    """AudioCaps: official CSV (rows grouped per audio file) or the release's JSON list.

    ``filename_pattern`` may use ``{youtube_id}``, ``{audiocap_id}`` and ``{start_time}`` (as written
    in the CSV). ``id`` and ``media_id`` are the audio file's stem.
    """
    path = Path(path)
    root = Path(audio_dir)
    samples: list[CaptionSample] = []
    if path.suffix.lower() == ".json":
        data = _as_list(_load_json(path, "AudioCaps file"), path)
        for i, e in enumerate(data):
            where = f"entry {i}"
            media_path = root / _text(_field(e, "audio", path, where), path, where, "audio")
            samples.append(
                CaptionSample(media_path.stem, media_path.stem, media_path, _captions_of(e, path, where), "audio")
            )
        return _finish(samples, check_files, "audio")

    if not path.is_file():
        raise missing_file(path, "AudioCaps CSV file")
    groups: dict[Path, list[str]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in _AUDIOCAPS_COLUMNS if c not in header]
            if missing:
                raise AnnotationError(f"{path}: header has no column {', '.join(repr(c) for c in missing)}")
            for n, row in enumerate(reader):
                where = f"row {n}"
                for c in _AUDIOCAPS_COLUMNS:
                    if not row.get(c):
                        raise AnnotationError(f"{path}: {where} has no '{c}'")
                fields = {c: row[c].strip() for c in _AUDIOCAPS_COLUMNS[:3]}
                media_path = root / filename_pattern.format(**fields)
                groups.setdefault(media_path, []).append(row["caption"].strip())
    except (UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"{path}: unreadable CSV ({e})") from e
    for media_path, caps in groups.items():
        samples.append(CaptionSample(media_path.stem, media_path.stem, media_path, caps, "audio"))
    return _finish(samples, check_files, "audio")
