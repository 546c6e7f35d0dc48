"""Train a grid of runs one after another; rerunning the command resumes it.

    python -m resnet_jax sweep --config=configs/cifar10.py \
        --models=plain20,plain56,resnet20,resnet56 --workdir=DIR [--grid=NAME] [--config.x=y ...]

What a run is, where it trains and what it leaves: resnet_jax.sweep.
`python -m resnet_jax report --workdir=DIR` turns DIR into the paper's table and figure.
"""

from absl import flags
from ml_collections import config_flags

from resnet_jax import sweep
from resnet_jax.commands import cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    sweep.sweep(
        config_flags.get_config_filename(FLAGS['config']).split(':')[0],
        FLAGS.models,
        FLAGS.workdir,
        grid=FLAGS.grid,
        overrides=config_flags.get_override_values(FLAGS['config']),
    )


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        'config', None, 'Config file, e.g. configs/cifar10.py; get_config(MODEL) is called per run.'
    )
    flags.DEFINE_string(
        'models', None, f'Comma-separated model names or sets: {", ".join(sweep.MODEL_SETS)}.'
    )
    flags.DEFINE_string('workdir', None, 'One subdirectory per run goes here.')
    flags.DEFINE_string('grid', 'models', f'One of {", ".join(sweep.GRIDS)}.')
    flags.mark_flags_as_required(['config', 'models', 'workdir'])


def run() -> None:
    define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
