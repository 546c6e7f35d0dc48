"""The tables the docs quote, made from the code: networks, options, registries, results.

    python -m resnet_jax tables            # rewrite every generated block of docs/ and results/

Each table sits in a markdown file between `<!-- NAME:start -->` and `<!-- NAME:end -->`;
`tests/test_docs.py` fails when one is stale, so the docs always say what the code does.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable

import jax

from resnet_jax import augment, counting, datasets, layers, models, optim

REPO = pathlib.Path(__file__).resolve().parents[1]

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


def write_block(path: str | os.PathLike, marker: str, body: str) -> None:
    """Replaces the text between `<!-- marker:start -->` and `<!-- marker:end -->`.

    Raises:
      ValueError: if the file has no such markers.
    """
    path = pathlib.Path(path)
    text = path.read_text()
    pattern = re.compile(rf'(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)', re.S)
    if not pattern.search(text):
        raise ValueError(f'{path} has no <!-- {marker}:start --> ... <!-- {marker}:end --> block')
    path.write_text(pattern.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text))


def read_block(path: str | os.PathLike, marker: str) -> str:
    text = pathlib.Path(path).read_text()
    match = re.search(rf'<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->', text, re.S)
    if not match:
        raise ValueError(f'{path} has no <!-- {marker}:start --> ... <!-- {marker}:end --> block')
    return match.group(1)


def _model_row(name: str) -> str:
    imagenet = models.family(name) == 'imagenet'
    num_classes, shape = (1000, (224, 224, 3)) if imagenet else (10, (32, 32, 3))
    # Scanned blocks trace fastest; the counts are identical (tests check it).
    model = models.create_model(name, num_classes=num_classes, scan_blocks=True)
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
    params = counting.count_params(variables['params'])
    macs = counting.count_flops(model, shape)
    blocks = '-'.join(str(n) for n in model.stage_sizes)
    return (
        f'| `{name}` | {"ImageNet" if imagenet else "CIFAR"} | {model.block_cls.__name__} '
        f'{blocks} | {model.stem} | {model.shortcut or "none"} | {shape[0]}x{shape[1]} '
        f'| {params:,} | {macs / 1e9:.3f} | {PAPER.get(name, "")} |'
    )


def model_table() -> str:
    """Every registered network with its parameters and multiply-adds."""
    header = [
        '| name | family | blocks per stage | stem | shortcut | input | parameters | GMACs '
        '| paper |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    return '\n'.join(header + [_model_row(name) for name in models.MODELS])


def option_table() -> str:
    """Every create_model option: its config field, default and meaning."""
    defaults = models.option_defaults()
    lines = ['| option | config field | default | meaning |', '|---|---|---|---|']
    for name, option in models.OPTIONS.items():
        field = f'`model.{name}`' if option.in_config else '—'
        if not option.in_config:
            default = 'float32' if name == 'dtype' else '3'
        else:
            default = "the network's own" if defaults[name] == '' else repr(defaults[name])
        lines.append(f'| `{name}` | {field} | {default} | {option.doc} |')
    return '\n'.join(lines)


def registry_table() -> str:
    """The extension points and what is registered in each."""
    rows = [
        ('stems', 'layers.register_stem', layers.STEMS),
        ('shortcuts', 'layers.register_shortcut', layers.SHORTCUTS),
        ('networks', 'models.register_model', models.MODELS),
        ('datasets', 'datasets.register_dataset', datasets.DATASETS),
        ('augmentations', 'augment.register_augmentation', augment.AUGMENTATIONS),
        ('optimizers', 'optim.register_optimizer', optim.OPTIMIZERS),
    ]
    lines = ['| what | registered with | registered now |', '|---|---|---|']
    for what, how, registry in rows:
        lines.append(f'| {what} | `{how}` | {", ".join(f"`{n}`" for n in registry)} |')
    from resnet_jax import preprocessing

    lines.append(
        f'| normalisations | `preprocessing.register_normalization` | '
        f'{", ".join(f"`{n}`" for n in preprocessing.NORMALIZATIONS)} |'
    )
    return '\n'.join(lines)


def augmentation_table() -> str:
    lines = ['| name | host | device | for | what |', '|---|---|---|---|---|']
    for name, op in augment.AUGMENTATIONS.items():
        lines.append(
            f'| `{name}` | {"yes" if op.host else "—"} | {"yes" if op.device else "—"} '
            f'| {", ".join(op.families)} | {op.doc} |'
        )
    return '\n'.join(lines)


# (file, marker, table): every generated block of the docs.
BLOCKS: list[tuple[str, str, Callable[[], str]]] = [
    ('docs/models.md', 'model-table', model_table),
    ('docs/models.md', 'option-table', option_table),
    ('docs/extending.md', 'registry-table', registry_table),
    ('docs/data.md', 'augmentation-table', augmentation_table),
]


def results_blocks() -> list[tuple[str, str, Callable[[], str]]]:
    """Each results/NAME/README.md quotes its table.md between `results-table` markers (and its
    finetune.md, where there is one, between `finetune-table` markers), and the README quotes
    those of results/cifar10_cpu and results/cifar10_pretrained."""
    quoted = [
        ('cifar10_cpu', 'table.md', 'results-cifar10-cpu'),
        ('cifar10_pretrained', 'table.md', 'results-cifar10-pretrained'),
    ]
    blocks = [
        ('README.md', marker, lambda t=REPO / 'results' / name / file: _table(t))
        for name, file, marker in quoted
    ]
    for readme in sorted((REPO / 'results').glob('*/README.md')):
        path = str(readme.relative_to(REPO))
        for file, marker in (('table.md', 'results-table'), ('finetune.md', 'finetune-table')):
            table = readme.parent / file
            if table.exists():
                blocks.append((path, marker, lambda t=table: _table(t)))
    return blocks


def _table(path: pathlib.Path) -> str:
    return path.read_text().rstrip('\n')


def write_all() -> list[tuple[str, str]]:
    """Rewrites every generated block; returns (file, block name) of each."""
    written = []
    for path, marker, make in BLOCKS + results_blocks():
        write_block(REPO / path, marker, make())
        written.append((path, marker))
    return written
