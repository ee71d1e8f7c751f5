"""Net benchmark: forward + backward time of whole nets, minicaffe against the same nets in PyTorch.

    python benchmarks/nets.py                  # every net; updates BENCHMARKS.md
    python benchmarks/nets.py --quick --no-write
    python benchmarks/nets.py --nets lenet,AlexNet

Rows:
  * lenet: one SGD step of the LeNet-PReLU train net (models/lenet_prelu, its Data layers replaced by
    Input layers of batch 64): forward, backward and the update. minicaffe runs Solver.step(1) of
    models/lenet_prelu/solver.prototxt; PyTorch runs zero_grad, forward, backward and torch.optim.SGD
    with the solver's momentum, weight decay and per-parameter lr_mult / decay_mult.
  * every deploy net in $MINICAFFE_SHARED/models/zoo (default ../shared/models/zoo beside the repo), at
    batch 1 with seeded random weights: forward, then backward from a random top diff (force_backward:
    every parameter gradient and the input gradient).
  * busy: the LeNet step again while another process keeps one core busy.

The PyTorch nets are not written by hand: `translate` turns the built minicaffe Net, layer by layer,
into torch.nn modules holding copies of the same weights. Before a net is timed both are run on the
same input and every blob and every gradient is compared (the "diff" and "same net" columns), so
each row compares the same computation. Both are timed in the same run, alternating, at default
settings: the script sets no thread variables, so what is measured is what a user's plain run gets;
the threads each one used are printed. PyTorch is timed in a process of its own (benchmarks/torch_peer.py,
see Peer) started with the user's environment, so that minicaffe's OpenMP wait policy is not PyTorch's.
PyTorch is optional (never a dependency of minicaffe): without
it only minicaffe's column is printed. CPU, float32.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io as text_io
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minicaffe import backend, log, timing
from minicaffe.inspect import prepare_net_param
from minicaffe.io import read_net_param
from minicaffe.layer import TEST, TRAIN
from minicaffe.layers import convolution
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.solver import Solver, read_solver

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/nets.py")
LENET_SOLVER = REPO / "models" / "lenet_prelu" / "solver.prototxt"
ZOO_BATCH = 1
# A translation is accepted when every blob is within this fraction of its largest value and every
# gradient within this fraction of its L2 norm (or, past that, as close to float64 as PyTorch is: compare).
TOLERANCE = 1e-3
QUICK_ZOO_NET = "SqueezeNet-v1.1"


def zoo_dir() -> Path:
    """The zoo's deploy nets: $MINICAFFE_SHARED/models/zoo, else ../shared/models/zoo beside the repo."""
    return Path(os.environ.get("MINICAFFE_SHARED") or REPO.parent / "shared") / "models" / "zoo"


def zoo_nets() -> dict[str, Path]:
    """{name: deploy prototxt}, e.g. {"AlexNet": .../AlexNet-deploy.prototxt}."""
    return {path.name.removesuffix("-deploy.prototxt"): path
            for path in sorted(zoo_dir().glob("*-deploy.prototxt"))}


def load_torch(disabled: bool = False):
    """The torch module, or None when it is not installed (or disabled for a minicaffe-only run)."""
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- the nets, on the minicaffe side -------------------------------------------------------------------

def lenet_train_param() -> caffe_pb2.NetParameter:
    """The LeNet-PReLU TRAIN net with each Data layer replaced by an Input layer of the same top shapes
    (batch 64), found with the dummy-data helper of `minicaffe time --dummy-data`."""
    solver_param = read_solver(LENET_SOLVER)
    param = prepare_net_param(REPO / solver_param.net, TRAIN, dummy_data=True, dummy_shape=(1, 28, 28))
    for layer in param.layer:
        if layer.type != "DummyData":
            continue
        shapes = [list(shape.dim) for shape in layer.dummy_data_param.shape]
        layer.ClearField("dummy_data_param")
        layer.type = "Input"
        for shape in shapes:
            layer.input_param.shape.add().dim.extend(shape)
    return param


def lenet_solver() -> Solver:
    """minicaffe's Solver of models/lenet_prelu/solver.prototxt on the Input-layer train net: no tests,
    display or snapshots, so that a step is the training step alone."""
    param = read_solver(LENET_SOLVER)
    param.ClearField("net")
    param.net_param.CopyFrom(lenet_train_param())
    param.ClearField("test_iter")
    param.test_interval = param.display = param.snapshot = 0
    with quiet_log():
        solver = Solver(param, base_dir=LENET_SOLVER.parent, source=str(LENET_SOLVER))
    solver.progress = log.Progress(0, 0, stream=text_io.StringIO())  # no progress line in the table
    return solver


