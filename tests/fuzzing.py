"""The fuzz harness of tests/test_fuzz.py: a runner that runs many `minicaffe` commands in one process, the
verdict on each, and helpers to make malformed inputs.

Starting Python and importing minicaffe costs about a second, so one runner process (this file run as a
script) runs case after case, each exactly as `python -m minicaffe.cli ARGS` would (runpy, with
SystemExit caught and an uncaught exception printed as the interpreter prints it), with stdout and stderr
captured per case and a per-case SIGALRM timeout. It runs under a memory limit (RLIMIT_AS), and reports
on a pipe of its own, "start" before each case and the result after it, so when a case kills the runner
(SIGSEGV, SIGBUS from a truncated LMDB) or hangs in C code where no alarm can stop it, the parent knows
which case it was, records it, and starts a fresh runner on the cases after it.

The verdict on each case (`verdict`): exit 0, or exit 1 with one error line on stderr after any glog
lines; never a traceback, a signal, a hang or a MemoryError. What a standalone process would show and
this one does not: bytes C code writes straight to file descriptor 2 (they go to the runner's log).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 30  # bytes of address space for the runner (RLIMIT_AS)
CASE_TIMEOUT = 20.0  # seconds per case
WATCHDOG_SLACK = 10.0  # the parent kills a runner this long after a case's own timeout
STARTUP_TIMEOUT = 120.0  # importing minicaffe (and compiling kernels on a cold cache)

# Numbers that break sizes and arithmetic: zero, negative, the 32- and 64-bit edges, huge, NaN.
SPECIAL_INTS = ["0", "-1", str(2**31), str(2**32 - 1), str(2**63), str(2**64)]
SPECIAL_FLOATS = ["0", "-1", "1e30", "-1e30", "nan", "inf"]


@dataclass
class Case:
    """One malformed input: `argv` for `minicaffe`, run in the folder `cwd`.

    expect: "any" (a correct result or a one-line error) or "error" (only the error: the input is invalid
    for certain). must_exist: paths that must still be there afterwards (nothing the user had is lost).
    entry: "cli", or "probe" for the harness's own tests (see probe())."""
    kind: str
    name: str
    argv: list[str]
    cwd: str = ""
    expect: str = "any"
    timeout: float = CASE_TIMEOUT
    must_exist: list[str] = field(default_factory=list)
    entry: str = "cli"


@dataclass
class Result:
    code: int | None  # exit status; a negative number is the signal that killed the runner
    stderr: str
    hang: bool = False
    killed: str = ""  # how the runner died, when it did
    runner_log: str = ""  # the runner's own fd 2 (faulthandler's dump) when it died
    seconds: float = 0.0
    lost: list[str] = field(default_factory=list)  # of the case's must_exist, right after it ran


# -- the verdict --------------------------------------------------------------------------------------

def verdict(case: Case, result: Result) -> str | None:
    """None when the case ended well, else what went wrong, starting with its cause."""
    from conftest import one_line_error

    if result.hang:
        return f"hang: no result within {case.timeout:g} s"
    if result.killed:
        return f"crash: {result.killed}"
    if "Traceback (most recent call last)" in result.stderr:
        last = result.stderr.strip().splitlines()[-1]
        return f"traceback: {last[:200]}"
    if result.lost:
        return f"data lost: {', '.join(result.lost)} removed (exit {result.code})"
    if result.code == 0:
        return "accepted: exit 0 for an input that must be refused" if case.expect == "error" else None
    if one_line_error(result.code, result.stderr, log_lines=True):
        return None
    return f"unclear: exit {result.code} without a one-line error"


def cause(problem: str) -> str:
    """The group a verdict falls in: its kind, and for a traceback the exception type."""
    kind, _, rest = problem.partition(": ")
    if kind == "traceback":
        return f"traceback {rest.split(':')[0]}"
    if kind == "crash":
        return f"crash {rest.split(' ')[0]}"
    return kind


# -- the parent's side --------------------------------------------------------------------------------

def _limit_resources() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()  # its own process group, so a kill takes its children (g++) too


