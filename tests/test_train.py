"""Training loop: loss goes down, exact resume, NaN handling, curves and logs."""

from __future__ import annotations

import pytest
import torch

from epalm.tiny import ColourDataset, collate, tiny_model
from epalm.train import OptimConfig, TrainConfig, Trainer, TrainingDiverged, config_from_dict, lr_lambda


def make_model(seed=0):
    return tiny_model(seed=seed)


def trainable(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def run(tmp_path, name, collate_fn=None, **kw):
    cfg = TrainConfig(output_dir=str(tmp_path / name), epochs=kw.pop("epochs", 3), batch_size=8, cpu=True,
                      log_every=1, optim=OptimConfig(lr=1e-2, warmup_lr=3e-3, min_lr=1e-3, prompt_lr=1e-2), **kw)
    model = make_model()
    return Trainer(model, ColourDataset(24), collate_fn or collate, cfg), model


def test_training_reduces_loss_and_writes_logs(tmp_path):
    trainer, model = run(tmp_path, "a", epochs=8)
    ds = ColourDataset(24)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        before = model(**batch).loss.item()
    trainer.train()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before * 0.5, (before, after)
    out = tmp_path / "a"
    assert (out / "metrics.csv").read_text().count("\n") == 25  # header + 24 steps
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoint" / "epalm_weights.safetensors").exists()


def test_resume_gives_identical_weights(tmp_path):
    straight, m1 = run(tmp_path, "straight", epochs=2)
    straight.train()
    calls = []

    def crashing_collate(items):  # the process dies while loading the 5th batch (epoch 1, batch 1)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return collate(items)

    first, _ = run(tmp_path, "resumed", collate_fn=crashing_collate, epochs=2, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert first.state["step"] == 4
    second, m2 = run(tmp_path, "resumed", epochs=2)
    second.train(resume=True)
    assert second.state["step"] == straight.state["step"] == 6
    a, b = trainable(m1), trainable(m2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_clear_message_or_skips(tmp_path):
    trainer, model = run(tmp_path, "nan", epochs=1)
    with torch.no_grad():
        model.connector.linears[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite loss .* at epoch 0, batch 0"):
        trainer.train()
    trainer, model = run(tmp_path, "skip", epochs=1, on_nan="skip")
    with torch.no_grad():
        model.connector.linears[0].weight.fill_(float("nan"))
    state = trainer.train()
    assert state["skipped_nan"] == 3


def test_schedule_and_config_errors():
    cfg = OptimConfig(lr=2e-5, warmup_lr=1e-5, min_lr=1e-6, warmup_steps=10)
    assert lr_lambda(0, 100, cfg) == pytest.approx(0.5)
    assert lr_lambda(10, 100, cfg) == pytest.approx(1.0)
    assert lr_lambda(100, 100, cfg) == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"unknown training key\(s\) \['epochz'\]"):
        config_from_dict({"epochz": 3})
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        config_from_dict({"optim": {"lrr": 1}})


class UnevenColours(ColourDataset):
    """Samples with 1 or 2 labelled tokens, so micro-batches hold different token counts."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i % 3 == 0:
            item["labels"] = item["labels"].clone()
            item["labels"][-1] = -100
        return item


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = []
    for accum in (1, 2, 4):
        cfg = TrainConfig(output_dir=str(tmp_path / f"acc{accum}"), epochs=2, batch_size=8, grad_accum=accum,
                          cpu=True, log_every=1, optim=OptimConfig(lr=1e-3, warmup_lr=1e-3, min_lr=1e-4))
        model = make_model()
        Trainer(model, UnevenColours(24), collate, cfg).train()
        results.append(trainable(model))
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], rtol=0, atol=1e-6)


def test_logged_loss_is_the_global_token_mean(tmp_path):
    import csv

    cfg = TrainConfig(output_dir=str(tmp_path / "log"), epochs=1, batch_size=24, grad_accum=3, cpu=True,
                      log_every=1, optim=OptimConfig(lr=1e-12, warmup_lr=1e-12, min_lr=1e-12))
    model = make_model()
    ds = UnevenColours(24)
    order = Trainer(model, ds, collate, cfg).order.indices(0)
    with torch.no_grad():
        expected = model(**collate([ds[i] for i in order])).loss.item()
    Trainer(model, ds, collate, cfg).train()
    row = next(csv.DictReader((tmp_path / "log" / "metrics.csv").open()))
    assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)


def test_trainers_with_different_precisions_share_a_process(tmp_path):
    """Mixed precision belongs to each Trainer (not to accelerate's process-wide state)."""
    seen = {}
    for name, precision in (("fp32", "no"), ("bf16", "bf16"), ("fp32-again", "no")):
        trainer, model = run(tmp_path, name, epochs=1, mixed_precision=precision)
        flags = []
        handle = model.connector.register_forward_pre_hook(lambda *_: flags.append(torch.is_autocast_enabled("cpu")))
        trainer.train()
        handle.remove()
        seen[name] = set(flags)
        assert all(torch.isfinite(v).all() for v in model.trainable_state_dict().values())
    assert seen == {"fp32": {False}, "bf16": {True}, "fp32-again": {False}}


def test_every_forward_input_a_batch_carries_reaches_the_model(tmp_path):
    """A batch key that EPALM.forward accepts (here text_states) is passed on; others are not."""
    model = tiny_model(variant="lin")
    ds = ColourDataset(8)

    def collate_with_states(items):
        batch = collate(items)
        batch["text_states"] = model.text_states(batch["input_ids"], batch["attention_mask"])
        batch["sample_ids"] = list(range(len(items)))  # not a model input: must not be passed
        return batch

    received = []
    forward = model.forward

    def spy(*args, **kwargs):
        received.append(set(kwargs))
        return forward(*args, **kwargs)

    model.forward = spy
    cfg = TrainConfig(output_dir=str(tmp_path / "ts"), epochs=1, batch_size=4, cpu=True, log_every=1,
                      optim=OptimConfig(lr=1e-2))
    Trainer(model, ds, collate_with_states, cfg).train()
    assert received and all("text_states" in r and "sample_ids" not in r for r in received)
