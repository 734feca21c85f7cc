"""Tiny randomly initialised models built from configs: real code paths, milliseconds to load."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    ViTConfig,
    ViTModel,
)

from epalm.core.encoders import wrap_hf_encoder

VOCAB = 97
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and CI has 2 cores)


def tiny_lm(family: str, num_layers: int = 4, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if family == "opt":
        cfg = OPTConfig(hidden_size=32, num_hidden_layers=num_layers, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                        attention_dropout=0.0, **common)
        model = OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, head_dim=8,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **common)
        model = Qwen3ForCausalLM(cfg)
    elif family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=64, sliding_window=4, **common)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    return model.eval()


def tiny_vit(num_layers: int = 3, image_size: int = 16, seed: int = 1):
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=48,
                    image_size=image_size, patch_size=8, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def tiny_encoder(num_layers: int = 2):
    return wrap_hf_encoder(tiny_vit(), num_layers=num_layers)


@pytest.fixture
def pixels():
    torch.manual_seed(3)
    return torch.randn(3, 3, 16, 16)


@pytest.fixture
def text():
    """Right-padded batch of 3 with lengths 6, 4, 5."""
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask
