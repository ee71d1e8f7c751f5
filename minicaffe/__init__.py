"""minicaffe: a Caffe-compatible layer framework whose layers run hand-written CUDA kernels on the GPU
and the same kernel sources compiled for the CPU.

pycaffe habits work: ``import minicaffe as caffe; net = caffe.Net(model, weights, caffe.TEST)``,
``caffe.io.Transformer`` (minicaffe/io.py), ``caffe.NetSpec`` and ``from caffe import layers as L, params
as P`` (minicaffe/net_spec.py).
"""

from __future__ import annotations

from . import io
from . import layers as _layers  # noqa: F401  (registers every layer type)
from .backend import set_device, set_mode_cpu, set_mode_gpu
from .blob import Blob
from .classifier import Classifier, Detector
from .layer import LAYERS, TEST, TRAIN, Layer, LayerError, register
from .net import Net, NetError
from .net_spec import NetSpec, layer_type_list, params, to_proto
from .onnx_export import export_onnx
from .rng import set_random_seed
from .solver import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    Solver,
    get_solver,
)

__version__ = "0.1.0"

__all__ = [
    "Blob", "LAYERS", "Layer", "LayerError", "Net", "NetError", "TEST", "TRAIN", "register",
    "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed",
    "io", "NetSpec", "params", "to_proto", "layer_type_list",  # caffe.layers.<Type>: layers/__init__.py
    "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
    "get_solver", "Classifier", "Detector", "export_onnx",
]
