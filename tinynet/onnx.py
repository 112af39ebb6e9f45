"""Export a tinynet model to a standard ONNX graph, and run one with onnxruntime.

    from tinynet.onnx import export
    export(model, "model.onnx", input_shape=(1, 3, 64, 64))

The exporter walks the module tree and writes one standard ONNX operator per
layer (opset :data:`OPSET`), built with the ``onnx`` package's helpers
(``onnx.helper.make_node`` / ``make_graph`` / ``make_model``,
``onnx.numpy_helper``); the weights become initializers named by their
state-dict keys (``layer1.0.conv1.weight``, as in PyTorch)::

    Conv2d              Conv            (weight, bias; strides, pads, group)
    BatchNorm2d/1d      BatchNormalization   (eval mode: the running mean and variance)
    ReLU                Relu
    MaxPool2d           MaxPool         (ONNX pads max pooling with -inf, as tinynet does)
    AvgPool2d           AveragePool     (count_include_pad kept)
    AdaptiveAvgPool2d(1)  GlobalAveragePool
    Flatten(1)          Flatten(axis=1)
    Flatten(other)      Reshape         (to [0, fixed sizes]: the batch stays free; merging it is refused)
    Linear              Gemm            (y = x W^T + b: transB=1)
    Softmax             Softmax
    BasicBlock          its layers, then Add (the shortcut) and Relu
    Dropout, Identity   nothing (identity in eval mode)

The graph computes the model in eval mode.  Its input ``input`` is float32
``(N, C, H, W)`` with a free batch dimension ``N``; its output is ``logits``.
A layer without a translation, or one that does not run on what it receives
from ``input_shape``, stops the export with :class:`ExportError` naming it; a
layer used twice (shared weights) reads one set of initializers.
``metadata`` (e.g. the class names and normalisation that
:mod:`tinynet.predict` stores) goes into the model's ``metadata_props`` as
JSON strings, so an ONNX file is as self-describing as a ``.safetensors`` one.

``onnx`` and ``onnxruntime`` are the optional extra ``onnx``
(``pip install -e ".[onnx]"`` from the checkout), imported only when a function here runs.
"""
from __future__ import annotations

import importlib
import json
import math
import pathlib

import numpy as np

from . import backend
from .io.files import short_repr
from .nn import (AdaptiveAvgPool2d, AvgPool2d, BasicBlock, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten,
                 Identity, Linear, MaxPool2d, ReLU, Sequential, Softmax)
from .nn.module import Module, no_grad

__all__ = ["OPSET", "MIN_OPSET", "MAX_INPUT_VALUES", "ExportError", "OnnxUnavailable", "ProviderUnavailable", "export",
           "load", "onnx_forward"]

OPSET = 17  # every operator used here has had its current definition since opset 15 or earlier


class ExportError(ValueError):
    """The model holds a layer (or a layer setting) that has no ONNX translation here."""


class OnnxUnavailable(ImportError):
    """The optional ``onnx`` / ``onnxruntime`` packages are not installed."""


