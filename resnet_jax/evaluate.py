"""Evaluate a checkpoint, and export its weights for inference.

    python -m resnet_jax.evaluate --workdir=DIR [--step=N] [--split=test] \
        [--export=model.stablehlo|model.onnx|weights.msgpack] [--config=FILE] [--config.x=y ...]
        [--crops=10 | --scales=224,256,384,480,640]        # the paper's test protocols

Restores the train state of `--step` (default: the latest) from DIR/checkpoints onto the
devices at hand (any number), prints top-1 / top-5 error and loss on the split, and with
`--export` writes the evaluated variables ({'params', 'batch_stats'}: the moving average where
the run kept one): as a model for serving with the run's input normalisation inside (`.stablehlo`:
jax.export, `.onnx`: ONNX; resnet_jax/serving.py), or as a Flax msgpack file that
`load_exported` reads (`.msgpack`). Any other suffix, or none, is refused before evaluating.

The config is the one the run recorded (DIR/config.json) unless `--config` is given; either way
the checkpoint's own record of what it is (network, input normalisation, optimizer) must match
it, so a checkpoint is never evaluated as another network.
"""

from __future__ import annotations

from typing import Any

import flax.serialization
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import (
    checkpoint,
    cli,
    paths,
    preprocessing,
    serving,
    sharding,
    sources,
    steps,
    trainer,
    weights,
)
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """(model, state, step, info) restored from `workdir` onto all devices, replicated.

    Raises:
      ValueError: no such checkpoint, or one of another network than `config` describes.
    """
    config_lib.validate(config, jax.device_count(), jax.process_count())
    ds = config.dataset
    train_source, info = sources.open_split(ds.name, ds.train_split, ds.data_dir)
    model, _, _, init = trainer.build_training(config, info, len(train_source))
    directory = paths.join(paths.normalize(workdir), 'checkpoints')
    if not paths.isdir(directory):
        raise ValueError(f'no checkpoints in {directory!r}; expected a workdir written by train.py')
    # A live trainer deletes old steps as it saves new ones: the latest step is looked up
    # again if the one being read disappears under the reader.
    for _ in range(3):
        chosen = _choose_step(directory, step)
        try:
            return model, _read_step(directory, chosen, config, model, init), chosen, info
        except Exception:
            if chosen in checkpoint.committed_steps(directory):
                raise  # still there: the error is the checkpoint's own
            if step is not None:
                raise ValueError(
                    f'checkpoint step {step} in {directory!r} was deleted while it was read (a '
                    'trainer running in this workdir keeps only its last checkpoints); pass '
                    'the --step of a kept one'
                ) from None
    raise ValueError(f'the checkpoints in {directory!r} kept changing while they were read')


def _choose_step(directory: str, step: int | None) -> int:
    """`step`, or the newest committed step, checked to be committed."""
    available = checkpoint.committed_steps(directory)
    step = (available[-1] if available else None) if step is None else step
    if step is None or step not in available:
        raise ValueError(f'checkpoint step {step} not in {directory!r}; available: {available}')
    return step


def _read_step(directory: str, step: int, config: Any, model: Any, init: Any) -> Any:
    """The train state of committed `step`, verified, of `config`'s network, replicated on all
    devices. Read only: the step is opened without a checkpoint manager, which would clean up
    (delete) a save in progress of a trainer writing the same workdir."""
    problem = checkpoint.verify(directory, step)
    if problem is not None:
        raise ValueError(f'checkpoint step {step} in {directory!r} is damaged: {problem}')
    workdir_lib.check_identity(
        checkpoint.read_meta_of(directory, step)['identity'],
        workdir_lib.identity(config, model),
        f'checkpoint step {step} in {directory!r}',
    )
    replicated = NamedSharding(sharding.data_mesh(), PartitionSpec())
    abstract = jax.eval_shape(init)
    target = checkpoint.abstract_with_shardings(
        abstract, jax.tree.map(lambda _: replicated, abstract)
    )
    state = checkpoint.read_state(directory, step, target)[0]
    weights.check_finite(state.eval_variables(), f'checkpoint step {step} in {directory!r}')
    return state


def export(state: Any, path: str) -> None:
    """Writes what evaluation uses (`state.eval_variables()`) as a Flax msgpack file."""
    serving.write_variables(path, state.eval_variables())


def export_for_serving(config: ml_collections.ConfigDict, state: Any, path: str) -> str:
    """Writes `state.eval_variables()` to `path` in the format its suffix names; returns what
    was written, in words.

    `.stablehlo` and `.onnx` get the run's network with its input normalisation
    (`config.dataset.normalization`) inside, for uint8 images of its eval size
    (`serving.export`); `.msgpack` the file of `export`; any other suffix is a ValueError.
    """
    fmt = serving.check_destination(path)
    if fmt == 'msgpack':
        export(state, path)
        return 'msgpack variables (load_exported)'
    ds = config.dataset
    _, info = sources.open_split(ds.name, ds.train_split, ds.data_dir)
    model = config_lib.create_model_from_config(config, info.num_classes)
    preprocess = preprocessing.preprocess_of(ds, info, train=False)
    image_shape = preprocessing.input_shape(info, ds.image_size)
    variables = jax.device_get(state.eval_variables())
    serving.export(
        path, model, variables, mean=preprocess.mean, std=preprocess.std, image_shape=image_shape
    )
    name = 'StableHLO (jax.export)' if fmt == 'stablehlo' else 'ONNX'
    return (
        f'{name}: uint8 images (batch, {", ".join(map(str, image_shape))}) -> logits, '
        f'normalisation {ds.normalization!r} inside'
    )


