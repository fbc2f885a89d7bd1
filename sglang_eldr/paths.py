"""User-given paths made absolute where the CLIs read them: servers and the router run with other
working directories (a cluster's servers run in its log directory), so a relative path would
name another file there, or be taken for a hub id."""

from __future__ import annotations

import os
from pathlib import Path


def local_path(path: str | os.PathLike[str]) -> str:
    """A file or directory path as an absolute one (relative to the current directory)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def model_path(path: str) -> str:
    """A local model directory as an absolute path; anything not on disk (a hub id such as
    `Qwen/Qwen3-30B-A3B`) unchanged."""
    return local_path(path) if Path(path).expanduser().exists() else path