class ProviderUnavailable(RuntimeError):
    """``device="cuda"`` and onnxruntime has no CUDA provider, or it did not start (not the file's fault)."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailable(f"{module} is not installed; ONNX export and inference need the optional extra: "
                              f"pip install -e \".[onnx]\" (onnx and onnxruntime) in the tinynet checkout") from None


class _GraphBuilder:
    """Collects nodes and initializers while walking the module tree; names every value uniquely.

    Beside each value's name in the graph, the walk carries that value for a trial
    input (zeros of ``input_shape`` with a batch of 1), computed by tinynet layer by
    layer: a layer that does not run on what it receives stops the export naming
    it, and the shapes that some translations need (Flatten, Linear) are known.
    """

    def __init__(self, helper, numpy_helper, names: dict, input_shape: tuple):
        self.helper, self.numpy_helper, self.names, self.input_shape = helper, numpy_helper, names, input_shape
        self.nodes, self.initializers, self.count = [], [], 0
        self.initializer_names, self.node_names = set(), set()

    def weight(self, key: str, array) -> str:
        # A layer used twice (weight sharing) reads the same initializer twice; ONNX wants each name once.
        if key not in self.initializer_names:
            self.initializer_names.add(key)
            self.initializers.append(self.numpy_helper.from_array(
                np.ascontiguousarray(backend.to_numpy(array), dtype=np.float32), name=key))
        return key

    def constant(self, key: str, values) -> str:
        """An int64 initializer (Reshape's target shape)."""
        self.initializer_names.add(key)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(values, dtype=np.int64), name=key))
        return key

    def node(self, op: str, inputs, where: str, **attributes) -> str:
        self.count += 1
        output = f"{where or op}:{op}:{self.count}"
        name = f"{where}/{op}"
        if name in self.node_names:  # the second use of a layer used twice
            name = f"{name}:{self.count}"
        self.node_names.add(name)
        self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=name, **attributes))
        return output

    def run(self, module, value, where: str):
        """``module(value)`` in eval mode; a layer that refuses its input becomes an :class:`ExportError`."""
        try:
            return module(value)
        except ValueError as error:
            raise ExportError(f"cannot export {_label(module, where)}: it does not run on what it receives from "
                              f"input_shape {self.input_shape}: {' '.join(str(error).split())}") from None

    def add(self, module, x: str, value):
        """Append ``module``'s nodes, reading the graph value ``x`` (``value`` for the trial input).

        Returns the name of its output and the output for the trial input.
        """
        where = self.names.get(id(module), "")
        dot = f"{where}." if where else ""
        if isinstance(module, (Dropout, Identity)):
            return x, value
        if isinstance(module, Sequential):
            for layer in module._run_order():
                x, value = self.add(layer, x, value)
            return x, value
        if isinstance(module, BasicBlock):
            main, main_value = x, value
            for layer in (module.conv1, module.bn1, module.relu1, module.conv2, module.bn2):
                main, main_value = self.add(layer, main, main_value)
            shortcut, shortcut_value = (x, value) if module.downsample is None else self.add(module.downsample, x,
                                                                                               value)
            if main_value.shape != shortcut_value.shape:
                raise ExportError(f"cannot export {_label(module, where)}: its main path gives "
                                  f"{tuple(main_value.shape)} and its shortcut {tuple(shortcut_value.shape)}, "
                                  f"which cannot be added")
            return self.add(module.relu2, self.node("Add", [main, shortcut], where), main_value + shortcut_value)
        if hasattr(module, "_stages"):  # ResNet: its forward is features then fc, stage by stage
            for layer in module._stages():
                x, value = self.add(layer, x, value)
            return x, value
        if isinstance(module, Conv2d):
            out = self.run(module, value, where)
            inputs = [x, self.weight(dot + "weight", module.weight.data)]
            if module.bias is not None:
                inputs.append(self.weight(dot + "bias", module.bias.data))
            (ph, pw) = module.padding
            return self.node("Conv", inputs, where, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                             pads=[ph, pw, ph, pw], group=int(module.groups)), out
        if isinstance(module, (BatchNorm2d, BatchNorm1d)):
            if not module.track_running_stats:
                raise ExportError(f"cannot export {_label(module, where)} ({module!r}): without running "
                                  f"statistics it normalises with each batch's own, which ONNX's "
                                  f"BatchNormalization (inference) does not do")
            out = self.run(module, value, where)
            c = module.num_features
            gamma = module.weight.data if module.affine else np.ones(c, np.float32)
            beta = module.bias.data if module.affine else np.zeros(c, np.float32)
            inputs = [x, self.weight(dot + "weight", gamma), self.weight(dot + "bias", beta),
                      self.weight(dot + "running_mean", module.running_mean),
                      self.weight(dot + "running_var", module.running_var)]
            return self.node("BatchNormalization", inputs, where, epsilon=float(module.eps)), out
        if isinstance(module, ReLU):
            return self.node("Relu", [x], where), self.run(module, value, where)
        if isinstance(module, Softmax):
            out = self.run(module, value, where)
            return self.node("Softmax", [x], where, axis=int(module.dim)), out
        if isinstance(module, (MaxPool2d, AvgPool2d)):
            out = self.run(module, value, where)
            (ph, pw) = module.padding
            options = dict(kernel_shape=list(module.kernel_size), strides=list(module.stride), pads=[ph, pw, ph, pw])
            if isinstance(module, MaxPool2d):
                return self.node("MaxPool", [x], where, **options), out
            return self.node("AveragePool", [x], where, count_include_pad=int(module.count_include_pad),
                             **options), out
        if isinstance(module, AdaptiveAvgPool2d):
            if tuple(module.output_size) != (1, 1):
                raise ExportError(f"cannot export {_label(module, where)} with output_size "
                                  f"{module.output_size}: only global average pooling (output_size 1) is supported")
            return self.node("GlobalAveragePool", [x], where), self.run(module, value, where)
        if isinstance(module, Flatten):
            return self._flatten(module, x, value, where)
        if isinstance(module, Linear):
            if value.ndim != 2:
                raise ExportError(f"cannot export {_label(module, where)}: its input has shape "
                                  f"{('N',) + tuple(value.shape[1:])}, and ONNX's Gemm takes (N, in_features) "
                                  f"only; put a Flatten() before it")
            out = self.run(module, value, where)
            inputs = [x, self.weight(dot + "weight", module.weight.data)]
            if module.bias is not None:
                inputs.append(self.weight(dot + "bias", module.bias.data))
            return self.node("Gemm", inputs, where, transB=1), out
        raise ExportError(f"cannot export {_label(module, where)}: no ONNX translation "
                          f"for this layer; supported are Sequential, ResNet, BasicBlock, Conv2d, BatchNorm1d/2d, "
                          f"ReLU, Softmax, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, Dropout, "
                          f"Identity")

    def _flatten(self, module, x: str, value, where: str):
        """``Flatten(start_dim, end_dim)``: ONNX's Flatten for (N, ...) -> (N, rest), a Reshape otherwise.

        ONNX's ``Flatten(axis)`` always makes a matrix, (d0*...*d(axis-1), rest): it is
        tinynet's (and PyTorch's) ``Flatten(1)`` only.  Any other flattening that keeps the
        batch dimension is a Reshape to ``[0, *fixed sizes]`` (``0``: copy the batch size).
        """
        rank, start, end = value.ndim, module.start_dim, module.end_dim
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and -rank <= d < rank
                   for d in (start, end)):
            raise ExportError(f"cannot export {_label(module, where)} (start_dim={start!r}, end_dim={end!r}): "
                              f"its input has {rank} dimensions, so each must be an int in {-rank}..{rank - 1}")
        if start % rank == 0:
            raise ExportError(f"cannot export {_label(module, where)} (start_dim={start}): it merges the batch "
                              f"dimension N into the others, and the graph keeps N free")
        out = self.run(module, value, where)
        if (start % rank, end % rank) == (1, rank - 1):
            return self.node("Flatten", [x], where, axis=1), out
        shape = self.constant(f"{where or 'flatten'}:shape:{self.count + 1}", [0, *out.shape[1:]])
        return self.node("Reshape", [x, shape], where), out


