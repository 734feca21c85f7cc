"""A slow, obviously-correct eP-ALM forward, written independently of epalm.core.injection.

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


def _linear(module, x):
    return x @ module.weight.T + module.bias


def _layer_norm(module, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2.0 ** 0.5))


def _attention(mha, q_in, kv_in):
    """Multi-head attention written out from nn.MultiheadAttention's packed weights."""
    d, h = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = mha.in_proj_bias.split(d)
    b, nq, nk = q_in.shape[0], q_in.shape[1], kv_in.shape[1]
    q = (q_in @ wq.T + bq).view(b, nq, h, d // h).transpose(1, 2)
    k = (kv_in @ wk.T + bk).view(b, nk, h, d // h).transpose(1, 2)
    v = (kv_in @ wv.T + bv).view(b, nk, h, d // h).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    return _linear(mha.out_proj, (weights @ v).transpose(1, 2).reshape(b, nq, d))


def _query_mapper(m, tokens):
    x = _linear(m.in_proj, tokens)
    q = m.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    for blk in m.blocks:
        kv = _layer_norm(blk.norm_attn, torch.cat([x, q], dim=1))
        q = q + _attention(blk.attn, kv[:, x.shape[1]:], kv)
        q = q + _linear(blk.ffn[2], _gelu(_linear(blk.ffn[0], _layer_norm(blk.norm_ffn, q))))
    return _linear(m.proj, _layer_norm(m.norm_out, q))


def _bins(n, k):
    """Adaptive pooling bins: [floor(i n / k), ceil((i + 1) n / k))."""
    return [(i * n // k, -(-(i + 1) * n // k)) for i in range(k)]


def _avg_pool(m, tokens):
    patches = tokens[:, 1:]
    n, k = patches.shape[1], m.num_tokens
    g, r = round(n ** 0.5), round(k ** 0.5)
    out = []
    if g * g == n and r * r == k:
        for a0, a1 in _bins(g, r):
            for b0, b1 in _bins(g, r):
                cells = [patches[:, row * g + col] for row in range(a0, a1) for col in range(b0, b1)]
                out.append(torch.stack(cells, 1).mean(1))
    else:
        out = [patches[:, a:b].mean(1) for a, b in _bins(n, k)]
    return _linear(m.proj, torch.stack(out, 1))


def _linear_resampler(m, tokens):
    mixed = torch.einsum("kn,bnd->bkd", m.mix.weight, tokens) + m.mix.bias[None, :, None]
    return _linear(m.proj, mixed)


def _visual_tokens(model, pixels):
    cfg = model.config
    if cfg.connector != "linear":  # one level of K slots, read from the HF model's own hidden states
        enc = model.encoder
        hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        layers = cfg.num_encoder_layers if cfg.connector in ("qpmapper", "linear_resampler") else 1
        feats = torch.cat([enc.final_norm(h) for h in hidden[-layers:]], dim=1)
        fn = {"qpmapper": _query_mapper, "avgpool": _avg_pool, "linear_resampler": _linear_resampler}[cfg.connector]
        return [fn(model.connector, feats)]
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
