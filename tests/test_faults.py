"""Nothing already saved is lost (issue #9, item 6) and the CLI never shows a traceback (item 8).

Snapshots under faults: SIGKILL at random moments of snapshotting, a second run on the same
snapshot_prefix, SIGTERM, a full disk (a small tmpfs when it can be mounted, and a simulated ENOSPC),
the umask, leftover temporary files and snapshot pairs that do not belong together.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minicaffe.commands.summary
from minicaffe import cli, io
from minicaffe.commands.common import SignalHandler
from minicaffe.proto import caffe_pb2
from minicaffe.solver import NONE, SNAPSHOT, STOP, SnapshotLock, Solver, SolverError

# Big enough (256 KB of weights, as much history) that writing a snapshot takes a while, so random
# kills often land inside one; small enough to train at many iterations per second.
NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "t"
        dummy_data_param { shape { dim: 4 dim: 256 } shape { dim: 4 dim: 256 }
                           data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 256 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def write_solver(folder: Path, name: str = "solver", prefix: str = "tiny", **fields) -> Path:
    """A solver for NET in `folder`, snapshotting every iteration to folder/prefix_iter_N."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.prototxt").write_text(NET)
    values = dict(max_iter=1000000, snapshot=1, display=0, snapshot_after_train=True)
    values.update(fields)
    text = "".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}\n"
                   for key, value in values.items())
    path = folder / f"{name}.prototxt"
    path.write_text(f'net: "{folder / "net.prototxt"}"\nbase_lr: 0.001 momentum: 0.9 lr_policy: "fixed"\n'
                    f'random_seed: 3\nsnapshot_prefix: "{folder / prefix}"\n{text}')
    return path


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minicaffe.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicaffe.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def iteration(path: Path) -> int:
    return int(re.search(r"_iter_(\d+)\.", path.name).group(1))


