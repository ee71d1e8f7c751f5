"""Mutation testing: plant one small bug at a time and see whether the tests catch it.

    python benchmarks/mutations.py                   # every mutation; updates BENCHMARKS.md
    python benchmarks/mutations.py --only relu-backward-at-zero --no-write

Each mutation is a textual edit of the source: per file, variants (a regular expression and its
replacement) tried in turn; the first that matches is applied at every match, so a mutation can follow
small rewrites of the code it targets.
For each mutation the repository is copied to a temporary folder (without .git and caches), the edit is
applied there, and the mutation's own pytest selection runs on the copy, with PYTHONPATH pointing at it
and a MINICAFFE_CACHE_DIR of this run's own (mutant kernels never reach the user's kernel cache).
Before the mutants, every selection runs once on an unmutated copy.

Outcomes: "killed" (the tests failed: good), "SURVIVED" (they passed: a gap in the tests), "not
applicable" (the text to mutate is not there any more: update the mutation), "no tests" (the selection
is missing or empty), "baseline fails" (the selection fails without the mutation, so it proves nothing).
Prints a table and updates this script's section of BENCHMARKS.md. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/mutations.py")
CACHES = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis",
                                ".ruff_cache", "build", "dist", ".venv*", "venv")


def ignored(folder: str, names: list[str]) -> set[str]:
    """Caches and every virtual environment, whatever its name: .ci/run makes .venv-ci inside the
    clone, and copying its 1.3 GB for each mutation filled the CI machine's disk."""
    skipped = set(CACHES(folder, names))
    return skipped | {name for name in names if (Path(folder) / name / "pyvenv.cfg").is_file()}


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository
    variants: tuple[tuple[str, str], ...]  # (regular expression (re.S), re.sub replacement), tried in turn


def edit(path: str, pattern: str, replacement: str) -> Edit:
    return Edit(path, ((pattern, replacement),))


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # the planted bug, in words
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest arguments run on the mutant


# <object>.decay_mult (or decay_mults[i], params_decay_mult()[i]): an attribute access, so that the
# module docstring's "weight_decay * decay_mult" is not what gets mutated.
DECAY_MULT = r"((?:[\w()\[\]]+\.)+\w*decay_mults?\b(?:\(\))?(?:\[[\w.]+\])?)"

