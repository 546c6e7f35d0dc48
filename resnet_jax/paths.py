"""Where runs keep their files: local paths and cloud storage URLs (gs://) through one layer.

Every file the trainer, evaluate, sweep and report read or write outside Orbax goes through these
functions, so a workdir on `gs://bucket/run` holds exactly what a local one does. Local paths use
the OS (atomic renames, O_EXCL); URLs use fsspec (gcsfs for gs://, the backend etils.epath and so
Orbax use without TensorFlow). What differs, and how it is bridged:

* An object store has no rename and no append: an object upload is already all-or-nothing, so
  `write_text` uploads it whole, and appenders (metrics.jsonl) rewrite the object.
* Exclusive creation is a conditional upload (`ifGenerationMatch=0`), the object-store O_EXCL.
* gcsfs caches listings; every query here drops the cache first, since Orbax, other hosts and
  our own background threads change the bucket behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

# gcsfs otherwise asks every bucket whether it has a hierarchical namespace first: one extra
# round trip per operation on GCS, and a minute of retries on an emulator that lacks the API.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


CACHE_DIR_ENV = 'RESNET_JAX_CACHE_DIR'  # default: ~/.cache/resnet_jax


def cache_dir() -> str:
    """Where derived data is kept between runs (the pixel mean, the XLA compilation cache)."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.expanduser('~/.cache/resnet_jax')


def is_url(path: Any) -> bool:
    """Whether `path` is a URL (gs://bucket/x, s3://...) rather than a local path."""
    scheme, sep, _ = str(path).partition('://')
    return bool(sep) and scheme.isalnum()


SUPPORTED_SCHEMES = ('gs',)  # URL schemes tested here (against a GCS emulator)


def check_supported(path: str, what: str) -> None:
    """Refuses a URL of a storage this layer is not tested with, before anything is written."""
    scheme = str(path).partition('://')[0]
    if is_url(path) and scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f'{what} {path!r}: {scheme}:// is not supported; expected a local path or '
            'gs://BUCKET/FOLDER'
        )


def check_path_text(path: Any, what: str) -> None:
    """Refuses a path given as nothing, as blanks, or with blanks around it, naming `what`.

    `normalize('')` is the current directory and `normalize(' ')` a folder named ' ': a flag
    left empty by a script (`--workdir=$UNSET`) or a stray space would silently train into,
    or read from, somewhere nobody meant.

    Raises:
      ValueError: naming `what` (the flag or field, e.g. '--workdir') and the value.
    """
    if path is None:
        raise ValueError(f'{what} is not given; expected a path')
    text = str(path)
    if not text.strip():
        raise ValueError(f'{what} {text!r} is {"blank" if text else "empty"}; expected a path')
    if text != text.strip():
        raise ValueError(
            f'{what} {text!r} begins or ends with whitespace; expected a path without it (a '
            'stray space or newline in the command?)'
        )


def normalize(path: str) -> str:
    """An absolute local path (~ expanded), or the URL without a trailing slash."""
    path = str(path)
    if is_url(path):
        return path.rstrip('/')
    return os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
    return os.path.join(str(path), *names)  # '/' on every system a URL can come from


def _fs(path: str) -> Any:
    """The fsspec filesystem of a URL, its listing cache dropped.

    The very instance etils.epath (and so Orbax) uses: gcsfs caches listings per instance, and
    a step we move aside must be gone from Orbax's view of the bucket too.

    Raises:
      ValueError: naming the URL, if its scheme has no filesystem or no credentials are found.
    """
    from etils.epath import backend

    scheme = path.partition('://')[0]
    try:
        fs = backend.fsspec_backend.fs(path)
    except ImportError as e:
        raise ValueError(f'{path!r}: no filesystem for {scheme}:// is installed ({e})') from None
    except ValueError as e:
        raise ValueError(f'{path!r}: {scheme}:// is not a known storage scheme ({e})') from None
    except Exception as e:  # google.auth's DefaultCredentialsError and kin
        raise ValueError(
            f'cannot use {path!r}: {type(e).__name__}: {e} (run `gcloud auth application-default '
            'login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key)'
        ) from None
    if fs.protocol == 'file' or 'file' in fs.protocol:
        raise ValueError(f'{path!r}: {scheme}:// is not a supported storage scheme (gs://)')
    fs.invalidate_cache()
    # gcsfs logs each failed request with a traceback before raising; the error reaches the
    # caller anyway, which names it in one line.
    logging.getLogger(type(fs).__module__.split('.')[0]).setLevel(logging.CRITICAL)
    return fs


