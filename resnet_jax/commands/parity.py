"""Logit parity of converted weights against independent implementations (resnet_jax.parity).

python -m resnet_jax parity                      # print the table
python -m resnet_jax parity --write docs/weights.md
"""

from absl import flags

from resnet_jax import parity, tables
from resnet_jax.commands import cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    body = parity.table()
    print(body)
    if FLAGS.write:
        tables.write_block(FLAGS.write, 'weight-parity', body)


def run() -> None:
    flags.DEFINE_string('write', None, 'A markdown file whose weight-parity block to refresh.')
    cli.run(main)


if __name__ == '__main__':
    run()