MUTATIONS = (
    Mutation("maxpool-backward-accumulates", "max-pool backward adds into dx instead of overwriting it",
             (edit("minicaffe/layers/pooling.py",
                   r"(# MAX: a scatter through the argmax[^\n]*\n)\s*dx\.fill\(0\)\n",
                   r"\1"),),
             ("tests/test_pooling.py",)),
    Mutation("col2im-one-launch", "col2im as one launch over all kernel columns (a race on the GPU)",
             (edit("kernels/convolution.cu",
                   r"(const int image_stride, const int) kj\) \{\n(\s*)PLANE_LOOP\(p, planes\)",
                   r"\1 kj_unused) {\n\2for (int kj = 0; kj < kernel_w; ++kj) PLANE_LOOP(p, planes)"),
              edit("minicaffe/layers/convolution.py", r"for kj in range\(geometry\.kernel\[1\]\):",
                   "for kj in range(1):")),
             ("tests/test_race.py",)),
    Mutation("col2im-gather-tap-ranges", "col2im_gather adds each tap over its valid range of w instead of "
             "masking the whole row (faster on the CPU, a race on the GPU)",
             (edit("kernels/convolution.cu",
                   r"INNER_LOOP\(w, width\) \{\n\s*if \(w \+ shift >= 0 && w \+ shift < out_w\) "
                   r"dst\[w\] \+= src\[w \+ shift\];\n\s*\}",
                   "const int lo = shift < 0 ? -shift : 0;\n"
                   "        const int hi = out_w - shift < width ? out_w - shift : width;\n"
                   "        INNER_LOOP(j, hi - lo) { dst[lo + j] += src[lo + j + shift]; }"),),
             ("tests/test_race.py", "-k", "every_kernel")),
    Mutation("relu-backward-at-zero", "ReLU backward `x > 0` -> `x >= 0` (slope side lost at x == 0)",
             (edit("kernels/relu.cu", r"return v > real\(0\);", "return v >= real(0);"),),
             ("tests/test_core.py", "-k", "relu")),
    Mutation("decay-mult-on-off", "decay_mult used as an on/off flag (weight_decay * bool(decay_mult))",
             # weight_decay * <object>.decay_mult, or the factors the other way round.
             (Edit("minicaffe/solver.py", (
                 (r"(weight_decay\s*\*\s*)" + DECAY_MULT, r"\1bool(\2)"),
                 (DECAY_MULT + r"(\s*\*\s*[\w.]*weight_decay)", r"bool(\1)\2"),
             )),),
             ("tests/test_solver.py",)),
    Mutation("maxpool-window-off-by-one", "max-pool forward window one row too tall (bound hend + 1)",
             (edit("kernels/pooling.cu",
                   r"const int hend = hs \+ kernel_h < height \? hs \+ kernel_h : height;",
                   "const int hend = hs + kernel_h + 1 < height ? hs + kernel_h + 1 : height;"),),
             ("tests/test_pooling.py",)),
    Mutation("sigmoid-backward-sign", "sigmoid backward y * (y - 1) instead of y * (1 - y)",
             (edit("kernels/activation.cu", r"y\[i\] \* \(real\(1\) - y\[i\]\)", "y[i] * (y[i] - real(1))"),),
             ("tests/test_activations.py", "-k", "Sigmoid")),
    Mutation("dropout-scale", "dropout scales by 1 - ratio instead of 1 / (1 - ratio)",
             (edit("minicaffe/layers/dropout.py", r"1\.0 / \(1\.0 - self\.ratio\)", "(1.0 - self.ratio)"),),
             ("tests/test_dropout.py",)),
    Mutation("accuracy-nan-correct", "Accuracy counts a row of NaN scores as correct (Caffe's comparison)",
             (edit("kernels/accuracy.cu",
                   r"sc\[j\] != sc\[j\] \? real\(channels\) : (real\(sc\[j\] > tp\[j\]\))", r"\1"),),
             ("tests/test_losses.py", "-k", "accuracy")),
    Mutation("ip-weight-diff-overwritten", "InnerProduct overwrites its weight diff instead of adding to it",
             # Its weight gradient goes through blas.gemm_accumulate (BLAS beta = 1): beta 0 overwrites.
             (edit("minicaffe/blas.py", r"cpu_gemm\(1\.0, a, b, 1\.0, c\)", "cpu_gemm(1.0, a, b, 0.0, c)"),),
             ("tests/test_inner_product.py",)),
    Mutation("sgd-momentum-dropped", "SGD ignores momentum (history *= 0)",
             # Plain SGD only (Nesterov and AdaDelta scale their histories too): in the function
             # _sgd, or in a class SGDSolver.
             (Edit("minicaffe/solver.py", (
                 (r"(def _sgd\b.*?history \*= )[\w.]*momentum\b", r"\g<1>0.0"),
                 (r"(class SGDSolver\b.*?history \*= )[\w.]*momentum\b", r"\g<1>0.0"),
             )),),
             ("tests/test_solver.py",)),
)


def copy_repo(folder: Path) -> Path:
    """The repository without .git and caches, at folder/repo; folder/shared links to ../shared."""
    root = folder / "repo"
    shutil.copytree(REPO, root, ignore=ignored)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (folder / "shared").symlink_to(shared)
    return root


def apply(mutation: Mutation, root: Path) -> str | None:
    """Edit the copy at root; returns why the mutation does not apply, or None when applied."""
    for change in mutation.edits:
        path = root / change.path
        if not path.is_file():
            return f"{change.path} is missing"
        text = path.read_text()
        for pattern, replacement in change.variants:
            mutated, count = re.subn(pattern, replacement, text, flags=re.S)
            if count:
                path.write_text(mutated)
                break
        else:
            return f"no match in {change.path}"
    return None


