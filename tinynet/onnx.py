"""Export a tinynet model to a standard ONNX graph, and run one with onnxruntime.

    from tinynet.onnx import export
    export(model, "model.onnx", input_shape=(1, 3, 64, 64))

The exporter walks the module tree and writes one standard ONNX operator per
layer (opset :data:`OPSET`), built with the ``onnx`` package's helpers
(``onnx.helper.make_node`` / ``make_graph`` / ``make_model``,
``onnx.numpy_helper``); the weights become initializers named by their
state-dict keys (``layer1.0.conv1.weight``, as in PyTorch)::

    Conv2d              Conv            (weight, bias; strides, pads)
    BatchNorm2d/1d      BatchNormalization   (eval mode: the running mean and variance)
    ReLU                Relu
    MaxPool2d           MaxPool         (ONNX pads max pooling with -inf, as tinynet does)
    AvgPool2d           AveragePool     (count_include_pad kept)
    AdaptiveAvgPool2d(1)  GlobalAveragePool
    Flatten(1)          Flatten(axis=1)
    Linear              Gemm            (y = x W^T + b: transB=1)
    Softmax             Softmax
    BasicBlock          its layers, then Add (the shortcut) and Relu
    Dropout, Identity   nothing (identity in eval mode)

The graph computes the model in eval mode.  Its input ``input`` is float32
``(N, C, H, W)`` with a free batch dimension ``N``; its output is ``logits``.
A layer without a translation stops the export with :class:`ExportError`
naming it.  ``metadata`` (e.g. the class names and normalisation that
:mod:`tinynet.predict` stores) goes into the model's ``metadata_props`` as
JSON strings, so an ONNX file is as self-describing as a ``.safetensors`` one.

``onnx`` and ``onnxruntime`` are the optional extra ``onnx``
(``pip install "tinynet[onnx]"``), imported only when a function here runs.
"""
from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np

from . import backend
from .nn import (AdaptiveAvgPool2d, AvgPool2d, BasicBlock, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten,
                 Identity, Linear, MaxPool2d, ReLU, Sequential, Softmax)
from .nn.module import no_grad

__all__ = ["OPSET", "ExportError", "OnnxUnavailable", "export", "load", "onnx_forward"]

OPSET = 17  # every operator used here has had its current definition since opset 15 or earlier


class ExportError(ValueError):
    """The model holds a layer (or a layer setting) that has no ONNX translation here."""


class OnnxUnavailable(ImportError):
    """The optional ``onnx`` / ``onnxruntime`` packages are not installed."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailable(f"{module} is not installed; ONNX export and inference need the optional extra: "
                              f"pip install \"tinynet[onnx]\" (onnx and onnxruntime)") from None


class _GraphBuilder:
    """Collects nodes and initializers while walking the module tree; names every value uniquely."""

    def __init__(self, helper, numpy_helper, names: dict):
        self.helper, self.numpy_helper, self.names = helper, numpy_helper, names
        self.nodes, self.initializers, self.count = [], [], 0

    def weight(self, key: str, array) -> str:
        self.initializers.append(self.numpy_helper.from_array(
            np.ascontiguousarray(backend.to_numpy(array), dtype=np.float32), name=key))
        return key

    def node(self, op: str, inputs, where: str, **attributes) -> str:
        self.count += 1
        output = f"{where or op}:{op}:{self.count}"
        self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=f"{where}/{op}", **attributes))
        return output

    def add(self, module, x: str) -> str:
        """Append ``module``'s nodes, reading the value ``x``; returns the name of its output."""
        where = self.names.get(id(module), "")
        dot = f"{where}." if where else ""
        if isinstance(module, (Dropout, Identity)):
            return x
        if isinstance(module, Sequential):
            for layer in module:
                x = self.add(layer, x)
            return x
        if isinstance(module, BasicBlock):
            main = x
            for layer in (module.conv1, module.bn1, module.relu1, module.conv2, module.bn2):
                main = self.add(layer, main)
            shortcut = x if module.downsample is None else self.add(module.downsample, x)
            return self.add(module.relu2, self.node("Add", [main, shortcut], where))
        if hasattr(module, "_stages"):  # ResNet: its forward is features then fc, stage by stage
            for layer in module._stages():
                x = self.add(layer, x)
            return x
        if isinstance(module, Conv2d):
            inputs = [x, self.weight(dot + "weight", module.weight.data)]
            if module.bias is not None:
                inputs.append(self.weight(dot + "bias", module.bias.data))
            (ph, pw) = module.padding
            return self.node("Conv", inputs, where, kernel_shape=list(module.kernel_size),
                             strides=list(module.stride), pads=[ph, pw, ph, pw])
        if isinstance(module, (BatchNorm2d, BatchNorm1d)):
            if not module.track_running_stats:
                raise ExportError(f"cannot export {where or type(module).__name__} ({module!r}): without running "
                                  f"statistics it normalises with each batch's own, which ONNX's "
                                  f"BatchNormalization (inference) does not do")
            c = module.num_features
            gamma = module.weight.data if module.affine else np.ones(c, np.float32)
            beta = module.bias.data if module.affine else np.zeros(c, np.float32)
            inputs = [x, self.weight(dot + "weight", gamma), self.weight(dot + "bias", beta),
                      self.weight(dot + "running_mean", module.running_mean),
                      self.weight(dot + "running_var", module.running_var)]
            return self.node("BatchNormalization", inputs, where, epsilon=float(module.eps))
        if isinstance(module, ReLU):
            return self.node("Relu", [x], where)
        if isinstance(module, Softmax):
            return self.node("Softmax", [x], where, axis=int(module.dim))
        if isinstance(module, (MaxPool2d, AvgPool2d)):
            (ph, pw) = module.padding
            options = dict(kernel_shape=list(module.kernel_size), strides=list(module.stride), pads=[ph, pw, ph, pw])
            if isinstance(module, MaxPool2d):
                return self.node("MaxPool", [x], where, **options)
            return self.node("AveragePool", [x], where, count_include_pad=int(module.count_include_pad), **options)
        if isinstance(module, AdaptiveAvgPool2d):
            if tuple(module.output_size) != (1, 1):
                raise ExportError(f"cannot export {where or 'AdaptiveAvgPool2d'} with output_size "
                                  f"{module.output_size}: only global average pooling (output_size 1) is supported")
            return self.node("GlobalAveragePool", [x], where)
        if isinstance(module, Flatten):
            if module.end_dim != -1 or module.start_dim < 0:
                raise ExportError(f"cannot export {where or 'Flatten'} (start_dim={module.start_dim}, end_dim="
                                  f"{module.end_dim}): only Flatten(start_dim >= 0, end_dim=-1) is supported")
            return self.node("Flatten", [x], where, axis=int(module.start_dim))
        if isinstance(module, Linear):
            inputs = [x, self.weight(dot + "weight", module.weight.data)]
            if module.bias is not None:
                inputs.append(self.weight(dot + "bias", module.bias.data))
            return self.node("Gemm", inputs, where, transB=1)
        raise ExportError(f"cannot export {where or 'the model'} ({type(module).__name__}): no ONNX translation "
                          f"for this layer; supported are Sequential, ResNet, BasicBlock, Conv2d, BatchNorm1d/2d, "
                          f"ReLU, Softmax, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, Dropout, "
                          f"Identity")


