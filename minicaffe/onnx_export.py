"""Export a built Net to ONNX (``minicaffe export``, ``minicaffe.export_onnx``), and check the export in
onnxruntime against the net's own forward.

The graph is built with the `onnx` package's helpers (an extra: ``pip install "minicaffe[onnx]"``) and
checked with its checker. EXPORTERS maps each layer type to one small function writing the ONNX nodes of
one layer with Caffe's semantics kept exactly; a type without an exact form is an error naming the
layer. Names: the graph's inputs and outputs are the prototxt's blobs; parameters are initializers
named ``<layer>_<role>`` (``conv1_weight``, ``conv1_bias``, ``prelu1_slope``), holding Caffe's values
(reshaped where ONNX broadcasting needs it: a PReLU's (C,) slopes as (C, 1, 1)); constants the mapping
needs are ``<layer>_<purpose>``. A blob written in place several times gets one name per version
(``conv1_prelu1`` ...): only its last version keeps the prototxt's name.

Pooling keeps Caffe's geometry exactly: the output size is the net's (ceil rounding, the last window
starting inside the image), the padding is explicit (end padding as the output size needs it), and AVE
divides each window's sum by Caffe's divisor (the window clipped to the padded image, not to the
image), as an AveragePool over the zero-padded input times a per-position correction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layer import TRAIN, Layer
from .proto import caffe_pb2

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Softmax over one axis, Split and ReduceSum with axes as inputs
TOLERANCE = 1e-5  # --check: max abs error within this fraction of each output's max abs value

DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}
TRAINING_LAYERS = {"SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "ContrastiveLoss",
                   "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "Accuracy", "HDF5Output"}


class OnnxExportError(ValueError):
    """A net or layer that cannot be exported exactly; the message names the layer."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxExportError('ONNX export needs the onnx package: pip install "minicaffe[onnx]"') from None
    return onnx


@dataclass
class Step:
    """One layer being exported: its ONNX input names and shapes, the names its tops must get."""
    name: str
    layer: Layer
    bottoms: list[str]
    tops: list[str]
    bottom_shapes: list[tuple[int, ...]]
    top_shapes: list[tuple[int, ...]]
    bottom_blobs: list  # the net's Blobs (a layer's axis helpers take them)
    top_blobs: list

    @property
    def param(self) -> caffe_pb2.LayerParameter:
        return self.layer.param

    def fail(self, why: str):
        raise OnnxExportError(f"layer '{self.name}' ({self.layer.type}): {why}")


