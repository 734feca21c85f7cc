"""Training loop: loss goes down, exact resume, NaN handling, curves and logs."""

from __future__ import annotations

import pytest
import torch

from epalm.recipes.tiny import ColourDataset, collate, tiny_model
from epalm.training.trainer import OptimConfig, TrainConfig, Trainer, TrainingDiverged, config_from_dict, lr_lambda


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


def test_should_stop_ends_training_where_it_says_and_a_resume_stays_stopped(tmp_path):
    calls = []

    def stop_at_5(model, step):
        calls.append((step, model.training))
        model.eval()  # a check may evaluate the model: the loop puts it back in training mode
        return step >= 5

    cfg_kw = dict(epochs=3)  # 3 steps per epoch: 9 steps at most
    trainer, model = run(tmp_path, "stop", **cfg_kw)
    trainer.should_stop = stop_at_5
    state = trainer.train()
    assert calls == [(s, True) for s in range(1, 6)]
    assert state["step"] == 5 and state["stopped_at"] == 5
    assert (tmp_path / "stop" / "metrics.csv").read_text().count("\n") == 6  # header + 5 steps
    weights = trainable(model)
    again, m2 = run(tmp_path, "stop", **cfg_kw)
    state = again.train(resume=True)
    assert state["step"] == 5 and state["stopped_at"] == 5  # a resumed run trains nothing more
    for k, v in trainable(m2).items():
        assert torch.equal(weights[k], v), k
    with pytest.raises(ValueError, match="stop_every"):
        Trainer(make_model(), ColourDataset(24), collate, again.cfg, should_stop=stop_at_5, stop_every=0)


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


# =========================================================================== device placement

class HostTensor(torch.Tensor):
    """A spy for "still where the data loader made it": ``.to(device)`` / ``.cuda()`` return a plain
    tensor and record the target device; any other op keeps the HostTensor type."""

    moves: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs).as_subclass(torch.Tensor)  # (same device: .to returns self)
            cls.moves.append(out.device)
            return out
        return super().__torch_function__(func, types, args, kwargs)


def host_collate(items):
    return {k: v.as_subclass(HostTensor) if isinstance(v, torch.Tensor) else v for k, v in collate(items).items()}


def assert_inputs_on(model, device, seen):
    def check(_module, args, kwargs):
        tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
        assert tensors
        for t in tensors:
            assert type(t) is torch.Tensor, f"a batch tensor reached the model without being moved ({type(t).__name__})"
            assert t.device == device
        seen.append(len(tensors))

    return model.register_forward_pre_hook(check, with_kwargs=True)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_every_batch_tensor_is_moved_to_the_accelerator_device(tmp_path, precision):
    """Fails when the trainer hands the collated (host) tensors to the model as they are."""
    trainer, model = run(tmp_path, precision, collate_fn=host_collate, epochs=1, mixed_precision=precision)
    seen = []
    handle = assert_inputs_on(model, trainer.accelerator.device, seen)
    HostTensor.moves.clear()
    trainer.train()
    handle.remove()
    assert len(seen) == 3  # 24 samples / batch 8
    assert HostTensor.moves and set(HostTensor.moves) == {trainer.accelerator.device}