def _label(module, where: str) -> str:
    """``1 (Swish)``, ``layer1.0.conv1 (Conv2d)``, ``the model (Swish)``: a layer as error messages name it."""
    return f"{where or 'the model'} ({type(module).__name__})"


#: The most values (C*H*W) of one input image that :func:`export` accepts: it runs the model once on
#: a trial input of this shape (batch 1), so ``input_shape`` bounds the memory the export needs.
MAX_INPUT_VALUES = 2 ** 24

#: The oldest opset whose definitions of the operators used here are the current ones.
MIN_OPSET = 15


def _check_input_shape(input_shape) -> tuple:
    """``input_shape`` as four positive ints, or an :class:`ExportError` saying what is wrong."""
    expected = "input_shape must be (N, C, H, W), four positive integers"
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ExportError(f"export: {expected}, got {short_repr(input_shape)}") from None
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 1
                                  for d in shape):
        raise ExportError(f"export: {expected}, got {short_repr(input_shape)}")
    shape = tuple(int(d) for d in shape)
    if math.prod(shape[1:]) > MAX_INPUT_VALUES:
        raise ExportError(f"export: input_shape {shape} holds {math.prod(shape[1:]):,} values per image, more than "
                          f"the {MAX_INPUT_VALUES:,} (MAX_INPUT_VALUES) that the trial run of the model may use")
    return shape


