"""The data beside the repo is found through one helper: $MINICAFFE_SHARED, else <repo>/../shared."""

from __future__ import annotations

import pytest
from conftest import REPO, shared_data


def test_variable_names_the_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("MINICAFFE_SHARED", str(tmp_path))
    assert shared_data("data/mnist", "t10k-images-idx3-ubyte.gz") == tmp_path / "data" / "mnist"


def test_skip_names_the_variable_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICAFFE_SHARED", str(tmp_path))
    with pytest.raises(pytest.skip.Exception) as skip:
        shared_data("models/mtcnn", "det1.caffemodel")
    message = str(skip.value)
    assert "MINICAFFE_SHARED" in message and f"models/mtcnn/det1.caffemodel in {tmp_path}" in message


def test_default_is_the_shared_folder_beside_the_repo(monkeypatch):
    monkeypatch.delenv("MINICAFFE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"in {REPO.parent / 'shared'}:"):
        shared_data("no/such/folder", "file")
