"""The package's plan holds: docs/architecture.md's layers are what the imports do, nothing in
the library imports a command, there is no circle, and each module stays one readable file."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'resnet_jax'
MAX_LINES = 600  # about; DESIGN.md: each module under about 600 lines


def _modules():
    names = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' and len(parts) > 1 else parts)
        names[name] = path
    return names


def _imports(path):
    """Every resnet_jax module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith('resnet_jax')
        ):
            sub = node.module[len('resnet_jax') :].lstrip('.')
            found.update([sub] if sub else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(
                a.name[len('resnet_jax.') :] for a in node.names if a.name.startswith('resnet_jax.')
            )
    return found


def _layers():
    """{module: layer} from the table in docs/architecture.md (layer 'top' = 99)."""
    text = (REPO / 'docs' / 'architecture.md').read_text()
    table = re.search(r'<!-- layers:start -->(.*?)<!-- layers:end -->', text, re.S).group(1)
    layers = {}
    for row in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in row.strip('|').split('|')]
        level = 99 if cells[0] == 'top' else int(cells[0])
        for name in re.findall(r'`([\w.]+)`', cells[2]):
            assert name not in layers, f'{name} is in two layers of docs/architecture.md'
            layers[name] = level
    return layers


MODULES = _modules()
LAYERS = _layers()


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    assert sorted(set(MODULES) - set(LAYERS)) == [], 'add them to docs/architecture.md'
    assert sorted(set(LAYERS) - set(MODULES)) == [], 'docs/architecture.md lists modules gone'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_a_module_imports_only_its_layer_and_those_below(module):
    wrong = sorted(
        f'{name} (layer {LAYERS.get(name, "?")})'
        for name in _imports(MODULES[module])
        if name in MODULES and name != module and LAYERS.get(name, 99) > LAYERS[module]
    )
    assert not wrong, f'{module} (layer {LAYERS[module]}) imports upwards: {wrong}'


def test_nothing_in_the_library_imports_a_command():
    commands = {name for name, level in LAYERS.items() if level == 99}
    wrong = {
        module: sorted(_imports(path) & commands)
        for module, path in MODULES.items()
        if module not in commands and _imports(path) & commands
    }
    assert not wrong


def test_the_import_graph_has_no_circle():
    graph = {m: {d for d in _imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    state, path, circles = {}, [], []

    def visit(node):
        state[node] = 'open'
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 'open':
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles


@pytest.mark.parametrize('module', sorted(MODULES))
def test_each_module_is_one_readable_file(module):
    path = MODULES[module]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f'{path.name}: split it by job'
    assert ast.get_docstring(ast.parse(text)), f'{path.name} says what it owns in a docstring'


# Modules whose tests live in a file of another name: a feature spanning modules, or a command
# tested where its library is.
TESTED_IN = {
    '__init__': 'test_models.py',  # the public API, the README's example
    '__main__': 'test_cli.py',
    'commands': 'test_cli.py',
    'commands.evaluate': 'test_evaluation.py',
    'commands.predict': 'test_prediction.py',
    'commands.tables': 'test_docs.py',
    'commands.parity': 'test_weights.py',
    'datasets': 'test_sources.py',  # the registry, as the sources read it
    'options': 'test_models.py',  # create_model's checks
    'parity': 'test_weights.py',
    'tables': 'test_docs.py',
    'train_state': 'test_steps.py',
}


@pytest.mark.parametrize('module', sorted(MODULES))
def test_a_maintainer_finds_the_tests_of_a_module(module):
    name = TESTED_IN.get(module, f'test_{module.rsplit(".", 1)[-1]}.py')
    assert (REPO / 'tests' / name).exists(), f'resnet_jax/{module}: expected tests/{name}'


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / 'm.py'
    source.write_text(
        'from resnet_jax import models\n'
        'def f():\n'
        '    from resnet_jax.commands import cli\n'
        '    import resnet_jax.trainer\n'
    )
    assert _imports(source) == {'models', 'commands', 'trainer'}
