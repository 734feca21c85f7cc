"""Every encoder family returns the [CLS] (or mean) of its last k layers after the final norm."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    ASTConfig,
    ASTModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    TimesformerConfig,
    TimesformerModel,
    WhisperConfig,
    WhisperModel,
)

from conftest import tiny_vit
from epalm.core.encoders import FrameWiseEncoder, find_layer_stack, wrap_hf_encoder

SMALL = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48)


def check_last_level(encoder, inputs, expected_last):
    out = encoder(inputs)
    assert out.shape == (inputs.shape[0], encoder.num_layers, encoder.hidden_size)
    torch.testing.assert_close(out[:, -1], expected_last, rtol=1e-5, atol=1e-5)
    assert not out.requires_grad
    return out


def test_hf_vit_cls_after_final_norm():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    enc = wrap_hf_encoder(vit, num_layers=2)
    ref = vit(pixel_values=x, output_hidden_states=True)
    out = check_last_level(enc, x, ref.last_hidden_state[:, 0])
    torch.testing.assert_close(out[:, 0], vit.layernorm(ref.hidden_states[-2])[:, 0])  # earlier level, same norm
    assert enc.requires_grad_ is not None and all(not p.requires_grad for p in enc.parameters())


def test_clip_and_siglip_vision_towers():
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=8, **SMALL)).eval()
    x = torch.randn(2, 3, 16, 16)
    check_last_level(wrap_hf_encoder(clip, 2), x, clip(pixel_values=x).pooler_output)
    siglip = SiglipVisionModel(SiglipVisionConfig(image_size=16, patch_size=8, **SMALL)).eval()
    check_last_level(wrap_hf_encoder(siglip, 2), x, siglip(pixel_values=x).last_hidden_state.mean(1))


def test_dinov2():
    dino = Dinov2Model(Dinov2Config(image_size=28, patch_size=14, **SMALL)).eval()
    x = torch.randn(2, 3, 28, 28)
    check_last_level(wrap_hf_encoder(dino, 3), x, dino(pixel_values=x).last_hidden_state[:, 0])


def test_timesformer_video():
    cfg = TimesformerConfig(image_size=16, patch_size=8, num_frames=2, **SMALL)
    model = TimesformerModel(cfg).eval()
    video = torch.randn(2, 2, 3, 16, 16)
    check_last_level(wrap_hf_encoder(model, 2), video, model(pixel_values=video).last_hidden_state[:, 0])


def test_ast_audio():
    cfg = ASTConfig(num_mel_bins=16, max_length=32, patch_size=16, frequency_stride=8, time_stride=8, **SMALL)
    model = ASTModel(cfg).eval()
    spec = torch.randn(2, 32, 16)
    check_last_level(wrap_hf_encoder(model, 2), spec, model(input_values=spec).last_hidden_state[:, 0])


def test_whisper_encoder_mean_pooled():
    cfg = WhisperConfig(d_model=24, encoder_layers=3, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                        max_source_positions=10, vocab_size=50, pad_token_id=0, bos_token_id=1,
                        eos_token_id=1, decoder_start_token_id=1)
    model = WhisperModel(cfg).eval()
    feats = torch.randn(2, 8, 20)  # 2 * max_source_positions frames
    enc = wrap_hf_encoder(model, 2)
    check_last_level(enc, feats, model.encoder(input_features=feats).last_hidden_state.mean(1))


def test_framewise_video_averages_frames():
    enc = wrap_hf_encoder(tiny_vit(), 2)
    video = torch.randn(2, 4, 3, 16, 16)
    out = FrameWiseEncoder(enc)(video)
    expected = torch.stack([enc(video[:, t]) for t in range(4)], 1).mean(1)
    torch.testing.assert_close(out, expected)
    images = torch.randn(2, 3, 16, 16)  # images are one-frame videos: train on images, answer about videos
    torch.testing.assert_close(FrameWiseEncoder(enc)(images), enc(images))
    with pytest.raises(ValueError, match="video must be"):
        FrameWiseEncoder(enc)(torch.randn(3, 16, 16))


def test_all_tokens_for_magma_star():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    tokens = wrap_hf_encoder(vit, 2)(x, all_tokens=True)
    torch.testing.assert_close(tokens, vit(pixel_values=x).last_hidden_state)


def test_unknown_encoder_and_bad_depth():
    with pytest.raises(ValueError, match="num_encoder_layers=7 but the encoder has 3 layers"):
        wrap_hf_encoder(tiny_vit(), 7)
    with pytest.raises(ValueError, match="cannot find the layer stack of Linear"):
        find_layer_stack(torch.nn.Linear(2, 2))


class TimmShapedViT(torch.nn.Module):
    """The attributes of timm's VisionTransformer that wrap_timm_vit relies on (timm itself needs torchvision)."""

    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.patch_embed.img_size = (16, 16)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_timm_style_vit_wrapper():
    from epalm.core.encoders import wrap_timm_vit

    model = TimmShapedViT().eval()
    x = torch.randn(2, 3, 16, 16)
    enc = wrap_timm_vit(model, 2)
    check_last_level(enc, x, model.forward_features(x)[:, 0])
    with pytest.raises(ValueError, match="expects 16x16"):
        enc(torch.randn(2, 3, 32, 32))