def run_cases(cases: list[Case], work: Path, slack: float = WATCHDOG_SLACK) -> list[Result]:
    """Run every case in runner processes; returns their results in order."""
    work.mkdir(parents=True, exist_ok=True)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps([asdict(case) for case in cases]))
    results: dict[int, Result] = {}
    start, runs = 0, 0
    while start < len(cases):
        start = _run_runner(cases, cases_file, start, results, work / f"runner{runs}.log", slack)
        runs += 1
    return [results[i] for i in range(len(cases))]


def _run_runner(cases: list[Case], cases_file: Path, start: int, results: dict[int, Result],
                log_path: Path, slack: float) -> int:
    """One runner from case `start` on; returns the index to go on from."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(cases_file), str(write_fd), str(start)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(write_fd,), env=env,
            preexec_fn=_limit_resources)
    os.close(write_fd)
    current, buffer = None, b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    reader = os.fdopen(read_fd, "rb", buffering=0)
    try:
        while True:
            ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:  # no word from the runner in time: a hang it could not stop itself
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                if current is None:
                    raise RuntimeError(f"the fuzz runner did not start: {_tail(log_path)}")
                results[current] = Result(None, "", hang=True)
                return current + 1
            chunk = reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if "start" in message:
                    current = message["start"]
                    deadline = time.monotonic() + cases[current].timeout + slack
                else:
                    results[message["done"]] = Result(message["code"], message["stderr"], message["hang"],
                                                      seconds=message["seconds"], lost=message["lost"])
                    current = None
    finally:
        reader.close()
    code = process.wait()
    if current is None:  # it ran to the end, or stopped after a hang
        done = [index for index in results if index >= start]
        if not done:
            raise RuntimeError(f"the fuzz runner failed (exit {code}): {_tail(log_path)}")
        return max(done) + 1
    results[current] = Result(code, "", killed=_signal_name(code), runner_log=_fatal_error(log_path))
    return current + 1


def _signal_name(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"{name} (out of memory?)" if name == "SIGKILL" else name
    return f"runner exited with {code} during the case"


def _tail(path: Path, chars: int = 600) -> str:
    return path.read_text(errors="replace")[-chars:]


def _fatal_error(path: Path) -> str:
    """faulthandler's report of the signal, and the innermost frames it lists."""
    text = path.read_text(errors="replace")
    if "Fatal Python error" not in text:
        return _tail(path)
    lines = text[text.rfind("Fatal Python error"):].splitlines()
    frames = [line.strip() for line in lines if line.strip().startswith("File ")]
    return "\n".join(lines[:1] + frames[:3])


# -- the runner's side --------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that product code catching Exception lets it by."""


def _on_alarm(signum, frame):
    raise CaseTimeout


def probe(argv: list[str]) -> int:
    """Misbehaviours on demand, for the harness's own tests."""
    action = argv[0]
    if action == "ok":
        print("fine")
        return 0
    if action == "error":
        print("I1130 13:00:00.000000 12345 net.cpp:1] a log line", file=sys.stderr)
        print("minicaffe probe: error: bad input", file=sys.stderr)
        return 1
    if action == "two-lines":
        print("first\nsecond", file=sys.stderr)
        return 1
    if action == "raise":
        raise ZeroDivisionError("division by zero")
    if action == "memory":
        return len(bytearray(MEMORY_LIMIT))
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "sleep":  # a hang the alarm stops
        time.sleep(3600)
    if action == "stuck":  # a hang it cannot: SIGALRM blocked, as in a long C call
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    if action == "remove":
        shutil.rmtree(argv[1])
        return 0
    raise AssertionError(f"unknown probe {action}")


