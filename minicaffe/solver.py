"""Solvers with Caffe's update rules, schedules, testing, snapshots and logs.

    solver = minicaffe.get_solver("models/lenet/lenet_solver.prototxt")   # type from the file
    solver = minicaffe.SGDSolver("solver.prototxt")                       # or a given rule
    solver.step(100); solver.solve(); solver.snapshot(); solver.restore("x_iter_100.solverstate")

What follows Caffe (solver.cpp, sgd_solver.cpp and the other *_solver.cpp), step by step:
  * an iteration clears the parameter diffs, tests when ``iter % test_interval == 0``, runs iter_size
    forward/backward passes, then ApplyUpdate: learning rate (GetLearningRate), ClipGradients, and per
    parameter Normalize (1 / iter_size), Regularize (L2 or L1, weight_decay * decay_mult),
    ComputeUpdateValue (the rule, at rate * lr_mult), and data -= diff;
  * each update rule is a Solver subclass registered by its ``type`` string (Caffe's SolverRegistry),
    overriding compute_update (Caffe's ComputeUpdateValue); ``Solver(...)`` and ``get_solver(...)``
    build the class the solver file names;
  * history blobs and .solverstate files have Caffe's layout: one history blob per learnable parameter,
    AdaDelta and Adam append a second set (squared updates / second moments) after the first;
  * log lines are Caffe's (see minicaffe.log), so its log parsers work.

Guards Caffe lacks: the fields are checked at start-up (a rule that would divide by zero, a schedule that
overflows between iteration 0 and max_iter, a train net with no layers, no loss or nothing to learn are
SolverErrors naming the field or the net). A NaN or inf loss stops training with NonFiniteLossError, naming
the iteration and the first non-finite blob, and weights that went non-finite are not snapshotted, so the
snapshots already written stay the last good ones; ``solver.allow_nan = True`` (``minicaffe train
--allow-nan``) keeps Caffe's behaviour: warn once and go on.

Paths in a solver file (net, train_net, test_net) are relative to the current folder, as in Caffe; when
such a path does not exist there, it is also looked up relative to the solver file's own folder, so a
solver and its net can travel together. snapshot_prefix stays relative to the current folder (as Caffe),
and defaults to the solver file's path without its extension.

random_seed >= 0 seeds minicaffe's random numbers (fillers, Dropout, data crops) before the nets are
built, as Caffe does; when it is unset the current seed is kept (minicaffe.set_random_seed, default 1701),
so runs are reproducible either way (Caffe would seed from the clock).

Before each forward pass the solver sets ``net.forward_count = iter * iter_size + k``: stochastic layers
(Dropout, data order) key their random numbers by it, so a run resumed from a snapshot replays exactly
what an uninterrupted run would have drawn.

Update math uses the array module of the current mode (numpy, or cupy on the GPU), as Caffe's solvers
call BLAS. The solver does not change the CPU/GPU mode; ``minicaffe train`` does (solver_mode, --gpu).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import backend, hdf5, io, log, rng
from .blob import Blob, proto_shape, proto_values
from .kernel import KernelFile
from .net import Net, NetError
from .proto import caffe_pb2

KERNELS = KernelFile("solver.cu")  # plain SGD's step in one pass (SGDSolver.update_parameter)

SolverParameter = caffe_pb2.SolverParameter

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
# The solver fields each lr_policy's rate depends on (named when the rate is not a finite number).
POLICY_FIELDS = {"fixed": ("base_lr",), "step": ("base_lr", "gamma", "stepsize"), "exp": ("base_lr", "gamma"),
                 "inv": ("base_lr", "gamma", "power"), "multistep": ("base_lr", "gamma", "stepvalue"),
                 "poly": ("base_lr", "power", "max_iter"), "sigmoid": ("base_lr", "gamma", "stepsize")}
# Real-valued solver fields: a NaN or inf in any of them makes every update NaN.
FLOAT_FIELDS = ("base_lr", "gamma", "power", "momentum", "momentum2", "delta", "rms_decay", "weight_decay",
                "clip_gradients")
LEGACY_TYPES = {caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
                caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
                caffe_pb2.SolverParameter.ADADELTA: "AdaDelta", caffe_pb2.SolverParameter.ADAM: "Adam"}
# Caffe's SolverRegistry: type string -> the Solver subclass with that update rule (register_solver).
SOLVER_TYPES: dict[str, type[Solver]] = {}

# What the action function (Ctrl-C, SIGHUP in `minicaffe train`) may ask for, as Caffe's SolverAction.
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"


class SolverError(ValueError):
    """A solver definition or a solver state that cannot be used; the message says which field."""


class NonFiniteLossError(SolverError):
    """Training stopped at a NaN or inf loss, or at weights that became NaN or inf, because the solver's
    ``allow_nan`` is False (the default): the message names the iteration and the first non-finite blob.
    Nothing is written after it, so the snapshots already written are the last good ones."""


# -- reading solver files ----------------------------------------------------------------------------

def upgrade_solver(param: SolverParameter, source: str = "<solver>") -> SolverParameter:
    """Caffe's UpgradeSolverAsNeeded: the legacy solver_type enum becomes the type string."""
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError(f"{source}: give the solver 'type' (string) or the old 'solver_type' enum, "
                              "not both")
        param.type = LEGACY_TYPES[param.solver_type]
        param.ClearField("solver_type")
    return param


def read_solver(path) -> SolverParameter:
    """Read a solver prototxt as Caffe's ReadSolverParamsFromTextFileOrDie does: upgrade the legacy
    type, and default snapshot_prefix to the file's path without extension (or, when snapshot_prefix
    is a folder, to that folder / the file's stem)."""
    path = Path(path)
    param = upgrade_solver(io.read_solver_param(path), str(path))
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = str(path.with_suffix(""))
    elif Path(param.snapshot_prefix).is_dir():
        param.snapshot_prefix = str(Path(param.snapshot_prefix) / path.stem)
    return param


def _solver_param(param_or_path, source: str) -> SolverParameter:
    """The SolverParameter of a solver prototxt path (read_solver), or an upgraded copy of one."""
    if isinstance(param_or_path, (str, Path)):
        return read_solver(param_or_path)
    if isinstance(param_or_path, SolverParameter):
        param = SolverParameter()
        param.CopyFrom(param_or_path)
        return upgrade_solver(param, source)
    raise TypeError(f"Solver takes a solver prototxt path or a SolverParameter, "
                    f"got {type(param_or_path).__name__}")


