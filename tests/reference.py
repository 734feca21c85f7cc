"""A slow, obviously-correct eP-ALM forward, written independently of epalm.injection.

It follows the release literally (../shared/spec/official-semantics.md): the sequence is
``[prompt, text]`` below the first injected layer; there the visual token is physically
*inserted* at position 0 (the sequence grows), and at every later injected layer position 0 is
*overwritten*. Masks are built with explicit loops. Only the trainable modules' weights are
shared with the model under test.
"""

from __future__ import annotations

import torch


def slow_mask(valid: torch.Tensor, num_slots: int, mode: str, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, K, K) additive mask: causal + key padding; in 'official' mode slot rows see everything."""
    b, k_len = valid.shape
    mask = torch.full((b, 1, k_len, k_len), torch.finfo(dtype).min, dtype=dtype)
    for bi in range(b):
        for q in range(k_len):
            for k in range(k_len):
                allowed = k <= q and bool(valid[bi, k])
                if mode == "official" and q < num_slots:
                    allowed = True
                if allowed:
                    mask[bi, 0, q, k] = 0.0
    return mask


def _visual_tokens(model, pixels):
    feats = model.encoder(pixels, all_tokens=model.config.all_patch_tokens)
    lin = model.connector.linears
    if model.config.all_patch_tokens:
        return [lin[0](feats)]  # one level of N slots
    n = model.num_visual_levels
    feats = feats[:, -n:]
    return [(lin[0] if len(lin) == 1 else lin[k])(feats[:, k]).unsqueeze(1) for k in range(n)]


def _prompt(module, batch):
    if module is None:
        return None
    e = module.embedding.weight
    if module.mlp is not None:
        e = module.mlp[2](torch.tanh(module.mlp[0](e)))
    return e.unsqueeze(0).expand(batch, -1, -1)


def reference_logits(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Text logits (B, T, V) of ``model`` computed layer by layer by hand."""
    lm, cfg = model.lm, model.config
    family = lm.config.model_type
    b, t = ids.shape
    levels = _visual_tokens(model, pixels)
    prompt = _prompt(model.prompt, b)
    deep = {}
    if model.deep_prompt is not None:
        deep = {layer: _prompt(p, b) for layer, p in zip(model.deep_prompt.layers, model.deep_prompt.prompts)}
        prompt = deep.get(0)
    p_len = 0 if prompt is None else prompt.shape[1]
    s_len = levels[0].shape[1]

    # ---- embeddings of the text (the prompt gets no positional embedding in the release)
    if family == "opt":
        dec = lm.model.decoder
        layers = dec.layers
        emb = dec.embed_tokens(ids)
        if dec.project_in is not None:
            emb = dec.project_in(emb)
        pos = mask.cumsum(-1) * mask - 1
        emb = emb + dec.embed_positions.weight[pos + 2]
    elif family == "gpt2":
        tr = lm.transformer
        layers = tr.h
        pos = (mask.cumsum(-1) * mask - 1).clamp(min=0)
        emb = tr.wte(ids) + tr.wpe(pos)
    else:  # llama-like, rotary: consecutive positions over [slots, prompt, text]
        layers = lm.model.layers
        emb = lm.model.embed_tokens(ids)
    full_valid = torch.cat([torch.ones(b, s_len + p_len, dtype=mask.dtype), mask], dim=1)
    rope_pos = (full_valid.cumsum(-1) - 1).clamp(min=0)

    h = torch.cat([prompt, emb], dim=1) if prompt is not None else emb
    valid = torch.cat([torch.ones(b, p_len, dtype=mask.dtype), mask], dim=1)
    inserted = False
    for i, layer in enumerate(layers):
        if i in model.schedule:
            v = levels[model.schedule[i]]
            if not inserted:
                h = torch.cat([v, h], dim=1)  # insert: the sequence grows by S
                valid = torch.cat([torch.ones(b, s_len, dtype=mask.dtype), valid], dim=1)
                inserted = True
            else:
                h = torch.cat([v, h[:, s_len:]], dim=1)  # overwrite position(s) 0
        s = s_len if inserted else 0
        if i in deep and i > 0:
            h = torch.cat([h[:, :s], deep[i], h[:, s + p_len:]], dim=1)
        kwargs = {"attention_mask": slow_mask(valid, s, cfg.attention)}
        if family not in ("opt", "gpt2"):
            pos = rope_pos if inserted else rope_pos[:, s_len:]
            kwargs["position_embeddings"] = lm.model.rotary_emb(h, pos)
            kwargs["position_ids"] = pos
        out = layer(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out

    if family == "opt":
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
    elif family == "gpt2":
        h = tr.ln_f(h)
    else:
        h = lm.model.norm(h)
    return lm.lm_head(h[:, -t:])