def states(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.solverstate"), key=iteration)


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def assert_one_line_error(stderr: str, command: str = "train") -> str:
    """The last line is the error; nothing but log lines before it, and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"minicaffe {command}: error: "), stderr
    assert all(re.match(r"^[IWE]\d{4} ", line) for line in lines[:-1]), stderr
    return lines[-1]


pytestmark = pytest.mark.usefixtures("log_text")  # log lines captured (conftest)


# -- the pair and its files ------------------------------------------------------------------------

def test_snapshot_writes_the_caffemodel_whole_before_the_solverstate(tmp_path, monkeypatch):
    solver = Solver(write_solver(tmp_path, snapshot=0))
    solver.step(2)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    solver.snapshot()
    monkeypatch.undo()
    model, state = "tiny_iter_2.caffemodel", "tiny_iter_2.solverstate"
    names = [name for _, name in events]
    # Each file: its data fsync'd (under its temporary name), renamed, then its folder fsync'd.
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"] * 2
    assert names[0].startswith(f".{model}.") and names[0].endswith(".tmp")
    assert names[1:3] == [model, tmp_path.name]
    assert names[3].startswith(f".{state}.") and names[4:] == [state, tmp_path.name]
    pair = io.read_binary(tmp_path / state, caffe_pb2.SolverState())
    assert pair.iter == 2 and pair.learned_net == str(tmp_path / model)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=lambda mask: f"umask{mask:03o}")
def test_written_files_respect_the_umask(umask, tmp_path):
    solver = Solver(write_solver(tmp_path, snapshot=0))
    previous = os.umask(umask)
    try:
        model, state = solver.snapshot()
        io.write_text(tmp_path / "out.prototxt", solver.param)
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() makes under this umask
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    assert (plain.stat().st_mode & 0o777) == want
    for path in (model, state, tmp_path / "out.prototxt"):
        assert (Path(path).stat().st_mode & 0o777) == want, path


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=lambda mask: f"umask{mask:03o}")
def test_lmdb_folder_respects_the_umask(umask, tmp_path):
    from minicaffe.db import write_datum_lmdb

    previous = os.umask(umask)
    try:
        write_datum_lmdb(tmp_path / "db", [np.zeros((1, 2, 2), np.uint8)], [0])
    finally:
        os.umask(previous)
    assert ((tmp_path / "db").stat().st_mode & 0o777) == 0o777 & ~umask


def test_restore_detects_a_missing_or_mismatched_pair(tmp_path):
    solver = Solver(write_solver(tmp_path, snapshot=0))
    solver.step(2)
    model_2, state_2 = solver.snapshot()
    solver.step(1)
    model_3, state_3 = solver.snapshot()
    other = Solver(write_solver(tmp_path, snapshot=0))
    # A .solverstate whose caffemodel is gone (deleted, or never written).
    os.unlink(model_3)
    with pytest.raises(SolverError, match=r"tiny_iter_3.solverstate: its learned_net '.*tiny_iter_3"
                                          r"\.caffemodel' is missing"):
        other.restore(state_3)
    # A .solverstate naming the caffemodel of another iteration.
    pair = io.read_binary(state_3, caffe_pb2.SolverState())
    pair.learned_net = model_2
    io.write_binary(state_3, pair)
    with pytest.raises(SolverError, match=r"is iteration 3 but its learned_net '.*tiny_iter_2\.caffemodel' "
                                          r"is iteration 2: not one snapshot"):
        other.restore(state_3)
    assert other.iter == 0  # nothing restored
    other.restore(state_2)
    assert other.iter == 2
    # Through the CLI: one line, exit 1.
    result = run(["train", "--solver", str(write_solver(tmp_path)), "--snapshot", state_3])
    assert result.returncode == 1
    assert "not one snapshot" in assert_one_line_error(result.stderr)


def test_stale_temp_files_are_cleaned_on_the_next_run(tmp_path):
    solver = write_solver(tmp_path, max_iter=1, snapshot=0)
    stale = [tmp_path / ".tiny_iter_7.caffemodel.1a2b3c.tmp", tmp_path / ".tiny_iter_7.solverstate.4d5e.tmp"]
    kept = [tmp_path / ".other_iter_1.caffemodel.1a2b.tmp",  # another prefix's (maybe a live run's)
            tmp_path / ".tiny.notes.tmp",  # not a snapshot of ours
            tmp_path / "tiny_iter_7.caffemodel.tmp"]  # not hidden: not our naming pattern
    for path in stale + kept:
        path.write_bytes(b"half")
    result = run(["train", "--solver", str(solver)])
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert f"Removing {stale[0]}, left by an interrupted snapshot" in result.stderr
    assert (tmp_path / "tiny_iter_1.solverstate").is_file()
    assert not (tmp_path / "tiny.lock").exists()  # removed at the end of the run


def test_lock_refuses_a_second_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    prefix = str(tmp_path / "run" / "tiny")
    with SnapshotLock(prefix) as lock:
        assert lock.path.read_text() == f"pid {os.getpid()} on host {os.uname().nodename}\n"
        with pytest.raises(SolverError, match=rf"snapshot_prefix '{re.escape(prefix)}' is in use by another "
                                              rf"run \(pid {os.getpid()} on host"):
            SnapshotLock(prefix).acquire()
    assert not Path(f"{prefix}.lock").exists()
    # A holder killed by SIGKILL leaves its lock file; the kernel has dropped its flock.
    code = ("import os, sys; from minicaffe.solver import SnapshotLock; SnapshotLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, prefix], check=False)
    assert Path(f"{prefix}.lock").read_text().startswith("pid ")
    with SnapshotLock(prefix) as lock:
        assert lock.path.read_text().startswith(f"pid {os.getpid()} ")


# -- signals ---------------------------------------------------------------------------------------

def test_signal_handler_effects():
    with SignalHandler("stop", "snapshot") as handler:
        os.kill(os.getpid(), signal.SIGTERM)  # default: stop, as Ctrl-C
        assert handler.action() == STOP
        with pytest.raises(KeyboardInterrupt):  # again while stopping: at once
            os.kill(os.getpid(), signal.SIGTERM)
    with SignalHandler("stop", "snapshot", "snapshot") as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.action() == SNAPSHOT and handler.action() == NONE
    with SignalHandler("stop", "snapshot", "none") as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.action() == NONE
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_second_run_is_refused_and_sigterm_writes_a_snapshot(tmp_path):
    solver = write_solver(tmp_path, snapshot=0, display=20)
    first = start(["train", "--solver", str(solver)])
    lines = []
    try:
        for line in first.stderr:
            lines.append(line)
            if "] Iteration 20 (" in line:
                break
        assert first.poll() is None, "".join(lines)
        second = run(["train", "--solver", str(write_solver(tmp_path, "second"))])
        assert second.returncode == 1
        error = assert_one_line_error(second.stderr)
        prefix = tmp_path / "tiny"
        assert f"snapshot_prefix '{prefix}' is in use by another run (pid {first.pid} on host" in error
        assert not list(tmp_path.glob("*.solverstate"))  # the second run wrote nothing
        first.send_signal(signal.SIGTERM)
        _, rest = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    text = "".join(lines) + rest
    assert first.returncode == 0, text
    assert "Optimization stopped early." in text
    [state] = states(tmp_path)
    assert iteration(state) >= 20
    Solver(solver).restore(state)
    # The prefix is free again.
    assert run(["train", "--solver", str(write_solver(tmp_path, "third", max_iter=1))]).returncode == 0


# -- SIGKILL at random moments of snapshotting -----------------------------------------------------

def wait_for(predicate, process: subprocess.Popen, timeout: float = 30.0, poll: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"minicaffe train ended ({process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"nothing happened in {timeout}s: {process.stderr.read()}")
        time.sleep(poll)


def test_sigkill_during_snapshotting_leaves_every_snapshot_loadable_and_resumable(tmp_path):
    """22 runs each killed with SIGKILL while snapshotting every iteration; each run but the first resumes
    from the latest .solverstate. Half the kills are at a random moment once the run snapshots; the
    other half the moment a temporary snapshot file shows up (mid-write)."""
    solver_file = write_solver(tmp_path)
    checker = Solver(solver_file)
    chance = random.Random(9)
    kills = mid_write = 0
    for round_ in range(22):
        latest = states(tmp_path)[-1] if states(tmp_path) else None
        left_before = set(temps(tmp_path))
        resume = ["--snapshot", str(latest)] if latest else []
        process = start(["train", "--solver", str(solver_file), *resume])
        try:
            # Once it snapshots past `latest`, the previous run's temporary files must be gone.
            beyond = iteration(latest) if latest else 0
            wait_for(lambda beyond=beyond: states(tmp_path) and iteration(states(tmp_path)[-1]) > beyond,
                     process)
            assert not left_before & set(temps(tmp_path)), "stale temporary files not cleaned at start"
            if round_ % 2:
                wait_for(lambda: temps(tmp_path), process, poll=0)  # a temporary file lives for ms or less
            else:
                time.sleep(chance.uniform(0, 0.05))
            process.send_signal(signal.SIGKILL)
            mid_write += bool(temps(tmp_path))
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        kills += 1
        # Every pair on disk loads: each .solverstate restores with its caffemodel; every caffemodel parses.
        found = states(tmp_path)
        for state in found:
            checker.restore(state)
            assert checker.iter == iteration(state)
        for model in tmp_path.glob("*.caffemodel"):
            io.read_binary(model, caffe_pb2.NetParameter())
        # Keep the folder (and the time to check it) small: the test's own clean-up, not the product's.
        for state in found[:-2]:
            state.unlink()
            state.with_suffix(".caffemodel").unlink(missing_ok=True)
    assert kills >= 20
    assert mid_write >= 5, f"only {mid_write} kills found a temporary file in the folder"
    print(f"{kills} kills, {mid_write} with a temporary file in the folder")
    # The latest snapshot resumes to the end of a (shorter) run.
    latest = states(tmp_path)[-1]
    end = iteration(latest) + 2
    result = run(["train", "--solver", str(write_solver(tmp_path, "finish", max_iter=end)),
                  "--snapshot", str(latest)])
    assert result.returncode == 0, result.stderr
    assert "Optimization Done." in result.stderr
    assert (tmp_path / f"tiny_iter_{end}.solverstate").is_file()
    assert not temps(tmp_path)


# -- a full disk ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (needs root and a kernel that lets us mount); skips where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def test_a_full_disk_names_the_file_and_keeps_the_previous_snapshots(small_disk, tmp_path):
    # The solver and net live outside: only the snapshots go to the small disk. Each snapshot is
    # ~260 KB of weights plus as much history: the disk is full at the third.
    folder = tmp_path / "files"
    solver = write_solver(folder)
    text = solver.read_text().replace(f'snapshot_prefix: "{folder / "tiny"}"',
                                      f'snapshot_prefix: "{small_disk / "tiny"}"')
    solver.write_text(text)
    result = run(["train", "--solver", str(solver)])
    assert result.returncode == 1
    error = assert_one_line_error(result.stderr)
    assert re.fullmatch(rf"minicaffe train: error: {re.escape(str(small_disk))}/tiny_iter_\d+\."
                        r"(caffemodel|solverstate): cannot write \(No space left on device\)", error), error
    written = states(small_disk)
    assert written, result.stderr
    checker = Solver(solver)
    for state in written:
        checker.restore(state)
        assert checker.iter == iteration(state)
    assert not temps(small_disk)


def test_a_failed_write_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """ENOSPC simulated where a real disk reports it late (at fsync, e.g. NFS or delayed allocation):
    for the solverstate, after its caffemodel was written."""
    solver = Solver(write_solver(tmp_path, snapshot=0))
    solver.step(1)
    model_1, state_1 = solver.snapshot()
    before = Path(model_1).read_bytes(), Path(state_1).read_bytes()
    solver.step(1)
    real_fsync = os.fsync

    def full_disk_fsync(fd):
        if ".solverstate" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OSError) as raised:
        solver.snapshot()
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "tiny_iter_2.solverstate")
    assert cli.error_line(raised.value) == \
        f"{tmp_path / 'tiny_iter_2.solverstate'}: cannot write (No space left on device)"
    assert (Path(model_1).read_bytes(), Path(state_1).read_bytes()) == before
    assert not temps(tmp_path)
    assert not (tmp_path / "tiny_iter_2.solverstate").exists()
    # The caffemodel written before the failure has no solverstate: the previous pair is the one to use.
    assert (tmp_path / "tiny_iter_2.caffemodel").is_file()
    Solver(write_solver(tmp_path, snapshot=0)).restore(state_1)


# -- item 8: one line, never a traceback -------------------------------------------------------------

@pytest.mark.parametrize("error, line", [
    (ZeroDivisionError("division by zero"),
     "internal error: ZeroDivisionError: division by zero (run again with --debug for the traceback)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.caffemodel"),
     "/x/y.caffemodel: No such file or directory"),
    (MemoryError(), "out of memory (a size too large for this machine?)"),
    (ValueError("first line\n  second line\n"), "first line | second line"),
    (OSError("no errno"), "no errno"),
])
def test_any_error_is_one_line_and_debug_shows_the_traceback(error, line, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(minicaffe.commands.summary, "run", fail)
    assert cli.main(["summary", "--model", "x.prototxt"]) == 1
    out, err = capsys.readouterr()
    assert err == f"minicaffe summary: error: {line}\n"
    for args in (["--debug", "summary", "--model", "x"], ["summary", "--model", "x", "--debug"]):
        assert cli.main(args) == 1
        _, err = capsys.readouterr()
        assert err.startswith("Traceback (most recent call last):")
        assert err.endswith(f"minicaffe summary: error: {line}\n")