def zoo_net(path: Path, batch: int = ZOO_BATCH, seed: int = 0) -> Net:
    """A zoo deploy net at `batch`, TEST phase, force_backward, with seeded random weights."""
    param = read_net_param(path)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    param.force_backward = True
    net = Net(param, TEST)
    rng = np.random.default_rng(seed)
    randomize_weights(net, rng)
    calibrate_batch_norm(net, rng)
    return net


def randomize_weights(net: Net, rng: np.random.Generator) -> None:
    """He-scaled gaussian weights, small biases, Scale factors around 1 (a zoo prototxt alone often fills
    zeros); BatchNorm statistics are set by calibrate_batch_norm."""
    for layer in net.layers:
        blobs = [blob.data for blob in layer.blobs]
        if not blobs:
            continue
        if layer.type == "BatchNorm":
            continue  # its statistics: calibrate_batch_norm
        if layer.type == "Scale":
            blobs[0][...] = rng.uniform(0.5, 1.5, blobs[0].shape)
            for bias in blobs[1:]:
                bias[...] = rng.normal(0, 0.1, bias.shape)
        elif layer.type == "PReLU":
            blobs[0][...] = rng.uniform(0.1, 0.4, blobs[0].shape)
        else:
            weight = blobs[0]
            fan_in = int(np.prod(weight.shape[1:])) if weight.ndim > 1 else 1
            weight[...] = rng.normal(0, np.sqrt(2.0 / fan_in), weight.shape)
            for bias in blobs[1:]:
                bias[...] = rng.normal(0, 0.01, bias.shape)


def calibrate_batch_norm(net: Net, rng: np.random.Generator) -> None:
    """Give each BatchNorm the mean its input really has on a random input (layer by layer) and that
    variance + 1, so that it scales activations down to variance < 1: with made-up statistics a residual
    net's activations grow block after block until the softmax saturates and every gradient is zero. The
    + 1 keeps a nearly constant channel from being divided by ~sqrt(eps), which would amplify the float32
    rounding of both implementations far beyond what a trained net sees."""
    for name in net.inputs:
        net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].shape)
    for index, layer in enumerate(net.layers):
        if layer.type == "BatchNorm":
            values = net.bottom_vecs[index][0].data
            values = values.reshape(values.shape[0], values.shape[1], -1)
            layer.blobs[0].data[...] = values.mean(axis=(0, 2))
            layer.blobs[1].data[...] = values.var(axis=(0, 2)) + 1
            layer.blobs[2].data[...] = 1
        net.forward_range(index, index)


@contextlib.contextmanager
def quiet_log():
    """Keep the solver's set-up log lines out of the table."""
    log.set_stream(text_io.StringIO())
    try:
        yield
    finally:
        log.set_stream(None)


# -- the same nets in PyTorch ----------------------------------------------------------------------

class Untranslatable(ValueError):
    """A layer (or a setting of it) the translator does not turn into PyTorch."""


class TorchNet:
    """A minicaffe Net as torch.nn modules, run blob by blob in the Net's layer order.

    `steps` are (function, bottom names, top names); `modules` holds every module and parameter (for
    the optimizer and .eval()); `blob_params` pairs each minicaffe parameter blob with the torch
    parameter holding its values, so gradients can be compared and given the blob's lr_mult."""

    def __init__(self, torch, modules, steps, blob_params, loss_weights: dict[str, float]):
        self.torch, self.modules, self.steps = torch, modules, steps
        self.blob_params = blob_params
        self.loss_weights = loss_weights

    def forward(self, inputs: dict) -> dict:
        blobs = dict(inputs)
        for function, bottoms, tops in self.steps:
            outputs = function(*[blobs[name] for name in bottoms])
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            blobs.update(zip(tops, outputs))
        return blobs

    def loss(self, blobs: dict):
        return sum(weight * blobs[name] for name, weight in self.loss_weights.items())


