"""Save/load, parameter counts, presets and input errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_encoder, tiny_lm, tiny_vit
from epalm import EPALM, EPALMConfig
from epalm.core.config import VARIANTS
from epalm.core.presets import build_random


@pytest.fixture
def saved_parts(tmp_path):
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("opt").save_pretrained(lm_dir)
    tiny_vit().save_pretrained(enc_dir)
    return str(lm_dir), str(enc_dir)


def test_save_load_round_trip_reproduces_logits(saved_parts, tmp_path, pixels, text):
    lm_dir, enc_dir = saved_parts
    model = EPALM.from_config(EPALMConfig(lm=lm_dir, encoder=enc_dir, variant="epalm", num_encoder_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids, mask = text
    before = model(pixels, ids, mask).logits
    model.save_pretrained(tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["epalm_config.json", "epalm_weights.safetensors"]  # no temp files left behind
    saved = load_file(tmp_path / "run" / "epalm_weights.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}  # trainable only
    loaded = EPALM.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded(pixels, ids, mask).logits, before)


def test_bad_checkpoints_give_clear_errors(saved_parts, tmp_path):
    lm_dir, enc_dir = saved_parts
    model = EPALM.from_config(EPALMConfig(lm=lm_dir, encoder=enc_dir, variant="epalm", num_encoder_layers=2))
    model.save_pretrained(tmp_path / "run")
    weights = tmp_path / "run" / "epalm_weights.safetensors"
    tensors = load_file(weights)
    tensors["connector.linears.0.weight"] = torch.zeros(5, 7)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"connector\.linears\.0\.weight.*\(5, 7\).*\(32, 24\)"):
        model.load_trainable(tmp_path / "bad.safetensors")
    other = EPALM.from_config(EPALMConfig(lm=lm_dir, encoder=enc_dir, variant="lin", num_encoder_layers=2))
    with pytest.raises(ValueError, match=r"unexpected tensors \['connector\.linears\.1\.bias'"):
        other.load_trainable(weights)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors file"):
        model.load_trainable(tmp_path / "corrupt.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        model.load_trainable(tmp_path / "missing.safetensors")
    cfg = json.loads((tmp_path / "run" / "epalm_config.json").read_text())
    cfg["promt_len"] = 3
    (tmp_path / "run" / "epalm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown EPALMConfig field\(s\) \['promt_len'\]"):
        EPALM.from_pretrained(tmp_path / "run")


def test_release_parameter_counts_on_meta_device():
    """The release's counts: eP-ALM on OPT-2.7B + ViT-B/16, and pt-L on OPT-6.7B + ViT-L/16."""
    epalm = build_random(EPALMConfig(lm="facebook/opt-2.7b", encoder="vit_base_patch16_224", variant="epalm"),
                         device="meta")
    assert epalm.parameter_report()["trainable"] == 24_949_760
    assert epalm.schedule == {i: (i - 19) // 2 for i in range(19, 31)}
    pt_l = build_random(EPALMConfig(lm="facebook/opt-6.7b", encoder="vit_large_patch16_224", variant="pt-L"),
                        device="meta")
    report = pt_l.parameter_report()
    assert report["trainable"] == 4_239_360
    assert report["trainable_percent"] < 0.1  # "0.06% with big models"


def test_release_checkpoint_names_are_mapped(tmp_path, pixels, text):
    model = EPALM(tiny_lm("opt"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", variant="epalm",
                                                               num_encoder_layers=2))
    release = {"connector.0.weight": torch.randn(32, 24), "connector.0.bias": torch.randn(32),
               "connector.1.weight": torch.randn(32, 24), "connector.1.bias": torch.randn(32),
               "prompt_module.prefix_embedding.0.weight": torch.randn(10, 32),
               "prompt_module.prefix_embedding.1.weight": torch.randn(32, 32),
               "prompt_module.prefix_embedding.1.bias": torch.randn(32),
               "prompt_module.prefix_embedding.3.weight": torch.randn(32, 32),
               "prompt_module.prefix_embedding.3.bias": torch.randn(32),
               "model_text.model.decoder.layers.0.fc1.weight": torch.randn(2, 2)}
    torch.save({"model": release}, tmp_path / "checkpoint.pth")
    model.load_release_checkpoint(tmp_path / "checkpoint.pth")
    assert torch.equal(model.connector.linears[1].weight, release["connector.1.weight"])
    assert torch.equal(model.prompt.mlp[2].bias, release["prompt_module.prefix_embedding.3.bias"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_under_one_percent_on_real_dims(variant):
    model = build_random(EPALMConfig(lm="facebook/opt-2.7b", encoder="vit_base_patch16_224", variant=variant),
                         device="meta")
    report = model.parameter_report()
    assert 0 < report["trainable"]
    limit = 5.0 if variant in ("ada", "magma", "magma*") else 1.0  # adapters in all 32 blocks cost more
    assert report["trainable_percent"] < limit


def test_input_errors(pixels, text):
    ids, mask = text
    with pytest.raises(ValueError, match="unknown variant 'epalm-xl'; choose one of"):
        EPALMConfig(variant="epalm-xl")
    model = EPALM(tiny_lm("opt"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2))
    with pytest.raises(ValueError, match="pixel_values is 32x32 but the encoder expects 16x16"):
        model(torch.randn(3, 3, 32, 32), ids, mask)
    with pytest.raises(ValueError, match="pixel_values has 1 channels but the encoder expects 3"):
        model(torch.randn(3, 1, 16, 16), ids, mask)
    with pytest.raises(ValueError, match="media batch 2 != text batch 3"):
        model(pixels[:2], ids, mask)
    with pytest.raises(ValueError, match=r"injection layers \[2, 9\) are out of range for an LM with 4 layers"):
        EPALM(tiny_lm("opt"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2,
                                                           inject_start=2, inject_end=9))
    with pytest.raises(ValueError, match="encoder tokens have dim 24 but the connector expects 16"):
        bad = EPALM(tiny_lm("opt"), None, EPALMConfig(lm="t", encoder="t", num_encoder_layers=2), encoder_dim=16)
        bad(features=torch.randn(3, 2, 24), input_ids=ids, attention_mask=mask)

    class NoStack(torch.nn.Module):
        config = tiny_lm("opt").config

    with pytest.raises(ValueError, match="cannot find the decoder layer stack of NoStack"):
        EPALM(NoStack(), tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2))
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'"):
        EPALM(flash, tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2))


def test_cached_features_equal_running_the_encoder(pixels, text):
    ids, mask = text
    model = EPALM(tiny_lm("llama"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2))
    feats = model.encoder(pixels)
    torch.testing.assert_close(model(features=feats, input_ids=ids, attention_mask=mask).logits,
                               model(pixels, ids, mask).logits)


def test_deepcopy_gives_an_independent_working_model(pixels, text):
    import copy

    ids, mask = text
    model = EPALM(tiny_lm("llama"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", variant="ada",
                                                                 num_encoder_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(pixels, ids, mask).logits, model(pixels, ids, mask).logits)
    with torch.no_grad():
        twin.adapters[0].attn.up.weight.add_(1.0)  # changing the copy must not change the original
    assert (twin(pixels, ids, mask).logits - model(pixels, ids, mask).logits).abs().max() > 1e-3
    twin(pixels, ids, mask, labels=ids).loss.backward()
    assert twin.connector.linears[0].weight.grad is not None and model.connector.linears[0].weight.grad is None


def test_forward_returns_a_model_output_and_last_position_logits(pixels, text):
    from transformers.utils import ModelOutput

    ids, mask = text
    model = EPALM(tiny_lm("opt"), tiny_encoder(), EPALMConfig(lm="t", encoder="t", num_encoder_layers=2))
    labels = ids.masked_fill(mask == 0, -100)
    out = model(pixels, ids, mask, labels=labels)
    assert isinstance(out, ModelOutput)
    assert out[0] is out.loss and out["loss"] is out.loss and out["logits"] is out.logits
    assert out.to_tuple()[1] is out.logits
    no_loss = model(pixels, ids, mask)
    assert no_loss[0] is no_loss.logits and "loss" not in no_loss  # HF: None fields are skipped
    full = no_loss.logits
    last = model(pixels, ids, mask, last_logits_only=True).logits  # each row's last attended token
    assert last.shape == (3, 1, full.shape[-1])
    lengths = mask.sum(1) - 1
    torch.testing.assert_close(last[:, 0], full[torch.arange(3), lengths])
    kept = model(pixels, ids, mask, logits_to_keep=2).logits  # transformers' convention: last 2 columns
    torch.testing.assert_close(kept, full[:, -2:])
    # the loss does not depend on which logits are returned
    torch.testing.assert_close(model(pixels, ids, mask, labels=labels, last_logits_only=True).loss, out.loss)
