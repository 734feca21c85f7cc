"""DePALM's connectors (QP mapper, average-pool and linear resamplers, LiMBeR-all): K tokens at the
LM input or at inner layers, checked against the slow reference like the paper's variants."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch

from conftest import VOCAB, tiny_lm, tiny_vit
from epalm import EPALM, EPALMConfig
from epalm.core.connectors import AvgPoolResampler, LinearResampler, QueryMapper
from epalm.core.encoders import count_tokens, wrap_hf_encoder
from epalm.core.presets import build_random
from reference import reference_logits
from test_generation import EOS, PAD, greedy_by_hand, left_padded

FAMILIES = ["opt", "gpt2", "llama"]
MODES = ["causal", "official"]
# tiny ViT (16 px, patch 8): CLS + 2x2 patches = 5 tokens. K=4 pools the 2x2 grid in 2-D (identity
# grid), K=3 pools in 1-D, K=1 averages everything; the mapper gets K=3 queries.
VARIANTS = {
    "qp-l0": dict(num_visual_tokens=3, mapper_heads=2),
    "qp-inner": dict(num_visual_tokens=3, mapper_heads=2, mapper_layers=1, mapper_dim=16),
    "avgpool-l0": dict(num_visual_tokens=3),
    "avgpool-inner": dict(num_visual_tokens=4),
    "linres-l0": dict(num_visual_tokens=3),
    "linres-inner": dict(num_visual_tokens=2),
    "limber-all": dict(),
}


def make(family, variant, mode="causal", num_layers=4, seed=7, **overrides):
    kw = {**VARIANTS[variant], **overrides}
    if variant.endswith("-inner"):
        kw.setdefault("inject_start", 1)
        kw.setdefault("inject_end", 3 if mode == "official" else 4)
    cfg = EPALMConfig(lm="tiny", encoder="tiny", variant=variant, attention=mode, **kw)
    model = EPALM(tiny_lm(family, num_layers=num_layers), wrap_hf_encoder(tiny_vit(), num_layers=1), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_matches_reference_logits_and_gradients(family, mode, variant, pixels, text):
    ids, mask = text
    model = make(family, variant, mode)
    out = model(pixels, ids, mask)
    ref = reference_logits(model, pixels, ids, mask)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)

    weight = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    g_engine = torch.autograd.grad((out.logits * weight).sum(), trainable)
    g_ref = torch.autograd.grad((ref * weight).sum(), trainable)
    for name, a, b in zip(names, g_engine, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert a.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_token_connector_with_soft_prompt_and_deep_prompt_matches_reference(family, mode, pixels, text):
    """[K slots | prompt | text]: DePALM pairs its QP tokens with a soft prompt."""
    ids, mask = text
    for variant, extra in (("qp-l0", dict(prompt_len=2)), ("avgpool-inner", dict(prompt_len=2, deep_prompt=True))):
        model = make(family, variant, mode, **extra)
        assert model.engine.state is None
        out = model(pixels, ids, mask)
        ref = reference_logits(model, pixels, ids, mask)
        torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for a, b in zip(torch.autograd.grad(out.logits.sum(), trainable), torch.autograd.grad(ref.sum(), trainable)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["qp-l0", "qp-inner", "linres-inner"])
def test_tokens_of_chosen_encoder_layers_match_reference(family, mode, variant, pixels, text):
    """num_encoder_layers=L: the mapper / linear resampler read the tokens of the last L layers."""
    ids, mask = text
    model = make(family, variant, mode, num_encoder_layers=2)
    assert model.encoder(pixels, all_tokens=True, token_layers=2).shape == (3, 10, 24)
    out = model(pixels, ids, mask)
    ref = reference_logits(model, pixels, ids, mask)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out.logits.sum(), trainable), torch.autograd.grad(ref.sum(), trainable)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a model reading one layer differs (the reference is not blind to the layer choice)
    one = make(family, variant, mode, num_encoder_layers=1)
    if variant != "linres-inner":  # the resampler's token-axis Linear changes shape with L
        one.load_trainable(model.trainable_state_dict())
        assert (one(pixels, ids, mask).logits - out.logits).abs().max() > 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_slots_and_schedule(variant, pixels):
    model = make("opt", variant)
    k = {"limber-all": 5}.get(variant, VARIANTS[variant].get("num_visual_tokens"))
    assert model.visual_tokens(pixels).shape == (3, 1, k, 32)
    if variant.endswith("-l0"):
        assert model.schedule == {0: 0}
    elif variant.endswith("-inner"):
        assert model.schedule == {1: 0, 2: 0, 3: 0}  # insert at 1, overwrite at 2 and 3


@pytest.mark.parametrize("family", FAMILIES + ["qwen3", "gemma3"])
@pytest.mark.parametrize("variant", ["qp-l0", "avgpool-inner", "linres-l0"])
def test_causal_logits_do_not_depend_on_padding(family, variant, pixels, text):
    ids, mask = text
    model = make(family, variant)
    base = model(pixels, ids, mask).logits
    pad = torch.ones(ids.shape[0], 3, dtype=ids.dtype)
    padded = model(pixels, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)).logits
    valid = mask.bool()
    torch.testing.assert_close(padded[:, : ids.shape[1]][valid], base[valid], rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    torch.testing.assert_close(model(pixels, changed, mask).logits[0, :-1], base[0, :-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["qp-l0", "qp-inner", "avgpool-l0", "linres-inner", "limber-all"])
def test_cached_greedy_equals_uncached_step_by_step(family, mode, variant, pixels):
    model = make(family, variant, mode)
    ids, mask = left_padded()
    cached = model.generate(pixels, ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                            eos_token_id=EOS)
    assert torch.equal(cached, greedy_by_hand(model, pixels, ids, mask, 5))


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("variant", ["qp-l0", "qp-inner", "avgpool-inner", "linres-l0"])
def test_cached_beam_search_equals_uncached(family, variant, pixels):
    model = make(family, variant)
    ids, mask = left_padded()
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(model.generate(pixels, ids, mask, use_cache=True, **kw),
                       model.generate(pixels, ids, mask, use_cache=False, **kw))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_all_token_features_equal_running_the_encoder(variant, pixels, text):
    ids, mask = text
    model = make("llama", variant)
    assert model.config.needs_all_tokens
    feats = model.encoder(pixels, all_tokens=True)  # what the feature cache stores for these variants
    assert feats.shape == (3, 5, 24)
    torch.testing.assert_close(model(features=feats, input_ids=ids, attention_mask=mask).logits,
                               model(pixels, ids, mask).logits)
    # and without an encoder at all (training from the cache only)
    bare = EPALM(model.lm, None, EPALMConfig(**{**model.config.to_dict(), "encoder_tokens": 5}), encoder_dim=24)
    bare.load_trainable(model.trainable_state_dict())
    torch.testing.assert_close(bare(features=feats, input_ids=ids, attention_mask=mask).logits,
                               model(pixels, ids, mask).logits)


def test_feature_cache_stores_all_tokens_for_token_connectors(tmp_path, pixels, text):
    from epalm.data.feature_cache import FeatureCache, encoder_fingerprint

    model = make("opt", "qp-l0")
    fp = encoder_fingerprint(model.encoder, "tiny-vit", {"size": 16}, all_tokens=model.config.needs_all_tokens)
    items = [(str(i), (lambda i=i: pixels[i])) for i in range(3)]
    cache = FeatureCache.build(tmp_path / "c", model.encoder, items, fp, batch_size=2, dtype="float32",
                               progress=False)
    feats = cache.get_batch(["0", "1", "2"])
    assert feats.shape == (3, 5, 24)
    ids, mask = text
    torch.testing.assert_close(model(features=feats, input_ids=ids, attention_mask=mask).logits,
                               model(pixels, ids, mask).logits, rtol=1e-5, atol=1e-5)
    # tokens of the last 2 layers: recorded in the fingerprint, (2 * 5, 24) per image
    two = make("opt", "qp-l0", num_encoder_layers=2)
    cfg = two.config
    fp2 = encoder_fingerprint(two.encoder, "tiny-vit", {"size": 16}, all_tokens=True, token_layers=cfg.token_layers)
    assert fp2["token_layers"] == 2 and "token_layers" not in fp
    cache2 = FeatureCache.build(tmp_path / "c2", two.encoder, items, fp2, batch_size=2, dtype="float32",
                                progress=False)
    feats2 = cache2.get_batch(["0", "1", "2"])
    assert feats2.shape == (3, 10, 24)
    torch.testing.assert_close(two(features=feats2, input_ids=ids, attention_mask=mask).logits,
                               two(pixels, ids, mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["qp-inner", "linres-inner"])
def test_text_states_reuse_with_k_slots(variant, pixels, text):
    ids, mask = text
    model = make("llama", variant, inject_start=2, inject_end=4)
    k = VARIANTS[variant]["num_visual_tokens"]
    states = model.text_states(ids, mask)
    assert states.shape == (3, k + ids.shape[1], 32)
    torch.testing.assert_close(model(pixels, ids, mask, text_states=states).logits, model(pixels, ids, mask).logits,
                               rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path, pixels, text):
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("llama").save_pretrained(lm_dir)
    tiny_vit().save_pretrained(enc_dir)
    ids, mask = text
    for variant in ("qp-l0", "linres-inner", "avgpool-l0"):
        cfg = EPALMConfig(lm=str(lm_dir), encoder=str(enc_dir), variant=variant, num_encoder_layers=1,
                          **{k: v for k, v in VARIANTS[variant].items()})
        model = EPALM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        before = model(pixels, ids, mask).logits
        model.save_pretrained(tmp_path / variant)
        loaded = EPALM.from_pretrained(tmp_path / variant)
        # the saved names are portable (relative to the checkpoint); everything else is as built
        assert (loaded.config.lm, loaded.config.encoder) == ("../lm", "../enc")
        assert dataclasses.replace(loaded.config, lm=cfg.lm, encoder=cfg.encoder) == model.config
        assert torch.equal(loaded(pixels, ids, mask).logits, before)


def test_modules_against_hand_computation():
    torch.manual_seed(0)
    tokens = torch.randn(2, 17, 8)  # CLS + 4x4 patches
    pool = AvgPoolResampler(8, 5, 4)
    pooled = pool.pool(tokens)
    grid = tokens[:, 1:].view(2, 4, 4, 8)
    expected = torch.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    torch.testing.assert_close(pooled, expected)
    one_d = AvgPoolResampler(8, 5, 2).pool(tokens)
    torch.testing.assert_close(one_d, torch.stack([tokens[:, 1:9].mean(1), tokens[:, 9:].mean(1)], 1))
    with pytest.raises(ValueError, match="cannot average-pool 16 patch tokens to num_visual_tokens=20"):
        AvgPoolResampler(8, 5, 20)(tokens)
    lin = LinearResampler(8, 5, 17, 3)
    with pytest.raises(ValueError, match="built for 17 encoder tokens .*got 10"):
        lin(tokens[:, :10])
    with pytest.raises(ValueError, match="mapper_dim=10 is not divisible by mapper_heads=4"):
        QueryMapper(8, 5, 3, num_heads=4, width=10)
    mapper = QueryMapper(8, 5, 3, num_layers=2, num_heads=2)
    assert mapper(tokens).shape == (2, 3, 5)
    # the queries read the image: changing one patch changes every output token
    other = tokens.clone()
    other[:, 5] += 1.0
    assert ((mapper(other) - mapper(tokens)).abs().amax(-1) > 1e-4).all()


def test_config_errors():
    with pytest.raises(ValueError, match="connector must be one of linear, qpmapper, avgpool, linear_resampler"):
        EPALMConfig(connector="perceiver")
    with pytest.raises(ValueError, match="num_visual_tokens must be a positive integer, got 0"):
        EPALMConfig(variant="qp-l0", num_visual_tokens=0)
    with pytest.raises(ValueError, match="connector='avgpool' needs num_visual_tokens"):
        EPALMConfig(connector="avgpool")
    with pytest.raises(ValueError, match="connector='avgpool' pools the last layer's patch grid"):
        EPALMConfig(variant="avgpool-l0", num_encoder_layers=2)
    with pytest.raises(ValueError, match="token_layers=4 but the encoder has 3 layers"):
        wrap_hf_encoder(tiny_vit(), num_layers=1)(torch.randn(1, 3, 16, 16), all_tokens=True, token_layers=4)
    with pytest.raises(ValueError, match="all_patch_tokens is for connector='linear'"):
        EPALMConfig(variant="qp-l0", all_patch_tokens=True)
    lm = tiny_lm("opt")
    with pytest.raises(ValueError, match="linear_resampler' without an encoder needs EPALMConfig.encoder_tokens"):
        EPALM(lm, None, EPALMConfig(lm="t", encoder="t", variant="linres-l0"), encoder_dim=24)
    assert not EPALMConfig(variant="epalm").needs_all_tokens and EPALMConfig(variant="magma*").needs_all_tokens


def test_count_tokens_of_image_encoders_on_meta():
    with torch.device("meta"):
        from transformers import AutoModel

        from epalm.core.presets import encoder_config

        enc = wrap_hf_encoder(AutoModel.from_config(encoder_config("vit_base_patch16_224")), num_layers=1)
    assert count_tokens(enc) == 197
    assert count_tokens(wrap_hf_encoder(tiny_vit(), num_layers=1)) == 5
    assert count_tokens(wrap_hf_encoder(tiny_vit(), num_layers=1), token_layers=3) == 15


# Trainable parameters on OPT-2.7B (d=2560) + ViT-B/16 (d_enc=768, 197 tokens), counted by hand.
D, E = 2560, 768
QP = (E * E + E) + 32 * E + 2 * (2 * E + 4 * E * E + 4 * E + 2 * E + E * 4 * E + 4 * E + 4 * E * E + E) \
    + 2 * E + (E * D + D)
PROJ = E * D + D
EXPECTED = {
    "qp-l0": QP, "qp-inner": QP,
    "avgpool-l0": PROJ, "avgpool-inner": PROJ,
    "linres-l0": 197 * 49 + 49 + PROJ, "linres-inner": 197 * 49 + 49 + PROJ,
    "limber-all": PROJ,
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_parameter_counts_on_meta_opt_2_7b_vit_b16(variant):
    model = build_random(EPALMConfig(lm="facebook/opt-2.7b", encoder="vit_base_patch16_224", variant=variant),
                         device="meta")
    report = model.parameter_report()
    assert report["trainable"] == EXPECTED[variant]
    slots = {"qp": 32, "avgpool": 49, "linres": 49, "limber": 1}[variant.split("-")[0]]  # limber-all: N per call
    assert model.num_visual_slots == slots


def test_params_command_reports_the_connector_variants(capsys):
    from epalm.interface import cli

    assert cli.main(["params", "--lm", "facebook/opt-2.7b", "--encoder", "vit_base_patch16_224",
                     "--variant", "qp-l0"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["variant"] == "qp-l0" and report["trainable"] == EXPECTED["qp-l0"]


def test_recipe_feature_cache_holds_all_tokens_and_trains_like_the_encoder(tmp_path):
    """cache-features + train through the CLI on a QP recipe: (N, d_enc) features per image, and the
    very same weights as training from the images."""
    from epalm.data.feature_cache import FeatureCache
    from test_recipe import build_assets, recipe, run_cli, trainable, write_config

    assets = build_assets(tmp_path / "assets")
    cfg_dict = recipe(assets, "vqa", tmp_path / "plain", train={"epochs": 1, "batch_size": 4})
    cfg_dict["model"] = {**cfg_dict["model"], "encoder": assets["models"]["vit_pooler"], "variant": "qp-l0",
                         "num_encoder_layers": 1, "num_visual_tokens": 2, "mapper_heads": 2}
    cfg_dict["data"]["feature_cache_dtype"] = "float32"
    cfg = write_config(tmp_path / "qp.yaml", cfg_dict)
    cache = tmp_path / "cache"
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    rc, out, err = run_cli("cache-features", cfg, f"data.feature_cache={cache}", "data.augment=false")
    assert rc == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["shape"] == [5, 24]  # CLS + 2x2 patches, not 1 [CLS]
    assert FeatureCache.read_meta(cache)["fingerprint"]["all_tokens"] is True
    rc, out, err = run_cli("train", cfg, f"data.feature_cache={cache}", f"train.output_dir={tmp_path / 'cached'}")
    assert rc == 0, err[-3000:]
    plain, cached = trainable(tmp_path / "plain" / "checkpoint"), trainable(tmp_path / "cached" / "checkpoint")
    assert plain.keys() == cached.keys() and any(k.startswith("connector.blocks.") for k in plain)
    for k in plain:
        assert torch.equal(cached[k], plain[k]), k
