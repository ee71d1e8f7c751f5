"""Python: a layer written in Python, pycaffe's ``type: "Python"``.

``python_param { module: "pyloss" layer: "EuclideanLossLayer" param_str: "..." }`` imports `module` by
name from the Python path (``sys.path``: PYTHONPATH, and the folder of the script that is running) and
makes an object of its class `layer`, a subclass of ``minicaffe.Layer`` (``caffe.Layer`` after ``import
minicaffe as caffe``). The module is never a file path: a prototxt names code to import, not a file to
run. As with Caffe's tool (whose embedded interpreter does not add it either), the `minicaffe` command
does not add the current folder to the path: put the module's folder on PYTHONPATH.

A prototxt with a Python layer runs that module's code, as in Caffe: only load prototxts you trust.

The class has pycaffe's methods: ``setup(bottom, top)`` (once; ``self.param_str`` and ``self.phase`` are
set before it), ``reshape(bottom, top)``, ``forward(bottom, top)`` and ``backward(top, propagate_down,
bottom)``; it computes on host numpy arrays, ``bottom[i].data`` / ``.diff`` (in GPU mode too, as pycaffe:
the blobs copy between host and device when the next layer reads them). ``self.blobs.add_blob(*shape)``
adds a learned parameter blob (zeros), updated by the solver and saved in .caffemodel and snapshots.
A Python layer is no loss unless its prototxt gives a ``loss_weight``, as in Caffe.

The net runs a PythonLayer (the Layer machinery: blob counts, loss weights, errors that name the layer)
that calls the user's object for those four methods; its other methods and attributes are reached
through the PythonLayer too (pycaffe's ``net.layers[i]`` is the user's object).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from ..blob import Blob
from ..layer import TEST, Layer, LayerError, register

METHODS = ("setup", "reshape", "forward", "backward")


class BlobVec(list):
    """A layer's parameter blobs as pycaffe's ``Layer.blobs``: a list with ``add_blob(*shape)``."""

    def __init__(self, dtype: np.dtype, blobs: Sequence[Blob] = ()):
        super().__init__(blobs)
        self.dtype = dtype

    def add_blob(self, *shape: int) -> None:
        """Append a parameter blob of `shape`, filled with zeros (pycaffe's BlobVec.add_blob)."""
        self.append(Blob(shape, self.dtype))


def defines(cls: type, method: str) -> bool:
    """Whether `cls` (a Layer subclass) has its own `method`, not minicaffe.Layer's."""
    return getattr(cls, method) is not getattr(Layer, method)


@register("Python")
class PythonLayer(Layer):
    """Runs the user's object `self.python` (see the module docstring), sharing its blobs with it."""

    def __init__(self, param, phase: int = TEST, dtype=np.float32):
        super().__init__(param, phase, dtype)
        self.module_name, self.class_name = param.python_param.module, param.python_param.layer
        self.blobs = BlobVec(self.dtype, self.blobs)
        cls = self.load_class()
        try:
            self.python = cls(param)  # as pycaffe's layer factory makes it
        except Exception as error:
            self.fail(f"{self.class_name}(layer parameter) raised {type(error).__name__}: {error}")
        self.python.phase, self.python.dtype, self.python.blobs = self.phase, self.dtype, self.blobs
        self.python.param_str = param.python_param.param_str

    def load_class(self) -> type[Layer]:
        module_name, class_name = self.module_name, self.class_name
        if not module_name or not class_name:
            self.fail("python_param needs a module (a module name on the Python path) and a layer (the "
                      "name of a class in it)")
        if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
            self.fail(f"python_param.module '{module_name}' is a file path; give the name of a module on "
                      "the Python path (its folder on PYTHONPATH), e.g. module: \"pyloss\" for pyloss.py")
        if not all(part.isidentifier() for part in module_name.split(".")):
            self.fail(f"python_param.module '{module_name}' is not a module name")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name or module_name.startswith(f"{error.name}."):  # it, or its package
                self.fail(f"no module '{module_name}' on the Python path: put its folder on PYTHONPATH")
            self.fail(f"importing module '{module_name}' failed: {type(error).__name__}: {error}")
        except Exception as error:  # a syntax error, or an exception of the module's own code
            self.fail(f"importing module '{module_name}' failed: {type(error).__name__}: {error}")
        cls = getattr(module, class_name, None)
        where = getattr(module, "__file__", None) or module_name
        if cls is None:
            self.fail(f"module '{module_name}' ({where}) has no class '{class_name}'")
        if not isinstance(cls, type) or not issubclass(cls, Layer):
            self.fail(f"'{class_name}' of module '{module_name}' ({where}) is not a subclass of "
                      "minicaffe.Layer (caffe.Layer after `import minicaffe as caffe`)")
        missing = [name for name in ("reshape", "forward") if not defines(cls, name)]
        if missing:
            self.fail(f"class '{class_name}' defines no {' and no '.join(missing)} (a Python layer defines "
                      f"{', '.join(METHODS)}, as in pycaffe)")
        return cls

    def call(self, method: str, *args) -> None:
        """The user's `method`; any exception it raises becomes a LayerError naming layer, module and class,
        with the user's message (the traceback stays chained, for --debug)."""
        try:
            getattr(self.python, method)(*args)
        except Exception as error:
            self.fail(f"{method} raised {type(error).__name__}: {error}")

    def fail(self, message: str) -> NoReturn:
        raise LayerError(f"layer '{self.name}' (Python, module '{self.module_name}', class "
                         f"'{self.class_name}'): {message}")

    def layer_setup(self, bottom, top):
        if defines(type(self.python), "setup"):  # Layer's own setup is the machinery that calls this
            self.call("setup", bottom, top)

    def reshape(self, bottom, top):
        self.call("reshape", bottom, top)

    def forward(self, bottom, top):
        self.call("forward", bottom, top)

    def backward(self, top, propagate_down, bottom):
        if defines(type(self.python), "backward"):
            self.call("backward", top, propagate_down, bottom)
        elif any(propagate_down) or any(self.param_propagate_down):
            self.fail("the net needs its gradients, but its class defines no backward")

    def __getattr__(self, name: str):
        """What the PythonLayer itself lacks is the user's object's: ``net.layers[i].my_method()`` as in
        pycaffe. (Only reached for names that are not found the ordinary way.)"""
        python = self.__dict__.get("python")
        if python is None:
            raise AttributeError(name)
        return getattr(python, name)