def export(model, path, input_shape, *, metadata: dict | None = None, opset: int = OPSET):
    """Write ``model`` (its eval-mode computation) as an ONNX file at ``path``; returns the ``onnx.ModelProto``.

    Parameters
    ----------
    model : a tinynet model built from the supported layers (see the module docstring).
    path : where the ``.onnx`` file goes.
    input_shape : ``(N, C, H, W)``, the shape of one input batch; the batch
        dimension becomes free (``N``), the others are fixed.  tinynet runs
        the model once, layer by layer, on zeros of shape ``(1, C, H, W)``,
        to check that each layer fits what it receives and to learn the
        output's shape; ``C*H*W`` may be at most :data:`MAX_INPUT_VALUES`.
    metadata : string keys, JSON-able values (no NaN or infinity), stored in ``metadata_props``.
    opset : the ONNX opset the graph declares (default :data:`OPSET`; at least :data:`MIN_OPSET`).

    Raises :class:`ExportError`, naming the layer or the argument, for anything that
    has no faithful ONNX translation; nothing is written then.  The graph is checked
    with ``onnx.checker.check_model`` before it is written.
    """
    onnx = _require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(model, Module):
        raise ExportError(f"export: model must be a tinynet Module, got a {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    newest = onnx.defs.onnx_opset_version()
    if not (isinstance(opset, (int, np.integer)) and not isinstance(opset, bool) and MIN_OPSET <= opset <= newest):
        raise ExportError(f"export: opset must be an int in {MIN_OPSET}..{newest} (the installed onnx's newest), "
                          f"got {short_repr(opset)}")
    properties = {}
    for key, value in (metadata or {}).items():
        try:
            properties[str(key)] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ExportError(f"export: metadata {short_repr(key)} cannot be stored as JSON: {error}") from None
    was_training = model.training
    model.eval()
    try:
        trial = np.zeros((1, *shape[1:]), dtype=np.float32)
        names = {}
        for name, m in model.named_modules():
            names.setdefault(id(m), name)  # a layer used twice is named by its first place
        builder = _GraphBuilder(helper, numpy_helper, names, shape)
        with no_grad():
            output, value = builder.add(model, "input", trial if model.device == "cpu"
                                        else backend.to_device(trial, model.device))
    finally:
        model.train(was_training)
    builder.nodes.append(helper.make_node("Identity", [output], ["logits"], name="logits"))
    graph = helper.make_graph(
        builder.nodes, f"tinynet_{type(model).__name__}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *(int(d) for d in value.shape[1:])])],
        initializer=builder.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="tinynet", doc_string=f"tinynet {type(model).__name__}, eval mode")
    # onnxruntime reads IR versions up to its own; the onnx package's newest may be ahead of it.
    proto.ir_version = min(proto.ir_version, 10)
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:  # ValidationError, or shape inference's InferenceError
        raise ExportError(f"export: the graph built for {type(model).__name__} fails onnx.checker, a bug in "
                          f"tinynet.onnx: {' '.join(str(error).split())[:300]}") from None
    onnx.save(proto, str(pathlib.Path(path)))
    return proto


def load(path, device: str = "cpu", threads: "int | None" = None):
    """``(session, meta)``: an onnxruntime session for the ONNX file ``path`` and its metadata (JSON-decoded).

    ``device="cuda"`` runs the graph on onnxruntime's CUDA provider (the ``onnxruntime-gpu``
    package; CuPy plays no part): :class:`ProviderUnavailable` where onnxruntime has none or it
    does not start, rather than a silent run on the CPU.  ``threads``: onnxruntime's intra-op
    thread count (None: its own default, one per core).
    """
    ort = _require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    cuda = backend.normalize_device(device) == "cuda"
    if cuda:
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ProviderUnavailable(f"device {device!r}: this onnxruntime ({ort.__version__}) has no "
                                      f"CUDAExecutionProvider (it has {', '.join(available)}); install "
                                      f"onnxruntime-gpu in its place")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if cuda and "CUDAExecutionProvider" not in session.get_providers():
        raise ProviderUnavailable(f"device {device!r}: onnxruntime's CUDAExecutionProvider did not start (no GPU, "
                                  f"or a CUDA or cuDNN library missing; onnxruntime's own warning above says which)")
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