def translate(net: Net, torch) -> TorchNet:
    """The built minicaffe `net` as torch.nn modules holding copies of its weights (see TorchNet).

    Caffe's conventions are kept: pooling rounds up (ceil_mode; output shapes are checked against the
    Net's), LRN's alpha is divided by the window size (as torch.nn.LocalResponseNorm does), BatchNorm
    uses the stored statistics (mean = blobs[0] / blobs[2]) and is fused with a following in-place Scale
    into one torch.nn.BatchNorm2d, as a torch.nn net writes it. In-place layers run in place in torch
    too (ReLU) unless their bottom is shared by a Split. Raises Untranslatable for other layers."""
    nn = torch.nn
    modules = nn.ModuleDict()
    steps: list[tuple[Callable, list[str], list[str]]] = []
    blob_params: list[tuple[object, object]] = []
    # Which names hold the same tensor (a Split's tops alias its bottom): in place is then unsafe.
    holder: dict[str, int] = {}
    tensor_ids = itertools.count()
    fused_scales: set[int] = set()

    def param(blob, shape=None):
        values = torch.from_numpy(np.array(blob.data, dtype=np.float32))
        parameter = nn.Parameter(values.reshape(shape) if shape is not None else values)
        blob_params.append((blob, parameter))
        return parameter

    def add(index: int, module):
        modules[f"layer{index}"] = module
        return module

    for index, layer in enumerate(net.layers):
        kind, bottoms, tops = layer.type, net.bottom_names[index], net.top_names[index]
        in_shapes = [blob.shape for blob in net.bottom_vecs[index]]
        where = f"layer '{layer.name}' ({kind})"
        in_place = bool(bottoms) and tops[0] == bottoms[0]
        shared = in_place and sum(h == holder.get(bottoms[0]) for h in holder.values()) > 1
        function: Callable
        if kind == "Input":
            for top in tops:
                holder[top] = next(tensor_ids)
            continue
        if index in fused_scales:
            continue
        if kind == "Split":
            for top in tops:
                holder[top] = holder[bottoms[0]]
            copies = len(tops)
            steps.append((lambda x, copies=copies: (x,) * copies, bottoms, tops))
            continue
        if kind == "Convolution":
            if layer.channel_axis != 1 or len(in_shapes[0]) != 4:
                raise Untranslatable(f"{where}: only 2-d convolutions of (N, C, H, W) blobs")
            g = layer.geometry
            conv = add(index, nn.Conv2d(layer.channels, layer.num_output, g.kernel, g.stride, g.pad,
                                        g.dilation, layer.group, layer.bias_term))
            conv.weight = param(layer.blobs[0])
            if layer.bias_term:
                conv.bias = param(layer.blobs[1])
            function = conv
        elif kind == "InnerProduct":
            if layer.transpose:
                raise Untranslatable(f"{where}: transpose: true is not translated")
            linear = add(index, nn.Linear(layer.inputs, layer.num_output, layer.bias_term))
            linear.weight = param(layer.blobs[0])
            if layer.bias_term:
                linear.bias = param(layer.blobs[1])

            def function(x, linear=linear, axis=layer.axis):
                return linear(x.flatten(axis))
        elif kind == "Pooling":
            kernel, stride = (layer.kernel_h, layer.kernel_w), (layer.stride_h, layer.stride_w)
            pad = (layer.pad_h, layer.pad_w)
            if 2 * max(pad) > min(kernel):
                raise Untranslatable(f"{where}: torch needs pad <= kernel / 2")
            if layer.method == caffe_pb2.PoolingParameter.MAX:
                function = add(index, nn.MaxPool2d(kernel, stride, pad, ceil_mode=not layer.floor))
            else:
                function = add(index, nn.AvgPool2d(kernel, stride, pad, ceil_mode=not layer.floor,
                                                   count_include_pad=True))
            if len(tops) > 1:
                raise Untranslatable(f"{where}: the argmax top is not translated")
        elif kind == "ReLU":
            if layer.param.relu_param.negative_slope:
                function = add(index, nn.LeakyReLU(layer.param.relu_param.negative_slope,
                                                   inplace=in_place and not shared))
            else:
                function = add(index, nn.ReLU(inplace=in_place and not shared))
        elif kind == "PReLU":
            channels = 1 if layer.channel_shared else in_shapes[0][1]
            prelu = add(index, nn.PReLU(channels))
            prelu.weight = param(layer.blobs[0])
            function = prelu
        elif kind == "BatchNorm":
            if not layer.use_global_stats:
                raise Untranslatable(f"{where}: only use_global_stats (TEST) is translated")
            following = net.layers[index + 1] if index + 1 < len(net.layers) else None
            fuse = (following is not None and following.type == "Scale" and len(following.blobs) == 2
                    and net.bottom_names[index + 1] == tops and net.top_names[index + 1] == tops
                    and following.blobs[0].shape == (layer.channels,))
            batch_norm = add(index, nn.BatchNorm2d(layer.channels, eps=layer.eps, affine=fuse))
            factor = float(layer.blobs[2].data[0])
            factor = 0.0 if factor == 0 else 1.0 / factor
            batch_norm.running_mean.copy_(torch.from_numpy(layer.blobs[0].data * factor))
            batch_norm.running_var.copy_(torch.from_numpy(layer.blobs[1].data * factor))
            if fuse:
                batch_norm.weight = param(following.blobs[0])
                batch_norm.bias = param(following.blobs[1])
                fused_scales.add(index + 1)
            function = batch_norm
        elif kind == "Scale":
            if len(bottoms) != 1:
                raise Untranslatable(f"{where}: a scale from a second bottom is not translated")
            ndim = len(in_shapes[0])
            axis = layer.param.scale_param.axis % ndim
            learned = layer.blobs[0].shape
            view = (1,) * axis + tuple(learned) + (1,) * (ndim - axis - len(learned))
            scale = param(layer.blobs[0], view)
            bias = param(layer.blobs[1], view) if len(layer.blobs) > 1 else None
            holder_module = add(index, nn.Module())
            holder_module.scale = scale
            if bias is not None:
                holder_module.bias = bias

            def function(x, scale=scale, bias=bias):
                return x * scale + bias if bias is not None else x * scale
        elif kind == "Eltwise":
            operation = layer.param.eltwise_param.operation
            if operation == caffe_pb2.EltwiseParameter.SUM:
                coeffs = layer.coeffs
                if all(c == 1 for c in coeffs):
                    function = lambda *xs: sum(xs[1:], xs[0])  # noqa: E731
                else:
                    function = lambda *xs, c=coeffs: sum(ci * x for ci, x in zip(c, xs))  # noqa: E731
            elif operation == caffe_pb2.EltwiseParameter.PROD:
                function = lambda *xs: torch.stack(xs).prod(0)  # noqa: E731
            else:
                function = lambda *xs: torch.stack(xs).amax(0)  # noqa: E731
        elif kind == "Concat":
            function = lambda *xs, axis=layer.axis: torch.cat(xs, axis)  # noqa: E731
        elif kind == "Softmax":
            function = add(index, nn.Softmax(layer.axis))
        elif kind == "SoftmaxWithLoss":
            p = layer.param.loss_param
            if (layer.normalization != caffe_pb2.LossParameter.VALID or len(tops) > 1
                    or layer.softmax.axis != 1):
                raise Untranslatable(f"{where}: only axis 1, normalization VALID and one top are translated")

            def function(x, label, ignore=p.ignore_label if layer.has_ignore else -100):
                return torch.nn.functional.cross_entropy(x, label.long(), ignore_index=ignore)
        elif kind == "Dropout":
            if net.phase != TEST:
                raise Untranslatable(f"{where}: random masks in TRAIN are not comparable")
            function = add(index, nn.Dropout(layer.ratio))
        elif kind == "LRN":
            if layer.region != caffe_pb2.LRNParameter.ACROSS_CHANNELS:
                raise Untranslatable(f"{where}: only ACROSS_CHANNELS is translated")
            function = add(index, nn.LocalResponseNorm(layer.size, layer.alpha, layer.beta, layer.k))
        elif kind == "Flatten":
            p = layer.param.flatten_param
            function = lambda x, a=p.axis, e=p.end_axis: x.flatten(a, e)  # noqa: E731
        elif kind == "Reshape":
            function = lambda x, shape=tuple(net.top_vecs[index][0].shape): x.reshape(shape)  # noqa: E731
        else:
            raise Untranslatable(f"{where}: no PyTorch translation")
        for top in tops:
            holder[top] = holder[bottoms[0]] if in_place and top == bottoms[0] else next(tensor_ids)
        steps.append((function, list(bottoms), list(tops)))
    # Dropout as identity and BatchNorm from its stored statistics: the only modes translated above.
    modules.eval()
    loss_weights = {name: weight for name, weight in net.blob_loss_weights.items() if weight}
    return TorchNet(torch, modules, steps, blob_params, loss_weights)