def export(model, path, input_shape, *, metadata: dict | None = None, opset: int = OPSET):
    """Write ``model`` (its eval-mode computation) as an ONNX file at ``path``; returns the ``onnx.ModelProto``.

    Parameters
    ----------
    model : a tinynet model built from the supported layers (see the module docstring).
    path : where the ``.onnx`` file goes.
    input_shape : ``(N, C, H, W)``, the shape of one input batch; the batch
        dimension becomes free (``N``), the others are fixed.  tinynet runs
        the model once on zeros of this shape, to check that it fits and to
        learn the output width.
    metadata : string keys, JSON-able values, stored in ``metadata_props``.
    opset : the ONNX opset the graph declares (default :data:`OPSET`).

    The graph is checked with ``onnx.checker.check_model`` before it is written.
    """
    onnx = _require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"export: input_shape must be (N, C, H, W) with positive sizes, got {input_shape!r}")
    was_training = model.training
    model.eval()
    try:
        zeros = np.zeros(shape, dtype=np.float32)
        with no_grad():
            classes = int(model(zeros if model.device == "cpu" else backend.to_device(zeros, model.device)).shape[1])
        names = {id(m): name for name, m in model.named_modules()}
        builder = _GraphBuilder(helper, numpy_helper, names)
        output = builder.add(model, "input")
    finally:
        model.train(was_training)
    builder.nodes.append(helper.make_node("Identity", [output], ["logits"], name="logits"))
    graph = helper.make_graph(
        builder.nodes, f"tinynet_{type(model).__name__}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=builder.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="tinynet", doc_string=f"tinynet {type(model).__name__}, eval mode")
    # onnxruntime reads IR versions up to its own; the onnx package's newest may be ahead of it.
    proto.ir_version = min(proto.ir_version, 10)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(pathlib.Path(path)))
    return proto


def load(path, device: str = "cpu"):
    """``(session, meta)``: an onnxruntime session for the ONNX file ``path`` and its metadata (JSON-decoded).

    ``device="cuda"`` asks for onnxruntime's CUDA provider, falling back to the CPU where it has none.
    """
    ort = _require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    raw = session.get_modelmeta().custom_metadata_map
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return session, meta


def onnx_forward(session):
    """``forward(x)`` for :func:`tinynet.predict.predict_files`: the session's ``logits`` for a float32 batch."""
    name = session.get_inputs()[0].name

    def forward(x):
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return forward
