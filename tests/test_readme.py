"""The README runs as written: its Python examples execute and its tables are current."""

import pathlib
import re

import pytest

import model_table  # scripts/, on pytest's pythonpath

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _block(marker: str) -> str:
    match = re.search(
        rf'<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->', README.read_text(), re.S
    )
    assert match, f'README has no {marker} block'
    return match.group(1)


def test_python_examples_run():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(block, str(README), 'exec'), namespace)
    assert namespace['logits'].shape == (8, 10)


def test_model_table_is_current():
    assert _block('model-table') == model_table.render(), (
        'README model table is stale: run python scripts/model_table.py --write README.md'
    )


def test_weight_parity_table_is_filled_and_within_tolerance():
    table = _block('weight-parity')
    rows = [line for line in table.splitlines() if line.startswith('| resnet')]
    assert len(rows) == 5
    for row in rows:
        diff = float(row.split('|')[4])
        assert diff < 1e-4, row
    assert 'Measured by `python scripts/weight_parity.py`' in table


@pytest.mark.parametrize(
    'name',
    ['cifar10_cpu', 'cifar10_cpu_subset', 'cifar10_cpu_zero_init', 'cifar10_cpu_zero_init_2400'],
)
def test_results_table_is_the_reports(name):
    table = README.parent / 'results' / name / 'table.md'
    marker = 'results-' + name.replace('_', '-')
    assert _block(marker) == table.read_text().rstrip('\n'), (
        f'README results are stale: run python scripts/readme_results.py results/{name} '
        '--write README.md'
    )
    assert (table.parent / 'figure6.png').read_bytes().startswith(b'\x89PNG')
