"""Rewrite every generated table of docs/ and results/ from the code (resnet_jax.tables).

python -m resnet_jax tables
"""

from resnet_jax import tables
from resnet_jax.commands import cli


def main(argv: list[str]) -> None:
    del argv
    for path, marker in tables.write_all():
        print(f'wrote {marker} in {path}')


def run() -> None:
    cli.run(main)


if __name__ == '__main__':
    run()
