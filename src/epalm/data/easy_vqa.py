"""Reader for easy-VQA (PyPI ``easy-vqa`` 1.0, MIT): 64x64 images of one coloured shape.

The package ships its data as plain files (it is never imported here, only located)::

    easy_vqa/data/answers.txt              the 13 answers, one per line
    easy_vqa/data/train/questions.json     [[question, answer, image_id], ...]   38,575 entries
    easy_vqa/data/train/images/<id>.png    4,000 RGB 64x64 images
    easy_vqa/data/test/questions.json      9,673 entries
    easy_vqa/data/test/images/<id>.png     1,000 images

:func:`read_easy_vqa` returns one :class:`~epalm.data.records.QASample` per question, with
``id = "<split>-<index in questions.json>"`` and ``media_id = "<split>-<image id>"`` (unique
across splits, so one feature cache can hold both). Published baselines on the test set:
always "yes" 37.3%, question only 67.0%.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from epalm.errors import AnnotationError, missing_file
from epalm.data.records import QASample

__all__ = [
    "EASY_VQA_PIP",
    "PUBLISHED_BASELINES",
    "SPLITS",
    "EasyVQANotInstalled",
    "easy_vqa_root",
    "question_template",
    "read_easy_vqa",
    "read_easy_vqa_answers",
]

#: The exact command that installs the data set.
EASY_VQA_PIP = "pip install easy-vqa==1.0"
SPLITS = ("train", "test")
#: Test-set accuracy of the baselines published with the data set.
PUBLISHED_BASELINES = {"always 'yes' (majority answer)": 0.373, "question only (no image)": 0.670}


class EasyVQANotInstalled(ImportError):
    """The ``easy-vqa`` package is not installed; ``pip_command`` installs it."""

    def __init__(self, message: str, pip_command: str = EASY_VQA_PIP) -> None:
        super().__init__(message)
        self.pip_command = pip_command


def easy_vqa_root() -> Path:
    """``.../site-packages/easy_vqa/data`` of the installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec("easy_vqa")
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EasyVQANotInstalled(f"The easy-VQA data set (package 'easy-vqa') is not installed. "
                                  f"Install it with:\n    {EASY_VQA_PIP}")
    return Path(locations[0]) / "data"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else easy_vqa_root()


def read_easy_vqa_answers(root: str | os.PathLike | None = None) -> list[str]:
    """The answer vocabulary (``answers.txt``), in file order."""
    path = _root(root) / "answers.txt"
    if not path.is_file():
        raise missing_file(path, "easy-VQA answer list (answers.txt)")
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise AnnotationError(f"{path}: no answers")
    return answers


def read_easy_vqa(split: str, root: str | os.PathLike | None = None, check_files: bool = False) -> list[QASample]:
    """Every question of ``split`` ("train" or "test") as :class:`QASample`, in file order.

    ``root``: the folder holding ``train/`` and ``test/`` (default: the installed package's
    ``easy_vqa/data``). ``check_files``: verify every referenced image exists up front.
    """
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split must be one of {SPLITS}, got {split!r}")
    base = _root(root) / split
    qpath, image_dir = base / "questions.json", base / "images"
    if not qpath.is_file():
        raise missing_file(qpath, f"easy-VQA {split} questions (questions.json)")
    if not image_dir.is_dir():
        raise missing_file(image_dir, f"easy-VQA {split} image folder")
    try:
        entries = json.loads(qpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AnnotationError(f"{qpath}: not readable JSON ({err})") from err
    if not isinstance(entries, list):
        raise AnnotationError(f"{qpath}: expected a list of [question, answer, image_id] entries")
    samples = []
    for i, entry in enumerate(entries):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                or not isinstance(entry[1], str) or isinstance(entry[2], bool) or not isinstance(entry[2], int)):
            raise AnnotationError(f"{qpath}: entry {i} is not [question, answer, image_id]: {entry!r:.120}")
        question, answer, image_id = entry
        path = image_dir / f"{image_id}.png"
        if check_files and not path.is_file():
            raise missing_file(path, f"easy-VQA image {image_id} (entry {i} of {qpath.name})")
        samples.append(QASample(id=f"{split}-{i}", media_id=f"{split}-{image_id}", media_path=path,
                                question=question, answers=[answer], answer_type=_answer_type(answer),
                                template=question_template(question, _answer_type(answer))))
    return samples


def _answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in ("circle", "rectangle", "triangle"):
        return "shape"
    return "color"


EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def question_template(question: str, answer_type: str) -> str:
    """The template family of an easy-VQA question (for per-template accuracy).

    ``"yes/no color +"`` ("is there a red shape?"), ``"yes/no color -"`` ("is there not a red
    shape?", "is no red shape present?"), ``"yes/no shape +"`` / ``"yes/no shape -"`` likewise,
    and ``"color"`` / ``"shape"`` for the open questions.
    """
    if answer_type != "yes/no":
        return answer_type
    words = question.lower().rstrip("?").split()
    about = "color" if any(c in words for c in EASY_VQA_COLORS) else "shape"
    negative = "not" in words or "no" in words
    return f"yes/no {about} {'-' if negative else '+'}"
