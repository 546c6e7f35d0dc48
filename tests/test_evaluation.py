"""Readers of a workdir (evaluate, predict, analysis, init_from) only read: beside a live
trainer they never delete, clean or write anything, so the trainer loses no step."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import smoke
from resnet_jax import checkpoint, evaluation
from resnet_jax import config as config_lib
from resnet_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _snapshot(directory):
    return {p: p.read_bytes() for p in pathlib.Path(directory).rglob('*') if p.is_file()}


@pytest.mark.slow
def test_evaluating_in_a_loop_beside_a_trainer_saving_every_2_steps_loses_no_step(
    tmp_path, cifar10_data_dir
):
    workdir = tmp_path / 'run'
    total = 120
    trainer = subprocess.Popen(
        [
            sys.executable,
            'train.py',
            '--config=configs/smoke.py',
            f'--workdir={workdir}',
            f'--config.dataset.data_dir={cifar10_data_dir}',
            f'--config.total_steps={total}',
            '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=2',
            '--config.keep_checkpoints=2',
            '--config.eval_every_steps=1000',
        ],
        cwd=REPO,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(cifar10_data_dir)})
    directory = str(workdir / 'checkpoints')
    reads, deadline = [], time.monotonic() + TIMEOUT
    try:
        while trainer.poll() is None and time.monotonic() < deadline:
            if not checkpoint.committed_steps(directory):
                time.sleep(0.05)
                continue
            # What evaluate, predict, analysis and init_from do to a workdir.
            run = evaluation.read_run(str(workdir), config=config)
            state, step = run.state(), run.step
            assert int(state.step) == step
            reads.append(step)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, err[-3000:]
    assert len(reads) >= 5, reads  # read all along the run, while it saved
    assert len(set(reads)) >= 3, reads
    assert checkpoint.committed_steps(directory)[-1] == total
    logged = [r['step'] for r in read_metrics(workdir / 'metrics.jsonl') if 'train/loss' in r]
    assert logged == list(range(1, total + 1))


def test_a_reader_writes_nothing_in_the_workdir(tmp_path, cifar10_data_dir):
    from resnet_jax import trainer

    config = smoke.get_config()
    config_lib.apply_overrides(
        config, {'dataset.data_dir': str(cifar10_data_dir), 'total_steps': 3}
    )
    workdir = tmp_path / 'run'
    trainer.train_and_evaluate(config, str(workdir))
    # A save cut off by a kill: the trainer's own manager cleans it up, a reader never does.
    partial = workdir / 'checkpoints' / '5'
    (partial / 'state').mkdir(parents=True)
    before = _snapshot(workdir)
    state, run = evaluation.read_train_state(str(workdir), config=config)
    step = run.step
    assert step == 3 == int(state.step)
    assert _snapshot(workdir) == before
    assert partial.exists()


@pytest.mark.slow
def test_a_copied_workdir_predicts_exports_and_fine_tunes_without_its_dataset(
    tmp_path, cifar10_data_dir, run_process
):
    """The laptop a model is copied to: the run's dataset is gone (its train split's pixel mean
    was the normalisation), and predict, export and init_from read the copy alone."""
    import cv2

    from configs import smoke
    from resnet_jax import sources, trainer

    data = tmp_path / 'data'  # the run's dataset, only while it trains
    data.mkdir()
    (data / 'cifar10_jpeg').symlink_to(cifar10_data_dir / 'cifar10_jpeg')
    source, info = sources.open_split('cifar10_jpeg', 'test[:2]', str(data))
    images = []
    for i in range(2):
        images.append(str(tmp_path / f'test{i}.png'))
        cv2.imwrite(images[-1], np.asarray(source[i]['image'])[..., ::-1])
    config = smoke.get_config()
    config_lib.apply_overrides(config, {'dataset.data_dir': str(data), 'total_steps': 3})
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    laptop = tmp_path / 'laptop' / 'run'
    shutil.copytree(tmp_path / 'run', laptop)
    shutil.rmtree(data)
    before = _snapshot(laptop)

    predicted = run_process(['-m', 'resnet_jax', 'predict', f'--workdir={laptop}', *images])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stdout.count('%') == 10  # top-5 of each image, by class name
    assert info.class_names[0] in predicted.stdout or info.class_names[1] in predicted.stdout
    model = tmp_path / 'model.stablehlo'
    exported = run_process(
        ['-m', 'resnet_jax', 'evaluate', f'--workdir={laptop}', '--split=none', f'--export={model}']
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert model.stat().st_size > 0
    assert _snapshot(laptop) == before  # readers only read

    # A new run on data of its own starts from the copy (its dataset still gone).
    tuned = smoke.get_config()
    config_lib.apply_overrides(
        tuned,
        {'dataset.data_dir': str(cifar10_data_dir), 'init_from': str(laptop), 'total_steps': 2},
    )
    trainer.train_and_evaluate(tuned, str(tmp_path / 'tuned'))
    assert checkpoint.committed_steps(str(tmp_path / 'tuned' / 'checkpoints'))[-1] == 2
