"""resnet_jax.paths on local disk: paths given as nothing or with blanks around them, and
writes that leave nothing behind when they fail. (gs:// is tests/test_gcs.py's.)"""

import os

import pytest

from resnet_jax import paths


@pytest.mark.parametrize(
    'value, message',
    [
        (None, r'^--workdir is not given; expected a path$'),
        ('', r"^--workdir '' is empty; expected a path$"),
        ('  ', r"^--workdir '  ' is blank; expected a path$"),
        (' run', r"^--workdir ' run' begins or ends with whitespace; expected a path without it"),
        ('run\n', r"^--workdir 'run\\n' begins or ends with whitespace"),
    ],
)
def test_a_path_of_nothing_or_with_blanks_around_it_is_refused(
    tmp_path, monkeypatch, value, message
):
    with pytest.raises(ValueError, match=message):
        paths.check_path_text(value, '--workdir')
    monkeypatch.chdir(tmp_path)  # '' would be this folder, ' ' a folder named ' ' in it
    with pytest.raises(ValueError, match=message.replace('--workdir', 'workdir')):
        paths.writable_dir(value, 'workdir')
    assert list(tmp_path.iterdir()) == []
    paths.check_path_text('run', '--workdir')  # a plain path passes


def test_a_failed_write_leaves_no_temporary_file_and_the_old_contents(tmp_path):
    target = tmp_path / 'config.json'
    paths.write_text(str(target), 'old')
    assert os.listdir(tmp_path) == ['config.json']  # the temporary file was renamed over it
    (tmp_path / 'run').mkdir()
    # A directory where the file should go: the rename fails after the temporary is written.
    for path in (tmp_path / 'run', f'{tmp_path / "run"}/'):
        with pytest.raises(OSError):
            paths.write_bytes(str(path), b'new')
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'run']
    assert os.listdir(tmp_path / 'run') == []
    assert target.read_text() == 'old'