def load_exported(path: str, what: str = 'weights') -> dict[str, Any]:
    """{'params', 'batch_stats'} written by `export`, for `resnet_jax.apply_model`.

    Raises:
      ValueError: naming `what` (the flag or field it was given as) and the file, if it is not
        a file `export` writes (damaged, cut off, of another kind) or holds a NaN or Inf.
    """
    with paths.open_file(path, 'rb') as f:
        blob = f.read()
    expected = 'expected a file written by python -m resnet_jax.evaluate --export=FILE.msgpack'
    try:
        variables = flax.serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack's errors for a file of another kind: ValueError and kin
        raise ValueError(
            f'{what} {path!r}: not a file written by --export ({type(e).__name__}: {e}); {expected}'
        ) from e
    params = variables.get('params') if isinstance(variables, dict) else None
    if not isinstance(params, dict) or 'bias' not in params.get('head', {}):
        raise ValueError(f'{what} {path!r} holds no params/head/bias; {expected}')
    weights.check_finite(variables, f'{what} {path!r}')
    return variables


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, split: str, step: int | None = None
) -> tuple[dict[str, float], Any, int]:
    """(metrics of `split`, the restored state, its step)."""
    model, state, step, info = restore_state(config, workdir, step)
    ds = config.dataset
    source, _ = sources.open_split(ds.name, split, ds.data_dir)
    preprocess = preprocessing.preprocess_of(ds, info, train=False)
    mesh = sharding.data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    eval_step = jax.jit(steps.make_eval_step(model, preprocess.normalize), out_shardings=replicated)
    result = trainer.evaluate_split(
        eval_step,
        state,
        source,
        preprocess,
        config=config,
        mesh=mesh,
        prefix=split,
    )
    return result, state, step


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    split = FLAGS.split
    # With --config given, nothing has read --workdir yet ('' would be the current directory).
    paths.check_path_text(FLAGS.workdir, '--workdir')
    # Both are found only after restoring the checkpoint otherwise.
    if FLAGS.step is not None and FLAGS.step < 0:
        raise cli.UserError(f'--step={FLAGS.step}; expected a checkpoint step >= 0 (or none)')
    if not split.strip():
        raise cli.UserError(f'--split={split!r}; expected a split name, e.g. test')
    config = cli.run_config(FLAGS.config, FLAGS.workdir)
    if FLAGS.export:  # a bad destination stops the command before the evaluation, not after
        serving.check_destination(FLAGS.export)
    protocol_name = ''
    if FLAGS.crops != 1 or FLAGS.scales:  # the paper's 10-crop or multi-scale testing
        from resnet_jax import protocol  # imports this module (restore_state)

        scales = protocol.parse_scales(FLAGS.scales)
        protocol.check_protocol(FLAGS.crops, scales)
        result, state, step = protocol.evaluate_protocol(
            config,
            FLAGS.workdir,
            split=split,
            crops=FLAGS.crops,
            scales=scales,
            step=FLAGS.step,
        )
        protocol_name = f' ({protocol.describe(FLAGS.crops, scales)})'
    else:
        result, state, step = evaluate(config, FLAGS.workdir, split=split, step=FLAGS.step)
    top1, top5 = result[f'{split}/top1_acc'], result[f'{split}/top5_acc']
    print(
        f'step {step}: {split} top-1 error {100 * (1 - top1):.2f}%, top-5 error '
        f'{100 * (1 - top5):.2f}%, loss {result[f"{split}/loss"]:.4f} on '
        f'{int(result[f"{split}/num_examples"])} images{protocol_name}'
    )
    if FLAGS.export:
        written = export_for_serving(config, state, FLAGS.export)
        what = 'the moving average' if state.ema is not None else 'params and batch_stats'
        print(f'exported {what} (what was evaluated) to {FLAGS.export} as {written}')


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        'config', None, 'Config file[:arg]; default: the one recorded in --workdir.'
    )
    flags.DEFINE_string('workdir', None, 'The training workdir.')
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
    flags.DEFINE_string('split', 'test', 'Split to evaluate.')
    flags.DEFINE_string(
        'export',
        None,
        'Write the evaluated variables here, by suffix: .stablehlo (jax.export) or .onnx, a '
        'model for serving that takes uint8 images and normalises them itself; .msgpack the '
        'Flax msgpack of the variables (no other suffix).',
    )
    flags.DEFINE_integer(
        'crops',
        1,
        "1: the single centre crop; 10: the paper's 10-crop testing (resnet_jax.protocol).",
    )
    flags.DEFINE_string(
        'scales',
        '',
        'Shorter sides, e.g. 224,256,384,480,640: fully-convolutional testing with '
        "the softmax averaged over the scales (the paper's best results).",
    )
    flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
    _define_flags()
    cli.run(main)