def run_tests(root: Path, tests: tuple[str, ...], cache: Path, timeout: float) -> tuple[str, float, str]:
    """(outcome of the selection: passed / failed / timeout / no tests / error, seconds, output tail)."""
    env = dict(os.environ, PYTHONPATH=str(root), MINICAFFE_CACHE_DIR=str(cache))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    tail = (result.stdout + result.stderr)[-2000:]
    # pytest's exit codes: 0 passed, 1 failed, 4 usage error (e.g. a missing file), 5 nothing collected.
    outcome = {0: "passed", 1: "failed", 4: "no tests", 5: "no tests"}.get(result.returncode, "error")
    return outcome, seconds, tail


def check_import(root: Path) -> None:
    """The copy, not an installed minicaffe, must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=str(root))
    found = subprocess.run([sys.executable, "-c", "import minicaffe; print(minicaffe.__file__)"], cwd=root,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"the copy at {root} imports minicaffe from {found}")


def run(mutations: tuple[Mutation, ...], timeout: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="minicaffe-mutations-") as temp:
        temp = Path(temp)
        cache = temp / "cache"
        baseline_root = copy_repo(temp / "baseline")
        check_import(baseline_root)
        baselines: dict[tuple[str, ...], str] = {}
        for mutation in mutations:
            if mutation.tests not in baselines:
                baselines[mutation.tests] = run_tests(baseline_root, mutation.tests, cache, timeout)[0]
        for i, mutation in enumerate(mutations):
            root = copy_repo(temp / f"mutant{i}")
            problem = apply(mutation, root)
            baseline = baselines[mutation.tests]
            seconds, tail = 0.0, ""
            if problem is not None:
                outcome = f"not applicable ({problem})"
            elif baseline == "no tests":
                outcome = "no tests"
            elif baseline != "passed":
                outcome = f"baseline fails ({baseline})"
            else:
                result, seconds, tail = run_tests(root, mutation.tests, cache, timeout)
                outcome = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed (timeout)"}.get(
                    result, result)
            rows.append({"mutation": mutation, "outcome": outcome, "seconds": seconds, "tail": tail})
            print(f"{mutation.name:32} {outcome:40} {seconds:6.1f} s  {' '.join(mutation.tests)}", flush=True)
            shutil.rmtree(root)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    survived = sum(row["outcome"] == "SURVIVED" for row in rows)
    killed = sum(row["outcome"].startswith("killed") for row in rows)
    lines = [
        BEGIN,
        "## Mutation testing (benchmarks/mutations.py)",
        "",
        f"Reproduce: `{command}` (updates this section). Run {dt.date.today().isoformat()}, Python "
        f"{sys.version.split()[0]}. Each mutation plants one small bug in a copy of the source and runs "
        f"the listed tests there: **killed** means the tests caught it, **SURVIVED** is a gap in the tests. "
        f"{killed} of {len(rows)} killed, {survived} survived.",
        "",
        "| mutation | planted bug | file(s) | tests | outcome | s |",
        "|---|---|---|---|---|---:|",
    ]
    for row in rows:
        mutation = row["mutation"]
        files = ", ".join(change.path for change in mutation.edits)
        lines.append(f"| {mutation.name} | {mutation.bug} | {files} | `{' '.join(mutation.tests)}` | "
                     f"{row['outcome']} | {row['seconds']:.0f} |")
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MUTATIONS],
                        help="run only these mutations")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test selection (default 600)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--show-output", action="store_true", help="print the test output of survivors")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name:32} {mutation.bug}")
        return 0
    mutations = tuple(m for m in MUTATIONS if not args.only or m.name in args.only)
    rows = run(mutations, args.timeout)
    if args.show_output:
        for row in rows:
            if row["outcome"] == "SURVIVED":
                print(f"\n== {row['mutation'].name}\n{row['tail']}")
    if not args.no_write:
        command = "python benchmarks/mutations.py"
        if args.only:
            command += " --only " + " ".join(args.only)
        update_section(Path(args.output), "benchmarks/mutations.py", markdown(rows, command))
        print(f"\nupdated {args.output}")
    return 1 if any(row["outcome"] == "SURVIVED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