def _run_one(case: dict) -> tuple[int, str, bool]:
    import runpy
    import warnings

    os.makedirs(case["cwd"], exist_ok=True)
    os.chdir(case["cwd"])
    out, err = io.StringIO(), io.StringIO()
    code, hang = 1, False
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    sys.argv = ["minicaffe", *case["argv"]]
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, case["timeout"])
    # catch_warnings resets the "already shown" registries, so a warning shows in every case that causes
    # it, as in a process of its own.
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if case["entry"] == "probe":
                code = probe(case["argv"])
            else:
                runpy.run_module("minicaffe.cli", run_name="__main__", alter_sys=True)
                code = 0
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
        except CaseTimeout as timeout:
            hang = True
            import traceback

            where = traceback.extract_tb(timeout.__traceback__)[-4:-1]  # not _on_alarm itself
            print("fuzz runner: timed out in " + " <- ".join(f"{Path(frame.filename).name}:{frame.lineno} "
                                                             f"{frame.name}" for frame in reversed(where)),
                  file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    return code, err.getvalue(), hang


def runner_main(cases_file: str, fd: str, start: str) -> None:
    import gc

    cases = json.loads(Path(cases_file).read_text())
    with os.fdopen(int(fd), "w") as report:
        for index in range(int(start), len(cases)):
            report.write(json.dumps({"start": index}) + "\n")
            report.flush()
            began = time.monotonic()
            code, stderr, hang = _run_one(cases[index])
            lost = [path for path in cases[index]["must_exist"] if not os.path.lexists(path)]
            report.write(json.dumps({"done": index, "code": code, "stderr": stderr[-4000:], "hang": hang,
                                     "seconds": time.monotonic() - began, "lost": lost}) + "\n")
            report.flush()
            gc.collect()
            if hang:  # a case stopped mid-way may leave locks or threads behind: go on in a fresh runner
                return


# -- making inputs ------------------------------------------------------------------------------------

def hypothesis_examples(strategy, count: int) -> list:
    """`count` examples of a hypothesis strategy, the same on every run of the same source (derandomize
    seeds from the test function's source): the cases are generated first and then run in one batch,
    since a process per example would be too slow."""
    from hypothesis import HealthCheck, Phase, given, settings

    found: list = []

    @settings(derandomize=True, max_examples=count, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def record(example):
        if example not in found:
            found.append(example)

    record()
    return found


def numeric_sites(text: str) -> list[int]:
    """Indices of the lines of a text prototxt that hold one number (`field: 12`)."""
    sites = []
    for index, line in enumerate(text.splitlines()):
        name, _, value = line.strip().partition(": ")
        if value and name.isidentifier() and _is_number(value):
            sites.append(index)
    return sites


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def replace_line(text: str, index: int, new: str | None) -> str:
    """`text` with line `index` replaced by `new` (None: removed), keeping its indentation."""
    lines = text.splitlines()
    if new is None:
        del lines[index]
    else:
        lines[index] = lines[index][: len(lines[index]) - len(lines[index].lstrip())] + new
    return "\n".join(lines) + "\n"


def set_value(text: str, index: int, value: str) -> str:
    name = text.splitlines()[index].strip().partition(": ")[0]
    return replace_line(text, index, f"{name}: {value}")


def format_number(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


def truncations(data: bytes) -> list[int]:
    """Lengths to cut a file to: nothing, its first bytes, fractions, one short of whole."""
    size = len(data)
    return sorted({0, 1, 2, 8, size // 7, size // 3, size // 2, size * 9 // 10, size - 1} - {size})


def bit_flips(data: bytes, count: int, seed: int) -> list[tuple[int, int]]:
    """(byte offset, bit) pairs, the same for every run: the first bytes (headers, tags) and spread."""
    rng = random.Random(seed)
    head = [(offset, rng.randrange(8)) for offset in range(min(6, len(data)))]
    rest = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(count - len(head))]
    return head + rest


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


def idx_file(type_code: int, dims: list[int], payload: bytes) -> bytes:
    """An IDX file (LeCun's MNIST format): 0 0 type ndim, big-endian uint32 dims, the data."""
    header = bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d & 0xFFFFFFFF) for d in dims)
    return header + payload


def png_bomb(width: int, height: int) -> bytes:
    """A gray PNG of width x height zeros: a few hundred kB that decode to width*height bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 and the pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faulthandler

    faulthandler.enable()
    runner_main(*sys.argv[1:4])