def test_evaluation_moves_every_tensor_to_the_accelerator_device():
    from accelerate import Accelerator

    from epalm.evaluation.evaluate import predict

    model = make_model()
    ds = ColourDataset(6)

    class Tok:
        pad_token_id, eos_token_id = 1, 2

        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(map(str, r.tolist())) for r in rows]

    ids = iter(range(100))

    def eval_collate(items):
        batch = collate(items)
        out = {"prompt_input_ids": batch["input_ids"][:, :4], "prompt_attention_mask": batch["attention_mask"][:, :4],
               "media": batch["pixel_values"], "sample_id": [next(ids) for _ in items]}
        return {k: v.as_subclass(HostTensor) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    acc = Accelerator(cpu=True)
    seen = []
    generate = model.generate

    def spy(**kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                assert type(v) is torch.Tensor and v.device == acc.device, k
        seen.append(1)
        return generate(**kwargs)

    model.generate = spy
    rows = predict(model, ds, eval_collate, Tok(), batch_size=4, accelerator=acc, progress=False, num_workers=0)
    assert len(rows) == 6 and len(seen) == 2


# =========================================================================== workers and exact resume

class AugmentedColours(ColourDataset):
    """Per-sample random noise drawn from the generator the loader passes (like an augmentation)."""

    def get(self, i, generator=None):
        item = super().__getitem__(i)
        item["pixel_values"] = item["pixel_values"] + 0.5 * torch.randn(item["pixel_values"].shape, generator=generator)
        return item

    def __getitem__(self, i):
        return self.get(i)


def run_aug(tmp_path, name, collate_fn=None, **kw):
    cfg = TrainConfig(output_dir=str(tmp_path / name), epochs=kw.pop("epochs", 2), batch_size=8, cpu=True,
                      log_every=1, optim=OptimConfig(lr=1e-2, warmup_lr=3e-3, min_lr=1e-3, prompt_lr=1e-2), **kw)
    model = make_model()
    return Trainer(model, AugmentedColours(24), collate_fn or collate, cfg), model


def test_samples_do_not_depend_on_the_number_of_workers():
    from epalm.data.loading import EpochBatchSampler, SeededSamples, make_loader
    from epalm.training.trainer import EpochOrder

    order = EpochOrder(24, 8, seed=3)
    batches = {}
    for workers in (0, 2):
        sampler = EpochBatchSampler(order)
        sampler.set_position(1, 1)
        loader = make_loader(SeededSamples(AugmentedColours(24), seed=3), batch_sampler=sampler, collate_fn=collate,
                             num_workers=workers, pin_memory=False, persistent=False)
        batches[workers] = [b["pixel_values"] for b in loader]
    assert len(batches[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    other_epoch = EpochBatchSampler(order)
    other_epoch.set_position(2, 0)
    ds = SeededSamples(AugmentedColours(24), seed=3)
    assert not torch.equal(ds[(1, 5)]["pixel_values"], ds[(2, 5)]["pixel_values"])  # seeded by epoch too
    assert torch.equal(ds[(1, 5)]["pixel_values"], ds[(1, 5)]["pixel_values"])


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing on the way catches it)."""


def test_resume_with_two_workers_equals_an_uninterrupted_run_without_workers(tmp_path):
    straight, m1 = run_aug(tmp_path, "straight", num_workers=0)
    straight.train()
    first, _ = run_aug(tmp_path, "resumed", num_workers=2, save_every=1)
    assert first.num_workers == 2
    step = first._step
    calls = []

    def dying_step(window):  # the process dies during the 5th step (epoch 1, batch 1)
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return step(window)

    first._step = dying_step
    with pytest.raises(Killed):
        first.train()
    first.close()
    assert first.state["step"] == 4
    second, m2 = run_aug(tmp_path, "resumed", num_workers=2)
    second.train(resume=True)
    assert second.state["step"] == straight.state["step"] == 6
    a, b = trainable(m1), trainable(m2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_num_workers(monkeypatch):
    from epalm.data import loading

    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loading.default_num_workers(10_000) == 8
    assert loading.default_num_workers(10) == 0  # tiny dataset: no worker processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loading.default_num_workers(10_000) == 3  # 16 cores / 4 processes - 1
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_workers=-1)


# =========================================================================== activation checkpointing

@pytest.mark.parametrize("variant", ["epalm", "ada"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    from epalm.training.parallel import enable_activation_checkpointing

    ds = ColourDataset(6)
    batch = collate([ds[i] for i in range(6)])
    grads = []
    recomputed = []
    for checkpointed in (False, True):
        model = tiny_model(variant=variant)
        assert (model.prompt is not None) == (variant == "epalm") and (model.adapters is not None) == (variant == "ada")
        if checkpointed:
            enable_activation_checkpointing(model)
            layer = model.engine.anatomy.layers[-1]
            layer.register_forward_hook(lambda *_: recomputed.append(torch.is_grad_enabled()))
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert recomputed.count(True) >= 1
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in grads[0].values()) > 0


def test_checkpointed_layers_recompute_inside_the_forwards_injection_state():
    from epalm.training.parallel import enable_activation_checkpointing

    model = enable_activation_checkpointing(tiny_model())
    states = []
    inner = type(model.engine.anatomy.layers[-1]).forward

    def spy(self, *args, **kwargs):
        states.append(model.engine.state)
        return inner(self, *args, **kwargs)

    layer = model.engine.anatomy.layers[-1]
    layer.__class__ = type("Spied", (type(layer),), {"forward": spy})
    ds = ColourDataset(4)
    out = model(**collate([ds[i] for i in range(4)]))
    assert model.engine.state is None  # the forward is over
    out.loss.backward()  # the layer runs again here
    assert len(states) == 2 and states[0] is not None and states[1] is states[0]
