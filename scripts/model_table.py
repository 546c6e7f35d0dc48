"""The README's model table: every network with its parameters and multiply-adds.

    python scripts/model_table.py                    # print the table
    python scripts/model_table.py --write README.md  # refresh the README's table

Figures are computed by the code (`count_params`, `count_flops`), never typed in; the paper's
figures stand beside them for comparison. `tests/test_readme.py::test_model_table_is_current` fails
when the README's table is stale.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

import resnet_jax as rj
from weight_parity import write_block

# Paper Table 1 (ImageNet, multiply-adds at 224x224) and Table 6 (CIFAR-10 parameters).
PAPER = {
    'resnet18': '1.8G MACs',
    'resnet34': '3.6G MACs',
    'resnet50': '3.8G MACs',
    'resnet101': '7.6G MACs',
    'resnet152': '11.3G MACs',
    'plain18': '1.8G MACs',
    'plain34': '3.6G MACs',
    'resnet20': '0.27M params',
    'resnet32': '0.46M params',
    'resnet44': '0.66M params',
    'resnet56': '0.85M params',
    'resnet110': '1.7M params',
    'resnet1202': '19.4M params',
}


def row(name: str) -> str:
    imagenet = name in rj.IMAGENET_MODELS
    num_classes, shape = (1000, (224, 224, 3)) if imagenet else (10, (32, 32, 3))
    # Scanned blocks trace fastest; the counts are identical (tests check it).
    model = rj.create_model(name, num_classes=num_classes, scan_blocks=True)
    variables = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))
    params = rj.count_params(variables['params'])
    macs = rj.count_flops(model, shape)
    blocks = '-'.join(str(n) for n in model.stage_sizes)
    kind = model.block_cls.__name__
    shortcut = model.shortcut or 'none'
    return (
        f'| `{name}` | {"ImageNet" if imagenet else "CIFAR"} | {kind} {blocks} | {shortcut} '
        f'| {shape[0]}x{shape[1]} | {params:,} | {macs / 1e9:.3f} | {PAPER.get(name, "")} |'
    )


def render() -> str:
    header = [
        '| name | family | blocks per stage | shortcut | input | parameters | GMACs | paper |',
        '|---|---|---|---|---|---|---|---|',
    ]
    return '\n'.join(header + [row(name) for name in rj.MODEL_NAMES])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', type=pathlib.Path, help='README to update in place')
    args = parser.parse_args()
    table = render()
    print(table)
    if args.write:
        write_block(args.write, 'model-table', table)


if __name__ == '__main__':
    main()
