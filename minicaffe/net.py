"""Net: a directed acyclic graph of layers built from a caffe.NetParameter, as Caffe's Net.

Building follows Caffe's Net::Init: upgrade legacy fields, keep the layers whose include/exclude rules
match the net state, insert Split layers where one top feeds several bottoms (so gradients are summed),
set up each layer in order, connect shared parameters, and work out which layers need backward.
The Python surface is pycaffe's: ``net.blobs``, ``net.params``, ``net.forward(**inputs)``, ...
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

import numpy as np

from . import backend, hdf5, io, log, upgrade
from .blob import Blob
from .layer import TEST, TRAIN, Layer, LayerError, create_layer
from .proto import caffe_pb2

# Whether a BatchNorm with global statistics and the Scale after it run as one pass (see
# Net._fusable_batch_norm_scales); read when a Net is built.
FUSE_BATCH_NORM_SCALE = True


class NetError(ValueError):
    """A net that cannot be built or run; the message names the net, layer and blob."""


class LearnableParam:
    """A parameter blob that the solver updates, with its ParamSpec multipliers."""

    __slots__ = ("blob", "lr_mult", "decay_mult", "layer_name", "index")

    def __init__(self, blob: Blob, lr_mult: float, decay_mult: float, layer_name: str, index: int):
        self.blob, self.lr_mult, self.decay_mult = blob, lr_mult, decay_mult
        self.layer_name, self.index = layer_name, index


class ByLayer(list):
    """A per-layer list (``net.top_names[i]``) that pycaffe code can also read as its dict by layer name:
    ``net.top_names['conv1']``, ``'conv1' in net.top_names``, ``.keys()``, ``.values()``, ``.items()``.
    (Iterating gives the values, as a list does; pycaffe's OrderedDict would give the names.)
    `layer_ids` maps each layer name to its position (shared with the Net, so lookups take O(1))."""

    def __init__(self, layer_ids: dict[str, int]):
        super().__init__()
        self._ids = layer_ids

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                key = self._ids[key]
            except KeyError:
                raise KeyError(key) from None
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return key in self._ids if isinstance(key, str) else super().__contains__(key)

    def get(self, key: str, default=None):
        return self[key] if key in self._ids else default

    def keys(self) -> list[str]:
        return list(self._ids)

    def values(self) -> list:
        return list(self)

    def items(self) -> list:
        return list(zip(self._ids, self))


# -- net state filtering (Caffe's FilterNet / StateMeetsRule) -------------------------------------

def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def filter_net(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState) -> caffe_pb2.NetParameter:
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise NetError(f"layer '{layer.name}': specify include or exclude rules, not both")
        included = not layer.include
        if any(state_meets_rule(state, rule) for rule in layer.exclude):
            included = False
        if any(state_meets_rule(state, rule) for rule in layer.include):
            included = True
        if included:
            filtered.layer.add().CopyFrom(layer)
    return filtered


# -- automatic splits (Caffe's InsertSplits) -------------------------------------------------------

def split_layer_name(blob: str, layer: str, index: int) -> str:
    return f"{blob}_{layer}_{index}_split"


def insert_splits(net: caffe_pb2.NetParameter) -> tuple[caffe_pb2.NetParameter, dict[str, str]]:
    """Where one top feeds several bottoms (or feeds one and is also a loss), route it through a Split.

    Returns the new net and {split top name: the blob it copies}."""
    producer: dict[str, tuple[int, int]] = {}  # blob name -> (layer index, top index) of latest writer
    consumers: dict[tuple[int, int], int] = {}
    bottom_source: dict[tuple[int, int], tuple[int, int]] = {}
    for i, layer in enumerate(net.layer):
        for j, name in enumerate(layer.bottom):
            if name not in producer:
                raise NetError(f"layer '{layer.name}' ({layer.type}): unknown bottom blob '{name}'")
            source = producer[name]
            bottom_source[(i, j)] = source
            consumers[source] = consumers.get(source, 0) + 1
        for j, name in enumerate(layer.top):
            producer[name] = (i, j)
    loss_weight = {}
    for i, layer in enumerate(net.layer):
        for j in range(len(layer.top)):
            if j < len(layer.loss_weight) and layer.loss_weight[j] != 0:
                loss_weight[(i, j)] = layer.loss_weight[j]

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    next_split_top: dict[tuple[int, int], int] = {}
    split_sources: dict[str, str] = {}
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j in range(len(layer.bottom)):
            source = bottom_source[(i, j)]
            if source in next_split_top:
                k = next_split_top[source]
                next_split_top[source] = k + 1
                src_layer = net.layer[source[0]]
                new.bottom[j] = split_layer_name(layer.bottom[j], src_layer.name, source[1]) + f"_{k}"
        for j, top in enumerate(layer.top):
            uses = consumers.get((i, j), 0)
            weight = loss_weight.get((i, j), 0.0)
            if uses > 1 or (uses >= 1 and weight):
                split = out.layer.add(name=split_layer_name(top, layer.name, j), type="Split")
                split.bottom.append(top)
                split.top.extend(split_layer_name(top, layer.name, j) + f"_{k}" for k in range(uses))
                if weight:
                    # The loss moves to an extra split top so that the producer still gets its gradient.
                    new.loss_weight[j] = 0
                    split.top.append(split_layer_name(top, layer.name, j) + f"_{uses}")
                    split.loss_weight.extend([0.0] * uses + [weight])
                split_sources.update((split_top, top) for split_top in split.top)
                next_split_top[(i, j)] = 0
    return out, split_sources


# -- the net ---------------------------------------------------------------------------------------

class Net:
    """A Caffe net. ``Net(model, phase)``, ``Net(model, weights, phase)`` or ``Net(model, phase,
    weights=...)`` as in pycaffe; `model` is a prototxt path or a caffe.NetParameter."""

    def __init__(self, model, *args, weights: str | None = None, phase: int | None = None,
                 level: int = 0, stages: Iterable[str] = (), dtype=np.float32):
        rest = list(args)
        if rest and isinstance(rest[0], (str, Path)):
            weights = rest.pop(0)
        if rest:
            phase = rest.pop(0)
        if rest:
            raise TypeError("Net(model, [weights,] phase): too many positional arguments")
        if phase is None:
            raise TypeError("Net needs a phase: minicaffe.TRAIN or minicaffe.TEST")
        if isinstance(model, (str, Path)):
            self.source = str(model)
            param = io.read_net_param(model)
        else:
            self.source = "<NetParameter>"
            param = caffe_pb2.NetParameter()
            param.CopyFrom(model)
            param = io.upgrade_net(param, self.source)
        self.dtype = np.dtype(dtype)
        self.phase = phase
        state = caffe_pb2.NetState()
        state.CopyFrom(param.state)
        state.phase = phase
        state.level = level or state.level
        state.stage.extend(s for s in stages if s not in state.stage)
        self.param = param
        self.name = param.name
        self._init(*insert_splits(filter_net(param, state)))
        if weights is not None:
            self.copy_from(weights)

    # -- building ------------------------------------------------------------------------------
    def _init(self, param: caffe_pb2.NetParameter, split_sources: dict[str, str]) -> None:
        """Build from `param` as insert_splits returned it; `split_sources` maps its split tops to the
        blobs they copy."""
        self.layers: list[Layer] = []
        self._layer_names: list[str] = []
        self._layer_ids: dict[str, int] = {}  # name -> position: lookups by name must not scan the list
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_names: ByLayer = ByLayer(self._layer_ids)
        self.top_names: ByLayer = ByLayer(self._layer_ids)
        self.inputs: list[str] = []
        self.learnable_params: list[LearnableParam] = []
        self._param_owner: dict[str, tuple[Blob, caffe_pb2.ParamSpec]] = {}
        self._shared_params: set[tuple[str, int]] = set()  # (layer, blob index) of a non-owner
        # Counts full forward passes; stochastic layers (Dropout, shuffled data) key their random
        # numbers by it. The solver sets it from the iteration so that a resumed run replays them.
        self.forward_count = 0
        # Called as callback(i) after layer i's step of backward_range (also when it needs no backward):
        # from there on, the gradients of the parameters that no earlier layer uses are final
        # (minicaffe.parallel starts exchanging them while the earlier layers run backward).
        self.on_layer_backward: list[Callable[[int], None]] = []
        blob_need_backward: dict[str, bool] = {}
        available: dict[str, None] = {}  # produced and not yet consumed: the net's outputs at the end
        self._input_blobs: dict[str, Blob] = {}
        self.layer_need_backward: list[bool] = []
        self.bottom_need_backward: list[list[bool]] = []

        for layer_param in param.layer:
            layer_param.phase = self.phase
            where = f"{self.source}: layer '{layer_param.name}' ({layer_param.type})"
            if layer_param.name in self._layer_ids:
                raise NetError(f"{where}: duplicate layer name")
            if layer_param.propagate_down and len(layer_param.propagate_down) != len(layer_param.bottom):
                raise NetError(f"{where}: propagate_down has {len(layer_param.propagate_down)} values for "
                               f"{len(layer_param.bottom)} bottoms")
            try:
                layer = create_layer(layer_param, self.phase, self.dtype)
            except ValueError as error:  # LayerError, or a bad blob given in the prototxt
                # `from error`: --debug shows the cause too, e.g. a Python layer's own traceback
                raise NetError(f"{self.source}: {error}") from error
            bottoms, tops = [], []
            for name in layer_param.bottom:
                if name not in self.blobs:
                    raise NetError(f"{where}: unknown bottom blob '{name}'")
                bottoms.append(self.blobs[name])
                available.pop(name, None)
            for name in layer_param.top:
                available[name] = None
            for j, name in enumerate(layer_param.top):
                bottom_j = layer_param.bottom[j] if j < len(layer_param.bottom) else None
                if bottom_j == name:
                    tops.append(self.blobs[name])  # in place
                    continue
                # An in-place layer whose bottom was routed through an automatic Split writes a new
                # blob under the old name (Caffe refuses such nets; later layers expect this blob).
                rebinding = split_sources.get(bottom_j) == name
                if name in self.blobs and not rebinding:
                    raise NetError(f"{where}: top blob '{name}' is produced by two layers")
                blob = Blob((), self.dtype)
                self.blobs[name] = blob
                tops.append(blob)
                if layer_param.type == "Input":
                    self.inputs.append(name)
                    self._input_blobs[name] = blob
            try:
                layer.setup(bottoms, tops)
            except LayerError as error:
                raise NetError(f"{self.source}: {error}") from error
            except (ValueError, IndexError) as error:
                raise NetError(f"{where}: {error}; bottom shapes "
                               f"{[list(b.shape) for b in bottoms]}") from None
            self._layer_ids[layer_param.name] = len(self.layers)
            self.layers.append(layer)
            self._layer_names.append(layer_param.name)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_names.append(list(layer_param.bottom))
            self.top_names.append(list(layer_param.top))

            # Parameters: multipliers, sharing by name, and whether each gets a gradient.
            param_need_backward = False
            for index in range(len(layer.blobs)):
                spec = layer_param.param[index] if index < len(layer_param.param) else caffe_pb2.ParamSpec()
                learns = spec.lr_mult != 0
                param_need_backward |= learns
                layer.param_propagate_down[index] = learns
                self._append_param(layer, index, spec, where)

            # Backward needs (the first half of Caffe's logic: forward propagation of need).
            need = param_need_backward
            bottom_need = []
            for j, name in enumerate(layer_param.bottom):
                wanted = blob_need_backward.get(name, False)
                if layer_param.propagate_down:
                    wanted = wanted and layer_param.propagate_down[j]
                bottom_need.append(wanted)
                need |= wanted
            for name in layer_param.top:
                blob_need_backward[name] = need
            self.layer_need_backward.append(need)
            self.bottom_need_backward.append(bottom_need)

        self.outputs = list(available)
        self._prune_backward(param.force_backward)
        self._mark_surviving_tops()
        self._batch_norm_scales = self._fusable_batch_norm_scales()
        self.params: OrderedDict[str, list[Blob]] = OrderedDict(
            (name, layer.blobs) for name, layer in zip(self._layer_names, self.layers) if layer.blobs
        )

    def _mark_surviving_tops(self) -> None:
        """Set each layer's top_data_survives: no later layer writes the memory of its top[0], so its
        output is still there at backward time (then Layer.lean_keep may keep less than a copy of x).

        Memory, not blobs: Split, Flatten and Reshape tops share their bottom's data (they write nothing),
        so a later in-place layer on such a top writes this layer's output too. A layer writes the memory
        of its in-place tops and of the tops that share no bottom's data."""
        last_writer: dict[int, int] = {}
        for i, (bottoms, tops) in enumerate(zip(self.bottom_vecs, self.top_vecs)):
            bottom_memory = {id(blob._data) for blob in bottoms}
            for blob in tops:
                if any(blob is b for b in bottoms) or id(blob._data) not in bottom_memory:
                    last_writer[id(blob._data)] = i
        for i, layer in enumerate(self.layers):
            tops = self.top_vecs[i]
            layer.top_data_survives = bool(tops) and last_writer.get(id(tops[0]._data)) == i

    def _fusable_batch_norm_scales(self) -> list[tuple[int, int]]:
        """(i, i + 1) for each BatchNorm with global statistics, in place, followed by a Scale with a bias
        term in place on the same blob, one scale per channel (the Caffe way to write a torch.nn
        BatchNorm2d). forward_range and backward_range run such a pair in one pass over the blob each way
        when they run both layers (ScaleLayer.normalizing / propagating_for): the same bits as the two
        layers apart, 7 instead of 11 blob-sized reads and writes. (With FUSE_BATCH_NORM_SCALE False,
        never: for tests and measurements.)"""
        pairs = []
        for i in range(len(self.layers) - 1) if FUSE_BATCH_NORM_SCALE else ():
            bn, scale = self.layers[i], self.layers[i + 1]
            if bn.type != "BatchNorm" or scale.type != "Scale" or not bn.use_global_stats:
                continue
            blob = self.top_vecs[i][0]
            in_place = (self.bottom_vecs[i] == [blob] and self.top_vecs[i] == [blob]
                        and self.bottom_vecs[i + 1] == [blob] and self.top_vecs[i + 1] == [blob])
            if (in_place and blob.num_axes >= 2 and scale.bias_layer is not None
                    and scale.dims == bn._dims(blob) and not any(bn.loss_weights + scale.loss_weights)):
                pairs.append((i, i + 1))
        return pairs

    def _append_param(self, layer: Layer, index: int, spec, where: str) -> None:
        if not spec.name:
            self.learnable_params.append(
                LearnableParam(layer.blobs[index], spec.lr_mult, spec.decay_mult, layer.name, index))
            return
        if spec.name not in self._param_owner:
            self._param_owner[spec.name] = (layer.blobs[index], spec)
            self.learnable_params.append(
                LearnableParam(layer.blobs[index], spec.lr_mult, spec.decay_mult, layer.name, index))
            return
        owner, owner_spec = self._param_owner[spec.name]
        self._shared_params.add((layer.name, index))
        mine = layer.blobs[index]
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if mine.count != owner.count:
                raise NetError(f"{where}: shared parameter '{spec.name}' has {mine.count} values, "
                               f"its owner {owner.count}")
            mine.share_data(owner)
            mine.share_diff(owner)
        else:
            if mine.shape != owner.shape:
                raise NetError(f"{where}: shared parameter '{spec.name}' has shape {list(mine.shape)}, its "
                               f"owner {list(owner.shape)} (share_mode: PERMISSIVE matches by count)")
            layer.blobs[index] = owner
        if spec.HasField("lr_mult") and spec.lr_mult != owner_spec.lr_mult:
            raise NetError(f"{where}: shared parameter '{spec.name}' has lr_mult {spec.lr_mult}, "
                           f"its owner {owner_spec.lr_mult}")

    def _prune_backward(self, force_backward: bool) -> None:
        """Skip backward for layers that do not lead to a loss (Caffe's second pass), or force it."""
        under_loss: set[str] = set()
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            contributes = any(w != 0 for w in layer.loss_weights) or any(
                name in under_loss for name in self.top_names[i])
            if not contributes and not force_backward:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_names[i])
            if contributes:
                under_loss.update(self.bottom_names[i])
        if force_backward:
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                self.bottom_need_backward[i] = [
                    layer.allow_force_backward(j) and (not layer.param.propagate_down
                                                       or layer.param.propagate_down[j])
                    for j in range(len(self.bottom_names[i]))]
                layer.param_propagate_down = [True] * len(layer.blobs)

    # -- running -------------------------------------------------------------------------------
    def _layer_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        try:
            return self._layer_ids[name]
        except KeyError:
            raise NetError(f"net '{self.name}' has no layer '{name}'") from None

    def reshape(self) -> None:
        for layer, bottoms, tops in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottoms, tops)

    def forward_range(self, start: int, end: int) -> float:
        self._fuse_forward(start, end)  # a fused pair only when both run (_fusable_batch_norm_scales)
        loss = 0.0
        try:
            for i in range(start, end + 1):
                layer = self.layers[i]
                layer.forward_index = self.forward_count
                try:
                    loss += layer.run_forward(self.bottom_vecs[i], self.top_vecs[i])
                except LayerError as error:
                    raise NetError(str(error)) from error
        finally:
            self._fuse_forward(0, -1)  # no pair outlives the range: a layer run alone runs whole
        if end == len(self.layers) - 1:
            self.forward_count += 1
        return loss

    def backward_range(self, start: int, end: int) -> None:
        self._fuse_backward(start, end)
        try:
            for i in range(start, end - 1, -1):
                if self.layer_need_backward[i]:
                    self.layers[i].run_backward(self.top_vecs[i], self.bottom_need_backward[i],
                                                self.bottom_vecs[i])
                for callback in self.on_layer_backward:
                    callback(i)
        finally:
            self._fuse_backward(-1, 0)

    def _fuse_forward(self, start: int, end: int) -> None:
        """Fuse each BatchNorm + Scale pair whose two layers both lie in [start, end]; apart the others."""
        for i, j in self._batch_norm_scales:
            both = start <= i and j <= end
            self.layers[i].scale_normalizes = both
            self.layers[j].normalizing = self.layers[i] if both else None

    def _fuse_backward(self, start: int, end: int) -> None:
        """The same for a backward from start down to end, for the pairs whose input gradient is needed."""
        for i, j in self._batch_norm_scales:
            both = (end <= i and j <= start and self.layer_need_backward[i]
                    and self.bottom_need_backward[i][0] and self.bottom_need_backward[j][0])
            self.layers[i].scale_propagates = both
            self.layers[j].propagating_for = self.layers[i] if both else None

    def forward(self, blobs: Iterable[str] | None = None, start: str | None = None,
                end: str | None = None, **inputs) -> dict[str, np.ndarray]:
        """pycaffe's forward: set inputs by name, run, return {output name: data}."""
        for name, value in inputs.items():
            blob = self._input_blobs.get(name) or self.blobs.get(name)
            if blob is None:
                raise NetError(f"net '{self.name}': forward got unknown blob '{name}'")
            value = np.asarray(value)
            if value.shape != blob.shape:
                blob.reshape(value.shape)
            blob.data[...] = value
        self.forward_range(self._layer_index(start, 0), self._layer_index(end, len(self.layers) - 1))
        names = list(self.outputs if end is None else self.top_names[self._layer_index(end, 0)])
        names += [b for b in (blobs or []) if b not in names]
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs: Iterable[str] | None = None, start: str | None = None,
                 end: str | None = None, **top_diffs) -> dict[str, np.ndarray]:
        """pycaffe's backward: optionally set output diffs by name, run, return {input name: diff}."""
        for name, value in top_diffs.items():
            if name not in self.blobs:
                raise NetError(f"net '{self.name}': backward got unknown blob '{name}'")
            self.blobs[name].diff[...] = value
        self.backward_range(self._layer_index(start, len(self.layers) - 1), self._layer_index(end, 0))
        names = list(self.inputs if end is None else self.bottom_names[self._layer_index(end, 0)])
        names += [b for b in (diffs or []) if b not in names]
        return {name: self.blobs[name].diff for name in names}

    def forward_backward(self) -> float:
        loss = self.forward_range(0, len(self.layers) - 1)
        self.backward_range(len(self.layers) - 1, 0)
        return loss

    def clear_param_diffs(self) -> None:
        for p in self.learnable_params:
            p.blob.mutable_diff()[...] = 0

    # -- weights -------------------------------------------------------------------------------
    def copy_from(self, weights) -> None:
        """Load parameters from a .caffemodel (binary NetParameter, V2 or V1): layers are matched by
        name, and layers the net does not have are skipped and logged, as in Caffe. Unlike Caffe, a
        file none of whose layers the net has is an error (it would load nothing, silently). A name ending
        in ".h5" is Caffe's HDF5 weights format (load_hdf5), as in Caffe's CopyTrainedLayersFrom."""
        path = Path(weights)
        if hdf5.is_hdf5(path):
            self.load_hdf5(path)
            return
        trained = io.upgrade_net(io.read_binary(path, caffe_pb2.NetParameter()), str(path))
        self.copy_from_proto(trained, str(path))

    def copy_from_proto(self, trained: caffe_pb2.NetParameter, source: str = "<NetParameter>") -> None:
        """Copy the blobs of `trained`'s layers into the net's layers of the same names (see copy_from);
        a NetError when no layer of `trained` is in the net. A legacy (V0, V1) `trained` is upgraded first."""
        if upgrade.net_upgrades(trained):
            trained = io.upgrade_net(caffe_pb2.NetParameter.FromString(trained.SerializeToString()), source)
        matched = 0
        for layer_param in trained.layer:
            index = self._layer_ids.get(layer_param.name)
            if index is None:
                log.info(f"Ignoring source layer {layer_param.name}", "net.cpp:1051")
                continue
            matched += 1
            layer = self.layers[index]
            if not layer_param.blobs:
                continue
            if len(layer_param.blobs) != len(layer.blobs):
                raise NetError(f"{source}: layer '{layer.name}' has {len(layer_param.blobs)} blobs in the "
                               f"file, the net's {layer.type} layer has {len(layer.blobs)}")
            for i, (blob, proto) in enumerate(zip(layer.blobs, layer_param.blobs)):
                try:
                    blob.from_proto(proto, reshape=False, where=f"{source}: layer '{layer.name}' blob {i}")
                except ValueError as error:
                    raise NetError(str(error)) from None
        if not matched:
            self._none_matched(source, [layer.name for layer in trained.layer])

    def _none_matched(self, source: str, names: list[str]) -> NoReturn:
        shown = ", ".join(f"'{io.excerpt(name)}'" for name in names[:5])
        shown += ", ..." if len(names) > 5 else ""
        raise NetError(f"{source}: none of its {len(names)} layers ({shown or 'none'}) is a layer of net "
                       f"'{self.name}': no weights would be loaded (is it the model of another net?)")

    def load_hdf5(self, path) -> None:
        """Load Caffe's HDF5 weights (/data/<layer>/<j>, see minicaffe.hdf5), matching layers by name as
        copy_from does. A blob missing from the file is an error unless it is shared with an earlier
        layer (Caffe writes a shared blob once, in its owner's group)."""
        source = str(path)
        with hdf5.open_read(path, "loading HDF5 weights") as handle:
            data = handle.get("data")
            if data is None or not hasattr(data, "keys"):
                raise NetError(f"{source}: has no 'data' group: not Caffe HDF5 weights")
            names = list(data.keys())
            matched = 0
            for name in names:
                index = self._layer_ids.get(name)
                if index is None:
                    log.info(f"Ignoring source layer {name}", "net.cpp:1092")
                    continue
                matched += 1
                layer, group = self.layers[index], data[name]
                if len(group) > len(layer.blobs):
                    raise NetError(f"{source}: layer '{name}' has {len(group)} blobs in the file, the net's "
                                   f"{layer.type} layer has {len(layer.blobs)}")
                for j, blob in enumerate(layer.blobs):
                    where = f"{source}: layer '{name}' blob {j}"
                    if str(j) not in group:
                        if (name, j) not in self._shared_params:
                            raise NetError(f"{where} is missing from the file")
                        continue  # shared: loaded with its owner
                    try:
                        values = hdf5.dataset(group, str(j), where)
                        blob.load(values.shape, values, reshape=False, where=where)
                    except ValueError as error:
                        raise NetError(str(error)) from None
        if not matched:
            self._none_matched(source, names)

    def _defined_layers(self) -> list[Layer]:
        """The layers of the net definition: all but the Split layers the Net inserted itself."""
        defined = {p.name for p in self.param.layer}
        return [layer for layer in self.layers if layer.param.type != "Split" or layer.name in defined]

    def to_proto(self, write_diff: bool = False) -> caffe_pb2.NetParameter:
        """The net's definition with its parameters (auto-inserted Split layers left out)."""
        out = caffe_pb2.NetParameter()
        out.CopyFrom(self.param)
        del out.layer[:]
        for layer in self._defined_layers():
            layer_param = out.layer.add()
            layer_param.CopyFrom(layer.param)
            del layer_param.blobs[:]
            for blob in layer.blobs:
                blob.to_proto(layer_param.blobs.add(), write_diff)
        return out

    def save(self, path) -> None:
        """Write a binary .caffemodel that Caffe can load."""
        io.write_binary(path, self.to_proto())

    def save_hdf5(self, path, write_diff: bool = False) -> None:
        """Write Caffe's HDF5 weights (pycaffe's save_hdf5, the .caffemodel.h5 of snapshot_format HDF5):
        a group per layer under /data (and /diff with write_diff), a dataset per blob it owns."""
        def fill(handle) -> None:
            for part in ("data", "diff") if write_diff else ("data",):
                top = handle.create_group(part)
                for layer in self._defined_layers():
                    group = top.create_group(layer.name)
                    for j, blob in enumerate(layer.blobs):
                        if (layer.name, j) not in self._shared_params:
                            group.create_dataset(str(j), data=np.asarray(getattr(blob, part)))

        hdf5.write(path, fill, "saving HDF5 weights")

    # -- pycaffe conveniences -----------------------------------------------------------------
    @property
    def layer_dict(self) -> OrderedDict[str, Layer]:
        return OrderedDict(zip(self._layer_names, self.layers))

    def set_input_arrays(self, data, labels) -> None:
        """pycaffe's set_input_arrays: (n, C, H, W) data and (n,) labels for the first MemoryData layer."""
        for layer in self.layers:
            if layer.type == "MemoryData":
                layer.set_input_arrays(data, labels)
                return
        raise NetError(f"net '{self.name}': set_input_arrays needs a MemoryData layer, the net has none")

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        """pycaffe's blob_loss_weights: each blob's loss weight (0 for blobs that are not losses)."""
        weights = OrderedDict((name, 0.0) for name in self.blobs)
        for layer, names in zip(self.layers, self.top_names):
            for name, weight in zip(names, layer.loss_weights):
                if weight:  # a later in-place layer without a loss does not clear it
                    weights[name] = float(weight)
        return weights

    def _batches(self, arrays: dict[str, np.ndarray]):
        """pycaffe's _batch: slices of the inputs by the net's batch size, the last one zero-padded."""
        if not arrays:
            yield {}
            return
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise NetError(f"net '{self.name}': inputs of different lengths {sorted(lengths)}")
        total = lengths.pop()
        batch = self.blobs[next(iter(arrays))].shape[0] if self.blobs[next(iter(arrays))].shape else 1
        for start in range(0, total, batch):
            chunk = {}
            for name, array in arrays.items():
                part = np.asarray(array[start:start + batch])
                if len(part) < batch:
                    pad = np.zeros((batch - len(part),) + part.shape[1:], part.dtype)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            yield chunk

    def forward_all(self, blobs: Iterable[str] | None = None, **inputs) -> dict[str, np.ndarray]:
        """pycaffe's forward_all: run the inputs through in batches of the net's batch size and
        return the outputs (and `blobs`) concatenated, padding dropped."""
        wanted = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        results: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        for chunk in self._batches({k: np.asarray(v) for k, v in inputs.items()}):
            outs = self.forward(blobs=wanted, **chunk)
            for name in wanted:
                results[name].append(np.array(outs[name]))
        total = len(next(iter(inputs.values()))) if inputs else None
        return {name: (np.concatenate(parts)[:total] if parts and parts[0].ndim else np.asarray(parts))
                for name, parts in results.items()}

    def forward_backward_all(self, blobs: Iterable[str] | None = None, diffs: Iterable[str] | None = None,
                             **kwargs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's forward_backward_all: inputs and output diffs by name, in batches; returns
        (outputs, input diffs), each concatenated with the padding dropped."""
        forward_in = {k: np.asarray(v) for k, v in kwargs.items() if k in self.inputs}
        backward_in = {k: np.asarray(v) for k, v in kwargs.items() if k not in self.inputs}
        out_names = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        diff_names = list(self.inputs) + [d for d in (diffs or []) if d not in self.inputs]
        outs: dict[str, list] = {name: [] for name in out_names}
        grads: dict[str, list] = {name: [] for name in diff_names}
        for f_chunk, b_chunk in zip(self._batches(forward_in), self._batches(backward_in)):
            batch_out = self.forward(blobs=out_names, **f_chunk)
            batch_diff = self.backward(diffs=diff_names, **b_chunk)
            for name in out_names:
                outs[name].append(np.array(batch_out[name]))
            for name in diff_names:
                grads[name].append(np.array(batch_diff[name]))
        total = len(next(iter(forward_in.values()))) if forward_in else None
        cut = lambda parts: np.concatenate(parts)[:total] if parts[0].ndim else np.asarray(parts)  # noqa: E731
        return ({n: cut(p) for n, p in outs.items()}, {n: cut(p) for n, p in grads.items()})

    def __repr__(self) -> str:
        return f"<Net '{self.name}' {len(self.layers)} layers, {backend.mode()}>"


__all__ = ["Net", "NetError", "TRAIN", "TEST", "LearnableParam"]