# -- checking that the two compute the same -----------------------------------------------------------

def max_relative_diff(mine: np.ndarray, theirs: np.ndarray) -> float:
    """max |mine - theirs| as a fraction of max |mine| (inf for different shapes): for blobs, whose values
    are continuous in the input, so every element must agree."""
    if mine.shape != theirs.shape:
        return float("inf")
    scale = float(np.abs(mine).max(initial=0.0))
    diff = float(np.abs(mine.astype(np.float64) - theirs).max(initial=0.0))
    return diff / scale if scale else diff


def norm_relative_diff(mine: np.ndarray, theirs: np.ndarray) -> float:
    """||mine - theirs|| / ||mine|| (L2; inf for different shapes): for gradients. A gradient jumps where
    a value sits at a kink (PReLU at 0) or two pooling inputs tie, and float rounding may put the two
    implementations on either side: a few elements then differ by a whole term, legitimately."""
    if mine.shape != theirs.shape:
        return float("inf")
    scale = float(np.linalg.norm(mine.astype(np.float64)))
    diff = float(np.linalg.norm(mine.astype(np.float64) - theirs))
    return diff / scale if scale else diff


def torch_pass(model: TorchNet, inputs: dict[str, np.ndarray], top_diffs: dict[str, np.ndarray],
               input_grads: bool, dtype=None) -> tuple[dict, list, dict]:
    """One forward and backward of `model` in `dtype` (default float32), as for compare. Returns the
    blobs, the parameter gradients (in model.blob_params' order) and the input gradients, as numpy."""
    torch = model.torch
    dtype = dtype or torch.float32
    tensors = {name: torch.from_numpy(value).to(dtype).requires_grad_(input_grads)
               for name, value in inputs.items()}
    for parameter in model.modules.parameters():
        parameter.grad = None
    blobs = model.forward(tensors)
    if top_diffs:
        torch.autograd.backward([blobs[name] for name in top_diffs],
                                [torch.from_numpy(diff).to(dtype) for diff in top_diffs.values()])
    else:
        model.loss(blobs).backward()
    grads = [parameter.grad.numpy().reshape(blob.shape)  # a Scale's parameter is a broadcast view
             for blob, parameter in model.blob_params]
    return ({name: blob.detach().numpy() for name, blob in blobs.items()}, grads,
            {name: tensor.grad.numpy() for name, tensor in tensors.items() if tensor.requires_grad})


