"""Past one GPU and past its memory: FSDP2 sharding of the frozen LM, activation checkpointing.

* :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) to every decoder layer
  of the frozen LM (the LM's ``_no_split_modules`` blocks) and then to the whole EPALM, whose own
  group holds the embeddings, the head, the frozen encoder and the trainable connectors / prompts:
  frozen and trainable parameters live in one model. ``generate`` and ``text_states`` are
  registered as FSDP forward methods, so generation gathers the root parameters like a forward.
* :func:`full_trainable_state_dict` gathers the trainable weights from their shards (a collective:
  every process calls it); :func:`load_trainable_state_dict` scatters saved weights back.
* :func:`enable_activation_checkpointing` recomputes each decoder layer in the backward pass
  instead of storing its activations. The layer's ``forward`` runs under
  ``torch.utils.checkpoint`` (non-reentrant); the injection pre-hooks run outside it, so the
  recomputed layer sees exactly the injected inputs of the forward pass, and the recomputation
  re-enters the injection state of that forward (``InjectionEngine.checkpoint_contexts``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["shard_model", "is_sharded", "full_trainable_state_dict", "load_trainable_state_dict",
           "enable_activation_checkpointing"]


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2-shard ``model`` (an EPALM) in place over all processes of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("FSDP needs a distributed launch (accelerate launch / torchrun), even for one process")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = model.engine.anatomy.layers
    names = set(getattr(model.lm, "_no_split_modules", None) or [])
    if names and type(layers[0]).__name__ not in names:
        raise ValueError(f"the LM's layer stack holds {type(layers[0]).__name__}, not one of its "
                         f"_no_split_modules {sorted(names)}")
    for layer in layers:  # one layer at a time: each is moved to the device and sharded
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to(device)  # buffers of the root group
    for method in ("generate", "text_states"):
        register_fsdp_forward_method(model, method)
    return model


def is_sharded(model: nn.Module) -> bool:
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the trainable parameters, gathered whole from FSDP shards (call on every
    process); a model that is not sharded gives its parameters as they are (detached)."""
    DTensor = _dtensor_type()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = t.full_tensor() if isinstance(t, DTensor) else t
    return out


def load_trainable_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole trainable tensors into a (possibly sharded) model through ``model.load_trainable``."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor_type()
    own = dict(model.named_parameters())
    local = {}
    for name, t in tensors.items():
        p = own.get(name)
        if isinstance(p, DTensor) and tuple(t.shape) == tuple(p.shape):
            t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)
        local[name] = t
    model.load_trainable(local)


class _CheckpointedForward:
    """Instance ``forward`` of a decoder layer that runs its class's forward under checkpoint.

    (A class, not a closure, so that a deep-copied model points at its own layer and engine.)"""

    def __init__(self, module: nn.Module, engine) -> None:
        self.module, self.engine = module, engine

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=self.engine.checkpoint_contexts, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every frozen decoder layer of ``model`` (an EPALM) in the backward pass."""
    engine = model.engine
    for layer in engine.anatomy.layers:
        if not isinstance(layer.__dict__.get("forward"), _CheckpointedForward):
            layer.forward = _CheckpointedForward(layer, engine)
    return model