def _source(param_or_path, source: str | None) -> str:
    """How messages name a solver: its file, else `source`."""
    if isinstance(param_or_path, (str, Path)):
        return str(param_or_path)
    return source or "<SolverParameter>"


def learned_net_path(state_file, learned_net: str) -> Path:
    """The .caffemodel a .solverstate names: as written, else its file name beside the .solverstate."""
    learned, beside = Path(learned_net), Path(state_file).parent / Path(learned_net).name
    return beside if not learned.exists() and beside.exists() else learned


def learning_rate(param: SolverParameter, iteration: int, current_step: int = 0) -> tuple[float, int]:
    """Caffe's GetLearningRate at `iteration`; returns (rate, current_step) (step/multistep move it).
    Large numbers do not raise: a rate that overflows is inf, one with no real value (a negative base to
    a fractional power) is NaN; the Solver refuses both, naming the fields."""
    if param.lr_policy == "step":
        current_step = iteration // param.stepsize
    elif param.lr_policy == "multistep":
        # One step per iteration at most, as Caffe's `if` (not `while`).
        if current_step < len(param.stepvalue) and iteration >= param.stepvalue[current_step]:
            current_step += 1
            log.info(f"MultiStep Status: Iteration {iteration}, step = {current_step}", "sgd_solver.cpp:60")
    return _scheduled_rate(param, iteration, current_step), current_step


def _scheduled_rate(param: SolverParameter, iteration: int, current_step: int) -> float:
    """The rate of param's lr_policy at `iteration`, the step/multistep position being `current_step`."""
    policy, base_lr, gamma = param.lr_policy, param.base_lr, param.gamma
    try:
        if policy == "fixed":
            rate = base_lr
        elif policy in ("step", "multistep"):
            rate = base_lr * gamma ** current_step
        elif policy == "exp":
            rate = base_lr * gamma ** iteration
        elif policy == "inv":
            rate = base_lr * (1.0 + gamma * iteration) ** (-param.power)
        elif policy == "poly":
            rate = base_lr * (1.0 - iteration / param.max_iter) ** param.power
        elif policy == "sigmoid":
            # exp() overflowing means a rate of 0, as in Caffe's C++ (1 / (1 + inf)).
            rate = base_lr * (1.0 / (1.0 + _exp(-gamma * (iteration - param.stepsize))))
        else:
            raise SolverError(f"unknown lr_policy '{policy}' (known: {', '.join(LR_POLICIES)})")
    except (OverflowError, ZeroDivisionError):  # a power too large, or 0 to a negative power
        return math.inf
    return math.nan if isinstance(rate, complex) else float(rate)


