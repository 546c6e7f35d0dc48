"""Output directories: created if missing, checked writable, one clear error otherwise."""

from __future__ import annotations

import os


def check_local(path: str, what: str) -> None:
    """Refuses a URL (gs://, s3://) where a local or mounted path is needed.

    Without this, os.makedirs('gs://bucket/run') makes a local folder named 'gs:' and the run
    keeps its checkpoints on one machine's disk, where a preempted VM loses them.
    """
    scheme, sep, rest = str(path).partition('://')
    if sep and scheme.isalnum():
        bucket = rest.split('/')[0] or 'BUCKET'
        raise ValueError(
            f'{what} {path!r} is a cloud storage URL, which resnet_jax cannot use yet; mount the '
            f'bucket (e.g. gcsfuse {bucket} /mnt/{bucket}) and pass the mounted path, as '
            'docs/scaling.md shows'
        )


def writable_dir(path: str, what: str) -> str:
    """The absolute path of directory `path`, created if needed.

    Raises:
      ValueError: naming `what` (e.g. 'workdir') and the path, if it is a URL, or cannot be
        created or written.
    """
    check_local(path, what)
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
