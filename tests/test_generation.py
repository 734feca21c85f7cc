"""Cached generation through transformers' generate equals uncached step-by-step decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_encoder, tiny_lm
from epalm import EPALM, EPALMConfig

FAMILIES = ["opt", "gpt2", "llama", "qwen2", "qwen3", "gemma3"]
PAD, EOS = 1, 2


def make(family, variant="epalm", mode="causal", **kw):
    model = EPALM(tiny_lm(family), tiny_encoder(),
                  EPALMConfig(lm="t", encoder="t", variant=variant, attention=mode, num_encoder_layers=2, **kw))
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def left_padded():
    torch.manual_seed(5)
    ids = torch.randint(3, 97, (3, 5))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    return ids.masked_fill(mask == 0, PAD), mask


def greedy_by_hand(model, pixels, ids, mask, steps):
    """No cache: re-run the whole forward for every new token; EOS-finished rows get PAD."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(pixels, ids, mask).logits[:, -1]
        token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, PAD), token)
        done |= token == EOS
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        if done.all():
            break
    return torch.stack(new, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["causal", "official"])
def test_cached_greedy_equals_uncached_step_by_step(family, mode, pixels):
    # layer 3 is left uninjected, as layer 31 of OPT-2.7B: in official mode the visual token's
    # view of later tokens then reaches the text, so official decoding must be (and is) uncached
    model = make(family, mode=mode, inject_start=1, inject_end=3)
    ids, mask = left_padded()
    cached = model.generate(pixels, ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                            eos_token_id=EOS)
    assert torch.equal(cached, greedy_by_hand(model, pixels, ids, mask, 6))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["epalm", "promptfuse", "ada"])
def test_cached_beam_search_equals_uncached(family, variant, pixels):
    model = make(family, variant)
    ids, mask = left_padded()
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(model.generate(pixels, ids, mask, use_cache=True, **kw),
                       model.generate(pixels, ids, mask, use_cache=False, **kw))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_batched_left_padded_generation_equals_one_by_one(family, pixels):
    model = make(family)
    ids, mask = left_padded()
    batched = model.generate(pixels, ids, mask, max_new_tokens=5, num_beams=3, pad_token_id=PAD, eos_token_id=EOS)
    for i in range(3):
        keep = mask[i].bool()
        alone = model.generate(pixels[i:i + 1], ids[i:i + 1, keep], max_new_tokens=5, num_beams=3,
                               pad_token_id=PAD, eos_token_id=EOS)
        assert torch.equal(batched[i, : alone.shape[1]], alone[0])


def test_sampling_is_seeded_and_returns_several_sequences(pixels):
    model = make("llama")
    ids, mask = left_padded()
    kw = dict(max_new_tokens=4, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=2,
              pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    a = model.generate(pixels, ids, mask, **kw)
    torch.manual_seed(0)
    b = model.generate(pixels, ids, mask, **kw)
    assert a.shape[0] == 6 and torch.equal(a, b)


def test_the_image_changes_the_answer(pixels):
    model = make("opt")
    ids, mask = left_padded()
    a = model(pixels, ids, mask).logits[:, -1]
    b = model(pixels.flip(0), ids, mask).logits[:, -1]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_cached_generation_equals_step_by_step(family, pixels):
    model = make(family, inject_start=1, inject_end=3)
    ids = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    cached = model.generate(pixels, ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(cached, greedy_by_hand(model, pixels, ids, mask, 6))
