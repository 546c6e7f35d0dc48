"""`python -m resnet_jax COMMAND [--flags]`: runs the command resnet_jax.commands.COMMAND."""

import importlib
import sys

from resnet_jax.commands import COMMANDS


def _usage() -> str:
    lines = [f'  {name:<9} {what}' for name, what in COMMANDS.items()]
    return (
        'usage: python -m resnet_jax COMMAND [--flags]   (COMMAND --help lists its flags)\n'
        + '\n'.join(lines)
    )


def main() -> None:
    asked = sys.argv[1] if len(sys.argv) > 1 else ''
    if asked in ('-h', '--help'):
        print(_usage())
        return
    if asked not in COMMANDS:
        problem = f'unknown command {asked!r}' if asked else 'no command given'
        print(f'error: {problem}; expected one of {", ".join(COMMANDS)}', file=sys.stderr)
        sys.exit(2)
    del sys.argv[1]
    sys.argv[0] = f'python -m resnet_jax {asked}'
    importlib.import_module(f'resnet_jax.commands.{asked}').run()


if __name__ == '__main__':
    main()
