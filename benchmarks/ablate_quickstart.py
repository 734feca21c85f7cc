"""Ablations of the easy-VQA quickstart recipe (issue 12): one process, parts loaded once.

    PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE python benchmarks/ablate_quickstart.py OUT.jsonl \
        'name=lin' 'name=ada_up,adapters_upper=1' ...

Each spec is comma-separated key=value: QuickstartConfig fields (steps, lr, batch_size,
inject_start, inject_end, variant, num_encoder_layers) plus: attention, prompt_len,
adapters_upper (bottleneck adapters in the injected layers only: lower layers stay cached),
adapter_lr, num_test, blind=1. Writes one JSON line per run (per type / per template accuracy,
seconds per phase, load average). Built on the cached-features recipe
(:mod:`epalm.recipes.cached`): the same features, text states, training and evaluation code.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from epalm.core.config import EPALMConfig
from epalm.core.connectors import LayerAdapters
from epalm.core.injection import attach_adapters
from epalm.core.model import EPALM
from epalm.data.registry import get_dataset
from epalm.data.text import encode_example, pad_token_id_of
from epalm.recipes import cached
from epalm.recipes import quickstart as qs
from epalm.training import trainer as train_mod

GROUP_BY = "answer_type,template"


class NullStates:
    """No cached lower layers: the full LM runs (variants training below the injection range)."""

    def __init__(self, pad_id, bf16):
        self.pad_id, self.bf16, self.states = pad_id, bf16, {}

    def ensure(self, keys, progress=False, desc=""):
        pass

    def batch(self, keys, length):
        return None


def parse(spec: str) -> dict:
    out = {}
    for item in spec.split(","):
        k, v = item.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        out[k] = v
    return out


def flat(scores: dict) -> dict:
    """accuracy, accuracy_<answer type> and per_template, rounded (the JSON line's numbers)."""
    out = {"accuracy": scores["accuracy"], **{f"accuracy_{k}": v for k, v in scores["per_answer_type"].items()}}
    out["per_template"] = {k: round(v, 4) for k, v in scores["per_template"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON-lines file the results are appended to")
    ap.add_argument("specs", nargs="+", help="comma-separated key=value run specs (see above)")
    args = ap.parse_args()
    out_path = Path(args.out)
    specs = [parse(s) for s in args.specs]
    base = qs.QuickstartConfig(progress=False, output_dir="runs/ablate")
    rbase = base.recipe()
    device = torch.device("cpu")
    t = time.perf_counter()
    parts = qs.load_parts(base)
    spec_ds = get_dataset("easy_vqa")
    train, test_all, _ = cached.load_splits(rbase, spec_ds)
    processor = cached.build_processor(rbase, spec_ds, parts.tokenizer)
    feats, row, _ = cached.media_features(rbase, parts, processor, cached.media_of(train, test_all), device, print)
    print(f"loaded in {time.perf_counter() - t:.0f}s", flush=True)

    tok = parts.tokenizer
    pad_id = pad_token_id_of(tok)
    seen, encoded = {}, []
    for s in train:
        key = (s.question, s.answers[0])
        if key not in seen:
            e = encode_example(tok, processor.prompt_text(s.question), s.answers[0])
            seen[key] = (tuple(e.input_ids), tuple(e.labels))
        encoded.append((*seen[key], row[s.media_id]))
    bf16 = cached.use_bf16(rbase.bf16, device)
    state_cache = {}

    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        num_test = int(spec.pop("num_test", 1000))
        attention = spec.pop("attention", "causal")
        prompt_len = spec.pop("prompt_len", None)
        adapters_upper = int(spec.pop("adapters_upper", 0))
        adapter_lr = spec.pop("adapter_lr", None)
        blind = bool(spec.pop("blind", 0))
        cfg = qs.QuickstartConfig(progress=False, output_dir=f"runs/ablate/{name}", **spec).recipe()
        test = cached.seeded_sample(test_all, num_test, cfg.seed)
        extra = {}
        if cfg.variant != "lin" and prompt_len is None and EPALMConfig(variant=cfg.variant).prompt_len:
            pass  # the variant's own prompt
        elif prompt_len is not None:
            extra["prompt_len"] = int(prompt_len)
        elif cfg.variant == "epalm":
            extra["prompt_len"] = 0
        config = EPALMConfig(lm=parts.lm_name, encoder=parts.encoder_name, variant=cfg.variant,
                             num_encoder_layers=cfg.num_encoder_layers, inject_start=cfg.inject_start,
                             inject_end=cfg.inject_end, attention=attention, **extra)
        torch.manual_seed(cfg.seed)
        model = EPALM(parts.lm, None, config, encoder_dim=feats.shape[-1]).to(device)
        d = model.engine.anatomy.hidden_size
        if adapters_upper:
            layers = list(model.engine.anatomy.layers)[model.inject_start:]
            model.upper_adapters = torch.nn.ModuleList(LayerAdapters(d, 8) for _ in layers)
            handles = attach_adapters(torch.nn.ModuleList(layers), model.upper_adapters)
        cacheable = model.prompt is None and model.deep_prompt is None and model.adapters is None
        test_prompts = [tuple(processor.encode_prompt(s.question)) for s in test]
        if cacheable:
            key = (model.inject_start,)
            states = cached.TextStates(model, pad_id, device, bf16)
            eval_states = cached.TextStates(model, pad_id, device, bf16=False)  # evaluation in fp32
            if key in state_cache:
                states.states, eval_states.states = state_cache[key]
            t = time.perf_counter()
            states.ensure([e[0] for e in encoded])
            eval_states.ensure(test_prompts)
            state_cache[key] = (states.states, eval_states.states)
            t_states = time.perf_counter() - t
        else:
            states, t_states = NullStates(pad_id, bf16), 0.0
            eval_states = states
        orig_groups = train_mod.param_groups

        def groups(m, ocfg):
            g, f = orig_groups(m, ocfg)
            if adapter_lr is not None:
                ad = {id(p) for n, p in m.named_parameters() if n.startswith("upper_adapters.")}
                for grp in g:
                    rest = [p for p in grp["params"] if id(p) not in ad]
                    if len(rest) != len(grp["params"]):
                        mine = [p for p in grp["params"] if id(p) in ad]
                        grp["params"] = rest
                        g.append({"params": mine, "lr": float(adapter_lr)})
                        f.append(False)
                        break
            return g, f

        train_mod.param_groups = groups
        load0 = os.getloadavg()[0]
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        quiet = dataclasses.replace(cfg, progress=False)

        def curve(m, _epoch):  # evaluation during training on the same test sample (eval.csv / curves.png)
            got = cached.evaluate_rows(quiet, m, processor, spec_ds, test, feats, row, eval_states, blind)
            return cached.flat_scores(cached.score_rows(spec_ds, got, test, GROUP_BY, []), GROUP_BY)

        t = time.perf_counter()
        info = cached.train_connectors(cfg, model, encoded, feats, states, Path(cfg.output_dir), blind, device,
                                       bf16, pad_id, evaluate=curve)
        t_train = time.perf_counter() - t
        train_mod.param_groups = orig_groups
        t = time.perf_counter()
        rows = cached.evaluate_rows(cfg, model, processor, spec_ds, test, feats, row, eval_states, blind)
        t_eval = time.perf_counter() - t
        result = {"name": name, "spec": {**spec, "attention": attention, "prompt_len": prompt_len,
                                         "adapters_upper": adapters_upper, "adapter_lr": adapter_lr, "blind": blind},
                  "num_test": num_test, **flat(cached.score_rows(spec_ds, rows, test, GROUP_BY, [])),
                  "trainable": model.parameter_report()["trainable"],
                  "seconds": {"text_states": round(t_states, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)},
                  "s_per_step": round(t_train / info["steps"], 3), "final_loss": info["final_loss"],
                  "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        print(json.dumps(result), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        if adapters_upper:
            for h in handles:
                h.remove()
        model.engine.remove()
        del model


if __name__ == "__main__":
    main()