def compare(net: Net, model: TorchNet, inputs: dict[str, np.ndarray], top_diffs: dict[str, np.ndarray],
            input_grads: bool) -> dict:
    """Run both nets forward and backward once on `inputs` and compare.

    The backward starts from `top_diffs` (deploy nets) or from the loss (nets with one); with
    input_grads the gradients of the inputs are compared too. Returns {"output_abs": max abs diff of the
    net's outputs, "blob_rel": the largest max_relative_diff over every blob, "grad_rel": the largest
    norm_relative_diff over every parameter gradient (and input gradient), "worst": where the largest
    was, "same": the verdict, "note": why when it needed the float64 reference}.

    Gradients further apart than TOLERANCE are compared with the same translation run in float64: when
    ties or kinks make float32 results differ, the net is still the same if minicaffe is within twice
    PyTorch's own float32 distance from float64, over all gradients (the float32 rounding of either side
    flips them)."""
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.clear_param_diffs()
    net.forward_range(0, len(net.layers) - 1)
    for name, diff in top_diffs.items():
        net.blobs[name].diff[...] = diff
    net.backward_range(len(net.layers) - 1, 0)
    blobs, grads, in_grads = torch_pass(model, inputs, top_diffs, input_grads)

    # (what, minicaffe's gradient, torch's), for every parameter and input gradient
    mine = [(f"gradient of {next(layer.name for layer in net.layers if any(b is blob for b in layer.blobs))}",
             blob.diff) for blob, _ in model.blob_params]
    mine += [(f"gradient of {name}", net.blobs[name].diff) for name in in_grads]
    theirs = grads + list(in_grads.values())

    results = {"output_abs": 0.0, "blob_rel": 0.0, "grad_rel": 0.0, "worst": "", "note": ""}
    worst = 0.0
    for name, blob in net.blobs.items():
        rel = max_relative_diff(blob.data, blobs[name])
        if name in net.outputs:
            gap = np.abs(blob.data - blobs[name]).max() if blob.shape == blobs[name].shape else np.inf
            results["output_abs"] = max(results["output_abs"], float(gap))
        if rel >= worst:
            worst, results["worst"] = rel, f"blob {name}"
        results["blob_rel"] = max(results["blob_rel"], rel)
    grad_rels = [norm_relative_diff(a, b) for (_, a), b in zip(mine, theirs)]
    for (what, _), rel in zip(mine, grad_rels):
        if rel >= worst:
            worst, results["worst"] = rel, what
    results["grad_rel"] = max(grad_rels, default=0.0)
    results["same"] = results["blob_rel"] <= TOLERANCE and results["grad_rel"] <= TOLERANCE
    if results["blob_rel"] <= TOLERANCE < results["grad_rel"]:
        reference = translate(net, model.torch)
        reference.modules.double()
        _, grads64, in_grads64 = torch_pass(reference, inputs, top_diffs, input_grads, model.torch.float64)
        exact = grads64 + list(in_grads64.values())
        mine_error = [norm_relative_diff(e, a) for e, (_, a) in zip(exact, mine)]
        torch_error = [norm_relative_diff(e, b) for e, b in zip(exact, theirs)]
        results["same"] = max(mine_error) <= max(2 * max(torch_error), TOLERANCE)
        results["note"] = (f"gradients from float64: minicaffe {max(mine_error):.1e}, PyTorch float32 "
                           f"{max(torch_error):.1e}")
        winograd = [layer for layer in net.layers if getattr(layer, "_is_winograd", lambda: False)()]
        if not results["same"] and winograd and convolution.WINOGRAD_CHOICE != "never":
            # Winograd's float32 rounding is larger than im2col's (README): is the rest the same net?
            convolution.WINOGRAD_CHOICE, choice = "never", convolution.WINOGRAD_CHOICE
            try:
                im2col = compare(net, model, inputs, top_diffs, input_grads)
            finally:
                convolution.WINOGRAD_CHOICE = choice
            verdict = "yes" if im2col["same"] else "NO"
            results["note"] += (f"; with Winograd's {len(winograd)} layers on im2col (engine: CAFFE): "
                                f"{verdict}, {im2col['note'] or 'within tolerance'}")
    return results


