"""The hook-based injection engine against the slow reference, per family and attention mode."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_encoder, tiny_lm
from epalm.core.config import EPALMConfig
from epalm.core.injection import build_attention_mask, default_injection_range, injection_schedule
from epalm.core.model import EPALM
from reference import reference_logits

FAMILIES = ["opt", "gpt2", "llama"]
MODES = ["causal", "official"]


def make(family, variant="epalm", mode="causal", num_layers=4, **overrides):
    lm = tiny_lm(family, num_layers=num_layers)
    cfg = EPALMConfig(lm="tiny", encoder="tiny", variant=variant, attention=mode,
                      num_encoder_layers=overrides.pop("num_encoder_layers", 2), **overrides)
    model = EPALM(lm, tiny_encoder(num_layers=2), cfg)
    torch.manual_seed(7)
    with torch.no_grad():  # non-trivial trainable weights (adapters start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def test_release_schedule_opt_2_7b():
    assert default_injection_range(32) == (19, 31)
    sched = injection_schedule(19, 31, 6)
    assert list(sched) == list(range(19, 31))
    assert [sched[i] for i in range(19, 31)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert injection_schedule(19, 31, 6, text_step=2) == {20: 0, 22: 1, 24: 2, 26: 3, 28: 4, 30: 5}
    assert injection_schedule(0, 1, 1) == {0: 0}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["epalm", "pt-L", "lin", "deep-pt", "promptfuse", "ada"])
def test_engine_matches_reference(family, mode, variant, pixels, text):
    ids, mask = text
    model = make(family, variant, mode, inject_start=1, inject_end=4) if variant not in (
        "promptfuse",) else make(family, variant, mode)
    out = model(pixels, ids, mask)
    ref = reference_logits(model, pixels, ids, mask)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)

    weight = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    g_engine = torch.autograd.grad((out.logits * weight).sum(), trainable)
    g_ref = torch.autograd.grad((ref * weight).sum(), trainable)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_engine, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert a.abs().sum() > 0 or "adapters" in name, f"{name} got no gradient"


@pytest.mark.parametrize("mode", MODES)
def test_magma_star_all_patch_tokens(mode, pixels, text):
    ids, mask = text
    model = make("llama", "magma*", mode)
    assert model.visual_tokens(pixels).shape[2] == 5  # CLS + 4 patches of the 16px/8px ViT
    torch.testing.assert_close(model(pixels, ids, mask).logits, reference_logits(model, pixels, ids, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES + ["qwen2", "qwen3", "gemma3"])
def test_causal_logits_do_not_depend_on_padding(family, pixels, text):
    ids, mask = text
    model = make(family, "epalm", "causal")
    base = model(pixels, ids, mask).logits
    pad = torch.ones(ids.shape[0], 3, dtype=ids.dtype)
    padded = model(pixels, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)).logits
    valid = mask.bool()
    torch.testing.assert_close(padded[:, : ids.shape[1]][valid], base[valid], rtol=1e-5, atol=1e-5)
    # and a future token does not change earlier logits
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    torch.testing.assert_close(model(pixels, changed, mask).logits[0, :-1], base[0, :-1], rtol=1e-5, atol=1e-5)


def test_official_mode_leaks_future_and_padding_as_documented(pixels, text):
    ids, mask = text
    model = make("opt", "epalm", "official", inject_start=1, inject_end=3)  # layer 3 uninjected: leak reaches text
    with torch.no_grad():  # random OPT init (std 0.02) makes the leak tiny; make it plainly visible
        for p in model.lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    base = model(pixels, ids, mask).logits
    pad = torch.ones(ids.shape[0], 3, dtype=ids.dtype)
    padded = model(pixels, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)).logits
    valid = mask.bool()
    assert (padded[:, : ids.shape[1]][valid] - base[valid]).abs().max() > 1e-4
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert (model(pixels, changed, mask).logits[0, :-1] - base[0, :-1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_parameters_get_no_gradient(family, pixels, text):
    ids, mask = text
    model = make(family, "ada")
    model(pixels, ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


def test_loss_is_mean_token_ce_and_official_sum(pixels, text):
    ids, mask = text
    labels = ids.masked_fill(mask == 0, -100)
    model = make("opt")
    out = model(pixels, ids, mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    target = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # the head-only-where-needed path gives the same loss
    torch.testing.assert_close(model(pixels, ids, mask, labels=labels, return_logits=False).loss, expected)
    model.config.loss_reduction = "official"
    official = model(pixels, ids, mask, labels=labels).loss
    per_sample = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    torch.testing.assert_close(official, per_sample.view(3, -1).sum(1).sum() / 3 * 0.1)


def test_mask_builder_semantics():
    mask2d = torch.tensor([[1, 1, 1, 1, 0]])
    hidden = build_attention_mask(mask2d, 5, 1, slots_visible=False, mode="causal", dtype=torch.float32)
    allowed = hidden[0, 0] == 0
    assert not allowed[1:, 0].any() and allowed[0, 0]  # slot invisible before insertion
    causal = build_attention_mask(mask2d, 5, 1, slots_visible=True, mode="causal", dtype=torch.float32)[0, 0] == 0
    assert causal[1:, 0].all() and not causal[0, 1:].any() and not causal[:, 4].any()
    official = build_attention_mask(mask2d, 5, 1, slots_visible=True, mode="official", dtype=torch.float32)[0, 0] == 0
    assert official[0].all()  # the release's unmasked visual-token row, padding included
    last = build_attention_mask(mask2d, 1, 1, slots_visible=True, mode="causal", dtype=torch.float32)
    assert last.shape == (1, 1, 1, 5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_reusing_text_states_skips_lower_layers_exactly(family, mode, pixels, text):
    ids, mask = text
    model = make(family, "lin", mode, inject_start=2, inject_end=4)
    states = model.text_states(ids, mask)
    assert states.shape == (3, 1 + ids.shape[1], 32)
    calls = []
    hook = model.engine.anatomy.layers[0].register_forward_hook(lambda *a: calls.append(1))
    fast = model(pixels, ids, mask, text_states=states)
    hook.remove()
    assert not calls  # layer 0 did not run
    full = model(pixels, ids, mask)
    torch.testing.assert_close(fast.logits, full.logits, rtol=1e-5, atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fast.logits.sum(), trainable), torch.autograd.grad(full.logits.sum(), trainable)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(model.engine.anatomy.decoder.get_submodule(model.engine.anatomy.layers_attr)) == 4  # restored
    with pytest.raises(ValueError, match="trains parameters below the first injected layer"):
        make(family, "epalm").text_states(ids, mask)


@pytest.mark.parametrize("family", FAMILIES + ["qwen3"])
@pytest.mark.parametrize("variant", ["epalm", "promptfuse"])
def test_unpadded_batches_use_sdpa_causal_path_and_match_reference(family, variant, pixels, text):
    """Without padding, layers where the slot is visible get attention_mask=None (SDPA's causal kernel)."""
    ids, _ = text
    mask = torch.ones_like(ids)
    model = make(family, variant, "causal")
    seen = []
    hook = model.engine.anatomy.layers[-1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask", "positional")), with_kwargs=True)
    out = model(pixels, ids, mask)
    hook.remove()
    if family != "gpt2":  # GPT-2 passes the mask positionally; the value is checked through the logits
        assert seen == [None]
    if family in FAMILIES:
        torch.testing.assert_close(out.logits, reference_logits(model, pixels, ids, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[:2], model(pixels[:2], ids[:2], mask[:2]).logits, rtol=1e-5, atol=1e-5)