class StorageError(OSError):
    """A request to a cloud store failed after its client's retries (unreachable, denied)."""


@contextlib.contextmanager
def _remote(path: str, doing: str) -> Iterator[None]:
    """Turns a client library's failure into one StorageError naming the path and the act."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, StorageError):
        raise
    except Exception as e:
        raise StorageError(f'could not {doing} {path}: {describe(e)}') from e


# --- Queries --------------------------------------------------------------------------------


def _kind(path: str) -> str | None:
    """'file', 'directory' or None (absent) for a URL. fsspec's exists/isdir answer False
    for any failure; an unreachable store must not look like an empty one."""
    with _remote(path, 'look up'):
        try:
            return _fs(path).info(path)['type']
        except FileNotFoundError:
            return None


def exists(path: str) -> bool:
    return _kind(path) is not None if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _kind(path) == 'directory' if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _kind(path) == 'file' if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in directory `path`, sorted ([] if it does not exist)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not isdir(path):
        return []
    with _remote(path, 'list'):
        entries = _fs(path).ls(path, detail=False)
    return sorted(entry.rstrip('/').rsplit('/', 1)[-1] for entry in entries)


def age_seconds(path: str) -> float:
    """Seconds since `path` was last written. Raises FileNotFoundError if it does not exist."""
    if not is_url(path):
        return time.time() - os.stat(path).st_mtime
    with _remote(path, 'look up'):
        modified = _fs(path).modified(path)  # FileNotFoundError too
    return time.time() - modified.timestamp()


def files_under(directory: str) -> list[str]:
    """The relative paths of all files below `directory`, in os.walk order (top-down, sorted):
    a folder's files before its sub-folders', so local and remote digests of a step agree."""
    if is_url(directory):
        root = directory.partition('://')[2].rstrip('/')
        with _remote(directory, 'list'):
            found = _fs(directory).find(directory)
        relative = [p[len(root) + 1 :] for p in found if p.startswith(root + '/')]
    else:
        relative = [
            os.path.relpath(os.path.join(parent, name), directory)
            for parent, _, names in os.walk(directory)
            for name in names
        ]

    def walk_order(rel: str) -> tuple:
        *folders, name = rel.split('/')
        return (*((1, f) for f in folders), (0, name))

    return sorted(relative, key=walk_order)


# --- Reading and writing --------------------------------------------------------------------


@contextlib.contextmanager
def open_file(path: str, mode: str = 'r') -> Iterator[Any]:
    """`open` for local paths and URLs (read modes; writes go through write_text)."""
    if is_url(path):
        with _remote(path, 'open'):
            f = _fs(path).open(path, mode)
        with f:
            yield f
    else:
        with open(path, mode) as f:
            yield f


def read_text(path: str) -> str:
    """The text of `path`. Raises FileNotFoundError (or OSError) like `open`."""
    if is_url(path):
        with _remote(path, 'read'):
            return _fs(path).cat_file(path).decode()
    with open(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes `path` all at once: a reader sees the old contents or the new, never part.

    Local: a temporary file beside it (same folder, so the rename is atomic; a hidden name of
    its own, so two writers never share one), renamed over it, and removed if anything fails
    (a full disk, a directory where the file should go). URL: one object upload, which the
    store commits whole (there is nothing to rename).
    """
    if is_url(path):
        with _remote(path, 'write'):
            _fs(path).pipe_file(path, data)
        return
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def append_text(path: str, text: str, *, whole: Callable[[], str]) -> None:
    """Adds `text` to the end of `path`, whose new contents are `whole()`.

    Local: one append (a crash cuts at most this line). URL: object stores cannot append, so
    the object is replaced by `whole` in one upload (metrics files are small).
    """
    if is_url(path):
        write_text(path, whole())
    else:
        with open(path, 'a') as f:
            f.write(text)


def create_exclusive(path: str, text: str) -> bool:
    """Creates `path` holding `text` if it does not exist; False if it does (atomic test)."""
    if is_url(path):
        try:
            with _remote(path, 'create'):
                _fs(path).pipe_file(path, text.encode(), mode='create')  # ifGenerationMatch=0
        except FileExistsError:
            return False
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def touch(path: str) -> None:
    """Marks `path` as written now (a heartbeat)."""
    if is_url(path):
        write_text(path, read_text(path))  # objects are immutable: the same bytes, new time
    else:
        os.utime(path)