# -- timing --------------------------------------------------------------------------------------------

# Runs per turn: each peer runs this many times back to back (a training loop's steady state), and the
# first run of a turn is not counted: it follows the other peer's turn, with the caches cold and, after
# PyTorch's turn, its OpenMP threads still spinning for a few milliseconds (libgomp's default).
TURN = 4


def alternate(runs: dict[str, Callable[[], object]], warmup: int, min_runs: int,
              min_seconds: float) -> dict[str, float]:
    """Median seconds of each function, timed in turns of TURN back-to-back runs (the first not counted)
    after `warmup` runs, for at least min_runs rounds and min_seconds. A function that returns a number
    has timed itself (the PyTorch peer, in its own process): that is its time."""
    for _ in range(warmup):
        for function in runs.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or (time.perf_counter() - start < min_seconds and rounds < 500):
        for name, function in runs.items():
            for run in range(TURN):
                t0 = time.perf_counter()
                measured = function()
                if run:
                    times[name].append(measured if isinstance(measured, float) else time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


class Peer:
    """PyTorch's side of a row, run by benchmarks/torch_peer.py in a process of its own.

    Why not in this process: importing minicaffe sets OMP_WAIT_POLICY=passive for its kernels
    (minicaffe/threads.py), and an OpenMP runtime reads it once, when it loads: PyTorch loaded after
    minicaffe would share that runtime and policy, and PyTorch runs up to 2x slower passive (a 12-block
    conv stack at 28x28: 23 ms at its default, 35-48 ms passive, on this 2-core machine). So each peer
    runs at its own defaults: the child gets the environment the user started this script with. It
    times each run itself and answers one number per request, so the rows still alternate."""

    def __init__(self, row: str, *options: str):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("torch_peer.py")), row,
                                         *options], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=timing.peer_environment())
        self.ask("ready")

    def ask(self, request: str) -> str:
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the PyTorch peer process failed: {self.process.stderr.read()[-2000:]}")
        return answer.strip()

    def __call__(self) -> float:
        return float(self.ask("run"))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def lenet_runs(torch, check: bool = True) -> tuple[dict[str, Callable], dict | None, str]:
    """The LeNet-PReLU SGD step of each peer, the translation check (unless check is False), and what
    the row measures."""
    solver = lenet_solver()
    net = solver.net
    rng = np.random.default_rng(0)
    shapes = {name: net.blobs[name].shape for name in net.inputs}
    inputs = {"data": rng.random(shapes["data"], dtype=np.float32),
              "label": rng.integers(0, 10, shapes["label"]).astype(np.float32)}
    runs: dict[str, Callable] = {}
    result = None
    if torch is not None:
        model = translate(net, torch)
        result = compare(net, model, inputs, {}, input_grads=False) if check else None
        rate = solver.param.base_lr
        groups = []
        for learnable in net.learnable_params:
            parameter = next(p for blob, p in model.blob_params if blob is learnable.blob)
            groups.append({"params": [parameter], "lr": rate * learnable.lr_mult,
                           "weight_decay": solver.param.weight_decay * learnable.decay_mult})
        optimizer = torch.optim.SGD(groups, lr=rate, momentum=solver.param.momentum)
        tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}

        def torch_step():
            optimizer.zero_grad()
            loss = model.loss(model.forward(tensors))
            loss.backward()
            optimizer.step()

        runs["torch"] = torch_step
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    runs = {"minicaffe": lambda: solver.step(1), **runs}
    batch = shapes["data"][0]
    return runs, result, f"SGD step (fwd+bwd+update), batch {batch}"


