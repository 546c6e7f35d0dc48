"""Tests of resnet_jax.workdir: one writer per workdir, the recorded config, run identities."""

import logging
import pathlib

import numpy as np
import pytest

from configs import smoke
from resnet_jax import checkpoint, sources, trainer, workdir
from resnet_jax import config as config_lib


def test_the_recorded_config_reads_back_as_written(tmp_path):
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'optimizer.learning_rate': 0.05, 'model.name': 'plain20'})
    (tmp_path / workdir.CONFIG_FILE).write_text(workdir.config_json(config))
    again = workdir.read_config(str(tmp_path))
    assert again.to_dict() == config.to_dict()  # tuples come back as tuples
    assert again.model.name == 'plain20' and again.optimizer.learning_rate == 0.05
    with pytest.raises(ValueError, match=r'config.json does not exist; expected the workdir'):
        workdir.read_config(str(tmp_path / 'nothing'))
    (tmp_path / workdir.CONFIG_FILE).write_text('{"step": 1')
    with pytest.raises(ValueError, match=r'config.json is not a readable config'):
        workdir.read_config(str(tmp_path))


def test_identity_tells_same_shaped_networks_apart():
    def identity(**overrides):
        config = smoke.get_config()
        config_lib.apply_overrides(config, overrides)
        return workdir.identity(config, config_lib.create_model_from_config(config, 10))

    base = identity()
    assert base['model.name'] == 'resnet20' and base['model.shortcut'] == 'A'
    assert base == identity(**{'model.shortcut': 'A'})  # the default, spelled out
    assert base == identity(**{'optimizer.learning_rate': 0.01, 'dtype': 'bfloat16'})
    plain = identity(**{'model.name': 'plain20'})  # resnet20's shapes exactly
    with pytest.raises(ValueError, match=r"model.name='resnet20' \(this config: 'plain20'\)"):
        workdir.check_identity(base, plain, 'checkpoint step 3')
    with pytest.raises(ValueError, match=r"dataset.normalization='pixel_mean'"):
        workdir.check_identity(base, identity(**{'dataset.normalization': 'channel'}), 'x')
    with pytest.raises(ValueError, match=r'model.bn_epsilon'):
        workdir.check_identity(base, identity(**{'model.bn_epsilon': 1e-3}), 'x')