class GraphBuilder:
    """Collects nodes and initializers; names intermediate tensors uniquely."""

    def __init__(self, opset: int, dynamic_batch: bool):
        self.onnx = _onnx()
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.nodes: list = []
        self.initializers: dict[str, object] = {}
        self.names: set[str] = set()
        self.reserved: set[str] = set()  # the net's blob names: kept for the blobs
        self._count = Counter()

    def fresh(self, base: str) -> str:
        """A tensor name not used yet nor a blob's: `base`, else base_2, base_3, ..."""
        name = base
        while name in self.names or name in self.reserved:
            self._count[base] += 1
            name = f"{base}_{self._count[base] + 1}"
        self.names.add(name)
        return name

    def take(self, blob: str) -> str:
        """The blob's own name, for its last version."""
        if blob in self.names:
            raise OnnxExportError(f"blob '{blob}' is written after its last version was named")
        self.names.add(blob)
        return blob

    def node(self, op: str, inputs: list[str], out: str | None = None, step: Step | None = None,
             outputs: list[str] | None = None, **attrs) -> str:
        """Add node `op`; returns its (first) output: `out`, or a fresh name from the layer's name."""
        if outputs is None:
            if out is None:
                out = self.fresh(f"{step.name}_{op.lower()}" if step else op.lower())
            outputs = [out]
        self.names.update(outputs)
        prefix = step.name if step else op
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=self.fresh(f"{prefix}/{op}"),
                                                     **attrs))
        return outputs[0]

    def constant(self, name: str, array, dtype=np.float32) -> str:
        """An initializer named `name` (made unique) holding `array`."""
        name = self.fresh(name)
        self.initializers[name] = self.onnx.numpy_helper.from_array(np.asarray(array, dtype), name)
        return name

    def ints(self, name: str, values) -> str:
        return self.constant(name, np.asarray(values, np.int64), np.int64)

    def shape(self, step: Step, shape, like: tuple[int, ...]) -> str:
        """A Reshape target for `shape`; with a dynamic batch, dim 0 copies the input's when both are the
        batch (the static shape would fix it)."""
        dims = list(shape)
        if self.dynamic_batch and dims and like and dims[0] == like[0]:
            dims[0] = 0
        elif self.dynamic_batch:
            step.fail("its output's axis 0 is not the batch: export without --dynamic-batch")
        return self.ints(f"{step.name}_shape", dims)

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int, step: Step,
               out: str | None = None) -> str:
        """Reduce* over `axes`: an attribute before opset 18 (ReduceSum: 13), an input from then on."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.node(op, [x, self.ints(f"{step.name}_axes", axes)], out, step, keepdims=keepdims)
        return self.node(op, [x], out, step, axes=axes, keepdims=keepdims)


Exporter = Callable[[GraphBuilder, Step], None]
EXPORTERS: dict[str, Exporter] = {}


def exports(*types: str):
    def wrap(function: Exporter) -> Exporter:
        for type_name in types:
            EXPORTERS[type_name] = function
        return function
    return wrap


def scale_shift(g: GraphBuilder, step: Step, x: str, scale: float, shift: float,
                out: str | None = None) -> str:
    """scale * x + shift, the trivial factors folded away."""
    if scale != 1:
        last = shift == 0 and out
        x = g.node("Mul", [x, g.constant(f"{step.name}_scale", scale)], last or None, step)
    if shift != 0:
        x = g.node("Add", [x, g.constant(f"{step.name}_shift", shift)], out, step)
    if out and x != out:
        x = g.node("Identity", [x], out, step)
    return x


def channel_broadcast(array: np.ndarray, ndim: int, axis: int = 1) -> np.ndarray:
    """A per-axis array shaped to broadcast over a blob of `ndim` axes from `axis` on (ONNX aligns shapes
    at the end): (C,) -> (C, 1, 1) for axis 1 of a 4-d blob."""
    return array.reshape(array.shape + (1,) * (ndim - axis - array.ndim))


# -- element-wise ---------------------------------------------------------------------------------------

@exports("ReLU")
def relu(g, s):
    slope = float(s.param.relu_param.negative_slope)
    if slope == 0:
        g.node("Relu", s.bottoms, s.tops[0], s)
    else:
        g.node("LeakyRelu", s.bottoms, s.tops[0], s, alpha=slope)


@exports("PReLU")
def prelu(g, s):
    slope = s.layer.blobs[0].data
    slope = slope.reshape(1) if s.layer.channel_shared else channel_broadcast(slope, len(s.bottom_shapes[0]))
    g.node("PRelu", [s.bottoms[0], g.constant(f"{s.name}_slope", slope)], s.tops[0], s)


@exports("Sigmoid", "TanH", "AbsVal", "BNLL")
def plain_neuron(g, s):
    op = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}[s.layer.type]
    g.node(op, s.bottoms, s.tops[0], s)


@exports("ELU")
def elu(g, s):
    g.node("Elu", s.bottoms, s.tops[0], s, alpha=s.layer.alpha)


@exports("Swish")
def swish(g, s):
    x = s.bottoms[0]
    gate = g.node("Sigmoid", [scale_shift(g, s, x, s.layer.beta, 0.0)], None, s)
    g.node("Mul", [x, gate], s.tops[0], s)


@exports("Clip")
def clip(g, s):
    low, high = g.constant(f"{s.name}_min", s.layer.min), g.constant(f"{s.name}_max", s.layer.max)
    clipped = g.node("Clip", [s.bottoms[0], low, high], None, s)
    # Caffe's max(min, min(x, max)) gives min for a NaN x; ONNX's Clip keeps the NaN.
    g.node("Where", [g.node("IsNaN", s.bottoms, None, s), low, clipped], s.tops[0], s)


@exports("Threshold")
def threshold(g, s):
    above = g.node("Greater", [s.bottoms[0], g.constant(f"{s.name}_threshold", s.layer.threshold)], None, s)
    g.node("Cast", [above], s.tops[0], s, to=g.onnx.TensorProto.FLOAT)


@exports("Power")
def power(g, s):
    p = s.param.power_param
    exponent = float(p.power)
    if exponent == 0 or p.scale == 0:  # a constant, as Caffe: 1, or shift^power whatever x is (inf, NaN)
        value = 1.0 if exponent == 0 else float(np.float32(p.shift)) ** exponent
        g.node("Expand", [g.constant(f"{s.name}_value", value), g.node("Shape", s.bottoms, None, s)],
               s.tops[0], s)
        return
    if exponent == 1:
        scale_shift(g, s, s.bottoms[0], float(p.scale), float(p.shift), s.tops[0])
        return
    base = scale_shift(g, s, s.bottoms[0], float(p.scale), float(p.shift))
    if exponent == 2:
        g.node("Mul", [base, base], s.tops[0], s)
    else:
        g.node("Pow", [base, g.constant(f"{s.name}_power", exponent)], s.tops[0], s)


@exports("Exp")
def exp(g, s):
    inner_scale, outer_scale = s.layer.args  # y = base^shift * exp(ln(base) * scale * x), as Caffe
    inner = scale_shift(g, s, s.bottoms[0], inner_scale, 0.0)
    e = g.node("Exp", [inner], None if outer_scale != 1 else s.tops[0], s)
    if outer_scale != 1:
        g.node("Mul", [e, g.constant(f"{s.name}_outer_scale", outer_scale)], s.tops[0], s)


@exports("Log")
def log(g, s):
    # y = ln(scale x + shift) / ln(base)
    inner = scale_shift(g, s, s.bottoms[0], s.layer.scale, s.layer.shift)
    ln = g.node("Log", [inner], s.tops[0] if s.layer.output_scale == 1 else None, s)
    if s.layer.output_scale != 1:
        g.node("Mul", [ln, g.constant(f"{s.name}_output_scale", s.layer.output_scale)], s.tops[0], s)


@exports("Eltwise")
def eltwise(g, s):
    op = s.param.eltwise_param.operation
    if op == caffe_pb2.EltwiseParameter.PROD:
        x = s.bottoms[0]
        for i, other in enumerate(s.bottoms[1:], 1):
            x = g.node("Mul", [x, other], s.tops[0] if i == len(s.bottoms) - 1 else None, s)
    elif op == caffe_pb2.EltwiseParameter.MAX:
        g.node("Max", s.bottoms, s.tops[0], s)
    else:
        terms = [x if c == 1 else g.node("Mul", [x, g.constant(f"{s.name}_coeff{i}", c)], None, s)
                 for i, (x, c) in enumerate(zip(s.bottoms, s.layer.coeffs))]
        g.node("Sum", terms, s.tops[0], s)


def broadcast_operand(g, s, role: str, blob_index: int) -> str:
    """Scale's / Bias's v: the second bottom, or the learned blob; shaped to broadcast over bottom 0."""
    x_shape = s.bottom_shapes[0]
    if len(s.bottoms) > 1:
        shape = s.bottom_shapes[1]
        axis = s.layer._axis(s.bottom_blobs[0]) if shape else 0
        target = tuple(shape) + (1,) * (len(x_shape) - axis - len(shape))
        if target == tuple(shape):
            return s.bottoms[1]
        return g.node("Reshape", [s.bottoms[1], g.shape(s, target, shape)], None, s)
    value = s.layer.blobs[blob_index].data
    axis = s.layer._axis(s.bottom_blobs[0]) if value.ndim else 0
    return g.constant(f"{s.name}_{role}", channel_broadcast(value, len(x_shape), axis))


@exports("Scale")
def scale(g, s):
    bias_term = s.param.scale_param.bias_term
    v = broadcast_operand(g, s, "scale", 0)
    y = g.node("Mul", [s.bottoms[0], v], None if bias_term else s.tops[0], s)
    if bias_term:
        x_shape, value = s.bottom_shapes[0], s.layer.blobs[-1].data
        axis = s.layer._axis(s.bottom_blobs[0]) if value.ndim else 0
        bias = g.constant(f"{s.name}_bias", channel_broadcast(value, len(x_shape), axis))
        g.node("Add", [y, bias], s.tops[0], s)


@exports("Bias")
def bias(g, s):
    g.node("Add", [s.bottoms[0], broadcast_operand(g, s, "bias", 0)], s.tops[0], s)


@exports("BatchNorm")
def batch_norm(g, s):
    if not s.layer.use_global_stats:
        s.fail("normalizes with the batch's statistics (use_global_stats: false): an export uses the "
               "stored ones, set use_global_stats: true")
    if len(s.bottom_shapes[0]) < 2:
        s.fail("needs a bottom with a channel axis (axis 1)")
    mean, variance, factor = (blob.data for blob in s.layer.blobs)
    factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]  # Caffe's scale_factor
    channels = mean.shape[0]
    inputs = [s.bottoms[0], g.constant(f"{s.name}_unit_scale", np.ones(channels)),
              g.constant(f"{s.name}_zero_shift", np.zeros(channels)),
              g.constant(f"{s.name}_mean", mean * factor),
              g.constant(f"{s.name}_variance", variance * factor)]
    g.node("BatchNormalization", inputs, s.tops[0], s, epsilon=s.layer.eps)


@exports("MVN")
def mvn(g, s):
    ndim = len(s.bottom_shapes[0])
    axes = list(range(1 if s.layer.across_channels else min(2, ndim), ndim))
    mean = g.reduce("ReduceMean", s.bottoms[0], axes, 1, s)
    centered = g.node("Sub", [s.bottoms[0], mean], None if s.layer.normalize_variance else s.tops[0], s)
    if s.layer.normalize_variance:
        variance = g.reduce("ReduceMean", g.node("Mul", [centered, centered], None, s), axes, 1, s)
        std = g.node("Add", [g.node("Sqrt", [variance], None, s), g.constant(f"{s.name}_eps", s.layer.eps)],
                     None, s)
        g.node("Div", [centered, std], s.tops[0], s)


@exports("Softmax")
def softmax(g, s):
    g.node("Softmax", s.bottoms, s.tops[0], s, axis=s.layer.axis)


@exports("LRN")
def lrn(g, s):
    layer = s.layer
    if layer.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        g.node("LRN", s.bottoms, s.tops[0], s, size=layer.size, alpha=layer.alpha, beta=layer.beta,
               bias=layer.k)
        return
    # WITHIN_CHANNEL: x * (1 + alpha / size^2 * box_sum(x^2))^-beta; an AveragePool counting the padding
    # (Caffe's AVE divisor is size^2 everywhere at stride 1 with pad (size - 1) / 2).
    x = s.bottoms[0]
    square = g.node("Mul", [x, x], None, s)
    pad = layer.pre
    mean = g.node("AveragePool", [square], None, s, kernel_shape=[layer.size] * 2, pads=[pad] * 4,
                  count_include_pad=1)
    base = scale_shift(g, s, mean, layer.alpha, 1.0)
    factor = g.node("Pow", [base, g.constant(f"{s.name}_power", -layer.beta)], None, s)
    g.node("Mul", [x, factor], s.tops[0], s)


# -- with weights ------------------------------------------------------------------------------------

def _conv_attributes(s: Step) -> dict:
    layer = s.layer
    if layer.channel_axis != 1 or len(s.bottom_shapes[0]) != 4:
        s.fail("only (N, C, H, W) convolutions (axis 1) have an ONNX form here")
    geometry = layer.geometry
    return {"kernel_shape": list(geometry.kernel), "strides": list(geometry.stride),
            "dilations": list(geometry.dilation), "pads": list(geometry.pad) * 2, "group": layer.group}


@exports("Convolution", "Deconvolution")
def convolution(g, s):
    op = "Conv" if s.layer.type == "Convolution" else "ConvTranspose"
    inputs = [s.bottoms[0], g.constant(f"{s.name}_weight", s.layer.blobs[0].data)]
    if s.layer.bias_term:
        inputs.append(g.constant(f"{s.name}_bias", s.layer.blobs[1].data))
    g.node(op, inputs, s.tops[0], s, **_conv_attributes(s))


@exports("InnerProduct")
def inner_product(g, s):
    layer, x, x_shape = s.layer, s.bottoms[0], s.bottom_shapes[0]
    weight = g.constant(f"{s.name}_weight", layer.blobs[0].data)
    bias = [g.constant(f"{s.name}_bias", layer.blobs[1].data)] if layer.bias_term else []
    if layer.axis == 1:
        if len(x_shape) != 2:
            x = g.node("Flatten", [x], None, s, axis=1)
        g.node("Gemm", [x, weight, *bias], s.tops[0], s, transB=0 if layer.transpose else 1)
        return
    # Axes before `axis` stay (Caffe's M); the rest is one vector of K values.
    x = g.node("Reshape", [x, g.shape(s, (*x_shape[:layer.axis], layer.inputs), x_shape)], None, s)
    if not layer.transpose:
        weight = g.node("Transpose", [weight], None, s, perm=[1, 0])
    y = g.node("MatMul", [x, weight], None if bias else s.tops[0], s)
    if bias:
        g.node("Add", [y, *bias], s.tops[0], s)


@exports("Embed")
def embed(g, s):
    """A row of the table per index (Caffe's indices are floats holding integers)."""
    table = g.constant(f"{s.name}_weight", s.layer.blobs[0].data)
    indices = g.node("Cast", s.bottoms, None, s, to=g.onnx.TensorProto.INT64)
    y = g.node("Gather", [table, indices], None if s.layer.bias_term else s.tops[0], s, axis=0)
    if s.layer.bias_term:
        g.node("Add", [y, g.constant(f"{s.name}_bias", s.layer.blobs[1].data)], s.tops[0], s)


@exports("Parameter")
def parameter(g, s):
    g.node("Identity", [g.constant(f"{s.name}_value", s.layer.blobs[0].data)], s.tops[0], s)


@exports("BatchReindex")
def batch_reindex(g, s):
    indices = g.node("Cast", [s.bottoms[1]], None, s, to=g.onnx.TensorProto.INT64)
    g.node("Gather", [s.bottoms[0], indices], s.tops[0], s, axis=0)


# -- pooling --------------------------------------------------------------------------------------------

@exports("Pooling")
def pooling(g, s):
    layer = s.layer
    if len(s.tops) > 1:
        s.fail("the argmax mask top has no ONNX form")
    x, (_, _, height, width) = s.bottoms[0], s.bottom_shapes[0]
    pooled = s.top_shapes[0][2:]
    kernel, stride = (layer.kernel_h, layer.kernel_w), (layer.stride_h, layer.stride_w)
    pad, sizes = (layer.pad_h, layer.pad_w), (height, width)
    # Padding at the end: what the net's output size needs (ceil rounding); negative: rows no window reads.
    end = [(p - 1) * st + k - size - pd for p, st, k, size, pd in zip(pooled, stride, kernel, sizes, pad)]
    if min(end) < 0:
        ends = [size + min(e, 0) for size, e in zip(sizes, end)]
        x = g.node("Slice", [x, g.ints(f"{s.name}_starts", [0, 0]), g.ints(f"{s.name}_ends", ends),
                             g.ints(f"{s.name}_axes", [2, 3])], None, s)
        end = [max(e, 0) for e in end]
    pads = [*pad, *end]
    attributes = {"kernel_shape": list(kernel), "strides": list(stride)}
    if layer.method == caffe_pb2.PoolingParameter.MAX:
        g.node("MaxPool", [x], s.tops[0], s, pads=pads, **attributes)
        return
    # AVE: the sum over the zero-padded window divided by Caffe's divisor: the window clipped to the
    # image plus its padding (pad at the start, pad at the end, not more).
    if any(pads):
        all_pads = g.ints(f"{s.name}_pads", [0, 0, pad[0], pad[1], 0, 0, end[0], end[1]])
        x = g.node("Pad", [x, all_pads], None, s)
    divisors = []
    for p, st, k, size, pd in zip(pooled, stride, kernel, sizes, pad):
        start = np.arange(p) * st - pd
        divisors.append(np.minimum(start + k, size + pd) - start)
    divisor = np.outer(*divisors)
    correction = (kernel[0] * kernel[1]) / divisor
    exact = np.all(correction == 1)
    mean = g.node("AveragePool", [x], s.tops[0] if exact else None, s, **attributes)
    if not exact:
        correction = g.constant(f"{s.name}_divisor_correction", correction[None, None])
        g.node("Mul", [mean, correction], s.tops[0], s)


@exports("SPP")
def spp(g, s):
    """As the inner layers the SPP layer runs (Split, Pooling, Flatten, Concat), each exported as itself."""
    names = {id(s.bottom_blobs[0]): s.bottoms[0], id(s.top_blobs[0]): s.tops[0]}
    for layer, bottoms, tops in s.layer.layers:
        for blob in tops:
            names.setdefault(id(blob), g.fresh(f"{layer.name}_out"))
        inner = Step(layer.name, layer, [names[id(b)] for b in bottoms], [names[id(t)] for t in tops],
                     [tuple(b.shape) for b in bottoms], [tuple(t.shape) for t in tops], bottoms, tops)
        EXPORTERS[layer.type](g, inner)


# -- shapes ---------------------------------------------------------------------------------------------

@exports("Split", "Dropout")
def identity(g, s):
    """A copy of the bottom per top (Dropout: the identity in TEST)."""
    for top in s.tops:
        g.node("Identity", [s.bottoms[0]], top, s)


@exports("Flatten", "Reshape")
def reshape(g, s):
    g.node("Reshape", [s.bottoms[0], g.shape(s, s.top_shapes[0], s.bottom_shapes[0])], s.tops[0], s)


@exports("Concat")
def concat(g, s):
    g.node("Concat", s.bottoms, s.tops[0], s, axis=s.layer.axis)


@exports("Slice")
def slice_(g, s):
    g.node("Split", [s.bottoms[0], g.ints(f"{s.name}_split", s.layer.sizes)], step=s, outputs=s.tops,
           axis=s.layer.axis)


@exports("Crop")
def crop(g, s):
    offsets, shape = s.layer.offsets, s.top_shapes[0]
    axis = s.layer.param.crop_param.axis % len(shape)
    axes = list(range(axis, len(shape)))
    if g.dynamic_batch and axis == 0:
        s.fail("crops the batch axis: export without --dynamic-batch")
    starts = g.ints(f"{s.name}_starts", [offsets[a] for a in axes])
    ends = g.ints(f"{s.name}_ends", [offsets[a] + shape[a] for a in axes])
    g.node("Slice", [s.bottoms[0], starts, ends, g.ints(f"{s.name}_axes", axes)], s.tops[0], s)


@exports("Tile")
def tile(g, s):
    ndim = len(s.bottom_shapes[0])
    axis = s.param.tile_param.axis % ndim
    repeats = [s.layer.tiles if a == axis else 1 for a in range(ndim)]
    g.node("Tile", [s.bottoms[0], g.ints(f"{s.name}_repeats", repeats)], s.tops[0], s)


@exports("Reduction")
def reduction(g, s):
    ndim = len(s.bottom_shapes[0])
    axis = s.param.reduction_param.axis % ndim if ndim else 0
    if g.dynamic_batch and axis == 0:
        s.fail("reduces over the batch axis: export without --dynamic-batch")
    op = {caffe_pb2.ReductionParameter.SUM: "ReduceSum", caffe_pb2.ReductionParameter.ASUM: "ReduceL1",
          caffe_pb2.ReductionParameter.SUMSQ: "ReduceSumSquare",
          caffe_pb2.ReductionParameter.MEAN: "ReduceMean"}[s.layer.operation]
    coeff = s.layer.coeff
    y = g.reduce(op, s.bottoms[0], list(range(axis, ndim)), 0, s, None if coeff != 1 else s.tops[0])
    if coeff != 1:
        g.node("Mul", [y, g.constant(f"{s.name}_coeff", coeff)], s.tops[0], s)


@exports("ArgMax")
def argmax(g, s):
    layer = s.layer
    if layer.top_k != 1:
        s.fail(f"top_k {layer.top_k}: ONNX TopK ranks ties the other way round from Caffe; only top_k 1 "
               "is exact")
    x, shape = s.bottoms[0], s.bottom_shapes[0]
    axis = layer.param.argmax_param.axis % len(shape) if layer.has_axis else 1
    if not layer.has_axis and len(shape) != 2:
        x = g.node("Flatten", [x], None, s, axis=1)
    # Caffe's ranking puts the larger index first among equal values: select_last_index.
    direct = layer.has_axis and not layer.out_max_val
    index = g.node("ArgMax", [x], None, s, axis=axis, keepdims=1, select_last_index=1)
    index = g.node("Cast", [index], s.tops[0] if direct else None, s, to=g.onnx.TensorProto.FLOAT)
    if direct:
        return
    if layer.out_max_val:
        value = g.reduce("ReduceMax", x, [axis], 1, s, s.tops[0] if layer.has_axis else None)
        if layer.has_axis:
            return
        index = g.node("Concat", [index, value], None, s, axis=1)
    g.node("Reshape", [index, g.shape(s, s.top_shapes[0], shape)], s.tops[0], s)


def export_graph(net, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False):
    """The ONNX ModelProto of the built Net `net` (TEST phase, Input layers as its inputs)."""
    onnx = _onnx()
    helper = onnx.helper
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise OnnxExportError(f"opset {opset} is not supported: give {MIN_OPSET} to {newest}")
    if net.phase == TRAIN:
        raise OnnxExportError("the net is in the TRAIN phase: export a TEST-phase (deploy) net")
    g = GraphBuilder(opset, dynamic_batch)
    g.reserved.update(net.blobs)
    remaining = Counter(name for tops in net.top_names for name in tops)  # writes left per blob
    current: dict[str, str] = {}  # blob -> the ONNX name of its current version
    inputs, shapes = [], {}
    for i, layer in enumerate(net.layers):
        name, type_name = net._layer_names[i], layer.type
        where = f"layer '{name}' ({type_name})"
        if type_name in DATA_LAYERS:
            raise OnnxExportError(f"{where} is a data layer: export a deploy net, whose inputs are Input "
                                  "layers")
        if type_name in TRAINING_LAYERS:
            raise OnnxExportError(f"{where} is a training/scoring layer with no ONNX form: export a "
                                  "deploy net")
        if type_name not in EXPORTERS and type_name not in ("Input", "Silence"):
            raise OnnxExportError(f"{where} has no exact ONNX form")
        tops = []
        for blob in net.top_names[i]:
            remaining[blob] -= 1
            # The last version of a blob keeps its name; earlier ones (in place) get the writer's too.
            tops.append(g.take(blob) if remaining[blob] == 0 else g.fresh(f"{blob}_{name}"))
        for top, blob in zip(tops, net.top_vecs[i]):
            shapes[top] = tuple(blob.shape)
        bottoms = [current[blob] for blob in net.bottom_names[i]]
        if type_name == "Input":
            inputs.extend(tops)
        elif type_name != "Silence":
            step = Step(name, layer, bottoms, tops, [tuple(b.shape) for b in net.bottom_vecs[i]],
                        [tuple(t.shape) for t in net.top_vecs[i]], net.bottom_vecs[i], net.top_vecs[i])
            EXPORTERS[type_name](g, step)
        current.update(zip(net.top_names[i], tops))

    def value_info(tensor: str, blob_shape: tuple[int, ...]):
        dims = list(blob_shape)
        if dynamic_batch and dims:
            dims[0] = "batch"
        return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, dims)

    graph = helper.make_graph(g.nodes, net.name or "minicaffe", [value_info(n, shapes[n]) for n in inputs],
                              [value_info(current[o], shapes[current[o]]) for o in net.outputs],
                              list(g.initializers.values()))
    model = helper.make_model(graph, producer_name="minicaffe",
                              opset_imports=[helper.make_opsetid("", opset)])
    # The oldest IR version the opset allows: what the most runtimes read.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def export_onnx(net, path: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False):
    """Write the built Net `net` as an ONNX model to `path`; returns the ModelProto. Raises
    OnnxExportError (a ValueError) naming the layer that has no exact ONNX form."""
    model = export_graph(net, opset, dynamic_batch)
    _onnx().save(model, str(path))
    return model


