"""The paper's Table 6 and Figure 6 from the logs of a sweep (or of any train.py workdirs).

    python -m resnet_jax report --workdir=DIR [--out=DIR]

What it reads and writes: resnet_jax.report.
"""

from absl import flags

from resnet_jax import paths, report
from resnet_jax.commands import cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    table, figure = report.write_report(FLAGS.workdir, FLAGS.out or FLAGS.workdir)
    print(paths.read_text(table), end='')
    print(f'wrote {table} and {figure}')


def define_flags() -> None:
    flags.DEFINE_string('workdir', None, 'The sweep (or train.py) workdir.')
    flags.DEFINE_string('out', None, 'Where table.md and figure6.png go (default: --workdir).')
    flags.mark_flags_as_required(['workdir'])


def run() -> None:
    define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
