"""Architectures of the paper's models (and a Llama-family LM) as transformers configs.

Used to count parameters on the meta device and to benchmark real shapes with random weights,
without downloading anything.
"""

from __future__ import annotations

from transformers import ASTConfig, LlamaConfig, OPTConfig, PretrainedConfig, TimesformerConfig, ViTConfig


def _opt(hidden: int, layers: int, heads: int, ffn: int, proj: int | None = None, pre_ln: bool = True) -> OPTConfig:
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                     word_embed_proj_dim=proj or hidden, vocab_size=50272, max_position_embeddings=2048,
                     do_layer_norm_before=pre_ln, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                     dropout=0.0, attention_dropout=0.0)


LM_CONFIGS = {
    "facebook/opt-125m": lambda: _opt(768, 12, 12, 3072),
    "facebook/opt-350m": lambda: _opt(1024, 24, 16, 4096, proj=512, pre_ln=False),
    "facebook/opt-1.3b": lambda: _opt(2048, 24, 32, 8192),
    "facebook/opt-2.7b": lambda: _opt(2560, 32, 32, 10240),
    "facebook/opt-6.7b": lambda: _opt(4096, 32, 32, 16384),
    "HuggingFaceTB/SmolLM2-135M": lambda: LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "meta-llama/Llama-3.2-1B": lambda: LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, pad_token_id=128001),
}

ENCODER_CONFIGS = {
    "vit_base_patch16_224": lambda: ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072, image_size=224, patch_size=16,
                                              layer_norm_eps=1e-6),
    "vit_large_patch16_224": lambda: ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, image_size=224, patch_size=16,
                                               layer_norm_eps=1e-6),
    "facebook/timesformer-base-finetuned-k400": lambda: TimesformerConfig(image_size=224, patch_size=16,
                                                                          num_frames=8, hidden_size=768),
    "MIT/ast-finetuned-audioset-10-10-0.4593": lambda: ASTConfig(num_mel_bins=128, max_length=1024,
                                                                 hidden_size=768, num_hidden_layers=12),
}


def lm_config(name: str) -> PretrainedConfig:
    if name not in LM_CONFIGS:
        raise KeyError(f"no built-in config for LM {name!r}; known: {sorted(LM_CONFIGS)}")
    return LM_CONFIGS[name]()


def encoder_config(name: str) -> PretrainedConfig:
    name = name.removeprefix("framewise:")
    if name not in ENCODER_CONFIGS:
        raise KeyError(f"no built-in config for encoder {name!r}; known: {sorted(ENCODER_CONFIGS)}")
    return ENCODER_CONFIGS[name]()


def build_random(epalm_config, device: str = "cpu", dtype=None):
    """EPALM with randomly initialised LM and encoder of the configured architectures (no download).

    ``device="meta"`` allocates nothing: enough to count parameters of multi-billion models.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from epalm.core.encoders import FrameWiseEncoder, wrap_hf_encoder
    from epalm.core.model import EPALM

    with torch.device(device):
        lm_cfg = lm_config(epalm_config.lm)
        lm_cfg._attn_implementation = "sdpa"
        lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa", torch_dtype=dtype)
        encoder = wrap_hf_encoder(AutoModel.from_config(encoder_config(epalm_config.encoder)),
                                  num_layers=epalm_config.num_encoder_layers)
        if epalm_config.encoder.startswith("framewise:"):
            encoder = FrameWiseEncoder(encoder)
        if dtype is not None:
            encoder.to(dtype)
        return EPALM(lm, encoder, epalm_config)
