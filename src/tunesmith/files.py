"""Small file helpers shared across stages."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary_path), then rename it to `path`: a killed process never leaves a partial
    file under the final name, and concurrent writers of the same content cannot corrupt it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def hash_files(paths: list[Path], digest: hashlib._Hash) -> None:
    """Feed every file under `paths` (files, or folders walked in sorted order) into `digest`: name and bytes."""
    for root in paths:
        files = sorted(item for item in root.rglob("*") if item.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
