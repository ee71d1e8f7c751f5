"""Every layer module registers its class with minicaffe.layer.LAYERS when imported."""

from . import input, relu, split  # noqa: F401