def zoo_runs(path: Path, torch, check: bool = True) -> tuple[dict[str, Callable], dict | None, str]:
    """Forward + backward of a zoo deploy net for each peer, and the translation check (unless check is
    False)."""
    net = zoo_net(path)
    rng = np.random.default_rng(1)
    inputs = {name: rng.standard_normal(net.blobs[name].shape, dtype=np.float32) for name in net.inputs}
    top_diffs = {name: rng.standard_normal(net.blobs[name].shape, dtype=np.float32) for name in net.outputs}
    runs: dict[str, Callable] = {}
    result = None
    if torch is not None:
        model = translate(net, torch)
        result = compare(net, model, inputs, top_diffs, input_grads=True) if check else None
        tensors = {name: torch.from_numpy(value).requires_grad_() for name, value in inputs.items()}
        grads = [torch.from_numpy(diff) for diff in top_diffs.values()]
        parameters = list(model.modules.parameters())

        def torch_forward_backward():
            for parameter in parameters:
                parameter.grad = None
            for tensor in tensors.values():
                tensor.grad = None
            blobs = model.forward(tensors)
            torch.autograd.backward([blobs[name] for name in top_diffs], grads)

        runs["torch"] = torch_forward_backward
    for name, value in inputs.items():
        net.blobs[name].data[...] = value

    def minicaffe_forward_backward():
        net.forward_range(0, len(net.layers) - 1)
        for name, diff in top_diffs.items():
            net.blobs[name].diff[...] = diff
        net.backward_range(len(net.layers) - 1, 0)

    runs = {"minicaffe": minicaffe_forward_backward, **runs}
    batch = next(iter(inputs.values())).shape[0]
    return runs, result, f"fwd+bwd, batch {batch}"


