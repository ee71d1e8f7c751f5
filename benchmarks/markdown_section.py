"""BENCHMARKS.md is shared by the benchmark scripts: each owns one section between its markers."""

from __future__ import annotations

import re
from pathlib import Path


def markers(script: str) -> tuple[str, str]:
    return f"<!-- BEGIN {script} -->", f"<!-- END {script} -->"


def update_section(path: Path, script: str, section: str) -> None:
    """Replace the section of `script` in the file at `path` (or append it), leaving the rest as is."""
    begin, end = markers(script)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
