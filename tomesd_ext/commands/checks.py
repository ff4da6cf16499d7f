"""Up-front checks of the commands' output paths (ValueError naming the option), and the atomic
text writer they use, so a bad path fails before any model is built, not after the work."""

from __future__ import annotations

import os
from pathlib import Path


def _writable_folder(flag: str, path: str, folder: Path) -> None:
    """The nearest existing ancestor of `folder` (missing folders are created later) must be a
    folder this process may write into."""
    a = folder.expanduser().absolute()
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise ValueError(f"{flag} {path!r}: {str(a)!r} is a file, not a folder")
    if not os.access(a, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: folder {str(a)!r} is not writable")


def check_output_file(flag: str, path: str, stdout_ok: bool = False) -> None:
    """A file the command will write at the end ('-' = stdout when stdout_ok)."""
    if stdout_ok and path == "-":
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    _writable_folder(flag, path, p.parent)
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {path!r} exists and is not writable")


def check_output_folder(flag: str, path: str) -> None:
    """A folder the command will create (or add files to)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path!r} is an existing file, not a folder")
    _writable_folder(flag, path, p)


def check_checkpoint_file(flag: str, path: str) -> None:
    """A single-file .safetensors checkpoint must be one (its header is read, nothing else)."""
    from ..models.single_file import builtin_architecture

    try:
        builtin_architecture(path)
    except Exception as err:  # safetensors raises its own error type for a non-checkpoint file
        raise ValueError(f"{flag} {path!r} is not a readable .safetensors checkpoint: {err}") from err


def plot_path(flag: str, path: str) -> str:
    """Check a figure path; one without a suffix gets .png (what matplotlib would write)."""
    check_output_file(flag, path)
    return path if os.path.splitext(path)[1] else path + ".png"


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace (parent folders are created)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
