"""Output directories: created if missing, checked writable, one clear error otherwise."""

from __future__ import annotations

import os


def writable_dir(path: str, what: str) -> str:
    """The absolute path of directory `path`, created if needed.

    Raises:
      ValueError: naming `what` (e.g. 'workdir') and the path, if it cannot be created or
        written.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f'{what} {path!r} cannot be created: {e.strerror}') from None
    if not os.access(path, os.W_OK):
        raise ValueError(f'{what} {path!r} is not writable')
    return path


def write_text_atomic(path: str, text: str) -> None:
    """Writes `path` through a temporary file and a rename: readers see all of it or none."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)
