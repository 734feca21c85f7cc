"""Feature cache: exact round trip, stale/incomplete detection, atomic + resumable builds."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel

from epalm import EPALM, EPALMConfig
from epalm.core.encoders import wrap_hf_encoder
from epalm.data.feature_cache import (
    FeatureCache,
    IncompleteCacheError,
    StaleCacheError,
    encoder_fingerprint,
    partial_path,
)

PRE = {"image_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def make_vit(seed: int = 1) -> ViTModel:
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                    image_size=16, patch_size=8)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def make_encoder(num_layers: int = 2, seed: int = 1):
    return wrap_hf_encoder(make_vit(seed), num_layers=num_layers)


def media(n: int = 7, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 16, 16)


def ids_for(n: int) -> list[str]:
    return [f"img{i:03d}" for i in range(n)]


def build(path, enc, px, **kwargs):
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("progress", False)
    cache = FeatureCache.build(path, enc, list(zip(ids_for(len(px)), px)), fp, **kwargs)
    return cache, fp


def direct(enc, px, batch_size):
    return torch.cat([enc(px[i:i + batch_size]) for i in range(0, len(px), batch_size)])


# ------------------------------------------------------------------------------ round trip
def test_fp32_cache_equals_encoder_exactly_and_dedups(tmp_path):
    enc, px = make_encoder(), media(7)
    calls: dict[str, int] = {}

    def loader(name, tensor):
        def load():
            calls[name] = calls.get(name, 0) + 1
            return tensor
        return load

    ids = ids_for(7)
    items = [(m, loader(m, x)) for m, x in zip(ids, px)]
    items.insert(3, (ids[1], loader(ids[1], px[1])))  # duplicate id: computed once
    items.append((ids[6], px[6]))  # duplicate given as a tensor
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    cache = FeatureCache.build(tmp_path / "c", enc, items, fp, batch_size=2, dtype="float32", progress=False)

    assert calls == {m: 1 for m in ids}
    assert len(cache) == 7 and cache.shape == (2, 24) and cache.dtype == torch.float32
    # rows are computed in batches [0,1],[2,3],[4,5],[6]: compare with the same batching
    want = direct(enc, px, 2)
    for i, m in enumerate(ids):
        assert torch.equal(cache[m], want[i])
    batch = cache.get_batch([ids[5], ids[0], ids[5]])
    assert batch.shape == (3, 2, 24)
    assert torch.equal(batch, want[[5, 0, 5]])
    assert ids[2] in cache and "nope" not in cache and 3 not in cache
    assert cache.ids == ids

    # plain numpy .npy + JSON on disk
    arr = np.load(tmp_path / "c" / "features.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (7, 2, 24) and arr.dtype == np.float32
    assert json.loads((tmp_path / "c" / "index.json").read_text()) == {m: i for i, m in enumerate(ids)}
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["complete"] is True and meta["rows"] == 7 and meta["dtype"] == "float32"
    assert meta["epalm_version"] and meta["fingerprint"]["num_layers"] == 2
    assert meta["fingerprint"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert not partial_path(tmp_path / "c").exists()


def test_fp16_cache_matches_to_tolerance(tmp_path):
    enc, px = make_encoder(), media(5)
    cache, _ = build(tmp_path / "c", enc, px, dtype=torch.float16)
    assert cache.dtype == torch.float16
    got = cache.get_batch(ids_for(5))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), direct(enc, px, 3), atol=1e-2, rtol=1e-3)
    assert cache.get_batch(ids_for(2), dtype=torch.float32).dtype == torch.float32


def test_int_ids_and_missing_id_error(tmp_path):
    enc, px = make_encoder(), media(3)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    cache = FeatureCache.build(tmp_path / "c", enc, [(391895, px[0]), (7, px[1])], fp, progress=False)
    assert 391895 in cache and "391895" in cache
    assert torch.equal(cache[391895], cache["391895"])
    with pytest.raises(KeyError, match=r"'12345'.*" + str(tmp_path / "c").replace("\\", "\\\\")):
        cache[12345]
    with pytest.raises(KeyError, match="'ghost'"):
        cache.get_batch([7, "ghost"])


def test_cache_pickles_for_dataloader_workers(tmp_path):
    enc, px = make_encoder(), media(4)
    cache, _ = build(tmp_path / "c", enc, px)
    cache.get_batch(ids_for(2))  # map it before pickling
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.get_batch(ids_for(4)), cache.get_batch(ids_for(4)))


# ------------------------------------------------------------------------------ stale / incomplete
def test_changed_weights_preprocessing_or_k_is_stale(tmp_path):
    enc, px = make_encoder(), media(4)
    _, fp = build(tmp_path / "c", enc, px)
    assert len(FeatureCache.open(tmp_path / "c", encoder_fingerprint(make_encoder(), "tiny-vit", PRE))) == 4

    changed = make_encoder()
    with torch.no_grad():
        changed.layers[1].attention.q_proj.weight.mul_(1.01)
    with pytest.raises(StaleCacheError, match="weights") as err:
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(changed, "tiny-vit", PRE))
    assert err.value.fields == ["weights"]

    with pytest.raises(StaleCacheError, match=r"preprocessing\.image_size") as err:
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(enc, "tiny-vit", {**PRE, "image_size": 32}))
    assert err.value.fields == ["preprocessing.image_size"]

    with pytest.raises(StaleCacheError, match=r"preprocessing\.std"):
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(enc, "tiny-vit", {**PRE, "std": (0.2, 0.2, 0.2)}))

    with pytest.raises(StaleCacheError, match="num_layers"):
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(make_encoder(num_layers=3), "tiny-vit", PRE))

    with pytest.raises(StaleCacheError, match="all_tokens"):
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(enc, "tiny-vit", PRE, all_tokens=True))

    with pytest.raises(StaleCacheError, match="encoder"):
        FeatureCache.open(tmp_path / "c", encoder_fingerprint(enc, "other-vit", PRE))


def test_build_refuses_a_fingerprint_of_another_encoder(tmp_path):
    enc, px = make_encoder(), media(2)
    fp = encoder_fingerprint(make_encoder(seed=9), "tiny-vit", PRE)
    with pytest.raises(ValueError, match="weights hash"):
        FeatureCache.build(tmp_path / "c", enc, [("a", px[0])], fp, progress=False)
    assert not (tmp_path / "c").exists() and not partial_path(tmp_path / "c").exists()


def test_truncated_or_unflagged_cache_is_incomplete(tmp_path):
    enc, px = make_encoder(), media(4)
    _, fp = build(tmp_path / "c", enc, px)
    feats = tmp_path / "c" / "features.npy"
    blob = feats.read_bytes()

    feats.write_bytes(blob[:-10])
    with pytest.raises(IncompleteCacheError, match="truncated"):
        FeatureCache.open(tmp_path / "c", fp)
    feats.write_bytes(blob)
    FeatureCache.open(tmp_path / "c", fp)

    meta_file = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "complete"}))
    with pytest.raises(IncompleteCacheError, match="complete"):
        FeatureCache.open(tmp_path / "c", fp)
    meta_file.write_text(json.dumps({**meta, "rows": 5}))
    with pytest.raises(IncompleteCacheError, match="rows"):
        FeatureCache.open(tmp_path / "c", fp)
    meta_file.write_text(json.dumps(meta))

    index_file = tmp_path / "c" / "index.json"
    index_file.write_text(json.dumps({"img000": 0, "img001": 1, "img002": 2}))
    with pytest.raises(IncompleteCacheError, match="index"):
        FeatureCache.open(tmp_path / "c", fp)
    index_file.unlink()
    with pytest.raises(IncompleteCacheError, match="index"):
        FeatureCache.open(tmp_path / "c", fp)


def test_existing_cache_needs_overwrite(tmp_path):
    enc, px = make_encoder(), media(3)
    build(tmp_path / "c", enc, px)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build(tmp_path / "c", enc, px)
    cache, _ = build(tmp_path / "c", enc, px[:2], overwrite=True)
    assert len(cache) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ------------------------------------------------------------------------------ atomic + resume
class Boom(RuntimeError):
    pass


def test_interrupted_build_leaves_no_cache_and_resume_completes_it(tmp_path):
    enc, px = make_encoder(), media(8)
    ids = ids_for(8)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    final = tmp_path / "c"
    loaded: list[str] = []

    def items(stop_after=None):
        for n, (m, x) in enumerate(zip(ids, px)):
            if stop_after is not None and n == stop_after:
                raise Boom("interrupted")

            def load(m=m, x=x):
                loaded.append(m)
                assert not final.exists(), "the final directory must appear only when complete"
                return x
            yield m, load

    with pytest.raises(Boom):
        FeatureCache.build(final, enc, items(stop_after=5), fp, batch_size=2, dtype="float32", progress=False)
    assert not final.exists()
    assert partial_path(final).is_dir()
    with pytest.raises(FileNotFoundError, match="resume=True"):
        FeatureCache.open(final, fp)

    loaded.clear()
    cache = FeatureCache.build(final, enc, items(), fp, batch_size=2, dtype="float32", progress=False)
    # two full batches (4 rows) were committed; item 5 was loaded but its batch never ran
    assert loaded == ids[4:]
    assert not partial_path(final).exists()

    reference, _ = build(tmp_path / "ref", enc, px, batch_size=2)
    assert cache.ids == reference.ids
    assert np.array_equal(np.asarray(cache.array), np.asarray(reference.array))
    assert (final / "index.json").read_text() == (tmp_path / "ref" / "index.json").read_text()


def test_resume_discards_unmarked_rows_and_checks_settings(tmp_path):
    enc, px = make_encoder(), media(6)
    ids = ids_for(6)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    final = tmp_path / "c"

    def failing_loader():
        raise Boom("bad file")

    items = list(zip(ids[:3], px[:3])) + [("bad", failing_loader)]
    with pytest.raises(Boom):
        FeatureCache.build(final, enc, items, fp, batch_size=2, dtype="float32", progress=False)
    # garbage appended after the last progress marker (a crash mid-write) is dropped on resume
    with open(partial_path(final) / "features.npy", "ab") as f:
        f.write(b"\x01" * 100)

    other = encoder_fingerprint(enc, "tiny-vit", {**PRE, "image_size": 32})
    with pytest.raises(StaleCacheError, match="resume=False"):
        FeatureCache.build(final, enc, zip(ids, px), other, dtype="float32", progress=False)
    with pytest.raises(StaleCacheError, match="dtype"):
        FeatureCache.build(final, enc, zip(ids, px), fp, dtype="float16", progress=False)

    cache = FeatureCache.build(final, enc, zip(ids, px), fp, batch_size=2, dtype="float32", progress=False)
    reference, _ = build(tmp_path / "ref", enc, px, batch_size=2)
    assert np.array_equal(np.asarray(cache.array), np.asarray(reference.array))
    assert cache.ids == ids

    # resume=False throws an unfinished build away
    with pytest.raises(Boom):
        FeatureCache.build(tmp_path / "d", enc, items, fp, batch_size=2, progress=False)
    cache = FeatureCache.build(tmp_path / "d", enc, zip(ids[3:], px[3:]), fp, resume=False, progress=False)
    assert cache.ids == ids[3:]


# ------------------------------------------------------------------------------ training
def test_training_from_cache_equals_training_from_media(tmp_path):
    enc, px = make_encoder(), media(3)
    ids = ids_for(3)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    cache = FeatureCache.build(tmp_path / "c", enc, list(zip(ids, px)), fp, batch_size=3, dtype="float32",
                               progress=False)

    def make_model():  # identical initial weights (deepcopy would keep hooks bound to the original)
        torch.manual_seed(0)
        lm = OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                      pad_token_id=1, bos_token_id=2, eos_token_id=2))
        lm.config._attn_implementation = "sdpa"
        return EPALM(lm, enc, EPALMConfig(lm="t", encoder="t", variant="epalm", num_encoder_layers=2))

    model_a, model_b = make_model(), make_model()
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    torch.manual_seed(4)
    input_ids = torch.randint(3, 97, (3, 6))
    labels = input_ids.clone()
    labels[:, :2] = -100

    def train(model, use_cache):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            if use_cache:
                out = model(features=cache.get_batch(ids), input_ids=input_ids, labels=labels)
            else:
                out = model(pixel_values=px, input_ids=input_ids, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        return losses, model.trainable_state_dict()

    initial = {k: v.clone() for k, v in model_a.trainable_state_dict().items()}
    losses_a, state_a = train(model_a, use_cache=False)
    losses_b, state_b = train(model_b, use_cache=True)
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys() and state_a
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert any(not torch.equal(state_a[k], initial[k]) for k in initial)  # training moved the weights


def test_all_tokens_cache_for_magma_star(tmp_path):
    enc, px = make_encoder(), media(3)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE, all_tokens=True)
    cache = FeatureCache.build(tmp_path / "c", enc, zip(ids_for(3), px), fp, dtype="float32", progress=False)
    assert cache.shape == (5, 24)  # CLS + 2x2 patches of the last layer
    assert torch.equal(cache.get_batch(ids_for(3)), enc(px, all_tokens=True))


def test_crash_between_completion_and_rename_is_finished_on_resume(tmp_path, monkeypatch):
    from epalm.data import feature_cache as fc

    enc, px = make_encoder(), media(4)
    fp = encoder_fingerprint(enc, "tiny-vit", PRE)
    real_publish = fc._PartialWriter.publish

    def crash(self, overwrite):
        raise Boom("killed before the rename")

    monkeypatch.setattr(fc._PartialWriter, "publish", crash)
    with pytest.raises(Boom):
        FeatureCache.build(tmp_path / "c", enc, zip(ids_for(4), px), fp, dtype="float32", progress=False)
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(fc._PartialWriter, "publish", real_publish)

    def must_not_iterate():
        raise AssertionError("a completed partial build must not recompute anything")
        yield

    cache = FeatureCache.build(tmp_path / "c", enc, must_not_iterate(), fp, dtype="float32", progress=False)
    assert cache.ids == ids_for(4)


def test_progress_bar_reports_items_per_second(tmp_path, capsys):
    enc, px = make_encoder(), media(4)
    build(tmp_path / "c", enc, px, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "item" in err  # "item/s" (or "s/item" on a very slow machine)
