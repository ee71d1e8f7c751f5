"""Layer base class and registry, after Caffe's Layer: setup -> reshape -> forward / backward.

How to write a layer: see the docstring of `Layer` and README.md, "Writing a layer".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from . import backend
from .blob import Blob, BlobSizeError, check_memory, checked_shape
from .filler import FillerError, fill
from .proto import caffe_pb2
from .rng import stream

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

LAYERS: dict[str, type[Layer]] = {}


class LayerError(ValueError):
    """Bad layer definition or bad input shapes; the message names the layer."""


def register(type_name: str, override: bool = False):
    """Class decorator: make the layer available to prototxt ``type: "<type_name>"``.

    A type that is already registered is an error, as in Caffe's registry (a layer would silently
    replace a built-in one otherwise); ``override=True`` replaces it on purpose."""

    def wrap(cls):
        existing = LAYERS.get(type_name)
        if existing is not None and existing is not cls and not override:
            raise LayerError(f"layer type '{type_name}' is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}; pick another type name, "
                             f"or pass register('{type_name}', override=True) to replace it")
        cls.type = type_name
        LAYERS[type_name] = cls
        return cls

    return wrap


def create_layer(param, phase: int = TEST, dtype=np.float32) -> Layer:
    try:
        cls = LAYERS[param.type]
    except KeyError:
        known = ", ".join(sorted(LAYERS))
        raise LayerError(f"layer '{param.name}': unknown type '{param.type}' (known: {known})") from None
    return cls(param, phase, dtype)


class Layer:
    """Base of every layer, after Caffe's Layer. A layer overrides:

      * ``layer_setup(bottom, top)``: once; read the layer's ``*_param``, check it (``self.fail``) and
        create the parameter blobs with ``setup_params`` (or ``add_param_blob``). Blobs given in the
        prototxt or loaded from weights are already in ``self.blobs``.
      * ``reshape(bottom, top)``: before every forward; check the bottom shapes, reshape the tops.
      * ``forward(bottom, top)``: write the tops from the bottoms.
      * ``backward(top, propagate_down, bottom)``: *write* the diff of each bottom i with
        ``propagate_down[i]`` and *add* the parameter gradients into ``self.blobs[i].diff`` where
        ``self.param_propagate_down[i]`` (so iter_size and shared weights accumulate; the solver clears
        them each step; a parameter with lr_mult 0 gets none).
    plus the class attributes below (blob counts, ``default_loss_weight``, ``keeps``).

    In forward and backward, arrays come from ``blob.get_data()`` / ``mutable_data()`` (and the diff
    twins): numpy in CPU mode, cupy in GPU mode; kernels are launched with them (minicaffe/kernel.py).
    Scratch arrays, and arrays forward leaves for backward, come from ``self.buffer(name, shape)``.

    In place (top[0] is bottom[0]) is allowed unless ``reshape`` refuses it. The shared blob then holds
    neither x nor surely this layer's y at backward time: forward overwrote x, and later in-place layers
    may change y. So a layer whose backward reads x or y says so with ``keeps``, and reads it back with
    ``kept_input(bottom)`` / ``kept_output(top)``.

    A layer is run by ``run_forward`` and ``run_backward`` (the Net does this), never by calling
    forward / backward directly: they also reshape, take the kept copies and seed the loss diffs.
    """

    type = ""
    # Blob-count rules, checked in setup; None means "any".
    exact_num_bottom: int | None = None
    min_num_bottom: int | None = None
    max_num_bottom: int | None = None
    exact_num_top: int | None = None
    min_num_top: int | None = None
    max_num_top: int | None = None
    equal_num_bottom_top = False
    # Layers whose tops are losses by default (loss_weight 1 on top 0), as Caffe's *Loss layers.
    default_loss_weight = 0.0
    # What backward reads of bottom[0] / top[0] that another layer may overwrite first; run_forward then
    # keeps a copy. "input": x, copied before forward when in place (forward overwrites it). "output":
    # y, copied after every forward (later in-place layers may change it, in place or not). None: nothing.
    # An instance may set it in layer_setup when it depends on the parameters. With "input", a layer may
    # keep less than x in place (see `lean_keep`).
    keeps: str | None = None

    def __init__(self, param, phase: int = TEST, dtype=np.float32):
        self.param = param
        self.name = param.name
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.blobs: list[Blob] = []
        self.param_propagate_down: list[bool] = []
        self.loss_weights: list[float] = []
        # Which forward pass this is (set by the Net before each forward; the solver sets it from the
        # iteration). Stochastic layers key their random numbers by it, so a resumed run replays them.
        self.forward_index = 0
        self.buffers: dict[str, object] = {}  # what buffer() gave out, by name (to inspect)
        # Set by the Net: no later layer writes top[0]'s data, so backward may read this layer's output
        # back from the top (what `lean_keep` may rely on). False outside a Net: nothing is known then.
        self.top_data_survives = False
        self.kept_lean = False  # whether the last run_forward kept less than x (see `lean_keep`)
        self._kept_names: set[str] = set()  # the buffers the last forward keeps for backward
        for i, blob_proto in enumerate(param.blobs):
            blob = Blob((), self.dtype)
            blob.from_proto(blob_proto, where=f"layer '{self.name}' blob {i}")
            self.blobs.append(blob)

    # -- to override -------------------------------------------------------------------------
    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """One-time setup: read the layer's *_param, create and fill self.blobs."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError

    def backward(self, top: list[Blob], propagate_down: Sequence[bool], bottom: list[Blob]) -> None:
        """Default: a layer with nothing to differentiate (data, accuracy...)."""

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    # -- machinery ---------------------------------------------------------------------------
    def run_forward(self, bottom: list[Blob], top: list[Blob]) -> float:
        """Caffe's Layer::Forward, the one way to run a layer forward: reshape, forward, then the
        weighted loss of its loss tops, whose diffs are seeded with their weights (d loss / d top) for
        the backward that follows. Returns that loss (0 for a layer without loss tops)."""
        try:
            self.reshape(bottom, top)
        except LayerError:
            raise
        except (ValueError, IndexError) as error:
            self.fail(f"{error}; bottom shapes {[list(b.shape) for b in bottom]}")
        self._kept_names = set()
        in_place = bool(top and bottom and top[0] is bottom[0])
        self.kept_lean = self.keeps == "input" and in_place and self.lean_keep(bottom, top)
        copy = self.keeps == "input" and in_place and not self.kept_lean
        if copy and not self.keeps_in_forward(bottom, top):
            self._keep(bottom[0].get_data())
        try:
            self.forward(bottom, top)
        except BlobSizeError as error:  # blobs take their memory when first used: name the layer
            self.fail(str(error))
        if self.keeps == "output":
            self._keep(top[0].get_data())
        loss = 0.0
        for weight, blob in zip(self.loss_weights, top):
            if weight:
                loss += weight * float(blob.get_data().sum())
                blob.mutable_diff()[...] = weight
        return loss

    def run_backward(self, top: list[Blob], propagate_down: Sequence[bool], bottom: list[Blob]) -> None:
        """Caffe's Layer::Backward, the one way to run a layer backward (after run_forward)."""
        try:
            self.backward(top, propagate_down, bottom)
        except BlobSizeError as error:  # e.g. the first use of a diff
            self.fail(str(error))

    def lean_keep(self, bottom: list[Blob], top: list[Blob]) -> bool:
        """Asked by run_forward before an in-place forward of a layer with keeps = "input": True when this
        forward keeps less than a copy of x -- what backward needs instead (e.g. a byte mask of x > 0),
        written by forward itself into buffers taken with ``kept=True``, a byte per element at most
        (`planned_kept_bytes` counts one). run_forward then copies nothing and sets ``self.kept_lean``,
        which forward and backward read; kept_input is not available.
        A layer whose backward also reads its output back from top[0] may answer True only when
        ``self.top_data_survives``. Default: False (a full copy)."""
        return False

    def keeps_in_forward(self, bottom: list[Blob], top: list[Blob]) -> bool:
        """Asked by run_forward before an in-place forward of a layer with keeps = "input" that keeps a
        full copy: True when forward writes that copy itself, into the buffer "kept" taken with
        ``kept=True``, in the pass that reads x anyway (run_forward then copies nothing). Default: False."""
        return False

    def kept_bytes(self) -> int:
        """The bytes the last forward kept for backward: the copy `keeps` asked for and the buffers taken
        with ``kept=True``."""
        return sum(self.buffers[name].nbytes for name in self._kept_names)

    def planned_kept_bytes(self, bottom: list[Blob], top: list[Blob]) -> int:
        """What `kept_bytes` will be after a forward on these blobs, from their shapes alone (for
        `minicaffe summary`, which runs nothing): a copy of x or y as `keeps` says, or in place a byte
        per element when `lean_keep`. A layer that keeps other buffers adds their bytes."""
        if self.keeps == "input" and top and bottom and top[0] is bottom[0]:
            return bottom[0].count * (1 if self.lean_keep(bottom, top) else bottom[0].dtype.itemsize)
        if self.keeps == "output":
            return top[0].count * top[0].dtype.itemsize
        return 0

    def kept_input(self, bottom: list[Blob]):
        """x as forward saw it (for a layer with keeps = "input"): the kept copy when run in place."""
        assert self.keeps == "input", f"{self!r}: kept_input needs keeps = 'input'"
        assert not self.kept_lean, f"{self!r}: forward kept less than x (lean_keep)"
        return self._kept_or(bottom[0])

    def kept_output(self, top: list[Blob]):
        """y as forward wrote it (for a layer with keeps = "output")."""
        assert self.keeps == "output", f"{self!r}: kept_output needs keeps = 'output'"
        return self._kept_or(top[0])

    def _keep(self, array) -> None:
        self.buffer("kept", array.shape, array.dtype, kept=True)[...] = array

    def _kept_or(self, blob: Blob):
        """The copy `keeps` asked for in the last run_forward (the buffer "kept"), else `blob`'s data."""
        return self.buffers["kept"] if "kept" in self._kept_names else blob.get_data()

    def buffer(self, name: str, shape: Sequence[int], dtype=None, kept: bool = False):
        """This layer's scratch array `name` (of the current mode's array module; contents undefined).

        The same name gives the same array again while shape, dtype and mode stay, so forward can leave
        values there for backward, and no call pays for fresh memory (which costs more in page faults
        than the kernels that fill it). dtype defaults to the layer's. The name "kept" is the copy that
        ``keeps`` asks for. ``kept=True`` (in forward): the array holds what backward needs, counted
        by `kept_bytes`."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        shape, count = self.checked_size(f"buffer '{name}'", shape)
        old = self.buffers.get(name)
        if old is None or old.size != count or old.dtype != dtype:  # new memory: check it fits
            self.check_memory(f"buffer '{name}'", shape, count * dtype.itemsize)
        array = backend.reuse(old, shape, dtype)
        self.buffers[name] = array
        if kept:
            self._kept_names.add(name)
        return array

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.check_blob_counts(bottom, top)
        try:
            self.layer_setup(bottom, top)
            if self.keeps not in (None, "input", "output"):
                self.fail(f"keeps must be None, 'input' or 'output', got {self.keeps!r}")
            if not self.param_propagate_down or len(self.param_propagate_down) != len(self.blobs):
                self.param_propagate_down = [True] * len(self.blobs)
            self.reshape(bottom, top)
        except BlobSizeError as error:  # a top or parameter shape refused by Blob: name the layer
            self.fail(f"{error}; bottom shapes {[list(b.shape) for b in bottom]}")
        self.set_loss_weights(top)

    def check_blob_counts(self, bottom: list[Blob], top: list[Blob]) -> None:
        def check(what, n, exact, low, high):
            if exact is not None and n != exact:
                self.fail(f"takes {exact} {what} blob(s), got {n}")
            if low is not None and n < low:
                self.fail(f"takes at least {low} {what} blob(s), got {n}")
            if high is not None and n > high:
                self.fail(f"takes at most {high} {what} blob(s), got {n}")

        check("bottom", len(bottom), self.exact_num_bottom, self.min_num_bottom, self.max_num_bottom)
        check("top", len(top), self.exact_num_top, self.min_num_top, self.max_num_top)
        if self.equal_num_bottom_top and len(bottom) != len(top):
            self.fail(f"needs as many tops as bottoms, got {len(bottom)} bottoms and {len(top)} tops")

    def set_loss_weights(self, top: list[Blob]) -> None:
        weights = list(self.param.loss_weight)
        if not weights and self.default_loss_weight:
            weights = [self.default_loss_weight] + [0.0] * (len(top) - 1)
        if weights and len(weights) != len(top):
            self.fail(f"has {len(weights)} loss_weight values for {len(top)} tops")
        self.loss_weights = weights or [0.0] * len(top)

    def fail(self, message: str) -> NoReturn:
        raise LayerError(f"layer '{self.name}' ({self.type}): {message}")

    def checked_size(self, what: str, shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """`shape` as Python ints and its exact count; a negative, non-integer or absurd dim fails,
        naming this layer and `what`."""
        try:
            return checked_shape(shape, what)
        except BlobSizeError as error:
            self.fail(str(error))

    def check_memory(self, what: str, shape, nbytes: int, on_host: bool = False) -> None:
        """Fail, naming this layer, `what`, its shape and bytes, when `nbytes` exceed the free memory of
        the current mode (of the host if `on_host`). Call before allocating, as blob.check_memory."""
        try:
            check_memory(what, shape, nbytes, on_host)
        except BlobSizeError as error:
            self.fail(str(error))

    def setup_params(self, shapes: Sequence[Sequence[int]], fillers: Sequence) -> None:
        """Create parameter blob i of shapes[i], filled by the FillerParameter fillers[i]; blobs that
        already exist (given in the prototxt) must have those shapes.

        The size of every new blob is checked before the first one is created. A filler works on the
        host in float64, so a blob takes 8 bytes per value there, besides its own, while filled."""
        if self.blobs and len(self.blobs) != len(shapes):
            self.fail(f"has {len(self.blobs)} parameter blobs, expected {len(shapes)}")
        new = [i for i, shape in enumerate(shapes) if not self.check_param_blob(i, shape)]
        for i in new:
            shape, count = self.checked_size(f"parameter blob {i}", shapes[i])
            self.check_memory(f"parameter blob {i}", shape, count * (self.dtype.itemsize + 8), on_host=True)
        for i in new:
            blob = self.add_param_blob(shapes[i])
            try:
                fill(blob, fillers[i], stream("filler", self.name, i))
            except FillerError as error:
                self.fail(f"parameter blob {i}: {error}")

    def add_param_blob(self, shape: Sequence[int]) -> Blob:
        blob = Blob(shape, self.dtype)
        self.blobs.append(blob)
        return blob

    def check_param_blob(self, index: int, shape: Sequence[int]) -> bool:
        """True when blob `index` already exists (e.g. loaded); its shape must then be `shape`."""
        if index >= len(self.blobs):
            return False
        if self.blobs[index].shape != tuple(shape):
            self.fail(f"parameter blob {index} has shape {list(self.blobs[index].shape)}, "
                      f"expected {list(shape)}")
        return True

    def __repr__(self) -> str:
        return f"<{self.type} layer '{self.name}'>"


class NeuronLayer(Layer):
    """One bottom, one top of the same shape, in place allowed (Caffe's NeuronLayer).

    A subclass overrides forward and backward (and layer_setup for its parameters); reshape is done.
    If backward reads x or y, it declares ``keeps = "input"`` or ``"output"`` and reads them with
    ``self.kept_input(bottom)`` / ``self.kept_output(top)``, never from the blobs: in place, the shared
    blob holds neither x nor surely y by then (see Layer)."""

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])


class ViewLayer(Layer):
    """A layer whose top is the bottom seen with another shape (Flatten, Reshape): the top shares the
    bottom's data and diff, so forward and backward have nothing to do. Subclasses give top_shape."""

    exact_num_bottom = 1
    exact_num_top = 1

    def top_shape(self, bottom: Blob) -> Sequence[int]:
        raise NotImplementedError

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (its top is a reshaped view of the bottom: give it its own top)")
        top[0].reshape(self.top_shape(bottom[0]))
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared
