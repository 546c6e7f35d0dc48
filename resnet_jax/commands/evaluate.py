"""Evaluate a checkpoint, and export what it evaluates with.

    python -m resnet_jax evaluate --workdir=DIR [--step=N] [--split=test] \
        [--export=model.stablehlo|model.onnx|weights.msgpack] [--config=FILE] [--config.x=y ...]
        [--crops=10 | --scales=224,256,384,480,640]        # the paper's test protocols
    python -m resnet_jax evaluate --workdir=DIR --split=none --export=model.onnx  # no data

Reads the run in DIR at `--step` (default: its newest checkpoint) onto the devices at hand
(any number; resnet_jax.evaluation: from the workdir alone, the split being evaluated the only
data read), prints top-1 / top-5 error and loss on the split, and with `--export` writes the
evaluated variables (the moving average where the run kept one): as a model for serving with
the run's input normalisation inside (`.stablehlo`: jax.export, `.onnx`: ONNX;
resnet_jax.serving), or as a Flax msgpack file (`.msgpack`). Any other suffix, or none, is
refused before evaluating. `--split=none` exports without evaluating: the export reads only
the workdir, so a copy of it on a machine without the dataset exports too.

The config is the one the run recorded unless `--config` is given; either way the checkpoint's
own record of what it is (network, input normalisation, optimizer) must match it, so a
checkpoint is never evaluated as another network.
"""

from absl import flags
from ml_collections import config_flags

from resnet_jax import evaluation, paths, protocol, serving
from resnet_jax.commands import cli

FLAGS = flags.FLAGS
NO_SPLIT = 'none'  # --split=none: export only


def main(argv: list[str]) -> None:
    del argv
    split = FLAGS.split
    # Found only after reading the checkpoint otherwise.
    paths.check_path_text(FLAGS.workdir, '--workdir')
    if FLAGS.step is not None and FLAGS.step < 0:
        raise cli.UserError(f'--step={FLAGS.step}; expected a checkpoint step >= 0 (or none)')
    if not split.strip():
        raise cli.UserError(f'--split={split!r}; expected a split name, e.g. test, or none')
    if split == NO_SPLIT and not FLAGS.export:
        raise cli.UserError('--split=none evaluates nothing; expected --export=FILE with it')
    if FLAGS.export:  # a bad destination stops the command before the evaluation, not after
        serving.check_destination(FLAGS.export)
    scales = protocol.parse_scales(FLAGS.scales)
    protocol.check_protocol(FLAGS.crops, scales)
    config = cli.run_config(FLAGS.config, FLAGS.workdir)

    run = evaluation.read_run(FLAGS.workdir, step=FLAGS.step, config=config)
    if split != NO_SPLIT:
        _evaluate(run, split, scales)
    if FLAGS.export:
        written = serving.export_run(run, FLAGS.export)
        what = 'the moving average' if run.averaged else 'params and batch_stats'
        print(f'exported {what} (what evaluation uses) to {FLAGS.export} as {written}')


def _evaluate(run: evaluation.Run, split: str, scales: tuple[int, ...]) -> None:
    if FLAGS.crops != 1 or scales:  # the paper's 10-crop or multi-scale testing
        result = protocol.evaluate_protocol(run, split=split, crops=FLAGS.crops, scales=scales)
        how = f' ({protocol.describe(FLAGS.crops, scales)})'
    else:
        result, how = evaluation.evaluate(run, split), ''
    top1, top5 = result[f'{split}/top1_acc'], result[f'{split}/top5_acc']
    print(
        f'step {run.step}: {split} top-1 error {100 * (1 - top1):.2f}%, top-5 error '
        f'{100 * (1 - top5):.2f}%, loss {result[f"{split}/loss"]:.4f} on '
        f'{int(result[f"{split}/num_examples"])} images{how}'
    )


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        'config', None, 'Config file[:arg]; default: the one recorded in --workdir.'
    )
    flags.DEFINE_string('workdir', None, 'The training workdir.')
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
    flags.DEFINE_string('split', 'test', "Split to evaluate; 'none' with --export: export only.")
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


def run() -> None:
    define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