def check_onnx(net, model, seed: int = 0, batch: int | None = None,
               inputs: dict[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Run `model` (a path or ModelProto) in onnxruntime and `net` on the same seeded normal inputs (or
    the arrays `inputs` gives by name, e.g. indices for an Embed); returns {output: (max abs error, max
    abs value)} and raises OnnxExportError when an error exceeds TOLERANCE times its output's max abs
    value. `batch`: run at this batch size (a dynamic-batch export), reshaping the net's inputs."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxExportError('checking needs onnxruntime: pip install "minicaffe[onnx]"') from None
    if not isinstance(model, (str, Path)):
        model = model.SerializeToString()
    else:
        model = str(model)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in net.inputs:
        shape = tuple(net.blobs[name].shape)
        if batch is not None:
            shape = (batch, *shape[1:])
            net.blobs[name].reshape(shape)
        given = (inputs or {}).get(name)
        feeds[name] = (rng.standard_normal(shape) if given is None else given).astype(np.float32)
    if batch is not None:
        net.reshape()
    expected = {name: np.array(value, np.float64) for name, value in net.forward(**feeds).items()}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    report, failed = {}, []
    for name in net.outputs:
        if np.shape(got[name]) != np.shape(expected[name]):
            failed.append(f"{name}: shape {list(np.shape(got[name]))}, minicaffe's "
                          f"{list(np.shape(expected[name]))}")
            continue
        reference, result = np.atleast_1d(expected[name]), np.atleast_1d(got[name])
        difference = np.abs(result - reference)
        difference[np.isnan(result) & np.isnan(reference)] = 0  # NaN where minicaffe has NaN agrees
        error = float(np.max(difference)) if reference.size else 0.0
        largest = float(np.nanmax(np.abs(reference))) if np.isfinite(reference).any() else 0.0
        report[name] = (error, largest)
        if not error <= TOLERANCE * largest:
            failed.append(f"{name}: max abs error {error:.3g} > {TOLERANCE:g} x max {largest:.3g}")
    if failed:
        raise OnnxExportError("onnxruntime disagrees with minicaffe: " + "; ".join(failed))
    return report
