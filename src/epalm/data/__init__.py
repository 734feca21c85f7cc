"""Data for eP-ALM: readers of the official benchmark formats, media decoding, text and datasets.

* :mod:`.readers` -- VQA v2 (standard and Karpathy), GQA, COCO Karpathy captions, MSRVTT-QA,
  MSVD-QA, MSR-VTT captions, AudioCaps -> lists of :class:`QASample` / :class:`CaptionSample`
  (its module docstring documents the expected directory layouts);
* :mod:`.image`, :mod:`.video`, :mod:`.audio` -- media loaders returning encoder-ready tensors
  (PyAV and soundfile are imported only when a video/audio file is read);
* :mod:`.text` -- templates, tokenization with answer-only or full labels, collation;
* :mod:`.datasets` -- :class:`VQADataset`, :class:`CaptionDataset`.
"""

from epalm.data.audio import ASTFeatures, AudioLoader, WhisperFeatures, load_audio, resample, spec_augment
from epalm.data.datasets import (
    CaptionDataset,
    SkippedSampleWarning,
    VQADataset,
    default_media_loader,
    few_shot_indices,
    load_samples,
)
from epalm.data.errors import AnnotationError, MediaError
from epalm.data.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASE_MEAN,
    RELEASE_STD,
    ImageLoader,
    ImageTransform,
    RandAugment,
    load_image,
)
from epalm.data.readers import (
    load_video_name_map,
    read_audiocaps,
    read_coco_karpathy,
    read_gqa,
    read_msrvtt_captions,
    read_msrvtt_qa,
    read_msvd_qa,
    read_video_qa,
    read_vqa_karpathy,
    read_vqa_v2,
)
from epalm.data.records import CaptionSample, QASample
from epalm.data.text import (
    DEFAULT_SEPARATOR,
    IGNORE_INDEX,
    DataCollator,
    Encoded,
    add_separator_token,
    build_generation_inputs,
    caption_text,
    encode_example,
    encode_prompt,
    make_collate_fn,
    pad_sequences,
    pad_token_id_of,
    vqa_prompt,
    vqa_text,
)
from epalm.data.video import VideoLoader, read_video_frames, sample_frame_indices

__all__ = [
    "AnnotationError",
    "MediaError",
    "QASample",
    "CaptionSample",
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
    "RELEASE_MEAN",
    "RELEASE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "ImageTransform",
    "RandAugment",
    "ImageLoader",
    "VideoLoader",
    "read_video_frames",
    "sample_frame_indices",
    "AudioLoader",
    "ASTFeatures",
    "WhisperFeatures",
    "load_audio",
    "resample",
    "spec_augment",
    "DEFAULT_SEPARATOR",
    "IGNORE_INDEX",
    "vqa_prompt",
    "vqa_text",
    "caption_text",
    "pad_token_id_of",
    "add_separator_token",
    "Encoded",
    "encode_example",
    "encode_prompt",
    "pad_sequences",
    "build_generation_inputs",
    "DataCollator",
    "make_collate_fn",
    "VQADataset",
    "CaptionDataset",
    "SkippedSampleWarning",
    "few_shot_indices",
    "default_media_loader",
    "load_samples",
]
