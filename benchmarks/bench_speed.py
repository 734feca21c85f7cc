"""Is eP-ALM as fast as the frozen LM it wraps? Train / eval / generate, bare LM vs epalm, same shapes.

One run, one machine, random-init weights of a real architecture (``epalm.core.presets``; nothing is
downloaded). The encoder is not timed: epalm gets cached features ``(B, 6, 768)``.

Bare LM (the bounds):
  train     forward + backward + AdamW step of a P=10 soft prompt prepended as ``inputs_embeds``
            (frozen weights, so autograd runs through every layer), loss on the last ``A`` tokens
            (``lm.base_model`` then the LM head on those positions only, as a 2-D matmul)
  eval      ``lm(inputs_embeds=[prompt | text], logits_to_keep=T)``: no grad, logits of the text
  generate  ``lm.generate`` greedy and beam 3, N new tokens, KV cache, prompt of P + T tokens
epalm (per variant; ``epalm``: prompt + 6 connectors, ``lin``: no prompt, one shared connector):
  train     ``model(..., labels, return_logits=False)`` + backward + AdamW on the trainable params
  eval      ``model(...)`` no grad, logits of the text positions
  generate  ``model.generate`` greedy and beam 3

Each LM instance is built from the same seed (one per contender: the bare LM carries no hooks)
and the contenders run round-robin, so load drift on a shared machine hits them alike.

Prints one JSON line and writes it to ``--out`` (atomically). Ratios are bare_ms / epalm_ms
(1.0 = as fast as the bare LM; targets: >= 0.90 train and eval, >= 0.85 generation).

    python benchmarks/bench_speed.py --lm facebook/opt-125m --batch 16 --seq 40
    python benchmarks/bench_speed.py --lm facebook/opt-2.7b --batch 64 --device cuda   # bf16
    python benchmarks/bench_speed.py --tiny                                           # CI smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT_DIR,
    autocast,
    dtype_name,
    load_average,
    machine_info,
    measure_memory,
    pick_device,
    pick_dtype,
    release_cpu_heap_caching,
    safe_name,
    time_interleaved,
)

PROMPT_LEN = 10  # P: the soft prompt of the bare bound (= the epalm variant's prompt)
ENCODER_DIM = 768  # ViT-B width of the cached features
ENCODER_TOKENS = 197  # ViT-B/16 at 224 px: CLS + 14x14 patches (all-token variants: qp-l0, limber-all, ...)
ENCODER_LEVELS = 6
TARGETS = {"train": 0.90, "eval": 0.90, "generate_greedy": 0.85, "generate_beam3": 0.85}
TINY_LM = "tiny-opt"


def build_lm(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, OPTConfig

    from epalm.core.presets import lm_config

    if name == TINY_LM:
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                        word_embed_proj_dim=64, vocab_size=1000, max_position_embeddings=256,
                        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    else:
        cfg = lm_config(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return lm.requires_grad_(False).eval()


def make_inputs(lm, batch: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    vocab = lm.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    features = torch.randn(batch, ENCODER_LEVELS, ENCODER_DIM, generator=g).to(device)
    return ids, mask, features


def all_token_features(batch: int, device: torch.device) -> torch.Tensor:
    """Cached last-layer tokens ``(B, 197, 768)`` for the variants that read every encoder token."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, ENCODER_TOKENS, ENCODER_DIM, generator=g).to(device)


