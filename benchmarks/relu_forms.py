"""Rectifier forms: every ReLU and PReLU a prototxt can express, timed forward and forward + backward,
with the memory each keeps for backward and its parameter count: the Theano comparison's ReLU and
PReLU formulations that layers can express (max(x, 0), x * (x > 0), (x + |x|) / 2, max(x, a x),
Lasagne's ReLU(x) + a (x - |x|) / 2), Caffe PR #1940's composed PReLU, and PReLU as two ReLUs (Keras).

    python benchmarks/relu_forms.py              # 64x32x56x56 blob and a (1000, 1000) matrix; BENCHMARKS.md
    python benchmarks/relu_forms.py --quick      # tiny shapes, few runs (a smoke test)
    python benchmarks/relu_forms.py --no-write   # print only

Each form is a small net (an Input "x", the form's layers, its output), built from the prototxt text
in FORMS; tests/test_relu_forms.py checks on the same nets that the forms of one group compute the
same outputs and gradients. Timed: Net forward, and forward + backward (force_backward: the input's
gradient and the parameters' gradients), CPU, float32, median of several runs, of the nets whose
layers do not run in place. Memory from `minicaffe summary`'s accounting (commands/summary.py), per
element of the input: "blobs" is the data of every blob the net holds (the input included; training
holds as much again in diffs), "kept" is what the layers keep for backward beyond the blobs
(Layer.planned_kept_bytes: a copy of x, or in place a byte mask); both for the net as written and
with every layer that can run in place doing so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from minicaffe import backend
from minicaffe.commands.summary import summarize
from minicaffe.layer import TRAIN
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernels.py, markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

from kernels import machine, median_time  # noqa: E402

BEGIN, END = markers("benchmarks/relu_forms.py")
BLOB, MATRIX = (64, 32, 56, 56), (1000, 1000)
QUICK_SHAPES = {BLOB: (4, 8, 10, 10), MATRIX: (40, 50)}
SLOPE = 0.25  # PReLU's default initial slope; also the leaky ReLU's negative_slope

ReLU_GROUP, PReLU_GROUP = "ReLU: max(0, x)", "PReLU: max(0, x) + a_c min(0, x)"


def layer(name: str, kind: str, bottoms: list[str], top: str, extra: str = "") -> str:
    return (f'layer {{ name: "{name}" type: "{kind}" ' + "".join(f'bottom: "{b}" ' for b in bottoms) +
            f'top: "{top}" {extra} }}\n')


# Each form's layers, from input blob "x"; in_place: run in place every layer that can. The output is
# the net's only output blob. Comments say which layers cannot run in place and why.
def relu(in_place: bool, shape: tuple) -> str:
    return layer("relu", "ReLU", ["x"], "x" if in_place else "y")


def leaky_relu(in_place: bool, shape: tuple) -> str:
    return layer("relu", "ReLU", ["x"], "x" if in_place else "y", f"relu_param {{ negative_slope: {SLOPE} }}")


def abs_sum(in_place: bool, shape: tuple) -> str:
    # (x + |x|) / 2. x feeds both layers, so AbsVal cannot overwrite it; Eltwise never runs in place.
    return (layer("abs", "AbsVal", ["x"], "absx") +
            layer("sum", "Eltwise", ["x", "absx"], "y",
                  "eltwise_param { operation: SUM coeff: 0.5 coeff: 0.5 }"))


def max_zero(in_place: bool, shape: tuple) -> str:
    # max(x, 0) (Theano's T.maximum(x, 0)) against a blob of zeros made by Power scale 0. No gradient
    # goes to the zeros (propagate_down: false; Eltwise MAX gives a tie at x = 0 to the zeros, so the
    # gradient there is 0 as ReLU's). Neither layer can run in place (x is read twice).
    return (layer("zeros", "Power", ["x"], "zeros", "propagate_down: false power_param { scale: 0 }") +
            layer("max", "Eltwise", ["x", "zeros"], "y",
                  "propagate_down: true propagate_down: false eltwise_param { operation: MAX }"))


def threshold_prod(in_place: bool, shape: tuple) -> str:
    # x * (x > 0). Threshold has no backward (as in Caffe), and needs none: the step's derivative is 0
    # wherever it exists, so the gradient of x * step(x) is step(x) * dy through the product's first
    # bottom alone (propagate_down: true false), and none reaches the Threshold (propagate_down: false).
    # Neither layer can run in place (x is read twice).
    return (layer("step", "Threshold", ["x"], "step",
                  "propagate_down: false threshold_param { threshold: 0 }") +
            layer("prod", "Eltwise", ["x", "step"], "y",
                  "propagate_down: true propagate_down: false eltwise_param { operation: PROD }"))


def prelu(in_place: bool, shape: tuple) -> str:
    return layer("prelu", "PReLU", ["x"], "x" if in_place else "y")


def prelu_shared(in_place: bool, shape: tuple) -> str:
    return layer("prelu", "PReLU", ["x"], "x" if in_place else "y", "prelu_param { channel_shared: true }")


def prelu_max(in_place: bool, shape: tuple) -> str:
    # max(x, a x) (Theano's T.maximum(x, a * x)) with a learned per channel by Scale; PReLU for a <= 1.
    # Neither layer can run in place (x is read twice).
    return (layer("slopes", "Scale", ["x"], "ax", "scale_param { axis: 1 }") +
            layer("max", "Eltwise", ["x", "ax"], "y", "eltwise_param { operation: MAX }"))


def prelu_lasagne(in_place: bool, shape: tuple) -> str:
    # ReLU(x) + a (x - |x|) / 2, as Lasagne's ParametricRectifierLayer computes it (a per channel by
    # Scale). x feeds three layers; only Scale could run in place, and in place it keeps a copy of x.
    neg = "neg" if in_place else "negpart"
    return (layer("pos", "ReLU", ["x"], "pos") +
            layer("abs", "AbsVal", ["x"], "absx") +
            layer("neg", "Eltwise", ["x", "absx"], "neg",
                  "eltwise_param { operation: SUM coeff: 0.5 coeff: -0.5 }") +
            layer("slopes", "Scale", ["neg"], neg, "scale_param { axis: 1 }") +
            layer("sum", "Eltwise", ["pos", neg], "y", "eltwise_param { operation: SUM }"))


def prelu_pr1940(in_place: bool, shape: tuple) -> str:
    # Caffe PR #1940: ReLU(x) + conv_{-a}(ReLU(-x)), the slopes as the weights -a_c of a 1x1 convolution
    # with one group per channel. x feeds two layers; the second ReLU can run in place on -x. A matrix
    # (N, C) goes to the convolution as (N, C, 1, 1) and back (Reshape shares the data: no copy).
    channels, neg = shape[1], "negx" if in_place else "negrelu"
    conv = (f"convolution_param {{ num_output: {channels} group: {channels} kernel_size: 1 "
            "bias_term: false }")
    if len(shape) == 2:
        to_image = layer("as_image", "Reshape", [neg], "negimage", "reshape_param { shape { dim: 0 dim: 0 "
                         "dim: 1 dim: 1 } }")
        back = layer("as_matrix", "Reshape", ["negpart_image"], "negpart", "reshape_param { shape { dim: 0 "
                     "dim: 0 } }")
        slopes = to_image + layer("slopes", "Convolution", ["negimage"], "negpart_image", conv) + back
    else:
        slopes = layer("slopes", "Convolution", [neg], "negpart", conv)
    return (layer("pos", "ReLU", ["x"], "pos") +
            layer("flip", "Power", ["x"], "negx", "power_param { scale: -1 }") +
            layer("neg", "ReLU", ["negx"], neg) + slopes +
            layer("sum", "Eltwise", ["pos", "negpart"], "y", "eltwise_param { operation: SUM }"))


def prelu_two_relus(in_place: bool, shape: tuple) -> str:
    # max(0, x) - a * max(0, -x) with a as Keras' PReLU keeps it: one slope per element of a sample
    # (Scale over all axes after the batch), the cost in parameters. Scale in place keeps a copy of x.
    neg = "negx" if in_place else "negrelu"
    scaled = neg if in_place else "negpart"
    return (layer("pos", "ReLU", ["x"], "pos") +
            layer("flip", "Power", ["x"], "negx", "power_param { scale: -1 }") +
            layer("neg", "ReLU", ["negx"], neg) +
            layer("slopes", "Scale", [neg], scaled, "scale_param { axis: 1 num_axes: -1 }") +
            layer("sum", "Eltwise", ["pos", scaled], "y",
                  "eltwise_param { operation: SUM coeff: 1 coeff: -1 }"))


@dataclass(frozen=True)
class Form:
    name: str
    group: str
    layers: Callable[[bool, tuple], str]
    # Slopes a (one per channel) -> the form's parameter blob (layer "slopes" or "prelu"), and that
    # blob's gradient -> d loss / d a per channel (None: the form has no learned slope).
    to_param: Callable[[np.ndarray, tuple], np.ndarray] | None = None
    to_slope_grad: Callable[[np.ndarray], np.ndarray] | None = None
    slope_layer: str = "slopes"
    # Its backward runs without a layer that has none (the Threshold: see threshold_prod).
    note: str = ""


def _per_element(a: np.ndarray, shape: tuple) -> np.ndarray:
    return np.broadcast_to(a.reshape((-1,) + (1,) * (len(shape) - 1)), shape).copy()


FORMS = [
    Form("ReLU", ReLU_GROUP, relu),
    Form("max(x, 0): Power scale 0 (zeros), Eltwise MAX", ReLU_GROUP, max_zero),
    Form("(x + |x|) / 2: AbsVal, Eltwise SUM 0.5 0.5", ReLU_GROUP, abs_sum),
    Form("x * (x > 0): Threshold, Eltwise PROD", ReLU_GROUP, threshold_prod,
         note="backward through the PROD's x only (the Threshold has none, and the step's gradient is 0)"),
    Form("PReLU", PReLU_GROUP, prelu, lambda a, shape: a.copy(), lambda g: g, "prelu"),
    Form("PReLU channel_shared", PReLU_GROUP, prelu_shared, lambda a, shape: np.asarray(a[0]),
         lambda g: g, "prelu", note="one slope: equal to the others when all a_c are equal"),
    Form("max(x, a x): Scale (a per channel), Eltwise MAX", PReLU_GROUP, prelu_max,
         lambda a, shape: a.copy(), lambda g: g, note="PReLU only while every a <= 1"),
    Form("ReLU(x) + a (x - |x|) / 2 (Lasagne): ReLU, AbsVal, Eltwise SUM, Scale, Eltwise SUM", PReLU_GROUP,
         prelu_lasagne, lambda a, shape: a.copy(), lambda g: g),
    Form("PReLU as PR #1940: ReLU, Power -1, ReLU, grouped 1x1 Convolution (-a), Eltwise SUM", PReLU_GROUP,
         prelu_pr1940, lambda a, shape: -a.reshape(shape), lambda g: -g.reshape(-1)),
    Form("PReLU as two ReLUs: ReLU, Power -1, ReLU, Scale (a per element, Keras), Eltwise SUM 1 -1",
         PReLU_GROUP, prelu_two_relus, _per_element, lambda g: g.reshape(g.shape[0], -1).sum(axis=1)),
    Form("leaky ReLU (negative_slope 0.25, fixed)", PReLU_GROUP, leaky_relu,
         note="a fixed slope: equal to the others when all a_c are 0.25; no slope gradient"),
]


def net_text(form: Form, shape: tuple, in_place: bool = False) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'name: "{form.name}" force_backward: true\n'
            f'layer {{ name: "input" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            + form.layers(in_place, shape))


def build(form: Form, shape: tuple, in_place: bool = False, slopes: np.ndarray | None = None,
          dtype=np.float32) -> Net:
    """The form's net (TRAIN phase) on an input of `shape`, its slopes set to `slopes` (one per channel;
    default all SLOPE)."""
    param = text_format.Parse(net_text(form, shape, in_place), caffe_pb2.NetParameter())
    net = Net(param, TRAIN, dtype=dtype)
    if form.to_param is not None:
        a = np.full(shape[1], SLOPE) if slopes is None else np.asarray(slopes, dtype=np.float64)
        blob = net.layer_dict[form.slope_layer].blobs[0]
        blob.data[...] = form.to_param(a, blob.shape)
    return net


def output_name(net: Net) -> str:
    (name,) = net.outputs
    return name


def memory(form: Form, shape: tuple, in_place: bool) -> dict:
    net = build(form, shape, in_place)
    info = summarize(net)
    count = int(np.prod(shape))
    return {"blobs": info["activation_bytes"] / count, "kept": info["kept_bytes"] / count,
            "params": info["params"]}


def time_form(form: Form, shape: tuple, min_runs: int, min_seconds: float) -> tuple[float, float]:
    net = build(form, shape)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal(shape)
    # The output's diff is read, never written, by the backward of these nets (not in place).
    net.blobs[output_name(net)].diff[...] = rng.standard_normal(shape)
    last = len(net.layers) - 1

    def forward():
        net.forward_range(0, last)

    def forward_backward():
        net.clear_param_diffs()  # as a solver step does: parameter gradients are added up
        net.forward_range(0, last)
        net.backward_range(last, 0)

    return median_time(forward, min_runs, min_seconds), median_time(forward_backward, min_runs, min_seconds)


def measure(shape: tuple, quick: bool) -> list[dict]:
    min_runs, min_seconds = (2, 0.0) if quick else (5, 0.5)
    rows = []
    for form in FORMS:
        fwd, fwd_bwd = time_form(form, shape, min_runs, min_seconds)
        apart, together = memory(form, shape, False), memory(form, shape, True)
        row = {"form": form.name, "group": form.group, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fwd_bwd * 1e3,
               "blobs": apart["blobs"], "kept": apart["kept"], "blobs_in_place": together["blobs"],
               "kept_in_place": together["kept"], "params": apart["params"], "note": form.note}
        rows.append(row)
        print(format_line(cells(row)), flush=True)
    return rows


HEADER = ("form", "fwd ms", "fwd+bwd ms", "blobs B/elem", "kept B/elem", "in place: blobs", "in place: kept",
          "params")


def cells(row: dict) -> list[str]:
    return [row["form"], f"{row['fwd_ms']:.3g}", f"{row['fwd_bwd_ms']:.3g}", f"{row['blobs']:g}",
            f"{row['kept']:g}", f"{row['blobs_in_place']:g}", f"{row['kept_in_place']:g}",
            f"{row['params']:,}"]


def format_line(c) -> str:
    return f"{c[0][:44]:<44} {c[1]:>8} {c[2]:>10} {c[3]:>12} {c[4]:>11} {c[5]:>15} {c[6]:>14} {c[7]:>9}"


def markdown(results: dict[tuple, list[dict]], command: str) -> str:
    lines = [BEGIN, "## Rectifier forms (benchmarks/relu_forms.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{machine()}.", "",
             "Every ReLU and PReLU a prototxt can express, each as a small net (Input x, the form's layers; "
             "the prototxt is in the script), CPU, float32, median time of Net forward and of forward + "
             "backward (the input's and the slopes' gradients). Memory per element of the input, by "
             "`minicaffe summary`'s accounting: *blobs* is the data of all blobs the net holds (x "
             "included; training holds as much again in diffs), *kept* what layers keep for backward "
             "beyond them (a copy of x, or in place a one-byte mask); *in place* runs every layer that can "
             f"in place. PReLU slopes {SLOPE}; tests/test_relu_forms.py checks that the forms of a group "
             "give the same outputs and input and slope gradients.", ""]
    for shape, rows in results.items():
        lines += [f"### x of shape {'x'.join(map(str, shape))}", "",
                  "| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
        group = None
        for row in rows:
            if row["group"] != group:
                group = row["group"]
                lines.append(f"| **{group}** |" + " |" * (len(HEADER) - 1))
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells(row)) + " |")
        lines.append("")
    notes = sorted({f"{row['form']}: {row['note']}"
                    for rows in results.values() for row in rows if row["note"]})
    lines += [f"- {note}" for note in notes]  # "|x|" needs no escape outside a table
    lines += ["- A blob is 4 B per element: PReLU holds x and y (8), in place x alone (4); each composed "
              "form holds its intermediate blobs besides, for backward. The Keras form learns a slope per "
              "element of a sample (C x H x W of them) instead of one per channel.", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs (a smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    backend.set_mode_cpu()
    print(machine())
    results = {}
    for shape in (BLOB, MATRIX):
        shape = QUICK_SHAPES[shape] if args.quick else shape
        print(f"\nx of shape {'x'.join(map(str, shape))}")
        print(format_line(HEADER))
        results[shape] = measure(shape, args.quick)
    if not args.no_write:
        command = "python benchmarks/relu_forms.py" + (" --quick" if args.quick else "")
        update_section(Path(args.output), "benchmarks/relu_forms.py", markdown(results, command))
        print(f"\nupdated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