@pytest.mark.parametrize('url', ['s3://bucket/run', 'az://container/run'])
def test_an_unsupported_storage_url_is_refused_and_no_local_folder_appears(
    tmp_path, monkeypatch, url
):
    """os.makedirs would make ./s3:/bucket/run; gs:// works (tests/test_gcs.py), others stop
    before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(tmp_path)})
    expected = rf"workdir '{url}': \w+:// is not supported; expected a local path or gs://"
    with pytest.raises(ValueError, match=expected):
        trainer.train_and_evaluate(config, url)
    with pytest.raises(ValueError, match=expected):
        workdir.read_config(url)
    assert list(tmp_path.iterdir()) == []


# --- A start is checked before anything is written; the record is written once it runs -------


def _smoke(data_dir, **overrides):
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(data_dir), **overrides})
    return config


def _files(directory):
    return {p: p.read_bytes() for p in directory.rglob('*') if p.is_file()}


AKAMASTER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / 'akamaster_cifar10'


def _photos(root, data_dir, *, damaged=False):
    """Class folders of real CIFAR-10 test images; `damaged`: every file cut after its header
    (the folder scan accepts them; reading them fails)."""
    import cv2

    source, info = sources.open_split('cifar10_jpeg', 'test[:64]', str(data_dir))
    for i in range(len(source)):
        record = source[i]
        path = root / info.class_names[record['label']] / f'{i:03d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = cv2.imencode('.jpg', np.asarray(record['image'])[..., ::-1])[1].tobytes()
        path.write_bytes(encoded[:40] if damaged else encoded)
    return root


@pytest.mark.parametrize(
    'case, message',
    [
        ('init-from-another-net', 'does not fit the model'),
        ('in-memory-photographs', "'inception_crop_flip' has no device version"),
        ('a-damaged-first-batch', 'is not a readable image'),
    ],
)
def test_a_start_refused_after_set_up_leaves_no_workdir_behind(
    case, message, tmp_path, cifar10_data_dir
):
    """Refusals found once the data, the model and the state are made: before, each left
    config.json, class_names.json, checkpoints/ and tensorboard/ in the new workdir, and the
    obvious retry was then refused as "another network"."""
    overrides = {
        'init-from-another-net': {
            'model.name': 'resnet56',
            'init_from': str(AKAMASTER / 'resnet20.safetensors'),
        },
        'in-memory-photographs': {'dataset.in_memory': True},
        'a-damaged-first-batch': {},
    }[case]
    if case != 'init-from-another-net':
        photos = _photos(tmp_path / 'photos', cifar10_data_dir, damaged=case.endswith('batch'))
        overrides = {
            **overrides,
            'dataset.name': 'folder',
            'dataset.data_dir': str(photos),
            'dataset.train_split': 'train',
            'dataset.eval_split': 'val',
            'dataset.image_size': 32,
            'dataset.normalization': 'channel',
        }
    workdir_path = tmp_path / 'run'
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir, **overrides), str(workdir_path))
    assert not workdir_path.exists()


def test_a_refused_command_leaves_a_workdir_without_config_json_as_it_was(
    tmp_path, cifar10_data_dir
):
    """Without config.json, the checkpoint's own record refuses another network: before, the
    refused command then wrote its own config.json, and the right one was refused after it."""
    run = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=3), str(run))
    (run / workdir.CONFIG_FILE).unlink()
    before = _files(run)
    with pytest.raises(ValueError, match=r'checkpoint step 3 in .* is of another network'):
        trainer.train_and_evaluate(
            _smoke(cifar10_data_dir, **{'model.name': 'plain20', 'total_steps': 6}), str(run)
        )
    assert _files(run) == before
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=6), str(run))
    assert workdir.read_config(str(run)).total_steps == 6  # recorded again


def test_a_damaged_config_json_is_rewritten_by_a_start_its_checkpoint_accepts(
    tmp_path, cifar10_data_dir, caplog
):
    run = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=3), str(run))
    (run / workdir.CONFIG_FILE).write_text('{"mod')
    # Readers take the config the newest checkpoint was saved under.
    assert workdir.read_config(str(run)).total_steps == 3
    with pytest.raises(ValueError, match=r'config\.json is not a readable config'):
        workdir.read_config(str(run), from_checkpoint=False)
    with pytest.raises(ValueError, match='is of another network'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir, **{'model.name': 'plain20'}), str(run))
    assert (run / workdir.CONFIG_FILE).read_text() == '{"mod'
    caplog.set_level(logging.WARNING, logger='resnet_jax')
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=6), str(run))
    assert 'config.json was damaged: rewrote it with this config' in caplog.text
    assert workdir.read_config(str(run), from_checkpoint=False).total_steps == 6


def _corrupt_every_checkpoint(run):
    for step_dir in (run / 'checkpoints').iterdir():
        target = max(
            (p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size
        )
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        target.write_bytes(bytes(blob))


def test_after_no_usable_checkpoint_a_rerun_starts_over_only_when_told(tmp_path, cifar10_data_dir):
    """A scheduler's automatic retry after "no usable checkpoint" used to start from step 0 and
    drop the old run's metrics without a word."""
    run = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(run))
    _corrupt_every_checkpoint(run)
    with pytest.raises(ValueError, match='no usable checkpoint in'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(run))
    before = _files(run)
    with pytest.raises(ValueError, match=r'would start over from step 0: pass --start_over'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(run))
    assert _files(run) == before
    metrics_before = (run / 'metrics.jsonl').read_bytes()
    trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(run), start_over=True)
    (previous,) = (run / workdir.PREVIOUS_DIR).iterdir()
    assert (previous / 'metrics.jsonl').read_bytes() == metrics_before  # kept, moved aside
    assert len(list((previous / 'bad_checkpoints').iterdir())) == 2
    assert not (run / 'bad_checkpoints').exists()
    assert checkpoint.committed_steps(str(run / 'checkpoints')) == [3, 6]
    # With usable checkpoints, starting over would discard them: refused.
    with pytest.raises(ValueError, match=r'--start_over: .* holds usable checkpoints'):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(run), start_over=True)


def test_a_finished_cosine_run_resumed_with_more_steps_is_refused(tmp_path, cifar10_data_dir):
    """Its learning rate would jump back up from about 0; a piecewise schedule whose boundaries
    are steps keeps its rate and may be extended."""
    cosine = {'optimizer.schedule': 'cosine'}
    run = tmp_path / 'run'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, **cosine), str(run))
    before = _files(run)
    with pytest.raises(
        ValueError,
        match=r'scheduled for total_steps=6 \(cosine\); resumed at step 6 with total_steps=12 '
        r'its learning rate would jump from 0 to 0.05',
    ):
        trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=12, **cosine), str(run))
    assert _files(run) == before
    piecewise = tmp_path / 'piecewise'
    trainer.train_and_evaluate(_smoke(cifar10_data_dir), str(piecewise))
    trainer.train_and_evaluate(_smoke(cifar10_data_dir, total_steps=9), str(piecewise))
    assert checkpoint.committed_steps(str(piecewise / 'checkpoints'))[-1] == 9