def _exp(x: float) -> float:
    """math.exp, with inf where it would overflow (as C's exp)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# -- the solver ---------------------------------------------------------------------------------------

class Solver:
    """A Caffe solver for a SolverParameter or a solver prototxt path.

    ``Solver(...)`` and ``get_solver(...)`` build the subclass named by the file's ``type`` (or legacy
    ``solver_type``); SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver and
    AdamSolver use their own rule whatever the file says, as pycaffe's classes do.
    ``dtype=np.float64`` builds double nets (Caffe's Solver<double>).

    A rule subclass (see register_solver) overrides compute_update and sets ``history_blobs``, the number
    of history blobs it keeps per parameter; it reads them with ``self.histories(index)``.

    Attributes: ``net`` (train net), ``test_nets``, ``iter``, ``param``, ``history`` (list of Blob, in
    Caffe's .solverstate order), ``smoothed_loss``, ``test_scores`` (per test net, the last test's
    {output: mean}), ``allow_nan`` (False: a NaN or inf loss raises NonFiniteLossError; True: Caffe's
    behaviour, a warning).
    """

    type = ""  # the registered type string of a rule subclass (register_solver)
    history_blobs = 1  # history blobs per learnable parameter
    uses_momentum = True  # False: a nonzero momentum is an error (Caffe's AdaGrad and RMSProp)
    uses_delta = False  # True: the rule divides by (... + delta), which must then be > 0

    def __new__(cls, param_or_path, dtype=np.float32, base_dir=None, source: str | None = None):
        # Solver(...) itself builds the rule the solver names (so the file is read twice, it is small).
        if cls is Solver:
            where = _source(param_or_path, source)
            cls = solver_class(_solver_param(param_or_path, where), where)
        return super().__new__(cls)

    def __init__(self, param_or_path, dtype=np.float32, base_dir=None, source: str | None = None):
        """For a SolverParameter, `base_dir` is the folder its relative net paths may also be beside (a
        solver file's own folder is used for a path), and `source` names it in messages."""
        self.source = _source(param_or_path, source)
        if isinstance(param_or_path, (str, Path)):
            self.base_dir: Path | None = Path(param_or_path).parent
        else:
            self.base_dir = Path(base_dir) if base_dir is not None else None
        self.param = param = _solver_param(param_or_path, self.source)
        self.dtype = np.dtype(dtype)
        self._check_param()
        if param.random_seed >= 0:
            rng.set_random_seed(param.random_seed)
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        self.iter = 0
        self.current_step = 0
        self.smoothed_loss = 0.0
        self.losses: list[float] = []
        self.test_scores: list[OrderedDict[str, float]] = [OrderedDict() for _ in self.test_nets]
        self.requested_early_exit = False
        self._action: Callable[[], str] | None = None
        self._callbacks: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []
        self._iterations_last = 0
        self._timer = time.monotonic()
        self.progress: log.Progress | None = None
        self._warned_non_finite = False
        # False: a NaN or inf loss stops training with NonFiniteLossError (`minicaffe train` without
        # --allow-nan); True: keep training after a warning, as Caffe does.
        self.allow_nan = False
        # False on ranks > 0 of a data-parallel run (minicaffe.parallel): only rank 0 writes snapshots.
        self.root = True
        # Caffe's layout: the first history blob of every parameter, then the second of every parameter.
        params = self.net.learnable_params
        self.history = [Blob(p.blob.shape, self.dtype) for _ in range(self.history_blobs) for p in params]
        self._scratch: dict[int, object] = {}  # per parameter, reused: updates allocate nothing per step

    # -- set-up ---------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.source

    def _check_param(self) -> None:
        p, where = self.param, self._where()
        if not any(p.HasField(f) for f in ("net", "net_param", "train_net", "train_net_param")):
            raise SolverError(f"{where}: no train net: give one of net, net_param, train_net, "
                              "train_net_param")
        if not p.lr_policy:  # Caffe has no default either
            raise SolverError(f"{where}: lr_policy is not set (give one of {', '.join(LR_POLICIES)})")
        if p.lr_policy not in LR_POLICIES:
            raise SolverError(f"{where}: lr_policy {p.lr_policy!r} is not one of {', '.join(LR_POLICIES)}")
        for name in FLOAT_FIELDS:
            if not math.isfinite(getattr(p, name)):
                raise SolverError(f"{where}: {name} must be a finite number, got {getattr(p, name)}")
        if p.base_lr < 0:
            raise SolverError(f"{where}: base_lr must be >= 0, got {p.base_lr:g}")
        if p.max_iter < 0:
            raise SolverError(f"{where}: max_iter must be >= 0, got {p.max_iter}")
        if any(n < 0 for n in p.test_iter):
            raise SolverError(f"{where}: test_iter must be >= 0, got {list(p.test_iter)}")
        if p.lr_policy in ("step", "sigmoid") and p.stepsize <= 0:
            raise SolverError(f"{where}: lr_policy '{p.lr_policy}' needs stepsize > 0")
        if p.lr_policy == "poly" and p.max_iter <= 0:
            raise SolverError(f"{where}: lr_policy 'poly' needs max_iter > 0")
        if p.lr_policy in ("step", "exp", "multistep") and p.gamma < 0:
            raise SolverError(f"{where}: gamma must be >= 0, got {p.gamma}")
        if p.average_loss < 1:
            raise SolverError(f"{where}: average_loss must be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise SolverError(f"{where}: iter_size must be >= 1, got {p.iter_size}")
        if p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"{where}: unknown regularization_type '{p.regularization_type}' (L1 or L2)")
        if not self.uses_momentum and p.momentum != 0:
            raise SolverError(f"{where}: momentum cannot be used with {self.type} (got {p.momentum})")
        if self.uses_delta and p.delta <= 0:
            raise SolverError(f"{where}: delta must be > 0 for {self.type} (it divides by sqrt(...) + "
                              f"delta), got {p.delta:g}")
        if p.snapshot < 0 or p.display < 0 or p.test_interval < 0:
            raise SolverError(f"{where}: snapshot, display and test_interval must be >= 0")
        self.check_rule_param()
        # The schedules are monotone in the iteration, so the first and the last rate that solve() uses
        # bound them all: a schedule that overflows is refused now rather than at that iteration.
        last = max(p.max_iter - 1, 0)
        steps = {"step": last // p.stepsize if p.stepsize > 0 else 0,
                 "multistep": sum(1 for value in p.stepvalue if value <= last)}
        self._check_rate(_scheduled_rate(p, 0, 0), 0)
        self._check_rate(_scheduled_rate(p, last, steps.get(p.lr_policy, 0)), last)

    def _check_rate(self, rate: float, iteration: int) -> None:
        """Refuse a learning rate that is not a finite number of the solver's dtype, or is negative (which
        'inv' gives where 1 + gamma * iter < 0)."""
        if math.isfinite(rate) and 0 <= rate <= float(np.finfo(self.dtype).max):
            return
        p = self.param
        fields = ", ".join(f"{name} {list(value) if name == 'stepvalue' else format(value, 'g')}"
                           for name, value in ((n, getattr(p, n)) for n in POLICY_FIELDS[p.lr_policy]))
        raise SolverError(f"{self._where()}: lr_policy '{p.lr_policy}' with {fields} gives learning rate "
                          f"{rate:g} at iteration {iteration}, not a finite {self.dtype} number >= 0")

    def _candidates(self, name: str) -> list[Path]:
        """Where a relative path of the solver file may be: from the CWD (Caffe), from the solver's
        folder, and its file name beside the solver (a path written relative to the repository root
        while the solver is used from elsewhere, e.g. models/x/net.prototxt in models/x/solver.prototxt)."""
        path = Path(name)
        if path.is_absolute() or self.base_dir is None:
            return [path]
        return list(dict.fromkeys([path, self.base_dir / path, self.base_dir / path.name]))

    def _path(self, name: str) -> Path:
        """The first of _candidates(name) that exists, else `name` as given."""
        return next((path for path in self._candidates(name) if path.exists()), Path(name))

    def _read_net(self, name: str) -> caffe_pb2.NetParameter:
        path = self._path(name)
        if not path.exists():
            looked = ", ".join(f"'{candidate}'" for candidate in self._candidates(name))
            raise SolverError(f"{self._where()}: net file '{name}' not found (looked for {looked})")
        return io.read_net_param(path)

    def _build_net(self, net_param: caffe_pb2.NetParameter, state: caffe_pb2.NetState,
                   extra_state: caffe_pb2.NetState | None) -> Net:
        # Caffe: NetState(phase) <- net_param.state <- solver's train_state / test_state.
        merged = caffe_pb2.NetState()
        merged.CopyFrom(state)
        merged.MergeFrom(net_param.state)
        if extra_state is not None:
            merged.MergeFrom(extra_state)
        net_param.state.CopyFrom(merged)
        return Net(net_param, phase=merged.phase, dtype=self.dtype)

    def _load_weights(self, net: Net) -> None:
        for entry in self.param.weights:
            for name in entry.split(","):
                if name:
                    net.copy_from(self._path(name))

    def _init_train_net(self) -> Net:
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(fields) > 1:
            raise SolverError(f"{self._where()}: give only one train net, got {', '.join(fields)}")
        if p.HasField("train_net_param"):
            net_param = _copy(p.train_net_param)
        elif p.HasField("train_net"):
            net_param = self._read_net(p.train_net)
        elif p.HasField("net_param"):
            net_param = _copy(p.net_param)
        else:
            net_param = self._read_net(p.net)
        log.info(f"Creating training net from {fields[0]}"
                 + (f" {getattr(p, fields[0])}" if not fields[0].endswith("param") else "."), "solver.cpp:87")
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        net = self._build_net(net_param, state, p.train_state if p.HasField("train_state") else None)
        file = fields[0] in ("net", "train_net")
        self._check_trainable(net, f"'{self._path(getattr(p, fields[0]))}'" if file else f"({fields[0]})")
        self._load_weights(net)
        return net

    def _check_trainable(self, net: Net, what: str) -> None:
        """Refuse a train net that would 'train' with loss 0: no layers, no loss, or nothing to learn.
        `what` names the net: its file, or the solver field holding it."""
        where = f"{self._where()}: the train net {what}"
        if not net.layers:
            raise SolverError(f"{where} has no layers in phase TRAIN (it is empty, or every "
                              "layer is excluded by include/exclude rules): nothing to train")
        if not any(net.blob_loss_weights.values()):
            raise SolverError(f"{where} has no loss: no top has a nonzero loss_weight (loss "
                              "layers such as SoftmaxWithLoss have 1 by default): nothing to train")
        if not any(learnable.lr_mult for learnable in net.learnable_params):
            raise SolverError(f"{where} has nothing to learn: no learnable parameter with a "
                              "nonzero lr_mult")

    def _init_test_nets(self) -> list[Net]:
        p, where = self.param, self._where()
        generic = [f for f in ("net", "net_param") if p.HasField(f)]
        if len(generic) > 1:
            raise SolverError(f"{where}: both net_param and net given")
        num_specific = len(p.test_net_param) + len(p.test_net)
        if generic:
            if len(p.test_iter) < num_specific:
                raise SolverError(f"{where}: test_iter must be given for each test net "
                                  f"({num_specific} test nets, {len(p.test_iter)} test_iter)")
        elif len(p.test_iter) != num_specific:
            raise SolverError(f"{where}: test_iter must be given once per test net "
                              f"({num_specific} test nets, {len(p.test_iter)} test_iter)")
        num_generic = len(p.test_iter) - num_specific
        total = num_specific + num_generic
        if p.test_state and len(p.test_state) != total:
            raise SolverError(f"{where}: test_state must be unspecified or given once per test net "
                              f"({total} test nets, {len(p.test_state)} test_state)")
        if total and p.test_interval <= 0:
            raise SolverError(f"{where}: test nets given (test_iter) but test_interval is {p.test_interval}; "
                              "set test_interval > 0")
        sources: list[tuple[str, caffe_pb2.NetParameter]] = []
        for net_param in p.test_net_param:
            sources.append(("test_net_param", _copy(net_param)))
        for name in p.test_net:
            sources.append((f"test_net file {name}", self._read_net(name)))
        for _ in range(num_generic):
            if p.HasField("net_param"):
                sources.append(("net_param", _copy(p.net_param)))
            else:
                sources.append((f"net file {p.net}", self._read_net(p.net)))
        nets = []
        for i, (what, net_param) in enumerate(sources):
            log.info(f"Creating test net (#{i}) specified by {what}", "solver.cpp:172")
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            net = self._build_net(net_param, state, p.test_state[i] if p.test_state else None)
            self._load_weights(net)
            nets.append(net)
        return nets

    # -- running --------------------------------------------------------------------------------
    def set_action_function(self, action: Callable[[], str] | None) -> None:
        """`action()` is asked after each iteration (and test batch): NONE, STOP or SNAPSHOT."""
        self._action = action

    def add_callback(self, on_start: Callable[[], None] | None = None,
                     on_gradients: Callable[[], None] | None = None) -> None:
        """pycaffe's add_callback: on_start() runs at the start of each iteration (after any testing),
        on_gradients() once the gradients are computed and the iteration displayed, before the update."""
        self._callbacks.append((on_start, on_gradients))

    def _requested_action(self) -> str:
        return self._action() if self._action is not None else NONE

    def _check_finite_loss(self, loss: float) -> None:
        """With allow_nan, warn once per solver when an iteration's loss is NaN or inf: from there on the
        parameters and the smoothed loss are usually NaN too, so the first such iteration is the one to
        know. Without it, stop: NonFiniteLossError names the first blob that is not finite."""
        if math.isfinite(loss):
            return
        if not self.allow_nan:
            raise NonFiniteLossError(
                f"{self._where()}: iteration {self.iter}: loss = {log.fmt(loss)} is not finite; the first "
                f"NaN or inf (in forward order) is in {self._first_non_finite()}. Training stopped, the "
                "snapshots already written are kept (NaN or inf in the input data, or a diverging update: "
                "try a lower base_lr or clip_gradients; --allow-nan keeps training as Caffe does)")
        if self._warned_non_finite:
            return
        self._warned_non_finite = True
        log.warning(f"Iteration {self.iter}, loss = {log.fmt(loss)} is not finite (NaN or inf in the input "
                    "data, or a diverging update: try a lower base_lr or clip_gradients); "
                    "warning only once")

    def _first_non_finite(self) -> str:
        """Where the train net's first NaN or inf is: in forward order, each layer's parameters then its
        tops, else the first parameter gradient. Run only once the loss is not finite (it reads all)."""
        net = self.net
        for layer, names, tops in zip(net.layers, net.top_names, net.top_vecs):
            for index, blob in enumerate(layer.blobs):
                if not _all_finite(blob.get_data()):
                    return f"parameter {index} of layer '{layer.name}' ({layer.type})"
            for name, blob in zip(names, tops):
                if not _all_finite(blob.get_data()):
                    return f"blob '{name}' (top of layer '{layer.name}', {layer.type})"
        for learnable in net.learnable_params:
            if not _all_finite(learnable.blob.get_diff()):
                return f"the gradient of parameter {learnable.index} of layer '{learnable.layer_name}'"
        return "no blob (every blob and gradient is finite)"

    def _check_finite_weights(self) -> None:
        """Before a snapshot: without allow_nan, weights that an update made NaN or inf (the loss being
        still finite, e.g. an overflowing gradient) stop training instead of being saved."""
        if self.allow_nan:
            return
        for learnable in self.net.learnable_params:
            if not _all_finite(learnable.blob.get_data()):
                raise NonFiniteLossError(
                    f"{self._where()}: iteration {self.iter}: parameter {learnable.index} of layer "
                    f"'{learnable.layer_name}' is not finite (NaN or inf) after the update, so it is not "
                    "snapshotted. Training stopped, the snapshots already written are kept (a diverging "
                    "update: try a lower base_lr or clip_gradients; --allow-nan keeps training as Caffe "
                    "does)")

    def step(self, iters: int) -> None:
        """Run `iters` training iterations (Caffe's Solver::Step)."""
        p = self.param
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self.losses = []
        self.smoothed_loss = 0.0
        self._timer = time.monotonic()
        self._iterations_last = self.iter
        own_progress = self.progress is None
        if own_progress:
            self.progress = log.Progress(start_iter, stop_iter)
        try:
            while self.iter < stop_iter:
                self.net.clear_param_diffs()
                if (p.test_interval and self.iter % p.test_interval == 0
                        and (self.iter > 0 or p.test_initialization)):
                    self.test_all()
                    if self.requested_early_exit:
                        break
                display = bool(p.display) and self.iter % p.display == 0
                for on_start, _ in self._callbacks:
                    if on_start is not None:
                        on_start()
                loss = 0.0
                for k in range(p.iter_size):
                    self.net.forward_count = self.iter * p.iter_size + k
                    loss += self.net.forward_backward()
                    if not (self.allow_nan or math.isfinite(loss)):
                        break  # stop at the pass that went non-finite: its blobs are the ones to scan
                loss /= p.iter_size
                self._update_smoothed_loss(loss, start_iter)
                if display or not (self.allow_nan or math.isfinite(loss)):
                    self._display()  # a loss that stops training is logged (as nan or inf) first
                self._check_finite_loss(loss)
                for _, on_gradients in self._callbacks:
                    if on_gradients is not None:
                        on_gradients()
                self.apply_update()
                self.iter += 1
                self.progress.update(self.iter, self.smoothed_loss)
                request = self._requested_action()
                if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                    self._check_finite_weights()
                    self.snapshot()
                if request == STOP:
                    self.requested_early_exit = True
                    break
        finally:
            if own_progress:
                self.progress.close()
                self.progress = None

    def solve(self, resume_file: str | None = None) -> None:
        """Train to max_iter (Caffe's Solver::Solve), optionally resuming from a .solverstate."""
        p = self.param
        log.info(f"Solving {self.net.name}", "solver.cpp:289")
        log.info(f"Learning Rate Policy: {p.lr_policy}", "solver.cpp:290")
        self.requested_early_exit = False
        if resume_file:
            log.info(f"Restoring previous solver status from {resume_file}", "solver.cpp:297")
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self._check_finite_weights()
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.", "solver.cpp:315")
            return
        if p.display and self.iter % p.display == 0:
            # One more forward pass to show the final loss, as Caffe does.
            self.net.forward_count = self.iter * p.iter_size
            loss = self.net.forward_range(0, len(self.net.layers) - 1)
            self._update_smoothed_loss(loss, start_iter)
            log.info(f"Iteration {self.iter}, loss = {log.fmt(self.smoothed_loss)}", "solver.cpp:330")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.", "solver.cpp:335")

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        average = self.param.average_loss
        if len(self.losses) < average:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            index = (self.iter - start_iter) % average
            self.smoothed_loss += (loss - self.losses[index]) / average
            self.losses[index] = loss

    def _display(self) -> None:
        now = time.monotonic()
        lapse = now - self._timer
        per_s = (self.iter - self._iterations_last) / (lapse or 1.0)
        log.info(f"Iteration {self.iter} ({log.fmt(per_s)} iter/s, {lapse:.3g}s/{self.param.display} iters), "
                 f"loss = {log.fmt(self.smoothed_loss)}", "solver.cpp:243")
        self._timer = now
        self._iterations_last = self.iter
        weights = self.net.blob_loss_weights
        index = 0
        for name in self.net.outputs:
            weight = weights.get(name, 0.0)
            for value in backend.to_host(self.net.blobs[name].get_data()).ravel():
                tail = f" (* {log.fmt(weight)} = {log.fmt(weight * value)} loss)" if weight else ""
                log.info(f"    Train net output #{index}: {name} = {log.fmt(value)}{tail}", "solver.cpp:259")
                index += 1

    # -- testing --------------------------------------------------------------------------------
    def test_all(self) -> list[OrderedDict[str, float]]:
        """Test every test net (Caffe's TestAll); returns the scores, also kept in test_scores."""
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)
        return self.test_scores

    def _test_pass(self) -> int:
        """Which test pass this is in a run (0, 1, ...): the test net's data position follows from it, so
        a resumed run tests on the batches an uninterrupted run would."""
        p = self.param
        if not p.test_interval:
            return 0
        return max(self.iter // p.test_interval - (0 if p.test_initialization else 1), 0)

    def share_weights(self, test_net: Net) -> None:
        """Let `test_net` use the train net's parameters (Caffe's ShareTrainedLayersWith)."""
        train_layers = self.net.layer_dict
        for name, layer in test_net.layer_dict.items():
            source = train_layers.get(name)
            if source is None or not layer.blobs:
                continue
            if len(source.blobs) != len(layer.blobs):
                raise NetError(f"layer '{name}': {len(source.blobs)} parameter blobs in the train net, "
                               f"{len(layer.blobs)} in the test net")
            for j, (mine, theirs) in enumerate(zip(layer.blobs, source.blobs)):
                if mine.shape != theirs.shape:
                    raise NetError(f"layer '{name}' parameter {j}: shape {list(theirs.shape)} in the train "
                                   f"net, {list(mine.shape)} in the test net")
                mine.share_data(theirs)

    def test(self, test_net_id: int = 0) -> OrderedDict[str, float]:
        """One test pass of test_iter batches (Caffe's Solver::Test); returns {output: mean}."""
        p = self.param
        log.info(f"Iteration {self.iter}, Testing net (#{test_net_id})", "solver.cpp:347")
        net = self.test_nets[test_net_id]
        self.share_weights(net)
        iters = p.test_iter[test_net_id]
        first = self._test_pass() * iters
        outputs = OutputMeans(net)
        for i in range(iters):
            request = self._requested_action()
            if request == SNAPSHOT:
                self.snapshot()
            elif request == STOP:
                self.requested_early_exit = True
            if self.requested_early_exit:
                log.info("Test interrupted.", "solver.cpp:391")
                return self.test_scores[test_net_id]
            net.forward_count = first + i
            outputs.add(net.forward_range(0, len(net.layers) - 1))
        if p.test_compute_loss:
            log.info(f"Test loss: {log.fmt(outputs.mean_loss())}", "solver.cpp:398")
        scores: OrderedDict[str, float] = OrderedDict()
        for index, (key, mean, text) in enumerate(outputs.results()):
            log.info(f"    Test net output #{index}: {text}", "solver.cpp:414")
            scores[key] = mean
        self.test_scores[test_net_id] = scores
        return scores

    # -- the update -----------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The rate for the current iteration (advances current_step for step / multistep)."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        self._check_rate(rate, self.iter)  # past max_iter (step() may go on) a schedule can still overflow
        return rate

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate: rate, clipping, then per parameter normalize, regularize,
        compute the update value, and data -= diff."""
        rate = self.learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            log.info(f"Iteration {self.iter}, lr = {log.fmt(rate)}", "sgd_solver.cpp:107")
        self.clip_gradients()
        for index in range(len(self.net.learnable_params)):
            self.update_parameter(index, rate)

    def update_parameter(self, index: int, rate: float) -> None:
        """Parameter `index`'s step: normalize, regularize, compute the update value, data -= diff (each
        parameter's step depends on no other's, so doing them one parameter at a time is Caffe's)."""
        self.normalize(index)
        self.regularize(index)
        self.compute_update(index, rate)
        blob = self.net.learnable_params[index].blob
        data = blob.mutable_data()
        data -= blob.get_diff()

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        xp = backend.xp()
        params = self.net.learnable_params
        sumsq = sum(float(xp.vdot(d, d)) for d in (p.blob.get_diff().ravel() for p in params))
        norm = math.sqrt(sumsq)
        if norm > clip:
            factor = clip / norm
            log.info(f"Gradient clipping: scaling down gradients (L2 norm {log.fmt(norm)} > {log.fmt(clip)}) "
                     f"by scale factor {log.fmt(factor)}", "sgd_solver.cpp:133")
            for p in params:
                diff = p.blob.mutable_diff()
                diff *= factor

    def normalize(self, index: int) -> None:
        if self.param.iter_size == 1:
            return
        diff = self.net.learnable_params[index].blob.mutable_diff()
        diff *= 1.0 / self.param.iter_size

    def regularize(self, index: int) -> None:
        learnable = self.net.learnable_params[index]
        decay = self.param.weight_decay * learnable.decay_mult
        if not decay:
            return
        data = learnable.blob.get_data()
        diff = learnable.blob.mutable_diff()
        term = self.scratch(index)  # decay * data (L2) or decay * sign(data) (L1), Caffe's axpy
        xp = backend.xp()
        if self.param.regularization_type == "L2":
            xp.multiply(data, decay, out=term)
        else:
            xp.sign(data, out=term)
            term *= decay
        diff += term

    def scratch(self, index: int):
        """A scratch array shaped as parameter `index`, kept between steps (a fresh parameter-sized
        temporary every step costs more in page faults than the arithmetic)."""
        blob = self.net.learnable_params[index].blob
        self._scratch[index] = backend.reuse(self._scratch.get(index), blob.shape, self.dtype)
        return self._scratch[index]

    def compute_update(self, index: int, rate: float) -> None:
        """Caffe's ComputeUpdateValue: turn parameter `index`'s (regularized) diff into the step that
        apply_update subtracts, at `rate` times the parameter's lr_mult. Each rule overrides it."""
        raise NotImplementedError(f"{type(self).__name__} has no update rule (use a registered subclass)")

    def check_rule_param(self) -> None:
        """The rule's own field checks (Caffe's CHECKs in each solver's constructor); none by default."""

    def histories(self, index: int) -> list:
        """Parameter `index`'s history arrays, one per history blob of the rule, for the rule to unpack
        by meaning (``m, v = self.histories(index)``); self.history keeps them in Caffe's order."""
        count = len(self.net.learnable_params)
        return [self.history[k * count + index].mutable_data() for k in range(self.history_blobs)]

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Write <prefix>_iter_N.caffemodel, then <prefix>_iter_N.solverstate naming it; returns both paths
        (with snapshot_format HDF5: .caffemodel.h5 and .solverstate.h5, Caffe's HDF5 layout, see
        minicaffe.hdf5). Each file is written to a temporary name, fsync'd and renamed (io.write_atomic),
        and the caffemodel is complete on disk before the solverstate exists: a kill or a full disk at any
        moment leaves every .solverstate with its caffemodel, and the previous snapshots as they were."""
        if not self.root:  # Caffe's Snapshot() runs on the root solver only
            return "", ""
        as_hdf5 = self.param.snapshot_format == SolverParameter.HDF5
        suffix = ".h5" if as_hdf5 else ""
        kind = "HDF5" if as_hdf5 else "binary proto"
        model = self.snapshot_filename(".caffemodel" + suffix)
        log.info(f"Snapshotting to {kind} file {model}", "solver.cpp:464")
        if as_hdf5:
            self.net.save_hdf5(model, write_diff=self.param.snapshot_diff)
        else:
            io.write_binary(model, self.net.to_proto(write_diff=self.param.snapshot_diff))
        state_file = self.snapshot_filename(".solverstate" + suffix)
        log.info(f"Snapshotting solver state to {kind} file {state_file}", "sgd_solver.cpp:273")
        if as_hdf5:
            hdf5.write(state_file, lambda handle: self._fill_hdf5_state(handle, model), "HDF5 snapshots")
        else:
            state = caffe_pb2.SolverState(iter=self.iter, learned_net=model, current_step=self.current_step)
            for blob in self.history:
                blob.to_proto(state.history.add())
            io.write_binary(state_file, state)
        return model, state_file

    def _fill_hdf5_state(self, handle, model: str) -> None:
        """Caffe's SnapshotSolverStateToHDF5: iter and current_step as 1-element int datasets, learned_net
        as a string, the history blobs as /history/<j>."""
        handle.create_dataset("iter", data=np.array([self.iter], dtype=np.int32))
        handle.create_dataset("learned_net", data=np.bytes_(model))
        handle.create_dataset("current_step", data=np.array([self.current_step], dtype=np.int32))
        history = handle.create_group("history")
        for j, blob in enumerate(self.history):
            history.create_dataset(str(j), data=np.asarray(blob.data))

    def restore(self, state_file) -> None:
        """Continue from a .solverstate: iteration, schedule position, history and the weights of its
        learned_net (looked up as written, else beside the .solverstate). A learned_net that is missing,
        or whose _iter_N name is another iteration than the state's, is an error: the pair is not one
        snapshot."""
        state_file = Path(state_file)
        state = read_solver_state(state_file)
        if len(state.history) != len(self.history):
            raise SolverError(
                f"{state_file}: has {len(state.history)} history blobs, the {self.type} solver of this net "
                f"needs {len(self.history)} (a state of another net or solver type?)")
        if state.learned_net:
            model = learned_net_path(state_file, state.learned_net)
            if not model.is_file():
                raise SolverError(f"{state_file}: its learned_net '{state.learned_net}' is missing (looked "
                                  f"for it as written and beside the .solverstate)")
            named = snapshot_iteration(model)
            if named is not None and named != state.iter:
                raise SolverError(f"{state_file}: is iteration {state.iter} but its learned_net '{model}' is "
                                  f"iteration {named}: not one snapshot")
            self.net.copy_from(model)
        for i, (blob, values) in enumerate(zip(self.history, state.history)):
            try:
                blob.load(values.shape, values, reshape=False, where=f"{state_file}: history blob {i}")
            except ValueError as error:
                raise SolverError(str(error)) from None
        self.iter = state.iter
        self.current_step = state.current_step
        log.info("SGDSolver: restoring history", "sgd_solver.cpp:335")


def _all_finite(array) -> bool:
    """No NaN or inf in `array` (numpy or cupy)."""
    return bool(backend.xp().isfinite(array).all())


class SolverStateFile(NamedTuple):
    """What a .solverstate or .solverstate.h5 holds: the history as arrays in Caffe's order."""

    iter: int
    learned_net: str
    current_step: int
    history: list[np.ndarray]


def read_solver_state(path: Path) -> SolverStateFile:
    """A binary .solverstate, or Caffe's HDF5 solver state when the name ends in ".h5"."""
    if not hdf5.is_hdf5(path):
        state = io.read_binary(path, caffe_pb2.SolverState())
        history = []
        for i, proto in enumerate(state.history):
            shape = proto_shape(proto)
            values = proto_values(proto)
            if math.prod(shape) != values.size:
                raise SolverError(f"{path}: history blob {i} has {values.size} values for shape "
                                  f"{list(shape)}")
            history.append(values.reshape(shape))
        return SolverStateFile(state.iter, state.learned_net, state.current_step, history)
    with hdf5.open_read(path, "resuming from HDF5 snapshots") as handle:
        numbers = [int(hdf5.dataset(handle, name, str(path)).reshape(-1)[0])
                   for name in ("iter", "current_step")]
        group = handle.get("history")
        if group is None or not hasattr(group, "keys"):
            raise SolverError(f"{path}: has no 'history' group: not a Caffe HDF5 solver state")
        history = [hdf5.dataset(group, str(j), f"{path}: history") for j in range(len(group))]
        return SolverStateFile(numbers[0], hdf5.text(handle, "learned_net"), numbers[1], history)


def snapshot_iteration(path) -> int | None:
    """N of a snapshot file named <prefix>_iter_N.caffemodel / .solverstate (+ .h5), else None."""
    name = Path(path).name.removesuffix(".h5")
    _, marker, number = Path(name).stem.rpartition("_iter_")
    return int(number) if marker and number.isdigit() else None


class SnapshotLock:
    """``<snapshot_prefix>.lock``, held while a run writes snapshots there, so that a second run on the
    same prefix is refused (naming the first one's process) instead of interleaving its snapshots.

    It is an flock: the kernel releases it when its holder dies, so the file a killed run leaves behind
    blocks nothing. Once it is held, the temporary files a killed run left (io.write_atomic's, of this
    prefix's snapshots) are removed: no other run can be writing them. Use as a context manager."""

    def __init__(self, snapshot_prefix: str):
        self.prefix = snapshot_prefix
        self.path = Path(f"{snapshot_prefix}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl  # POSIX only, as flock
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode(errors="replace").strip() or "a process starting up"
                os.close(fd)
                raise SolverError(f"snapshot_prefix '{self.prefix}' is in use by another run ({holder}; "
                                  f"lock file {self.path}): wait for it to end or use another "
                                  "snapshot_prefix") from None
            except BaseException:
                os.close(fd)
                raise
            # Its previous holder removes the file on release: if that happened between our open and our
            # flock, we hold a lock on a file nobody else will look at; open the current one again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        for leftover in io.temp_files(f"{self.prefix}_iter_"):
            log.info(f"Removing {leftover}, left by an interrupted snapshot", "solver.cpp:445")
            try:
                leftover.unlink(missing_ok=True)
            except OSError as error:
                log.warning(f"cannot remove {leftover}: {error.strerror}", "solver.cpp:447")

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held (see acquire), so that no run ever locks a file about to disappear.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> SnapshotLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- the update rules (Caffe's *_solver.cpp) -------------------------------------------------------

def register_solver(type_name: str):
    """Class decorator: make a Solver subclass the rule of solver files' ``type: "<type_name>"``."""

    def wrap(cls: type[Solver]) -> type[Solver]:
        cls.type = type_name
        SOLVER_TYPES[type_name] = cls
        return cls

    return wrap


def solver_class(param: SolverParameter, source: str = "<solver>") -> type[Solver]:
    """The registered Solver subclass of `param.type` (Caffe's SolverRegistry::CreateSolver)."""
    try:
        return SOLVER_TYPES[param.type]
    except KeyError:
        raise SolverError(f"{source}: unknown solver type '{param.type}' "
                          f"(known: {', '.join(SOLVER_TYPES)})") from None


@register_solver("SGD")
class SGDSolver(Solver):
    """Momentum SGD: history = momentum * history + local_rate * diff; the step is the history."""

    def update_parameter(self, index: int, rate: float) -> None:
        """Plain SGD: the whole step in one kernel pass (kernels/solver.cu's sgd_update), where normalize
        and regularize are Solver's own; else they run first and the kernel computes the update value
        (compute_update). A rule that derives from SGD with its own compute_update (Nesterov, AdaGrad, ...)
        takes the steps apart."""
        own = type(self)
        if (own.compute_update is not SGDSolver.compute_update or own.normalize is not Solver.normalize
                or own.regularize is not Solver.regularize):
            super().update_parameter(index, rate)
            return
        p = self.param
        decay = p.weight_decay * self.net.learnable_params[index].decay_mult
        self._sgd_update(index, rate, 1.0 / p.iter_size, decay, update_data=True)

    def compute_update(self, index: int, rate: float) -> None:
        self._sgd_update(index, rate, 1.0, 0.0, update_data=False)

    def _sgd_update(self, index: int, rate: float, scale: float, decay: float, update_data: bool) -> None:
        """kernels/solver.cu's sgd_update on parameter `index`: history = momentum * history + rate *
        lr_mult * (diff * scale + the decay term), diff = history, and with update_data data -= history."""
        learnable = self.net.learnable_params[index]
        blob, p = learnable.blob, self.param
        (history,) = self.histories(index)
        data, diff = blob.mutable_data(), blob.mutable_diff()
        KERNELS.sgd_update(data.size, data, diff, history, scale, decay, int(p.regularization_type == "L1"),
                           p.momentum, rate * learnable.lr_mult, int(update_data), extents=data.size)


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    """Nesterov's accelerated gradient: SGD's momentum history, stepped along as Caffe's NesterovSolver."""

    def compute_update(self, index: int, rate: float) -> None:
        learnable = self.net.learnable_params[index]
        momentum = self.param.momentum
        diff = learnable.blob.mutable_diff()
        (history,) = self.histories(index)
        previous = history.copy()
        history *= momentum
        history += rate * learnable.lr_mult * diff
        # step back by the old momentum, then over-step along the new one
        diff[...] = (1 + momentum) * history - momentum * previous


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    """AdaGrad: history sums the squared gradients; step = local_rate * diff / (sqrt(history) + delta)."""

    uses_momentum = False
    uses_delta = True

    def compute_update(self, index: int, rate: float) -> None:
        learnable = self.net.learnable_params[index]
        diff = learnable.blob.mutable_diff()
        (squared_sum,) = self.histories(index)
        squared_sum += diff * diff
        update = backend.xp().sqrt(squared_sum)
        update += self.param.delta
        diff[...] = rate * learnable.lr_mult * (diff / update)


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    """RMSProp: history is a running mean (rms_decay) of squared gradients, used as AdaGrad's sum."""

    uses_momentum = False
    uses_delta = True

    def check_rule_param(self) -> None:
        if not 0 <= self.param.rms_decay < 1:
            raise SolverError(f"{self._where()}: rms_decay must be in [0, 1), got {self.param.rms_decay}")

    def compute_update(self, index: int, rate: float) -> None:
        learnable = self.net.learnable_params[index]
        decay = self.param.rms_decay
        diff = learnable.blob.mutable_diff()
        (squared_mean,) = self.histories(index)
        squared_mean *= decay
        squared_mean += (1 - decay) * (diff * diff)
        update = backend.xp().sqrt(squared_mean)
        update += self.param.delta
        diff[...] = rate * learnable.lr_mult * (diff / update)


@register_solver("AdaDelta")
class AdaDeltaSolver(SGDSolver):
    """AdaDelta: running means (momentum) of squared gradients and of squared updates."""

    history_blobs = 2
    uses_delta = True

    def check_rule_param(self) -> None:
        # Outside [0, 1] a running mean of squares can turn negative, and its sqrt NaN.
        if not 0 <= self.param.momentum <= 1:
            raise SolverError(f"{self._where()}: momentum must be in [0, 1] for AdaDelta, "
                              f"got {self.param.momentum:g}")

    def compute_update(self, index: int, rate: float) -> None:
        learnable = self.net.learnable_params[index]
        momentum, delta = self.param.momentum, self.param.delta
        diff = learnable.blob.mutable_diff()
        grad_history, update_history = self.histories(index)
        grad_history *= momentum
        grad_history += (1 - momentum) * (diff * diff)
        diff *= backend.xp().sqrt((update_history + delta) / (grad_history + delta))
        update_history *= momentum
        update_history += (1 - momentum) * (diff * diff)
        diff *= rate * learnable.lr_mult


@register_solver("Adam")
class AdamSolver(SGDSolver):
    """Adam: first moment m (beta1 = momentum) and second moment v (beta2 = momentum2), bias-corrected."""

    history_blobs = 2
    uses_delta = True

    def check_rule_param(self) -> None:
        # The bias correction sqrt(1 - beta2^t) / (1 - beta1^t): beta1 = 1 divides by zero, beta2 = 1
        # never steps, and outside [0, 1) the moments are no running means.
        for name in ("momentum", "momentum2"):
            value = getattr(self.param, name)
            if not 0 <= value < 1:
                raise SolverError(f"{self._where()}: {name} must be in [0, 1) for Adam "
                                  f"(beta{1 if name == 'momentum' else 2}), got {value:g}")

    def compute_update(self, index: int, rate: float) -> None:
        learnable = self.net.learnable_params[index]
        beta1, beta2 = self.param.momentum, self.param.momentum2
        diff = learnable.blob.mutable_diff()
        m, v = self.histories(index)
        t = self.iter + 1
        correction = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        m *= beta1
        m += (1 - beta1) * diff
        v *= beta2
        v += (1 - beta2) * (diff * diff)
        update = backend.xp().sqrt(v)
        update += self.param.delta
        diff[...] = rate * learnable.lr_mult * correction * (m / update)


def get_solver(param_or_path, dtype=np.float32) -> Solver:
    """pycaffe's caffe.get_solver: the registered Solver subclass of the solver's `type`."""
    return Solver(param_or_path, dtype=dtype)


# -- helpers --------------------------------------------------------------------------------------

def _copy(net_param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    return out


class OutputMeans:
    """The means of a net's outputs over test batches, as Solver::Test and `caffe test` score a net:
    ``add(loss)`` after each forward pass; ``results()`` then gives Caffe's lines
    ``name = mean`` (with `` (* weight = weighted loss)`` for loss outputs)."""

    def __init__(self, net: Net):
        self.net = net
        self.batches = 0
        self.loss = 0.0
        self.sums: list[np.ndarray] = []

    def add(self, loss: float) -> list[np.ndarray]:
        """Count one forward pass (its loss); returns this batch's outputs (flat float64 arrays)."""
        values = [backend.to_host(self.net.blobs[name].get_data()).astype(np.float64).ravel()
                  for name in self.net.outputs]
        self.sums = values if not self.batches else [s + v for s, v in zip(self.sums, values)]
        self.loss += loss
        self.batches += 1
        return values

    def mean_loss(self) -> float:
        return self.loss / max(self.batches, 1)

    def results(self) -> list[tuple[str, float, str]]:
        """(key, mean, Caffe's log text) per output value; the key is the output's name, or name[k]
        for an output of several values."""
        weights = self.net.blob_loss_weights
        out = []
        for name, total in zip(self.net.outputs, self.sums):
            weight = weights.get(name, 0.0)
            for k, value in enumerate(total):
                mean = float(value) / self.batches
                tail = f" (* {log.fmt(weight)} = {log.fmt(weight * mean)} loss)" if weight else ""
                key = name if len(total) == 1 else f"{name}[{k}]"
                out.append((key, mean, f"{name} = {log.fmt(mean)}{tail}"))
        return out


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "NonFiniteLossError",
           "RMSPropSolver", "SGDSolver", "Solver", "SolverError", "get_solver", "learning_rate",
           "read_solver"]