def remove(path: str) -> None:
    """Removes file `path`. Raises FileNotFoundError if it does not exist."""
    if is_url(path):
        if not exists(path):
            raise FileNotFoundError(path)
        with _remote(path, 'remove'):
            _fs(path).rm_file(path)
    else:
        os.remove(path)


def move(source: str, target: str) -> None:
    """Moves a file or folder. On an object store a copy then a delete: not atomic, so callers
    only move what nobody else writes (a quarantined checkpoint, a lock already judged stale)."""
    if is_url(source):
        with _remote(source, f'move to {target}'):
            _move_remote(source, target)
    else:
        shutil.move(source, target)


def _move_remote(source: str, target: str) -> None:
    if not exists(source):
        raise FileNotFoundError(source)
    fs = _fs(source)
    # Copy then delete, by hand: gcsfs's mv tries a server-side moveTo first, which not every
    # GCS API offers, and logs a traceback for each object when it falls back.
    folder = isdir(source)
    fs.copy(source, target, recursive=folder)
    fs.rm(source, recursive=folder)


def remove_empty_dir(path: str) -> None:
    """Removes local directory `path` if it is empty (a workdir made for a start that was
    refused); leaves it, and anything in it, otherwise. Object stores have no empty folders."""
    if not is_url(path):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def copy_file(source: str, target: str) -> None:
    """Copies a file from a local path or URL to a local path or URL."""
    with open_file(source, 'rb') as f:
        write_bytes(target, f.read())


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding `path`'s bytes: itself if local, else a temporary copy (same suffix,
    removed afterwards) for readers that open only local files (torch, Keras)."""
    if not is_url(path):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix='resnet_jax-') as folder:
        local = os.path.join(folder, path.rstrip('/').rsplit('/', 1)[-1])
        with open_file(path, 'rb') as source, open(local, 'wb') as target:
            shutil.copyfileobj(source, target)
        yield local


def upload(local_path: str, target: str) -> None:
    """Copies a local file to `target` (a URL, or another local path)."""
    if is_url(target):
        with _remote(target, 'upload'):
            _fs(target).put_file(local_path, target)
    else:
        shutil.copyfile(local_path, target)


# --- Directories ----------------------------------------------------------------------------


def writable_dir(path: str, what: str) -> str:
    """`path` normalised, created if needed, and shown to be writable.

    A URL is checked by writing and deleting a probe object, so a missing bucket, missing
    credentials or an unreachable store stop the run here, before anything else is written.

    Raises:
      ValueError: naming `what` (e.g. 'workdir') and the path, with the reason: empty or
        blank-edged (`check_path_text`), unsupported, not creatable or not writable.
    """
    check_path_text(path, what)
    check_supported(path, what)
    path = normalize(path)
    if is_url(path):
        _check_bucket_writable(path, what)
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f'{what} {path!r} cannot be created: {e.strerror}') from None
    if not os.access(path, os.W_OK):
        raise ValueError(f'{what} {path!r} is not writable')
    return path


def _check_bucket_writable(path: str, what: str) -> None:
    scheme, _, rest = path.partition('://')
    bucket = rest.split('/')[0]
    if not bucket:
        raise ValueError(f'{what} {path!r} names no bucket; expected {scheme}://BUCKET/FOLDER')
    fs = _fs(path)
    try:
        bucket_exists = fs.exists(f'{scheme}://{bucket}')
    except Exception as e:
        raise ValueError(f'{what} {path!r} cannot be reached: {describe(e)}') from None
    if not bucket_exists:
        raise ValueError(
            f'{what} {path!r}: bucket {bucket!r} does not exist (or these credentials cannot see '
            f'it); create it (gcloud storage buckets create {scheme}://{bucket}) or fix the path'
        )
    probe = join(path, f'.write-probe-{uuid.uuid4().hex}')
    try:
        fs.pipe_file(probe, b'')
        fs.rm_file(probe)
    except Exception as e:
        raise ValueError(f'{what} {path!r} is not writable: {describe(e)}') from None


def describe(error: BaseException) -> str:
    """An error in one line of at most about 300 characters: its type and message."""
    return f'{type(error).__name__}: {" ".join(str(error).split())[:300]}'
