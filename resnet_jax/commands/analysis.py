"""The paper's Figure 7: the standard deviation of every 3x3 layer's response.

    python -m resnet_jax analysis --workdir=SWEEP_DIR [--out=DIR] [--split=test]

What it measures and writes: resnet_jax.analysis.
"""

from absl import flags

from resnet_jax import analysis
from resnet_jax.commands import cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.split.strip():  # found only after reading the first run otherwise
        raise cli.UserError(f'--split={FLAGS.split!r}; expected a split name, e.g. test')
    out = FLAGS.out or FLAGS.workdir
    csv_path, png_path = analysis.write_figure7(FLAGS.workdir, out, FLAGS.split)
    print(f'wrote {csv_path} and {png_path}')


def define_flags() -> None:
    flags.DEFINE_string('workdir', None, 'A sweep directory (or one train.py workdir).')
    flags.DEFINE_string('out', None, 'Where figure7.csv and figure7.png go (default: --workdir).')
    flags.DEFINE_string('split', 'test', 'The split whose images are run through the networks.')
    flags.mark_flags_as_required(['workdir'])


def run() -> None:
    define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
