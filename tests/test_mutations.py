"""benchmarks/mutations.py stays in step with the source: every mutation still finds its text (a
mutation that no longer applies tests nothing), and one that does not is reported, not applied."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mutations():
    spec = importlib.util.spec_from_file_location("mutations", REPO / "benchmarks" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mutations = _mutations()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return mutations.copy_repo(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_applies_and_changes_the_source(mutation, tmp_path, pristine):
    root = mutations.copy_repo(tmp_path)
    assert mutations.apply(mutation, root) is None
    for change in mutation.edits:
        assert (root / change.path).read_text() != (pristine / change.path).read_text(), change.path


def test_a_mutation_whose_text_is_gone_is_not_applied(tmp_path):
    stale = mutations.Mutation("stale", "a text no longer in the source",
                               (mutations.edit("kernels/relu.cu", r"no such text", "x"),), ("tests",))
    root = mutations.copy_repo(tmp_path)
    before = (root / "kernels/relu.cu").read_text()
    assert mutations.apply(stale, root) == "no match in kernels/relu.cu"
    assert (root / "kernels/relu.cu").read_text() == before
    assert not (root / ".git").exists()


def test_the_copy_imports_its_own_minicaffe(tmp_path):
    mutations.check_import(mutations.copy_repo(tmp_path))


def test_the_copy_leaves_out_virtual_environments_whatever_their_name(tmp_path):
    # .ci/run builds .venv-ci inside the clone; one copy of it per mutation filled CI's disk.
    source = tmp_path / "source"
    for venv in ("env-of-mine", ".venv-ci"):
        (source / venv / "lib").mkdir(parents=True)
        (source / venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (source / "minicaffe").mkdir()
    (source / "minicaffe" / "net.py").write_text("")
    (source / "environment").mkdir()  # a plain folder whose name looks like one is kept
    shutil.copytree(source, tmp_path / "copy", ignore=mutations.ignored)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["environment", "minicaffe"]
