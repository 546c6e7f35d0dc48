"""Copies a report's table (results/NAME/table.md) into the README between its markers.

    python scripts/readme_results.py results/cifar10_cpu --write README.md

The block is `<!-- results-NAME:start -->` ... `<!-- results-NAME:end -->`, NAME the folder's
name with '_' as '-', so the README quotes what `python -m resnet_jax.report` measured.
"""

import argparse
import pathlib

from weight_parity import write_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('results', type=pathlib.Path, help='a folder holding table.md')
    parser.add_argument('--write', type=pathlib.Path, required=True, help='README to update')
    args = parser.parse_args()
    table = args.results / 'table.md'
    if not table.is_file():
        raise SystemExit(f'error: {table} does not exist; run python -m resnet_jax.report first')
    marker = 'results-' + args.results.name.replace('_', '-')
    write_block(args.write, marker, table.read_text().rstrip('\n'))


if __name__ == '__main__':
    main()
