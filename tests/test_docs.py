"""The docs cite only what exists: files of the repository, and tests by their names."""

import pathlib
import re

import pytest

from resnet_jax import parity, tables

REPO = pathlib.Path(__file__).resolve().parents[1]
TOP_DIRS = (
    'tests',
    'resnet_jax',
    'scripts',
    'benchmarks',
    'configs',
    'docs',
    'results',
    'notebooks',
    'deploy',
)
FILE_REFERENCE = re.compile(
    r'(?<![\w/.])((?:' + '|'.join(TOP_DIRS) + r')/[\w./-]*\w'
    r'\.(?:py|md|png|sh|ipynb|json|csv|txt|yaml|sbatch))(?:::(\w+))?'
)
TEST_FILE_REFERENCE = re.compile(r'(?<![\w/])(test_\w+\.py)::(\w+)')
TEST_NAME = re.compile(r'`(test_\w+)`')
MARKDOWN_LINK = re.compile(r'\]\(([^)\s#]+)')


def _documents():
    files = [REPO / 'README.md', REPO / 'BENCHMARKS.md', *sorted((REPO / 'docs').glob('*.md'))]
    files += sorted((REPO / 'results').glob('*/README.md'))
    for folder in ('resnet_jax', 'configs', 'scripts', 'benchmarks'):
        files += sorted((REPO / folder).glob('*.py'))
    files += sorted((REPO / 'benchmarks').glob('*.sh')) + sorted(
        (REPO / 'results').glob('*/run.sh')
    )
    return files


def _defined_tests():
    names = set()
    for path in (REPO / 'tests').glob('test_*.py'):
        names.update(re.findall(r'^def (test_\w+)', path.read_text(), re.M))
    return names


@pytest.mark.parametrize('document', _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_and_test_a_document_cites_exists(document):
    text = document.read_text()
    tests = _defined_tests()
    missing = []
    for path, name in FILE_REFERENCE.findall(text):
        if any(part.isupper() for part in re.split(r'[/.]', path)):
            continue  # a placeholder: results/NAME/table.md
        if not (REPO / path).exists():
            missing.append(path)
        elif name and not re.search(rf'^def {name}\b', (REPO / path).read_text(), re.M):
            missing.append(f'{path}::{name}')
    for file, name in TEST_FILE_REFERENCE.findall(text):
        if not (REPO / 'tests' / file).exists() or name not in tests:
            missing.append(f'{file}::{name}')
    missing += [f'`{name}`' for name in TEST_NAME.findall(text) if name not in tests]
    if document.suffix == '.md':
        for target in MARKDOWN_LINK.findall(text):
            if '://' not in target and not (document.parent / target).exists():
                missing.append(f'link {target}')
    assert not missing, f'{document.relative_to(REPO)} cites what does not exist: {missing}'


def test_the_checker_sees_references():
    sample = 'see `tests/test_cli.py::test_verbose_adds_the_traceback` and `test_nope`'
    assert FILE_REFERENCE.findall(sample) == [
        ('tests/test_cli.py', 'test_verbose_adds_the_traceback')
    ]
    assert TEST_NAME.findall(sample) == ['test_nope']
    launchers = 'deploy/gke_jobset_gpu.yaml and scripts/slurm_train.sbatch'
    assert FILE_REFERENCE.findall(launchers) == [
        ('deploy/gke_jobset_gpu.yaml', ''),
        ('scripts/slurm_train.sbatch', ''),
    ]


# --- Examples and generated tables -------------------------------------------------------------


def _python_blocks(path):
    return re.findall(r'```python\n(.*?)```', (REPO / path).read_text(), re.S)


@pytest.mark.parametrize('path', ['README.md', 'docs/models.md', 'docs/weights.md'])
@pytest.mark.slow
def test_python_examples_run(path):
    namespace: dict = {}
    for block in _python_blocks(path):  # later blocks build on earlier ones, as a reader would
        exec(compile(block, str(REPO / path), 'exec'), namespace)


def test_the_data_example_runs(cifar10_data_dir):
    (block,) = _python_blocks('docs/data.md')
    default = "os.path.expanduser('~/.cache/resnet_jax/tfds')"
    assert default in block
    namespace: dict = {}
    exec(
        compile(block.replace(default, repr(str(cifar10_data_dir))), 'docs/data.md', 'exec'),
        namespace,
    )
    assert namespace['batch']['image'].shape == (128, 32, 32, 3)


@pytest.mark.parametrize(
    'path, marker, make',
    [b for b in tables.BLOCKS if b[1] != 'model-table'] + tables.results_blocks(),
    ids=lambda x: x if isinstance(x, str) else '',
)
def test_generated_tables_are_current(path, marker, make):
    assert tables.read_block(REPO / path, marker) == make(), (
        f'{path}: the {marker} block is stale; run python -m resnet_jax tables'
    )


@pytest.mark.slow
def test_the_model_table_is_current():
    assert tables.read_block(REPO / 'docs/models.md', 'model-table') == tables.model_table(), (
        'docs/models.md: the model table is stale; run python -m resnet_jax tables'
    )


def test_the_weight_parity_table_is_filled_and_within_tolerance():
    table = tables.read_block(REPO / 'docs/weights.md', 'weight-parity')
    rows = [line for line in table.splitlines() if line.startswith('| resnet')]
    assert [row.split('|')[1:3] for row in rows] == [
        [f' {name} ', f' {reference} '] for name, reference, _, _ in parity.CASES
    ]
    for row in rows:
        assert float(row.split('|')[4]) < 1e-4, row
    assert 'Measured by `python -m resnet_jax parity`' in table


def test_readme_stays_a_front_page():
    lines = (REPO / 'README.md').read_text().splitlines()
    assert len(lines) <= 160, len(lines)
