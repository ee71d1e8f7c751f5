"""pycaffe's Python net specification: write nets in Python, get a NetParameter (or prototxt).

    from minicaffe import layers as L, params as P
    n = NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[1, 3, 8, 8]), dict(dim=[1])], ntop=2)
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, weight_filler=dict(type="xavier"))
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    print(n.to_proto())

The rules are pycaffe's (python/caffe/net_spec.py), so scripts written for it build the same prototxt:
  * ``L.<Type>(*bottoms, **kwargs)`` makes a layer of type <Type>; it returns its top (or a tuple of
    tops for ``ntop`` > 1, or the layer itself for ``ntop=0``).
  * keyword arguments: ``ntop`` (number of tops, default 1) and ``in_place`` (top = first bottom) are
    consumed by the builder; a name ending in ``param`` (``param=[...]``, ``transform_param=...``)
    goes to the LayerParameter field of that name; any other name goes to the layer type's own
    ``<type>_param`` message when that message has the field, else to the LayerParameter itself
    (``include``, ``loss_weight``, ``name``, ``propagate_down``, ...).
  * values: a dict fills a sub-message, a list of dicts adds repeated sub-messages, a list (or a
    single value for a repeated field) extends a repeated field, anything else is assigned.
  * names: a NetSpec attribute names the top assigned to it, and a layer takes the name of its
    first top's attribute; unnamed tops and layers get ``<Type><k>`` (``Convolution1``...).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from functools import lru_cache
from typing import Any

from google.protobuf import text_format

from .proto import caffe_pb2


class NetSpecError(ValueError):
    """A NetSpec argument that fits no field of the layer."""


@lru_cache(maxsize=1)
def param_name_dict() -> dict[str, str]:
    """Layer type -> the stem of its LayerParameter field: {'Convolution': 'convolution', ...}.

    Read from the schema: each ``<stem>_param`` field's message type is ``<Type>Parameter``."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[: -len("Parameter")]] = field.name[: -len("_param")]
    # Caffe's Deconvolution reads convolution_param; pycaffe has no entry for it, so its users had to
    # write convolution_param=dict(...). Both spellings work here.
    names.setdefault("Deconvolution", "convolution")
    return names


def _scalar(descriptor, value: Any) -> Any:
    """Enum fields also take their value's name (pool="MAX"), which protobuf alone refuses."""
    if descriptor.enum_type is not None and isinstance(value, str):
        try:
            return descriptor.enum_type.values_by_name[value].number
        except KeyError:
            known = ", ".join(descriptor.enum_type.values_by_name)
            raise ValueError(f"'{value}' is not one of {known}") from None
    return value


def assign_proto(proto, name: str, value: Any) -> None:
    """Set field `name` of message `proto` from a Python value (dicts, lists, scalars), as pycaffe."""
    if name not in proto.DESCRIPTOR.fields_by_name:
        raise AttributeError(f"{proto.DESCRIPTOR.name} has no field '{name}'")
    descriptor = proto.DESCRIPTOR.fields_by_name[name]
    field = getattr(proto, name)
    repeated = descriptor.is_repeated
    if repeated and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, dict):
                message = field.add()
                for key, sub in item.items():
                    assign_proto(message, key, sub)
            elif hasattr(item, "DESCRIPTOR"):
                field.add().CopyFrom(item)
            else:
                field.append(_scalar(descriptor, item))
    elif isinstance(value, dict):
        for key, sub in value.items():
            assign_proto(field, key, sub)
    elif hasattr(value, "DESCRIPTOR"):
        field.CopyFrom(value)
    else:
        setattr(proto, name, _scalar(descriptor, value))


class Top:
    """One output of a layer function; the value a NetSpec attribute holds."""

    def __init__(self, fn: Function, n: int):
        self.fn, self.n = fn, n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The net needed to compute this top (intermediate names generated)."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """A layer not yet turned into a LayerParameter: type, bottoms (Tops) and keyword arguments."""

    def __init__(self, type_name: str, inputs: tuple, params: dict[str, Any]):
        self.type_name = type_name
        for index, top in enumerate(inputs):
            if not isinstance(top, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (it is a {type(top).__name__}); "
                                "pass the result of another layer function")
        self.inputs = tuple(inputs)
        params = dict(params)
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        if self.in_place and not self.inputs:
            raise TypeError(f"{type_name}: in_place=True needs a bottom")
        self.params = params
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _name(self, names, autonames) -> str:
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottoms = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottoms.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        stem = param_name_dict().get(self.type_name)
        for key, value in self.params.items():
            self._assign(layer, stem, key, value)
        layers[self] = layer

    def _assign(self, layer, stem: str | None, key: str, value: Any) -> None:
        where = f"L.{self.type_name}({key}=...)"
        if key.endswith("param"):
            targets = [layer]
        else:
            targets = [getattr(layer, stem + "_param")] if stem else []
            targets.append(layer)
        for target in targets:
            if key in target.DESCRIPTOR.fields_by_name:
                try:
                    assign_proto(target, key, value)
                except (AttributeError, TypeError, ValueError) as error:
                    raise NetSpecError(f"{where}: {error}") from None
                return
        places = " or ".join(t.DESCRIPTOR.name for t in targets)
        raise NetSpecError(f"{where}: no field '{key}' in {places}")


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """The NetParameter computing `tops`, every blob and layer named automatically."""
    layers: OrderedDict = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops: ``n.conv1 = L.Convolution(n.data, ...)``; ``n.to_proto()`` -> NetParameter."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Top) -> None:
        if not isinstance(value, Top):
            raise TypeError(f"NetSpec.{name}: expected a layer's top, got {type(value).__name__}")
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top named '{name}'") from None

    __setitem__ = __setattr__

    def __getitem__(self, name: str) -> Top:
        return self.__getattr__(name)

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tops

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list[Top]:
        return list(self.tops.values())

    def to_proto(self) -> caffe_pb2.NetParameter:
        names = {top: name for name, top in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net

    def to_prototxt(self) -> str:
        """The prototxt text (``str(n.to_proto())`` gives the same in pycaffe)."""
        return text_format.MessageToString(self.to_proto())


class Layers:
    """``layers.Convolution(...)``: any attribute is a layer type (checked when the net is built)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer_fn(*bottoms: Top, **kwargs):
            fn = Function(type_name, bottoms, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = type_name
        return layer_fn


class Parameters:
    """``params.Pooling.MAX`` -> caffe_pb2.PoolingParameter.MAX (enum values of the <Type>Parameter)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        try:
            message = getattr(caffe_pb2, type_name + "Parameter")
        except AttributeError:
            raise AttributeError(f"caffe.proto has no message {type_name}Parameter") from None

        class Param:
            def __getattr__(self, name: str):
                return getattr(message, name)

        return Param()


layers = Layers()
params = Parameters()


def layer_type_list() -> list[str]:
    """pycaffe's caffe.layer_type_list(): every registered layer type, sorted."""
    from .layer import LAYERS

    return sorted(LAYERS)


__all__ = ["NetSpec", "NetSpecError", "Top", "Function", "layers", "params", "to_proto", "assign_proto",
           "param_name_dict", "layer_type_list"]
