"""resnet_jax.checkpoint: calls that wait on a store are bounded, and stop on a signal."""

import re
import signal
import threading
import time

import jax.numpy as jnp
import pytest

from resnet_jax import checkpoint, signals


def test_a_call_that_does_not_answer_is_given_up_after_its_time():
    never = threading.Event()
    started = time.monotonic()
    with pytest.raises(checkpoint.StorageStalled) as e:
        checkpoint.bounded(never.wait, seconds=0.3, what='saving checkpoint step 3')
    assert 0.3 <= time.monotonic() - started < 5
    assert str(e.value) == (
        'saving checkpoint step 3: the store did not answer within 0.3 s (storage_timeout_seconds)'
    )
    assert e.value.hard_exit and e.value.exit_code == 1
    never.set()
    assert checkpoint.bounded(lambda: 7, seconds=1, what='x') == 7
    with pytest.raises(ZeroDivisionError):
        checkpoint.bounded(lambda: 1 / 0, seconds=1, what='x')


def test_a_stop_signal_ends_the_wait_at_once_with_its_exit_code():
    never = threading.Event()
    timer = threading.Timer(0.2, signals.note, args=(signal.SIGTERM,))
    timer.start()
    started = time.monotonic()
    with pytest.raises(checkpoint.StorageStalled, match=r'stopped by SIGTERM while reading') as e:
        checkpoint.bounded(never.wait, seconds=60, what='reading checkpoint step 3')
    assert time.monotonic() - started < 5
    assert e.value.exit_code == 143
    never.set()


def test_a_checkpoint_with_non_finite_weights_is_refused_where_it_enters(
    tmp_path, cifar10_data_dir, caplog
):
    """Readers refuse it with one line naming the tensor; the trainer sets it aside and resumes
    from the one before (XLA's CPU ReLU turns a NaN into 0: such a net still answers)."""
    import logging
    import shutil

    import jax

    import resnet_jax as rj
    from configs import smoke
    from resnet_jax import config as config_lib
    from resnet_jax import evaluation, pretrained, trainer

    def config(**overrides):
        c = smoke.get_config()
        config_lib.apply_overrides(c, {'dataset.data_dir': str(cifar10_data_dir), **overrides})
        return c

    run = tmp_path / 'run'
    directory = str(run / 'checkpoints')
    trainer.train_and_evaluate(config(), str(run))
    state, _ = evaluation.read_train_state(str(run), step=6, config=config())
    meta = checkpoint.read_meta_of(directory, 6)
    poisoned = state.replace(
        params=jax.tree_util.tree_map_with_path(
            lambda p, x: x * jnp.nan if 'stage2' in jax.tree_util.keystr(p) else x, state.params
        )
    )
    shutil.rmtree(run / 'checkpoints' / '6')
    manager = checkpoint.create_manager(directory, save_every_steps=1, keep=5)
    checkpoint.save(manager, 6, poisoned, meta=meta, force=True)
    checkpoint.wait(manager)
    checkpoint.close(manager)
    assert checkpoint.verify(directory, 6) is None  # its files are as saved: only NaN inside

    named = r"tensor 'params/stage2/block1/\w+/\w+' has \d+ non-finite values \(NaN/Inf\)"
    with pytest.raises(ValueError, match=rf'checkpoint step 6 in .*: {named}'):
        evaluation.read_run(str(run), config=config())
    model = rj.create_model('resnet20', num_classes=10)
    fresh = jax.device_get(rj.init_variables(model, jax.random.key(0), (32, 32, 3)))
    with pytest.raises(ValueError, match=rf'checkpoint step 6 in .*: {named}'):
        pretrained.load_variables(str(run), model, fresh)  # init_from=<that workdir>
    caplog.set_level(logging.INFO, logger='resnet_jax')
    trainer.train_and_evaluate(config(total_steps=9), str(run))
    assert re.search(f'checkpoint step 6 is bad: checkpoint step 6: {named}', caplog.text)
    assert 'resumed from' in caplog.text and 'at step 3' in caplog.text
    assert checkpoint.committed_steps(directory)[-1] == 9