def answer_labels(ids: torch.Tensor, answer: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return labels


# ---------------------------------------------------------------------------------- bare LM
def bare_benchmarks(lm, ids, mask, args, device, dtype) -> dict:
    batch, seq = ids.shape
    emb = lm.get_input_embeddings()
    prompt = torch.nn.Parameter(torch.randn(PROMPT_LEN, emb.embedding_dim, device=device) * 0.02)
    opt = torch.optim.AdamW([prompt], lr=1e-4, fused=device.type == "cuda")  # as epalm.training.trainer
    full_mask = torch.ones(batch, PROMPT_LEN + seq, dtype=mask.dtype, device=device)
    target = ids[:, -args.answer:]

    def embeds(grad: bool) -> torch.Tensor:
        text = emb(ids)
        p = prompt if grad else prompt.detach()
        return torch.cat([p.to(text.dtype).unsqueeze(0).expand(batch, -1, -1), text], dim=1)

    head = lm.get_output_embeddings()

    def train() -> None:
        with autocast(device, dtype):
            hidden = lm.base_model(inputs_embeds=embeds(True), attention_mask=full_mask,
                                   use_cache=False).last_hidden_state
            answer = hidden[:, -(args.answer + 1):-1].reshape(-1, hidden.shape[-1])  # head on the answer only
            loss = F.cross_entropy(head(answer).float(), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate() -> None:
        with autocast(device, dtype):
            lm(inputs_embeds=embeds(False), attention_mask=full_mask, use_cache=False, logits_to_keep=seq)

    gen_ids = torch.cat([ids.new_full((batch, PROMPT_LEN), 3), ids], dim=1)  # same prefill length

    def generate(beams: int):
        @torch.no_grad()
        def run() -> None:
            with autocast(device, dtype):
                lm.generate(input_ids=gen_ids, attention_mask=full_mask, **gen_kwargs(lm, args, beams))

        return run

    return {
        "train": train,
        "eval": evaluate,
        "generate_greedy": generate(1),
        "generate_beam3": generate(3),
    }


def gen_kwargs(lm, args, beams: int) -> dict:
    pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
    return dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                num_beams=beams, pad_token_id=pad, use_cache=True)


# ---------------------------------------------------------------------------------- epalm
def epalm_benchmarks(model, ids, mask, features, args, device, dtype) -> dict:
    labels = answer_labels(ids, args.answer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")  # as epalm.training.trainer
    model.train()

    def train() -> None:
        with autocast(device, dtype):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, features=features,
                        return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate() -> None:
        with autocast(device, dtype):
            model(input_ids=ids, attention_mask=mask, features=features)

    def generate(beams: int):
        @torch.no_grad()
        def run() -> None:
            with autocast(device, dtype):
                model.generate(input_ids=ids, attention_mask=mask, features=features,
                               **gen_kwargs(model.lm, args, beams))

        return run

    return {
        "train": train,
        "eval": evaluate,
        "generate_greedy": generate(1),
        "generate_beam3": generate(3),
    }


def build_epalm(lm, lm_name: str, variant: str, device: torch.device):
    from epalm import EPALM, EPALMConfig

    torch.manual_seed(2)
    cfg = EPALMConfig(lm=lm_name, encoder="vit_base_patch16_224", variant=variant, encoder_tokens=ENCODER_TOKENS)
    return EPALM(lm, None, cfg, encoder_dim=ENCODER_DIM).to(device)  # trainable parts stay fp32


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    from epalm.core.presets import LM_CONFIGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", default="facebook/opt-125m", help=f"one of {sorted(LM_CONFIGS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=40, help="text tokens per sample")
    ap.add_argument("--new-tokens", type=int, default=5, help="tokens generated per sample")
    ap.add_argument("--answer", type=int, default=3, help="labelled (answer) tokens at the end of the text")
    ap.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="epalm,lin", help="comma-separated epalm variants")
    ap.add_argument("--modes", default="train,eval,generate_greedy,generate_beam3",
                    help="comma-separated subset of train,eval,generate_greedy,generate_beam3")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--tiny", action="store_true",
                    help="2-layer hidden-64 OPT, batch 4, seq 12, 2 new tokens, 2 repeats: a CI smoke run")
    ap.add_argument("--out", default=None, help="JSON result file (default benchmarks/out/speed-<lm>-<device>.json)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.threads = args.threads or 1  # tiny ops: OpenMP threads only add contention
        args.lm = TINY_LM
        args.batch, args.seq, args.new_tokens = min(args.batch, 4), min(args.seq, 12), min(args.new_tokens, 2)
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    elif args.lm not in LM_CONFIGS:
        ap.error(f"--lm must be one of {sorted(LM_CONFIGS)} (or use --tiny)")
    if not 1 <= args.answer < args.seq:
        ap.error("--answer must be in [1, seq)")
    args.variants = [v for v in args.variants.split(",") if v]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(TARGETS)
    if unknown:
        ap.error(f"unknown --modes {sorted(unknown)}")
    return args


def run(args: argparse.Namespace) -> dict:
    import transformers

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_before = load_average()

    # One LM instance per contender (same seed, same weights): the bare LM carries no hooks at
    # all, and the measurements can be interleaved round-robin.
    lm = build_lm(args.lm, device, dtype)
    ids, mask, features = make_inputs(lm, args.batch, args.seq, device)
    contenders = {"bare": bare_benchmarks(lm, ids, mask, args, device, dtype)}
    trainable_params = {}
    for variant in args.variants:
        model = build_epalm(build_lm(args.lm, device, dtype), args.lm, variant, device)
        trainable_params[variant] = model.parameter_report()["trainable"]
        feats = all_token_features(args.batch, device) if model.config.needs_all_tokens else features
        contenders[variant] = epalm_benchmarks(model, ids, mask, feats, args, device, dtype)

    results: dict[str, dict[str, dict]] = {name: {} for name in contenders}
    for mode in args.modes:
        per_mode = time_interleaved({name: fns[mode] for name, fns in contenders.items()}, device,
                                    args.warmup, args.repeats)
        for name, res in per_mode.items():
            results[name][mode] = res
    load_after = load_average()
    # Memory after all timings: one untimed call of each (a sampler thread would compete with
    # timed code for the GIL, and on CPU glibc caching is switched off for it).
    if device.type == "cpu":
        release_cpu_heap_caching()
    for mode in args.modes:
        for name, fns in contenders.items():
            results[name][mode].update(measure_memory(fns[mode], device))

    def table(key: str) -> dict:
        return {who: {m: r[key] for m, r in per.items()} for who, per in results.items()}

    times = table("median_ms")
    ratios = {v: {m: times["bare"][m] / times[v][m] for m in args.modes} for v in args.variants}
    paired = {
        v: {m: statistics.median(b / e for b, e in zip(results["bare"][m]["runs_ms"], results[v][m]["runs_ms"]))
            for m in args.modes}
        for v in args.variants
    }
    machine = machine_info(device)
    report = {
        "benchmark": "speed",
        "lm": args.lm,
        "tiny": args.tiny,
        "device": device.type,
        "device_name": machine["device_name"],
        "dtype": dtype_name(dtype),
        "autocast": dtype != torch.float32,
        "batch": args.batch,
        "seq": args.seq,
        "prompt_len": PROMPT_LEN,
        "answer_tokens": args.answer,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "variants": args.variants,
        "trainable_params": trainable_params,
        "times_ms": times,
        "min_ms": table("min_ms"),
        "runs_ms": table("runs_ms"),
        "samples_per_s": {who: {m: args.batch / (ms / 1e3) for m, ms in per.items()} for who, per in times.items()},
        "new_tokens_per_s": {
            who: {m: args.batch * args.new_tokens / (ms / 1e3) for m, ms in per.items() if m.startswith("generate")}
            for who, per in times.items()
        },
        "peak_mem_mb": table("peak_mem_mb"),
        "peak_mem_kind": ("cuda max_memory_allocated above the allocation at entry, one untimed call"
                          if device.type == "cuda" else
                          "peak RSS above the RSS at entry of one untimed call after all timings (sampled "
                          "every 1 ms, glibc heap caching off); maxrss_growth_mb: growth of resource "
                          "ru_maxrss (process high-water mark)"),
        "ratios": ratios,
        "ratios_paired": paired,
        "ratio_definition": ("bare_ms / epalm_ms of the medians (ratios) or median of per-round ratios "
                             "(ratios_paired); >= 1: epalm at least as fast as the bare LM bound"),
        "targets": {m: TARGETS[m] for m in args.modes},
        "meets_target": {v: {m: r >= TARGETS[m] for m, r in per.items()} for v, per in ratios.items()},
        "load_average": {"before": load_before, "after": load_after},
    }
    if device.type != "cuda":
        report["maxrss_growth_mb"] = table("maxrss_growth_mb")
    report["machine"] = machine
    report["torch"] = torch.__version__
    report["transformers"] = transformers.__version__
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    from epalm.io import atomic_write_json

    out = Path(args.out) if args.out else OUT_DIR / f"speed-{safe_name(args.lm)}-{report['device']}.json"
    atomic_write_json(out, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
