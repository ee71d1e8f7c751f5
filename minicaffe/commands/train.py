"""minicaffe train --solver S [--weights W] [--snapshot STATE] [--gpu N]: Caffe's `caffe train`.

Trains the solver's net, logging in Caffe's format to stderr (plus a progress line on a terminal).
`--snapshot` resumes from a .solverstate; `--weights` starts from (comma-separated) .caffemodel files.
Without --gpu the solver's solver_mode decides, as in Caffe (CPU unless the file says GPU; when it
says GPU and none is usable, minicaffe warns and trains on the CPU). Ctrl-C, and SIGTERM (what Slurm
and Kubernetes send), stop after the current iteration and write a snapshot (Caffe's --sigint_effect
stop); SIGHUP snapshots and goes on.

Nothing already saved is lost: snapshots are written whole or not at all (see Solver.snapshot), and
`<snapshot_prefix>.lock` refuses a second run on the same snapshot_prefix while this one runs.
A NaN or inf loss stops training with an error naming the first non-finite blob (the snapshots already
written are kept); --allow-nan keeps training instead, as Caffe does.

Under mpirun / mpiexec / srun (K processes, found from the launcher's environment), each process is one
rank of a data-parallel run (minicaffe.parallel, over MPI): each reads its share of the data, gradients
are averaged after every backward, rank 0 alone logs, tests and snapshots; `--sync-timeout` bounds how
long a rank waits for the others before ending the job with an error. The gradients go in buckets of
`--bucket-mb` MB whose allreduce starts while backward still runs; `--no-overlap` sends them in one
buffer after backward instead (the same weights). `--gpu 0,1` / `--gpu all` starts one
process per GPU, averaging gradients over NCCL (CuPy's binding); under mpirun with --gpu, each rank takes
the GPU of its local rank and NCCL is set up over MPI (one rank per GPU, across machines).

`--solver quickstart` trains the embedded example: a small conv net on scikit-learn's 8x8 digits,
converted to LMDB on first use; it runs offline in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .. import log, parallel
from ..example import default_work_dir, quickstart_solver, report
from ..proto import caffe_pb2
from ..solver import SnapshotLock, Solver, read_solver
from ..watch import watch_solver
from . import common

QUICKSTART = "quickstart"  # --solver value naming the embedded example


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--solver", required=True,
                        help=f"solver prototxt, or '{QUICKSTART}' for the embedded digits example")
    parser.add_argument("--weights", default="",
                        help="pretrained .caffemodel(s) to finetune from, comma-separated")
    parser.add_argument("--snapshot", default="", help=".solverstate to resume training from")
    common.add_gpu_argument(parser, "the solver's solver_mode")
    common.add_state_arguments(parser)
    parser.add_argument("--watch", metavar="PATTERN", default=None,
                        help="at each display step and at the end, log the mean [min .. max] of the "
                             "parameters of the layers matching PATTERN (glob on name or type, e.g. "
                             "'prelu*') and append them to <snapshot_prefix>_watch.csv")
    parser.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                        help=f"with --solver {QUICKSTART}: folder for its LMDBs and trained model "
                             f"(default {default_work_dir()})")
    parser.add_argument("--allow-nan", "--allow_nan", dest="allow_nan", action="store_true",
                        help="keep training after a NaN or inf loss, warning once (Caffe's behaviour); "
                             "by default training stops with an error naming the first non-finite blob")
    parser.add_argument("--sync-timeout", "--sync_timeout", dest="sync_timeout", type=float,
                        default=parallel.DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="under mpirun: how long a rank waits for the others in one gradient exchange "
                             "before ending the job with an error (a rank died or hangs); more than rank "
                             f"0's longest test phase (default {parallel.DEFAULT_TIMEOUT:g})")
    parser.add_argument("--no-overlap", "--no_overlap", dest="overlap", action="store_false",
                        help="data-parallel: allreduce all gradients in one buffer after backward, instead "
                             "of in buckets that start while backward still runs")
    parser.add_argument("--bucket-mb", "--bucket_mb", dest="bucket_mb", type=float,
                        default=parallel.DEFAULT_BUCKET_MB, metavar="MB",
                        help="data-parallel: size of the gradient buckets whose allreduce starts during "
                             f"backward (default {parallel.DEFAULT_BUCKET_MB:g})")
    for name, default, what in (("sigint_effect", "stop", "Ctrl-C"), ("sighup_effect", "snapshot", "SIGHUP"),
                                ("sigterm_effect", "stop", "SIGTERM")):
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=default,
                            choices=sorted(common.EFFECTS), help=f"what {what} does (default {default})")


def run(args: argparse.Namespace) -> int:
    if args.snapshot and args.weights:
        raise ValueError("give --snapshot to resume training or --weights to finetune, not both")
    gpus = common.parse_gpu(args.gpu)  # a bad value is an error before the quickstart's data is written
    quickstart = args.solver == QUICKSTART and not Path(args.solver).exists()
    if gpus and len(gpus) > 1 and parallel.launched_size() == 1 and parallel.GPU_RANK not in os.environ:
        if quickstart:
            raise ValueError(f"--solver {QUICKSTART} runs on one GPU; give a solver file for several")
        return parallel.launch_gpus(gpus, gpu_rank_arguments(args))
    comm = _communicator(args, quickstart, gpus)
    if quickstart:
        param, base_dir = quickstart_solver(args.work_dir)
    elif args.work_dir is not None:
        raise ValueError(f"--work-dir is for --solver {QUICKSTART}; a solver file says where its data and "
                         "snapshots are")
    else:
        if not Path(args.solver).exists():  # a folder or FIFO gets the reader's own error
            raise FileNotFoundError(f"solver file '{args.solver}' not found")
        param, base_dir = read_solver(args.solver), Path(args.solver).parent
    param.train_state.level = args.level
    param.train_state.stage.extend(common.stages(args))
    gpu = args.gpu
    from_solver = False
    if gpu is None and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu, from_solver = str(param.device_id), True
    device = common.use_device(gpu, from_solver)
    if device is not None and isinstance(comm, parallel.MPICommunicator):
        comm = parallel.nccl_over_mpi(comm)  # gradients between GPUs go over NCCL, not MPI
    elif device is not None and parallel.GPU_RANK in os.environ:
        comm = parallel.gpu_rank_communicator(args.sync_timeout)
        parallel.init(comm)
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    if comm is None:
        with SnapshotLock(param.snapshot_prefix):
            solver = _solve(args, param, base_dir)
    else:
        try:
            with SnapshotLock(param.snapshot_prefix) if comm.rank == 0 else contextlib.nullcontext():
                solver = _solve(args, parallel.worker_param(param, comm.rank), base_dir, comm)
        except BaseException as error:  # the others would wait for this rank until their deadline
            comm.abort(f"rank {comm.rank} of {comm.size}: {error or type(error).__name__}")
    if quickstart:
        report(solver, sys.stdout)
    return 0


def gpu_rank_arguments(args: argparse.Namespace) -> list[str]:
    """The command line of one process of `train --gpu 0,1` (parallel.launch_gpus adds --gpu ID)."""
    arguments = ["train", "--solver", args.solver, "--level", str(args.level), "--sync-timeout",
                 str(args.sync_timeout), "--sigint_effect", args.sigint_effect, "--sighup_effect",
                 args.sighup_effect, "--sigterm_effect", args.sigterm_effect, "--bucket-mb",
                 str(args.bucket_mb)]
    for flag, value in (("--weights", args.weights), ("--snapshot", args.snapshot), ("--stage", args.stage),
                        ("--watch", args.watch)):
        if value:
            arguments += [flag, value]
    arguments += ["--allow-nan"] if args.allow_nan else []
    return arguments + ([] if args.overlap else ["--no-overlap"])


def _communicator(args: argparse.Namespace, quickstart: bool,
                  gpus: list[int] | None) -> parallel.MPICommunicator | None:
    """The MPI communicator when a launcher started this process as one of several, else None. With
    --gpu, each rank takes the GPU of its local rank (args.gpu becomes that one)."""
    launched = parallel.launched_size()
    if launched == 1:
        return None
    if quickstart:
        raise ValueError(f"--solver {QUICKSTART} runs in one process; under mpirun give a solver file")
    comm = parallel.MPICommunicator(args.sync_timeout)
    if comm.size != launched:
        raise parallel.ParallelError(
            f"the launcher started {launched} processes but MPI sees {comm.size}: mpi4py is built for "
            "another MPI than the launcher's (use the mpiexec of the same installation; with Slurm, "
            "srun --mpi=pmi2 or pmix)")
    parallel.init(comm)
    if gpus:
        args.gpu = str(gpus[parallel.local_rank(comm) % len(gpus)])
    return comm


def _solve(args: argparse.Namespace, param: caffe_pb2.SolverParameter, base_dir: Path,
           comm: parallel.Communicator | None = None) -> Solver:
    solver = Solver(param, base_dir=base_dir, source=args.solver)
    solver.allow_nan = args.allow_nan
    root = comm is None or comm.rank == 0
    watcher = watch_solver(solver, args.watch) if args.watch and root else None
    if watcher is not None:
        log.info(f"Watching {', '.join(layer.name for layer in watcher.layers)} in {watcher.csv_path}",
                 "caffe.cpp:268")
    with common.SignalHandler(args.sigint_effect, args.sighup_effect, args.sigterm_effect) as handler:
        solver.set_action_function(handler.action)
        if comm is not None:
            parallel.GradientSync(solver, comm, handler.action, args.overlap, args.bucket_mb)
        if args.snapshot:
            log.info(f"Resuming from {args.snapshot}", "caffe.cpp:258")
        log.info("Starting Optimization", "caffe.cpp:263")
        solver.solve(args.snapshot or None)
    if watcher is not None:
        watcher.log(solver.iter)  # the final weights (those of the last snapshot)
    return solver
