"""Evaluate a checkpoint, and export its weights for inference.

    python -m resnet_jax.evaluate --config=configs/cifar10.py:resnet20 --workdir=DIR \
        [--step=N] [--split=test] [--export=weights.msgpack]

Restores the train state of `--step` (default: the latest) from DIR/checkpoints onto the
devices at hand (any number), prints top-1 / top-5 error and loss on the split, and with
`--export` writes {'params', 'batch_stats'} as a Flax msgpack file that `load_exported` reads.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import flax.serialization
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import checkpoint, data, sharding, steps, trainer
from resnet_jax import config as config_lib


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """(model, state, step, info) restored from `workdir` onto all devices, replicated."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    ds = config.dataset
    train_source, info = data.open_split(ds.name, ds.train_split, ds.data_dir)
    model, _, _, init = trainer.build_training(config, info, len(train_source))
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if not os.path.isdir(directory):
        raise ValueError(f'no checkpoints in {directory!r}; expected a workdir written by train.py')
    manager = checkpoint.create_manager(directory, save_every_steps=1, keep=1)
    try:
        available = manager.all_steps()
        step = manager.latest_step() if step is None else step
        if step is None or step not in available:
            raise ValueError(f'checkpoint step {step} not in {directory!r}; available: {available}')
        mesh = sharding.data_mesh()
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract = jax.eval_shape(init)
        target = checkpoint.abstract_with_shardings(
            abstract, jax.tree.map(lambda _: replicated, abstract)
        )
        try:
            state = checkpoint.restore(manager, step, target)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f'checkpoint {step} in {directory!r} does not fit config model '
                f'{config.model.name!r}: {e}'
            ) from None
    finally:
        manager.close()
    return model, state, step, info


def export(state: Any, path: str) -> None:
    variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    with open(path, 'wb') as f:
        f.write(flax.serialization.msgpack_serialize(variables))


def load_exported(path: str) -> dict[str, Any]:
    """{'params', 'batch_stats'} written by `export`, for `resnet_jax.apply_model`."""
    with open(path, 'rb') as f:
        return flax.serialization.msgpack_restore(f.read())


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    try:
        model, state, step, info = restore_state(FLAGS.config, FLAGS.workdir, FLAGS.step)
        ds = FLAGS.config.dataset
        source, _ = data.open_split(ds.name, FLAGS.split, ds.data_dir)
        preprocess = data.make_preprocess(
            info, train=False, data_dir=ds.data_dir, normalization=ds.normalization
        )
        mesh = sharding.data_mesh()
        replicated = NamedSharding(mesh, PartitionSpec())
        use_ema = bool(FLAGS.config.optimizer.ema_decay)
        eval_step = jax.jit(steps.make_eval_step(model, use_ema=use_ema), out_shardings=replicated)
        result = trainer.evaluate_split(
            eval_step,
            state,
            source,
            preprocess,
            batch_size=sharding.local_batch_size(FLAGS.config.eval_batch_size, mesh),
            mesh=mesh,
            prefix=FLAGS.split,
        )
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    split = FLAGS.split
    top1, top5 = result[f'{split}/top1_acc'], result[f'{split}/top5_acc']
    print(
        f'step {step}: {split} top-1 error {100 * (1 - top1):.2f}%, top-5 error '
        f'{100 * (1 - top5):.2f}%, loss {result[f"{split}/loss"]:.4f} on '
        f'{int(result[f"{split}/num_examples"])} images'
    )
    if FLAGS.export:
        export(state, FLAGS.export)
        print(f'exported params and batch_stats to {FLAGS.export}')


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].')
    flags.DEFINE_string('workdir', None, 'The training workdir.')
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
    flags.DEFINE_string('split', 'test', 'Split to evaluate.')
    flags.DEFINE_string('export', None, 'Write params + batch_stats here (msgpack).')
    flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
    from absl import app

    _define_flags()
    app.run(main)
