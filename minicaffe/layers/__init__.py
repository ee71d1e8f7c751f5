"""Layer implementations, one module per layer type (plus its kernels/NAME.cu).

Every module here is imported so that its @register'ed classes become available to prototxt `type:`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    """pycaffe's ``from caffe import layers as L; L.Convolution(...)``: a CamelCase attribute of this
    package is a NetSpec layer function (the modules here are lower case, so nothing is shadowed)."""
    if name[:1].isupper():
        from ..net_spec import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
