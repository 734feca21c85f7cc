"""Tests for epalm.data: readers on fixtures written in the official formats, media decoding,
templates/tokenization/collation and the datasets. Everything is generated into tmp dirs; the
tokenizer is a tiny byte-level BPE trained on the fly (no model hub)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epalm.data import (
    IGNORE_INDEX,
    AnnotationError,
    ASTFeatures,
    AudioLoader,
    CaptionDataset,
    CaptionSample,
    ImageLoader,
    ImageTransform,
    MediaError,
    QASample,
    RandAugment,
    SkippedSampleWarning,
    VideoLoader,
    VQADataset,
    WhisperFeatures,
    add_separator_token,
    build_generation_inputs,
    encode_example,
    encode_prompt,
    few_shot_indices,
    load_audio,
    load_image,
    load_samples,
    make_collate_fn,
    pad_sequences,
    pad_token_id_of,
    read_audiocaps,
    read_coco_karpathy,
    read_gqa,
    read_msrvtt_captions,
    read_msrvtt_qa,
    read_msvd_qa,
    read_video_frames,
    read_vqa_karpathy,
    read_vqa_v2,
    resample,
    sample_frame_indices,
    spec_augment,
    vqa_prompt,
    vqa_text,
)

try:  # optional extras (epalm[video], epalm[audio]): only the tests that decode such files need them
    import av
except ImportError:  # pragma: no cover
    av = None
try:
    import soundfile as sf
except ImportError:  # pragma: no cover
    sf = None
needs_av = pytest.mark.skipif(av is None, reason="PyAV (pip install av) is not installed")
needs_sf = pytest.mark.skipif(sf is None, reason="soundfile (pip install soundfile) is not installed")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# =========================================================================== fixture builders


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_image(path: Path, color=(200, 30, 60), fmt="JPEG", size=32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = color
    arr[: size // 2, : size // 2] = 255 - np.array(color, np.uint8)  # some structure for the augmentations
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_video(path: Path, n_frames: int = 10, size: int = 32, codec: str = "mpeg4", frames=None) -> Path:
    """Frame i is a flat gray of level 20*i+10, so decoded frames tell which index they are
    (``frames``: these (H, W, 3) uint8 RGB arrays instead)."""
    if frames is None:
        frames = [np.full((size, size, 3), 20 * i + 10, np.uint8) for i in range(n_frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_wav(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def write_garbage(path: Path, data: bytes = b"this is not a media file " * 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


VQA_ANSWERS = ["net", "net", "net", "netting", "net", "net", "mesh", "net", "net", "net"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A data/ tree in the release layout with every official annotation format and media kind."""
    r = tmp_path_factory.mktemp("data")
    coco = r / "COCO" / "images"
    write_image(coco / "val2014" / "COCO_val2014_000000000042.jpg", (200, 30, 60))
    write_image(coco / "val2014" / "COCO_val2014_000000000073.jpg", (10, 120, 250))
    write_image(coco / "train2014" / "COCO_train2014_000000000009.jpg", (90, 90, 90))
    write_image(r / "VG" / "VG_100K" / "2375429.jpg", (0, 200, 0))
    write_image(r / "GQA" / "images" / "n356822.jpg", (50, 60, 70))
    write_image(r / "GQA" / "images" / "2375429.jpg", (70, 60, 50))

    # VQA v2 standard
    write_json(
        r / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": {},
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 42, "question": "What is this photo taken looking through?", "question_id": 420},
                {"image_id": 73, "question": "Is it sunny?", "question_id": 730},
                {"image_id": 42, "question": "How many cats", "question_id": 421},
            ],
        },
    )
    write_json(
        r / "vqa" / "v2_mscoco_val2014_annotations.json",
        {
            "info": {},
            "license": {},
            "data_subtype": "val2014",
            "annotations": [
                {
                    "question_id": 420,
                    "image_id": 42,
                    "question_type": "what is this",
                    "answer_type": "other",
                    "multiple_choice_answer": "net",
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(VQA_ANSWERS)
                    ],
                },
                {
                    "question_id": 730,
                    "image_id": 73,
                    "question_type": "is it",
                    "answer_type": "yes/no",
                    "multiple_choice_answer": "yes",
                    "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)],
                },
                {
                    "question_id": 421,
                    "image_id": 42,
                    "question_type": "how many",
                    "answer_type": "number",
                    "multiple_choice_answer": "2",
                    "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)],
                },
            ],
        },
    )
    # VQA v2 Karpathy, ALBEF style and release (VL-T5) style
    write_json(
        r / "vqa" / "karpathy_val.json",
        [
            {
                "question_id": 420,
                "question": "What is this photo taken looking through?",
                "answer": VQA_ANSWERS,
                "image": "val2014/COCO_val2014_000000000042.jpg",
                "dataset": "vqa",
            },
            {
                "question_id": 730,
                "question": "Is it sunny?",
                "answer": "yes",
                "image": "val2014/COCO_val2014_000000000073.jpg",
                "dataset": "vqa",
            },
            {
                "question_id": 9001,
                "question": "What color is the grass?",
                "answer": ["green"],
                "image": "2375429.jpg",
                "dataset": "vg",
            },
        ],
    )
    write_json(
        r / "vqa" / "karpathy_train.json",
        [
            {
                "answer_type": "other",
                "img_id": "COCO_train2014_000000000009",
                "label": {"net": 1, "mesh": 0.3},
                "question_id": 90,
                "question_type": "what is this",
                "sent": "What is this photo taken looking through?",
            },
            {
                "answer_type": "number",
                "img_id": "COCO_val2014_000000000073",
                "label": {"2": 1},
                "question_id": 91,
                "question_type": "how many",
                "sent": "How many birds?",
            },
        ],
    )
    # GQA official (dict) and release (list)
    write_json(
        r / "GQA" / "questions" / "testdev_balanced_questions.json",
        {
            "201307251": {
                "semantic": [],
                "entailed": [],
                "equivalent": ["201307251"],
                "question": "Is the sky blue?",
                "imageId": "n356822",
                "isBalanced": True,
                "groups": {"global": None, "local": "13-sky"},
                "answer": "yes",
                "semanticStr": "",
                "annotations": {},
                "types": {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
                "fullAnswer": "Yes, the sky is blue.",
            },
            "201640614": {
                "question": "What is on the white wall?",
                "imageId": "2375429",
                "answer": "pipe",
                "types": {"structural": "query"},
            },
        },
    )
    write_json(
        r / "GQA" / "valid.json",
        [
            {
                "img_id": "2375429",
                "label": {"pipe": 1.0},
                "question_id": "07333408",
                "sent": "What is on the white wall?",
            }
        ],
    )
    # COCO Karpathy captions
    write_json(
        r / "COCO" / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                {
                    "filepath": "val2014",
                    "sentids": [1, 2],
                    "filename": "COCO_val2014_000000000042.jpg",
                    "imgid": 0,
                    "split": "test",
                    "cocoid": 42,
                    "sentences": [
                        {"tokens": ["a"], "raw": "A cat sits on a mat. ", "imgid": 0, "sentid": 1},
                        {"tokens": ["b"], "raw": "A red square.", "imgid": 0, "sentid": 2},
                    ],
                },
                {
                    "filepath": "val2014",
                    "sentids": [3],
                    "filename": "COCO_val2014_000000000073.jpg",
                    "imgid": 1,
                    "split": "restval",
                    "cocoid": 73,
                    "sentences": [{"raw": "A blue thing.", "sentid": 3}, {"raw": "Something blue.", "sentid": 4}],
                },
                {
                    "filepath": "train2014",
                    "sentids": [5],
                    "filename": "COCO_train2014_000000000009.jpg",
                    "imgid": 2,
                    "split": "train",
                    "cocoid": 9,
                    "sentences": [{"raw": "Gray.", "sentid": 5}],
                },
                {
                    "filepath": "val2014",
                    "filename": "COCO_val2014_000000000099.jpg",
                    "imgid": 3,
                    "split": "val",
                    "cocoid": 99,
                    "sentences": [{"raw": "Missing image.", "sentid": 6}],
                },
            ],
        },
    )
    # videos: MSRVTT (mp4) and MSVD (avi); one Matroska file has no frame count in its header
    vids = r / "MSRVTT" / "videos" / "all"
    if av is not None:
        write_video(vids / "video0.mp4")
        write_video(vids / "video1.mp4", n_frames=4)
        write_video(vids / "video2.mkv")
        write_video(r / "MSVD" / "videos" / "all" / "-4wsuPCjDBc_5_15.avi")
    write_json(
        r / "MSRVTT" / "annotation" / "msrvtt_vqa_test.json",
        [
            {"answer": "cat", "category_id": 1, "id": 0, "question": "what is playing", "video_id": 0},
            {"answer": "dog", "category_id": 1, "id": 1, "question": "what runs?", "video_id": 1},
        ],
    )
    write_json(
        r / "MSRVTT" / "annotation" / "msrvtt_vqa_release.json",
        [{"video": "video0.mp4", "label": {"cat": 1.0}, "question_id": "q0", "sent": "what is playing?"}],
    )
    write_json(
        r / "MSVD" / "annotation" / "msvd_vqa_test.json",
        [{"answer": "man", "id": 5, "question": "who is talking?", "video_id": 1}],
    )
    (r / "MSVD" / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
    write_json(
        r / "MSRVTT" / "train_val_videodatainfo.json",
        {
            "info": {},
            "videos": [
                {
                    "category": 9,
                    "url": "u",
                    "video_id": "video0",
                    "start time": 0.0,
                    "end time": 1.0,
                    "split": "train",
                    "id": 0,
                },
                {
                    "category": 9,
                    "url": "u",
                    "video_id": "video1",
                    "start time": 0.0,
                    "end time": 1.0,
                    "split": "validate",
                    "id": 1,
                },
            ],
            "sentences": [
                {"caption": "a cat plays", "video_id": "video0", "sen_id": 0},
                {"caption": "a cat is playing", "video_id": "video0", "sen_id": 1},
                {"caption": "dog runs", "video_id": "video1", "sen_id": 2},
            ],
        },
    )
    # audio: AudioCaps CSV + wav files (one at 44.1 kHz, stereo)
    audios = r / "audiocaps" / "audios" / "test"
    if sf is not None:
        write_wav(audios / "--L22BmDI6E.wav")
        write_wav(audios / "abc123.wav", sr=44100)
    (r / "audiocaps" / "dataset").mkdir(parents=True)
    with (r / "audiocaps" / "dataset" / "test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerow([103549, "--L22BmDI6E", 30, "A man speaks"])
        w.writerow([103550, "--L22BmDI6E", 30, "Someone talks"])
        w.writerow([103551, "abc123", 0, "Birds chirp"])
    # corrupt media
    write_garbage(r / "bad" / "bad.jpg")
    good = (coco / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes()
    write_garbage(r / "bad" / "truncated.jpg", good[: len(good) // 2])
    write_garbage(r / "bad" / "bad.mp4", bytes(range(256)) * 8)
    write_garbage(r / "bad" / "bad.wav", b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4)
    return r


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE with <s>, </s>, <pad>, trained on the fly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "what is this photo taken looking through? net mesh netting",
        "is it sunny? yes no",
        "how many cats? 2 a cat sits on a mat </a> answer",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _variant(tokenizer, **special):
    """A copy of the tiny tokenizer with different special tokens (e.g. no pad, no bos)."""
    from transformers import PreTrainedTokenizerFast

    kw = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", **special}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **{k: v for k, v in kw.items() if v})


# =========================================================================== readers


def test_read_vqa_v2_standard(root):
    s = read_vqa_v2(
        root / "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        root / "vqa/v2_mscoco_val2014_annotations.json",
        root / "COCO/images",
        check_files=True,
    )
    assert [x.id for x in s] == [420, 730, 421]
    first = s[0]
    assert first.media_id == "COCO_val2014_000000000042"
    assert first.media_path == root / "COCO/images/val2014/COCO_val2014_000000000042.jpg"
    assert first.answers == VQA_ANSWERS and first.answer_type == "other"
    assert first.most_common_answer() == "net"


def test_read_vqa_v2_without_annotations(root):
    s = read_vqa_v2(root / "vqa/v2_OpenEnded_mscoco_val2014_questions.json", None, root / "COCO/images")
    assert all(x.answers == [] for x in s) and s[1].most_common_answer() is None


def test_read_vqa_karpathy_albef_and_release_formats(root):
    albef = read_vqa_karpathy(
        root / "vqa/karpathy_val.json", root / "COCO/images", vg_root=root / "VG/VG_100K", check_files=True
    )
    assert albef[0].answers == VQA_ANSWERS and albef[1].answers == ["yes"]
    assert albef[2].media_path == root / "VG/VG_100K/2375429.jpg" and albef[2].media_id == "2375429"
    with pytest.raises(ValueError, match="vg_root"):
        read_vqa_karpathy(root / "vqa/karpathy_val.json", root / "COCO/images")
    rel = read_vqa_karpathy(root / "vqa/karpathy_train.json", root / "COCO/images", check_files=True)
    assert rel[0].media_path == root / "COCO/images/train2014/COCO_train2014_000000000009.jpg"
    assert rel[0].answers == ["net", "mesh"] and rel[0].weights == [1.0, 0.3]
    assert rel[0].question == "What is this photo taken looking through?" and rel[1].answer_type == "number"


def test_read_gqa_official_and_release(root):
    s = read_gqa(root / "GQA/questions/testdev_balanced_questions.json", root / "GQA/images", check_files=True)
    assert [x.id for x in s] == ["201307251", "201640614"]
    assert s[0].media_path == root / "GQA/images/n356822.jpg" and s[0].answers == ["yes"]
    assert s[0].answer_type == "verify"
    r = read_gqa(root / "GQA/valid.json", root / "GQA/images")
    assert r[0].id == "07333408" and r[0].answers == ["pipe"] and r[0].media_id == "2375429"


def test_read_coco_karpathy_splits(root):
    path, images = root / "COCO/dataset_coco.json", root / "COCO/images"
    train = read_coco_karpathy(path, images, "train")
    assert [x.id for x in train] == [73, 9]  # restval goes to train
    test = read_coco_karpathy(path, images, "test", check_files=True)
    assert test[0].captions == ["A cat sits on a mat.", "A red square."]
    assert test[0].media_id == "COCO_val2014_000000000042"
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000099.jpg"):
        read_coco_karpathy(path, images, "val", check_files=True)
    with pytest.raises(ValueError, match="unknown COCO Karpathy split"):
        read_coco_karpathy(path, images, "dev")


@needs_av
def test_read_msrvtt_qa_official_and_release(root):
    s = read_msrvtt_qa(root / "MSRVTT/annotation/msrvtt_vqa_test.json", root / "MSRVTT/videos/all", check_files=True)
    assert [x.media_id for x in s] == ["video0", "video1"] and s[0].answers == ["cat"] and s[0].id == 0
    assert s[0].modality == "video"
    r = read_msrvtt_qa(root / "MSRVTT/annotation/msrvtt_vqa_release.json", root / "MSRVTT/videos/all")
    assert r[0].id == "q0" and r[0].media_path.name == "video0.mp4" and r[0].answers == ["cat"]


@needs_av
def test_read_msvd_qa_with_name_map(root):
    qa, vids = root / "MSVD/annotation/msvd_vqa_test.json", root / "MSVD/videos/all"
    s = read_msvd_qa(qa, vids, video_name_map=root / "MSVD/youtube_mapping.txt", check_files=True)
    assert s[0].media_id == "-4wsuPCjDBc_5_15" and s[0].id == 5
    s2 = read_msvd_qa(qa, vids, video_name_map={"1": "-4wsuPCjDBc_5_15"})
    assert s2[0].media_path == s[0].media_path
    with pytest.raises(AnnotationError, match="msvd_vqa_test.json: entry 0 has video_id '1'"):
        read_msvd_qa(qa, vids, video_name_map={"vid7": "x"})


@needs_av
def test_read_msrvtt_captions_official_and_release(root, tmp_path):
    info, vids = root / "MSRVTT/train_val_videodatainfo.json", root / "MSRVTT/videos/all"
    train = read_msrvtt_captions(info, vids, "train", check_files=True)
    assert [(x.id, x.captions) for x in train] == [("video0", ["a cat plays", "a cat is playing"])]
    assert [x.id for x in read_msrvtt_captions(info, vids, "val")] == ["video1"]
    assert len(read_msrvtt_captions(info, vids)) == 2
    rel = write_json(tmp_path / "msrvtt_caption_test.json", [{"video": "video0.mp4", "caption": ["x", "y"]}])
    assert read_msrvtt_captions(rel, vids)[0].captions == ["x", "y"]


@needs_sf
def test_read_audiocaps_csv_and_patterns(root, tmp_path):
    csv_path, audios = root / "audiocaps/dataset/test.csv", root / "audiocaps/audios/test"
    s = read_audiocaps(csv_path, audios, check_files=True)
    assert [(x.id, x.captions) for x in s] == [
        ("--L22BmDI6E", ["A man speaks", "Someone talks"]),
        ("abc123", ["Birds chirp"]),
    ]
    assert s[0].modality == "audio"
    by_cap = read_audiocaps(csv_path, audios, filename_pattern="{audiocap_id}.wav")
    assert [x.media_id for x in by_cap] == ["103549", "103550", "103551"]
    rel = write_json(
        tmp_path / "audiocaps_caption_test.json", [{"audio": "--L22BmDI6E.wav", "caption": "A man speaks"}]
    )
    assert read_audiocaps(rel, audios)[0].captions == ["A man speaks"]


# ---------------------------------------------------------------- reader errors


def test_malformed_json_names_file(tmp_path):
    bad = tmp_path / "annotations.json"
    bad.write_text('{"annotations": [ {"question_id": 1,, } ]}')
    with pytest.raises(AnnotationError, match=r"annotations\.json: invalid JSON"):
        read_vqa_v2(write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": []}), bad, tmp_path)


def _vqa_files(tmp: Path, edit) -> tuple[Path, Path]:
    """A two-question VQA v2 questions/annotations pair, after ``edit(questions, annotations)``."""
    q = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "q?", "question_id": 1},
            {"image_id": 1, "question": "q?", "question_id": 2},
        ],
    }
    a = {
        "annotations": [
            {"question_id": 1, "answers": [{"answer": "x"}]},
            {"question_id": 2, "answers": [{"answer": "y"}]},
        ]
    }
    edit(q, a)
    return write_json(tmp / "questions.json", q), write_json(tmp / "annotations.json", a)


def _coco(tmp: Path, drop_sentences: bool):
    e = {
        "filepath": "val2014",
        "filename": "x.jpg",
        "split": "val",
        "cocoid": 1,
        "sentences": [{"raw": "a"}, {"tokens": []}],
    }
    if drop_sentences:
        del e["sentences"]
    return read_coco_karpathy(write_json(tmp / "dataset_coco.json", {"images": [e]}), tmp, "val")


def _csv(tmp: Path, text: str):
    (tmp / "caps.csv").write_text(text)
    return read_audiocaps(tmp / "caps.csv", tmp)


MALFORMED = {
    "vqa_answers": (
        lambda t: read_vqa_v2(*_vqa_files(t, lambda q, a: a["annotations"][1].pop("answers")), t),
        r"annotations\.json: entry 1 has no 'answers'",
    ),
    "vqa_question": (
        lambda t: read_vqa_v2(*_vqa_files(t, lambda q, a: q["questions"][0].pop("question")), t),
        r"questions\.json: entry 0 has no 'question'",
    ),
    "vqa_unmatched": (
        lambda t: read_vqa_v2(*_vqa_files(t, lambda q, a: a["annotations"].pop()), t),
        r"annotations\.json: no annotation for question_id 2",
    ),
    "gqa_image": (
        lambda t: read_gqa(write_json(t / "gqa.json", {"7": {"question": "q", "answer": "a"}}), t),
        r"gqa\.json: question 7 has no 'imageId'",
    ),
    "coco_sentences": (lambda t: _coco(t, True), r"dataset_coco\.json: entry 0 has no 'sentences'"),
    "coco_raw": (lambda t: _coco(t, False), r"dataset_coco\.json: entry 0 sentence 1 has no 'raw'"),
    "msrvtt_question": (
        lambda t: read_msrvtt_qa(write_json(t / "qa.json", [{"answer": "a", "video_id": 0}]), t),
        r"qa\.json: entry 0 has no 'question' or 'sent'",
    ),
    "msrvtt_sentence": (
        lambda t: read_msrvtt_captions(
            write_json(
                t / "info.json",
                {"videos": [{"video_id": "video0", "split": "train"}], "sentences": [{"video_id": "video0"}]},
            ),
            t,
        ),
        r"info\.json: sentence 0 has no 'caption'",
    ),
    "audiocaps_column": (
        lambda t: _csv(t, "audiocap_id,youtube_id,start_time\n1,a,0\n"),
        r"caps\.csv: header has no column 'caption'",
    ),
    "audiocaps_row": (
        lambda t: _csv(t, "audiocap_id,youtube_id,start_time,caption\n1,a,0,hello\n2,b,0,\n"),
        r"caps\.csv: row 1 has no 'caption'",
    ),
    "karpathy_image": (
        lambda t: read_vqa_karpathy(write_json(t / "karpathy.json", [{"question_id": 1, "question": "q"}]), t),
        r"karpathy\.json: entry 0 has no 'image' or 'img_id'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_missing_field_errors_name_file_entry_and_field(tmp_path, case):
    read, message = MALFORMED[case]
    with pytest.raises(AnnotationError, match=message):
        read(tmp_path)


def test_missing_annotation_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "v2_mscoco_val2014_annotations.json"
    q = write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": []})
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        read_vqa_v2(q, missing, tmp_path)
    for call in (
        lambda: read_gqa(tmp_path / "gqa_missing.json", tmp_path),
        lambda: read_audiocaps(tmp_path / "gqa_missing.csv", tmp_path),
        lambda: read_msvd_qa(
            write_json(tmp_path / "qa.json", [{"question": "q", "video_id": 1}]),
            tmp_path,
            video_name_map=tmp_path / "gqa_missing.txt",
        ),
    ):
        with pytest.raises(FileNotFoundError, match="gqa_missing"):
            call()


def test_wrong_top_level_type(tmp_path):
    with pytest.raises(AnnotationError, match="top level is not a JSON list"):
        read_msrvtt_qa(write_json(tmp_path / "qa.json", {"a": 1}), tmp_path)
    with pytest.raises(AnnotationError, match="top level has no 'questions'"):
        read_vqa_v2(write_json(tmp_path / "q.json", {"data_subtype": "val2014"}), None, tmp_path)


# =========================================================================== images


def test_image_loader_resizes_and_normalises(root):
    path = root / "GQA/images/n356822.jpg"
    x = ImageLoader(size=48, mean=MEAN, std=STD)(path, train=False)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    raw = np.asarray(Image.open(path).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC), np.float32) / 255
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)
    default = ImageLoader()(path)
    assert default.shape == (3, 224, 224)


def test_train_augmentation_is_random_but_reproducible(root):
    img = load_image(root / "COCO/images/val2014/COCO_val2014_000000000042.jpg")
    t = ImageTransform(32, MEAN, STD, train=True)
    a = t(img, generator=torch.Generator().manual_seed(1))
    b = t(img, generator=torch.Generator().manual_seed(1))
    outs = [t(img, generator=torch.Generator().manual_seed(s)) for s in range(2, 8)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert any(not torch.equal(a, o) for o in outs)
    frames = t([img, img, img], generator=torch.Generator().manual_seed(3))  # one draw shared by all frames
    assert frames.shape == (3, 3, 32, 32) and torch.equal(frames[0], frames[2])


def test_randaugment_every_op_keeps_size(root):
    img = load_image(root / "COCO/images/val2014/COCO_val2014_000000000042.jpg")
    for op in RandAugment.OPS:
        for strength in (0.7, -0.7):
            out = RandAugment.apply(img, [(op, strength)])
            assert out.size == img.size and out.mode == "RGB"
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        RandAugment(ops=["Solarize!"])


# ---- the release's RandomAugment(2, 7), op by op, against values worked out by hand

def _grid(h=5, w=5):
    """A small RGB image whose pixel (r, c, ch) is 3 * (15 r + 3 c + ch): every value distinct."""
    return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 3


def _op(fn, arr, *args):
    from epalm.data import image as im

    return np.asarray(getattr(im, fn)(Image.fromarray(arr), *args))


def test_release_magnitudes_at_m7():
    ra = RandAugment(2, 7)
    assert ra.argument("Brightness") == pytest.approx(1.36) and ra.argument("Sharpness") == pytest.approx(1.36)
    assert ra.argument("Identity") is None and ra.argument("Equalize") is None
    g = torch.Generator().manual_seed(0)
    assert {round(abs(ra.argument("ShearX", g)), 6) for _ in range(20)} == {0.21}
    assert {round(ra.argument("TranslateY", g), 6) for _ in range(40)} == {7.0, -7.0}  # pixels, not a fraction
    assert {round(ra.argument("Rotate", g), 6) for _ in range(40)} == {21.0, -21.0}
    # the release's op list, ops drawn with replacement, each applied with p = 0.5
    assert RandAugment.OPS == ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
                               "ShearY", "TranslateX", "TranslateY", "Rotate")
    counts = [len(RandAugment(2, 7).sample(torch.Generator().manual_seed(s))) for s in range(400)]
    assert 0.9 < sum(counts) / 400 < 1.1  # expected 2 x 0.5


def test_brightness_truncates_like_the_release():
    arr = np.array([[[0, 100, 200], [10, 187, 188]]], np.uint8)
    out = _op("brightness", arr, 1.36)
    # 100 * 1.36 = 136; 10 * 1.36 = 13.6 -> 13 (truncated); 187 * 1.36 = 254.3 -> 254; 188 * 1.36 = 255.7 -> 255
    assert out.tolist() == [[[0, 136, 255], [13, 254, 255]]]


def test_autocontrast_stretches_each_channel():
    arr = np.array([[[5, 0, 7], [56, 255, 7]], [[30, 128, 7], [6, 10, 7]]], np.uint8)
    out = _op("autocontrast", arr)
    # red: [5, 56] -> scale 255 / 51 = 5, offset -25: 30 -> 125, 6 -> 5; green already full; blue flat
    assert out[..., 0].tolist() == [[0, 255], [125, 5]]
    assert out[..., 1].tolist() == arr[..., 1].tolist()
    assert (out[..., 2] == 7).all()


def test_equalize_matches_pils_rule():
    # one channel with values 0 (x2), 1 (x1), 2 (x1): step = (4 - 1) // 255 = 0 -> unchanged
    small = np.zeros((1, 4, 3), np.uint8)
    small[0, :, 0] = [0, 0, 1, 2]
    assert _op("equalize", small).tolist() == small.tolist()
    # 510 pixels of 0 and 510 of 255: step = 510 // 255 = 2; lut[0] = (2 // 2) // 2 = 0, lut[255] = (1 + 510) // 2 = 255
    two = np.zeros((2, 510, 3), np.uint8)
    two[1] = 255
    assert _op("equalize", two).tolist() == two.tolist()
    # 255 pixels each of 10 and 20 (+ one of 30): step = 510 // 255 = 2; lut[10] = 1 // 2 = 0,
    # lut[20] = (1 + 255) // 2 = 128, lut[30] = (1 + 510) // 2 = 255
    vals = np.array([10] * 255 + [20] * 255 + [30], np.uint8)
    arr = np.stack([vals] * 3, -1)[None]
    out = _op("equalize", arr)[0, :, 0]
    assert (out[:255] == 0).all() and (out[255:510] == 128).all() and out[510] == 255


def test_sharpness_blends_with_the_smoothed_image_inside_the_border():
    arr = np.full((3, 3, 3), 100, np.uint8)
    arr[1, 1] = 230
    out = _op("sharpness", arr, 1.36)
    # centre: degenerate = round((8 * 100 + 5 * 230) / 13) = round(150) = 150; 150 + 1.36 * 80 = 258.8 -> 255
    assert out[1, 1].tolist() == [255, 255, 255]
    assert (np.delete(out.reshape(9, 3), 4, axis=0) == 100).all()  # the 1-pixel border is kept
    arr[1, 1] = 113  # degenerate = (8 * 100 + 5 * 113) / 13 = 105
    out = _op("sharpness", arr, 1.36)
    assert out[1, 1, 0] == int(105 + 1.36 * (113 - 105))  # 115.88 -> 115


def test_translations_are_whole_pixels_with_grey_fill():
    a = _grid()
    left = _op("translate_x", a, 2.0)  # content moves 2 px left
    assert (left[:, :3] == a[:, 2:]).all() and (left[:, 3:] == 128).all()
    right = _op("translate_x", a, -2.0)
    assert (right[:, 2:] == a[:, :3]).all() and (right[:, :2] == 128).all()
    up = _op("translate_y", a, 1.0)
    assert (up[:4] == a[1:]).all() and (up[4:] == 128).all()


def test_shears_move_rows_and_columns():
    a = _grid()
    sx = _op("shear_x", a, 1.0)  # x' = x + y: row r shifts r pixels right
    for r in range(5):
        assert (sx[r, r:] == a[r, :5 - r]).all() and (sx[r, :r] == 128).all(), r
    sy = _op("shear_y", a, -1.0)  # y' = y - x: column c shifts c pixels up
    for c in range(5):
        assert (sy[:5 - c, c] == a[c:, c]).all() and (sy[5 - c:, c] == 128).all(), c


def test_rotate_about_opencvs_centre():
    a = _grid()
    out = _op("rotate", a, 90.0)  # counter-clockwise about (W/2, H/2) = (2.5, 2.5) in pixel centres
    # forward map x' = y, y' = W - x: dst[r, c] = src[c, W - r]; row 0 comes from x = 5 (outside): fill
    assert (out[0] == 128).all()
    for r in range(1, 5):
        for c in range(5):
            assert (out[r, c] == a[c, 5 - r]).all(), (r, c)
    assert (_op("rotate", a, 0.0) == a).all()


def test_identity_and_skipped_ops_leave_the_image():
    img = Image.fromarray(_grid())
    assert np.array_equal(np.asarray(RandAugment.apply(img, [("Identity", None)])), _grid())
    assert RandAugment(2, 7, p=0.0).sample(torch.Generator().manual_seed(0)) == []


@pytest.mark.parametrize("name", ["bad.jpg", "truncated.jpg", "absent.jpg"])
def test_corrupt_or_missing_image_raises_media_error(root, name):
    with pytest.raises(MediaError, match=name) as info:
        load_image(root / "bad" / name)
    assert info.value.path.endswith(name)


# =========================================================================== video


def test_frame_sampling_counts_and_segments():
    assert sample_frame_indices(4, 10) == [0, 3, 5, 8]  # middles of [0,2) [2,5) [5,7) [7,10)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = sample_frame_indices(8, 100, train=True, generator=g)
        assert len(idx) == 8 and idx == sorted(idx)
        assert all(12 * i <= j < 12 * (i + 1) + 5 for i, j in enumerate(idx))  # inside segment i (width 12.5)
    assert sample_frame_indices(8, 3) == [0, 0, 0, 1, 1, 1, 2, 2]  # short video: frames repeat, count exact
    with pytest.raises(ValueError):
        sample_frame_indices(0, 10)


@needs_av
def test_read_video_frames_picks_the_sampled_frames(root):
    frames = read_video_frames(root / "MSRVTT/videos/all/video0.mp4", 4, train=False)
    levels = [float(np.asarray(f, np.float32).mean()) for f in frames]
    assert len(frames) == 4 and frames[0].size == (32, 32)
    for level, idx in zip(levels, [0, 3, 5, 8], strict=True):
        assert abs(level - (20 * idx + 10)) < 8, levels


@needs_av
@pytest.mark.parametrize("name, n", [("video0.mp4", 8), ("video1.mp4", 8), ("video2.mkv", 8), ("video0.mp4", 16)])
def test_video_loader_shape(root, name, n):
    loader = VideoLoader(num_frames=n, size=40, mean=MEAN, std=STD)
    for train in (False, True):
        x = loader(root / "MSRVTT/videos/all" / name, train=train)
        assert x.shape == (n, 3, 40, 40) and torch.isfinite(x).all()


class _VideoFrames(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.stack([torch.from_numpy(np.asarray(f).copy()) for f in read_video_frames(self.paths[i], 3)])


@needs_av
def test_video_decodes_in_a_forked_worker_after_the_parent_decoded(tmp_path):
    """PyAV >= 18 keeps a threaded swscale context per thread: a DataLoader worker forked after the
    parent converted a frame inherited it without its threads and waited forever (bench_data --tiny
    hung in CI). The parent decodes first here, as an evaluation pass or a preview does."""
    paths = [write_video(tmp_path / f"v{i}.mp4", n_frames=6, size=160) for i in range(2)]
    in_parent = [_VideoFrames(paths)[i] for i in range(2)]
    loader = torch.utils.data.DataLoader(_VideoFrames(paths), batch_size=1, num_workers=1, timeout=60,
                                         multiprocessing_context="fork")
    in_worker = [batch[0] for batch in loader]  # a hang raises after `timeout` s instead of blocking
    assert len(in_worker) == 2
    for a, b in zip(in_parent, in_worker, strict=True):
        assert torch.equal(a, b)


@needs_av
def test_frame_conversion_matches_pyav(tmp_path):
    """Our per-process converter gives the same RGB pixels as PyAV's ``frame.to_image()``."""
    from epalm.data.video import _frame_to_image

    rng = np.random.default_rng(0)
    blocks = [np.kron(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)) for _ in range(3)]
    path = write_video(tmp_path / "colour.mp4", frames=blocks)  # 96x64, 8x8 blocks of random colour
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            ours, theirs = _frame_to_image(frame), frame.to_image()
            assert ours.mode == "RGB" and ours.size == theirs.size == (96, 64)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@needs_av
@pytest.mark.parametrize("name", ["bad.mp4", "bad.jpg", "absent.mp4"])
def test_corrupt_video_raises_media_error(root, name):
    with pytest.raises(MediaError, match=name):
        read_video_frames(root / "bad" / name)


# =========================================================================== audio


@needs_sf
def test_load_audio_and_ast_fbank_shape(root):
    wav, sr = load_audio(root / "audiocaps/audios/test/--L22BmDI6E.wav")
    assert sr == 16000 and wav.shape == (16000,) and wav.dtype == torch.float32
    feats = ASTFeatures()
    x = feats(wav, sr)
    assert x.shape == (1024, 128) and torch.isfinite(x).all()
    assert torch.equal(x, feats(wav, sr))  # eval is deterministic
    pad_value = (0 - feats.mean) / (2 * feats.std)  # frames past the 1 s clip are zero-padded, then normalised
    assert torch.allclose(x[200:], torch.full_like(x[200:], pad_value))
    loud = x[:98].mean(0)
    assert loud.argmax() < 30  # 440 Hz energy sits in the low mel bins


@needs_sf
def test_audio_loader_resamples_other_rates(root):
    x = AudioLoader("ast")(root / "audiocaps/audios/test/abc123.wav")  # 44.1 kHz file
    y = AudioLoader("ast")(root / "audiocaps/audios/test/--L22BmDI6E.wav")
    assert x.shape == (1024, 128)
    # same tone, same features once at 16 kHz (the top bins only hold float32 noise at the log floor)
    assert torch.allclose(x[:90, :80], y[:90, :80], atol=0.05)
    w = WhisperFeatures()(*load_audio(root / "audiocaps/audios/test/abc123.wav"))
    assert w.shape == (80, 3000) and torch.isfinite(w).all()


def test_resample_is_accurate_and_band_limited():
    for orig, new in [(44100, 16000), (8000, 16000), (48000, 16000)]:
        t = torch.arange(orig, dtype=torch.float64) / orig
        y = resample(torch.sin(2 * math.pi * 440 * t), orig, new)
        assert y.shape == (new,)
        ref = torch.sin(2 * math.pi * 440 * torch.arange(new, dtype=torch.float64) / new)
        assert (y - ref)[100:-100].abs().max() < 2e-3
    t = torch.arange(44100, dtype=torch.float64) / 44100
    alias = resample(torch.sin(2 * math.pi * 12000 * t), 44100, 16000)  # above the new Nyquist: removed
    assert alias[100:-100].pow(2).mean().sqrt() < 0.01


def test_spec_augment_masks_frequency_and_time():
    spec = torch.ones(1024, 128)
    widths_f, widths_t = [], []
    for seed in range(10):
        out = spec_augment(spec, 24, 96, generator=torch.Generator().manual_seed(seed))
        zero_cols = (out == 0).all(0).nonzero().flatten()
        zero_rows = (out == 0).all(1).nonzero().flatten()
        for z, limit, acc in ((zero_cols, 24, widths_f), (zero_rows, 96, widths_t)):
            if len(z):
                assert z.max() - z.min() + 1 == len(z) <= limit  # one contiguous band, narrower than the param
            acc.append(len(z))
        assert torch.equal(spec, torch.ones(1024, 128))  # input untouched
    assert max(widths_f) > 0 and max(widths_t) > 0


@needs_sf
def test_ast_train_mode_applies_specaugment(root):
    wav, sr = load_audio(root / "audiocaps/audios/test/--L22BmDI6E.wav")
    feats = ASTFeatures()
    torch.manual_seed(0)
    eval_x = feats(wav, sr)
    masked = [feats(wav, sr, train=True, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    assert any(not torch.equal(eval_x, m) for m in masked)
    fill = (0 - feats.mean) / (2 * feats.std)  # masks are applied before normalisation, as in the release
    assert any(torch.isclose(m[:98], torch.tensor(fill)).all(0).any() for m in masked)


@needs_sf
@pytest.mark.parametrize("name", ["bad.wav", "bad.jpg", "absent.wav"])
def test_corrupt_audio_raises_media_error(root, name):
    with pytest.raises(MediaError, match=name):
        AudioLoader("ast")(root / "bad" / name)


# =========================================================================== text


def test_vqa_template():
    assert vqa_prompt("Is it sunny?") == "Is it sunny?</a>"
    assert vqa_prompt("How many cats ") == "How many cats?</a>"
    assert vqa_prompt("Is it sunny?", question_mark="always") == "Is it sunny??</a>"
    assert vqa_prompt("Is it?", separator=" Answer:") == "Is it? Answer:"
    assert vqa_text("Is it sunny?", "yes") == "Is it sunny?</a>yes"


def test_encode_answer_only_vs_all(tokenizer):
    prompt, answer = vqa_prompt("is it sunny"), "yes"
    enc = encode_example(tokenizer, prompt, answer)
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.input_ids[-1] == tokenizer.eos_token_id
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "yes</s>"
    n_prompt = len(encode_prompt(tokenizer, prompt))
    assert enc.input_ids[:n_prompt] == encode_prompt(tokenizer, prompt)  # training prefix == generation prompt
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    full = encode_example(tokenizer, prompt, answer, loss_on="all")
    assert full.input_ids == enc.input_ids
    assert full.labels == [IGNORE_INDEX] + full.input_ids[1:]  # everything but BOS
    assert tokenizer.decode(full.input_ids[1:]) == "is it sunny?</a>yes</s>"
    cut = encode_example(tokenizer, prompt, answer, max_length=4)
    assert (
        len(cut.input_ids) == 4
        and cut.input_ids[0] == tokenizer.bos_token_id
        and cut.input_ids[-1] == tokenizer.eos_token_id
    )
    with pytest.raises(ValueError, match="loss_on"):
        encode_example(tokenizer, prompt, answer, loss_on="question")


def test_tokenizer_without_bos_or_pad(tokenizer):
    no_bos = _variant(tokenizer, bos_token=None)
    assert no_bos.bos_token_id is None
    enc = encode_example(no_bos, "hi?</a>", "yes")
    assert enc.input_ids[0] != tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    no_pad = _variant(tokenizer, pad_token=None)
    assert pad_token_id_of(no_pad) == no_pad.eos_token_id
    batch = make_collate_fn(no_pad)(
        [
            {"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels)}
            for e in (
                encode_example(no_pad, "a?</a>", "yes"),
                encode_example(no_pad, "is it a long question?</a>", "no"),
            )
        ]
    )
    eos = no_pad.eos_token_id
    # pads are eos ids but masked out; the real EOS stays a target
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == eos).all()
    assert (batch["labels"][0] == eos).sum() == 1 and (batch["labels"][1] == eos).sum() == 1


def test_padding_sides_and_generation_inputs(tokenizer):
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    prompts = [vqa_prompt("is it sunny"), vqa_prompt("how many cats are there on the mat")]
    gen = build_generation_inputs(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    assert gen["input_ids"][0, 0] == pad and gen["attention_mask"][0, 0] == 0  # left padded
    assert (gen["input_ids"][:, -1] != pad).all()
    assert gen["input_ids"][0][gen["attention_mask"][0] == 1].tolist() == encode_prompt(tokenizer, prompts[0])
    caption_prompt = build_generation_inputs(tokenizer, ["", ""])
    assert caption_prompt["input_ids"].tolist() == [[tokenizer.bos_token_id]] * 2


def test_add_separator_token_never_resizes(tokenizer):
    tok = _variant(tokenizer)
    before = len(tok)
    with pytest.raises(ValueError, match="embedding rows"):
        add_separator_token(tok, "</a>", num_embeddings=before)
    assert len(tok) == before
    sep_id = add_separator_token(tok, "</a>", num_embeddings=before + 8)
    assert sep_id == before and len(tok) == before + 1
    assert sep_id in tok("is it?</a>yes", add_special_tokens=False)["input_ids"]
    assert add_separator_token(tok, "</a>", num_embeddings=before + 8) == sep_id  # idempotent


# =========================================================================== datasets


@pytest.fixture(scope="module")
def vqa_samples(root):
    return read_vqa_v2(
        root / "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        root / "vqa/v2_mscoco_val2014_annotations.json",
        root / "COCO/images",
    )


def test_vqa_dataset_items_and_batches(vqa_samples, tokenizer):
    ds = VQADataset(vqa_samples, tokenizer, split="val", media_loader=ImageLoader(32, MEAN, STD))
    item = ds[0]
    assert item["sample_id"] == 420 and item["media_id"] == "COCO_val2014_000000000042"
    assert item["media"].shape == (3, 32, 32) and item["answer"] == "net" and len(item["answers"]) == 10
    assert tokenizer.decode(item["input_ids"][1:]) == "What is this photo taken looking through?</a>net</s>"
    assert tokenizer.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX]) == "net</s>"
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=make_collate_fn(tokenizer))
    batch = next(iter(loader))
    assert batch["media"].shape == (3, 3, 32, 32)
    B, L = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, L) and batch["attention_mask"].shape == (B, L)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["attention_mask"][:, 0].all()  # right padded
    assert batch["prompt_attention_mask"][:, -1].all()  # left padded
    assert batch["sample_id"] == [420, 730, 421] and batch["answer"] == ["net", "yes", "2"]
    full = VQADataset(vqa_samples, tokenizer, media_loader=ImageLoader(32, MEAN, STD), loss_on="all")[1]
    assert full["labels"][0] == IGNORE_INDEX and (full["labels"][1:] == full["input_ids"][1:]).all()


def test_vqa_dataset_train_samples_answers(vqa_samples, tokenizer):
    ds = VQADataset(vqa_samples, tokenizer, train=True, media_loader=ImageLoader(32, MEAN, STD))
    torch.manual_seed(0)
    seen = {ds[0]["answer"] for _ in range(60)}
    assert seen <= set(VQA_ANSWERS) and "net" in seen and len(seen) > 1
    weighted = QASample(1, "m", Path("m.jpg"), "q", ["a", "b"], weights=[1.0, 0.0])
    assert {ds.choose_answer(weighted) for _ in range(20)} == {"a"}


def test_dataset_items_draw_every_random_choice_from_the_given_generator(vqa_samples, tokenizer):
    """Augmentation and answer choice come from the generator, not the global RNG (the trainer seeds
    it by (seed, epoch, index), so a sample does not depend on the worker that loads it)."""
    ds = VQADataset(vqa_samples, tokenizer, train=True, media_loader=ImageLoader(32, MEAN, STD))

    def item(seed):
        torch.manual_seed(1234 + seed * 7)  # global RNG scrambled differently each time: must not matter
        return ds.get(0, generator=torch.Generator().manual_seed(seed))

    a, b = item(5), item(5)
    assert torch.equal(a["media"], b["media"]) and a["answer"] == b["answer"]
    others = [item(s) for s in range(6, 16)]
    assert any(not torch.equal(a["media"], o["media"]) for o in others)  # augmentation follows the seed
    assert len({o["answer"] for o in others} | {a["answer"]}) > 1  # so does the sampled answer


def test_few_shot_subsets_are_seeded_and_nonempty(vqa_samples, tokenizer):
    assert few_shot_indices(100, 0.1, seed=3) == few_shot_indices(100, 0.1, seed=3)
    assert len(few_shot_indices(100, 0.1)) == 10 and len(few_shot_indices(100, 0.01)) == 1
    assert len(few_shot_indices(100, 0.0012)) == 1  # at least one sample
    assert len(few_shot_indices(443757, 0.0012)) == 532
    assert few_shot_indices(1000, 0.01, seed=0) != few_shot_indices(1000, 0.01, seed=1)
    assert few_shot_indices(50, num_samples=7) == sorted(few_shot_indices(50, num_samples=7))
    with pytest.raises(ValueError):
        few_shot_indices(10, 1.5)
    a = VQADataset(vqa_samples, tokenizer, fraction=0.0012, seed=5, media_loader=ImageLoader(32, MEAN, STD))
    b = VQADataset(vqa_samples, tokenizer, fraction=0.0012, seed=5, media_loader=ImageLoader(32, MEAN, STD))
    assert len(a) == 1 and a.samples == b.samples


def test_feature_lookup_replaces_media(vqa_samples, tokenizer):
    cache = {"COCO_val2014_000000000042": torch.ones(6, 8), "COCO_val2014_000000000073": torch.zeros(6, 8)}
    ds = VQADataset(vqa_samples, tokenizer, feature_lookup=lambda mid: cache[mid])
    item = ds[1]
    assert "media" not in item and torch.equal(item["features"], cache["COCO_val2014_000000000073"])
    batch = make_collate_fn(tokenizer)([ds[0], ds[1]])
    assert batch["features"].shape == (2, 6, 8)
    assert torch.equal(VQADataset(vqa_samples, tokenizer, feature_lookup=cache)[0]["features"], torch.ones(6, 8))
    del cache["COCO_val2014_000000000073"]
    with pytest.raises(MediaError, match="COCO_val2014_000000000073"):
        ds[1]


def test_on_error_raise_and_skip(root, tokenizer):
    samples = [
        QASample(
            1, "COCO_val2014_000000000042", root / "COCO/images/val2014/COCO_val2014_000000000042.jpg", "q?", ["a"]
        ),
        QASample(2, "bad", root / "bad/bad.jpg", "q?", ["a"]),
        QASample(3, "truncated", root / "bad/truncated.jpg", "q?", ["a"]),
    ]
    strict = VQADataset(samples, tokenizer, media_loader=ImageLoader(32, MEAN, STD))
    with pytest.raises(MediaError, match="bad.jpg"):
        strict[1]
    lenient = VQADataset(samples, tokenizer, media_loader=ImageLoader(32, MEAN, STD), on_error="skip")
    with pytest.warns(SkippedSampleWarning, match="bad.jpg"):
        assert lenient[1] is None
    collate = make_collate_fn(tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate([lenient[i] for i in range(3)])
    assert any("truncated.jpg" in str(w.message) for w in caught)
    assert batch["sample_id"] == [1] and batch["media"].shape == (1, 3, 32, 32)
    assert collate([None, None]) is None
    assert lenient.skipped == [2, 2, 3]


def test_caption_dataset_expansion_and_references(root, tokenizer):
    samples = read_coco_karpathy(root / "COCO/dataset_coco.json", root / "COCO/images", "train")
    train = CaptionDataset(samples, tokenizer, train=True, media_loader=ImageLoader(32, MEAN, STD))
    assert len(train) == 3  # one item per (image, caption)
    item = train[1]
    assert item["sample_id"] == 73 and item["caption"] == "Something blue."
    assert item["references"] == ["A blue thing.", "Something blue."]
    assert tokenizer.decode(item["input_ids"]) == "<s>Something blue.</s>"
    assert item["prompt_ids"].tolist() == [tokenizer.bos_token_id]
    ev = CaptionDataset(samples, tokenizer, media_loader=ImageLoader(32, MEAN, STD))
    assert len(ev) == 2 and ev[0]["caption"] == "A blue thing."
    prompted = CaptionDataset(samples, tokenizer, prompt="a picture of", media_loader=ImageLoader(32, MEAN, STD))[0]
    assert tokenizer.decode(prompted["input_ids"]) == "<s>a picture of A blue thing.</s>"
    assert tokenizer.decode([t for t in prompted["labels"].tolist() if t != IGNORE_INDEX]) == " A blue thing.</s>"
    assert tokenizer.decode(prompted["prompt_ids"]) == "<s>a picture of"
    few = CaptionDataset(samples, tokenizer, train=True, fraction=0.01, seed=1, media_loader=ImageLoader(32, MEAN, STD))
    assert len(few) == 1


@needs_av
@needs_sf
def test_video_qa_and_audio_caption_datasets(root, tokenizer):
    qa = read_msrvtt_qa(root / "MSRVTT/annotation/msrvtt_vqa_test.json", root / "MSRVTT/videos/all")
    ds = VQADataset(qa, tokenizer, train=True, media_loader=VideoLoader(8, 32, MEAN, STD))
    batch = make_collate_fn(tokenizer)([ds[0], ds[1]])
    assert batch["media"].shape == (2, 8, 3, 32, 32) and batch["media_id"] == ["video0", "video1"]
    caps = read_audiocaps(root / "audiocaps/dataset/test.csv", root / "audiocaps/audios/test")
    ads = CaptionDataset(caps, tokenizer, train=True)  # default loader for audio: AST fbanks + SpecAugment
    assert len(ads) == 3 and ads[0]["media"].shape == (1024, 128)
    bad = [CaptionSample("x", "bad", root / "bad/bad.wav", ["noise"], "audio")]
    with pytest.warns(SkippedSampleWarning, match="bad.wav"):
        assert CaptionDataset(bad, tokenizer, on_error="skip")[0] is None


def test_load_samples_release_layout(root, tokenizer):
    assert [s.id for s in load_samples("vqa_v2", root, "karpathy_val")] == [420, 730, 9001]
    assert len(load_samples("vqa_v2_standard", root, "val")) == 3
    assert len(load_samples("gqa", root, "testdev")) == 2
    assert [s.id for s in load_samples("coco", root, "test")] == [42]
    assert len(load_samples("msrvtt_qa", root, "test")) == 1 + 1
    assert load_samples("msvd_qa", root, "test")[0].media_id == "-4wsuPCjDBc_5_15"
    assert load_samples("audiocaps", root, "test")[1].id == "abc123"
    ds = CaptionDataset.from_name("coco", root, "test", tokenizer, media_loader=ImageLoader(32, MEAN, STD))
    assert ds.split == "test" and len(ds) == 1
    with pytest.raises(ValueError, match="unknown dataset"):
        load_samples("nocaps", root, "val")
