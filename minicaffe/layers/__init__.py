"""Layer implementations, one module per layer type (plus its kernels/NAME.cu).

Every module here is imported so that its @register'ed classes become available to prototxt `type:`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