@contextlib.contextmanager
def busy_core():
    """Another process spinning on one core while the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it get scheduled
        yield
    finally:
        spinner.kill()
        spinner.wait()


# -- the table -----------------------------------------------------------------------------------------

HEADER = ("net", "measured", "minicaffe ms", "torch ms", "minicaffe / torch", "outputs max abs diff",
          "blobs max rel diff", "gradients L2 rel diff", "same net")


def row_cells(row: dict) -> list[str]:
    mine, theirs, check = row["minicaffe_ms"], row.get("torch_ms"), row.get("check")
    ratio = f"{mine / theirs:.2f}x" if theirs else "-"
    if check is None:
        checks = ["-"] * 4
    else:
        checks = [f"{check[key]:.1e}" for key in ("output_abs", "blob_rel", "grad_rel")]
        verdict = "yes" if check["same"] else f"NO, at {check['worst']}"
        checks.append(f"{verdict}; {check['note']}" if check["note"] else verdict)
    return [row["net"], row["measured"], f"{mine:.1f}", f"{theirs:.1f}" if theirs else "-", ratio, *checks]


def format_line(cells) -> str:
    return (f"{cells[0]:<26} {cells[1]:<37} {cells[2]:>12} {cells[3]:>9} {cells[4]:>17} {cells[5]:>20} "
            f"{cells[6]:>18} {cells[7]:>21} {cells[8]}")


def thread_info(torch) -> str:
    """The threads each peer computes with: torch.get_num_threads() and every thread pool threadpoolctl
    finds in this process (BLAS, OpenMP), named by the package that loaded it."""
    parts = []
    if torch is not None:
        parts.append(f"torch.get_num_threads() = {torch.get_num_threads()}")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        parts.append("(threadpoolctl not installed: BLAS threads unknown)")
        return "; ".join(parts)
    for pool in threadpool_info():
        path = pool.get("filepath", "")
        owner = next((name for name in ("numpy", "scipy", "torch", "minicaffe") if name in path), "other")
        parts.append(f"{pool.get('internal_api', pool.get('user_api'))} ({owner}) {pool.get('num_threads')} "
                     "threads")
    return "; ".join(parts)


def machine() -> str:
    return f"{timing.machine()}; {timing.software()}"


def markdown(rows: list[dict], notes: list[str], command: str, torch) -> str:
    peer = f"PyTorch {torch.__version__} (CPU)" if torch is not None else "no PyTorch"
    lines = [BEGIN, "## Whole nets against PyTorch (benchmarks/nets.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{machine()}; {peer}.", "",
             f"Median time of one step (after warm-up, the two peers timed in turns of {TURN} back-to-back "
             "runs, the first of each turn not counted), float32, default thread "
             "settings; PyTorch runs in a process of its own (benchmarks/torch_peer.py), so that minicaffe's "
             "passive OpenMP wait policy is not imposed on it. "
             "LeNet: `Solver.step(1)` of models/lenet_prelu/solver.prototxt on its train net with "
             "Input layers, against zero_grad + forward + backward + torch.optim.SGD (same momentum, weight "
             "decay and lr_mult / decay_mult). Zoo nets: forward + backward (all parameter gradients and the "
             "input gradient) with seeded random weights. The PyTorch nets are translated from the "
             "minicaffe nets with the same weights and both are run once on the same input before timing: "
             "the diff columns compare the outputs, every blob (largest element difference over the blob's "
             "largest value) and every parameter and input gradient (L2 norm of the difference over the "
             "gradient's: a value at a kink or a pooling tie may route a single element differently). "
             f"\"same net\": both below {TOLERANCE:g}, or gradients as close to a float64 run of the "
             "translation as PyTorch's own float32 run is (within 2x). A net whose 3x3 convolutions run "
             "Winograd (README: its float32 rounding is ~5x im2col's) and fails that is compared again with "
             "those layers on im2col, and the note says how that went.", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|---|---|" + "---:|" * (len(HEADER) - 3) + "---|")
    for row in rows:
        lines.append("| " + " | ".join(row_cells(row)) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"few runs, LeNet and {QUICK_ZOO_NET} only (a smoke test)")
    parser.add_argument("--nets", help="comma-separated rows to run: lenet, busy and zoo net names "
                                       "(default: all)")
    parser.add_argument("--no-torch", action="store_true",
                        help="minicaffe only, even if PyTorch is installed")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    backend.set_mode_cpu()
    torch = load_torch(args.no_torch)
    zoo = zoo_nets()
    known = {"lenet": "lenet", "busy": "busy", **{name.lower(): name for name in zoo}}
    if args.nets:
        wanted = [name.strip() for name in args.nets.split(",") if name.strip()]
    elif args.quick:
        wanted = ["lenet", *[name for name in zoo if name == QUICK_ZOO_NET]]
    else:
        wanted = ["lenet", *zoo, "busy"]
    unknown = [name for name in wanted if name.lower() not in known]
    if unknown:
        print(f"benchmarks/nets.py: unknown net(s) {', '.join(unknown)}; choose from "
              f"{', '.join(known.values())}"
              + ("" if zoo else f" (no zoo nets in {zoo_dir()}: set MINICAFFE_SHARED)"), file=sys.stderr)
        return 1
    warmup, min_runs, min_seconds = (1, 2, 0.0) if args.quick else (2, 7, 2.0)

    print(machine())
    if torch is None:
        why = "--no-torch" if args.no_torch else "PyTorch is not installed"
        print(f"torch: not used ({why}); only minicaffe's column is measured")
    else:
        print(f"torch: {torch.__version__}")
    if not zoo:
        print(f"no zoo nets in {zoo_dir()} (set MINICAFFE_SHARED): zoo rows skipped")
    print(format_line(HEADER))
    rows, notes, quiet = [], [], {}
    for name in wanted:
        name = known[name.lower()]
        try:
            if name in ("lenet", "busy"):
                runs, check, measured = lenet_runs(torch)
                label = "LeNet-PReLU" + (", one core busy" if name == "busy" else "")
            else:
                runs, check, measured = zoo_runs(zoo[name], torch)
                label = name
            peer = Peer("lenet" if name == "busy" else name) if "torch" in runs else None
            if peer is not None:
                runs["torch"] = peer
            try:
                with busy_core() if name == "busy" else contextlib.nullcontext():
                    times = alternate(runs, warmup, min_runs, min_seconds)
            finally:
                if peer is not None:
                    peer.close()
            if name == "lenet":
                quiet = times
        except Untranslatable as error:
            print(f"{name}: not compared with PyTorch: {error}", file=sys.stderr)
            notes.append(f"{name}: not compared with PyTorch: {error}")
            continue
        row = {"net": label, "measured": measured, "minicaffe_ms": times["minicaffe"] * 1e3,
               "torch_ms": times["torch"] * 1e3 if "torch" in times else None, "check": check}
        rows.append(row)
        print(format_line(row_cells(row)), flush=True)
        if name == "busy" and quiet:
            slowdown = ", ".join(f"{peer} {times[peer] / quiet[peer]:.2f}x" for peer in times)
            notes.append(f"one core busy (another process spinning on it), against the quiet LeNet row: "
                         f"{slowdown}")
        if check is not None and not check["same"]:
            print(f"WARNING: {label}: minicaffe and its PyTorch translation differ (worst at "
                  f"{check['worst']})", file=sys.stderr)
    notes.append(f"threads: {thread_info(torch)}")
    if torch is None:
        notes.append("PyTorch was not used (" + ("--no-torch" if args.no_torch else "not installed")
                     + "), so there is no comparison column.")
    for note in notes:
        print(note)
    if not args.no_write:
        command = "python benchmarks/nets.py" + (" --quick" if args.quick else "") + (
            f" --nets {args.nets}" if args.nets else "")
        update_section(Path(args.output), "benchmarks/nets.py", markdown(rows, notes, command, torch))
        print(f"\nupdated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
