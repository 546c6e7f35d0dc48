"""Train a grid of runs one after another; rerunning the command resumes it.

    python -m resnet_jax sweep --config=configs/cifar10.py \
        --models=plain20,plain56,resnet20,resnet56 --workdir=DIR [--grid=NAME] [--config.x=y ...]

A run is (model, variant): `--models` (names, or the sets `degradation` = plain/resnet at depths
20, 32, 44, 56 and `degradation110` = the same and 110) crossed with the variants of `--grid`:
`models` (one run per model), `shortcuts` (options A, B, C) or `optimizers` (SGD momentum,
Nesterov, AdamW, LARS, each with its own learning rate). Each run's config is
`get_config(model)` of the config file (so configs/cifar10.py:resnet110 keeps its warm-up), then
the variant's overrides, then the `--config.x=y` overrides of the command line, which win.

Every run trains in DIR/RUN (RUN = model, or model-variant) through the trainer, so an
interrupted run resumes from its checkpoint. A finished run leaves DIR/RUN/run.json (its config,
parameter count and final metrics) and is skipped by later invocations. A run directory that was
started with a different config is an error, never silently reused. All configs are validated
before the first run trains, so a typo in the last run does not cost the hours before it.

`python -m resnet_jax report --workdir=DIR` turns DIR into the paper's table and figure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import ml_collections

from resnet_jax import checkpoint, counting, models, paths
from resnet_jax import config as config_lib
from resnet_jax.lock import WorkdirLock

logger = logging.getLogger('resnet_jax')

RUN_FILE = 'run.json'

# Named grids: variant name -> config overrides, crossed with --models. The optimizers' learning
# rates are for batch 128 (the paper's); they are starting points, not tuned values.
GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    'models': {'': {}},
    'shortcuts': {
        'A': {'model.shortcut': 'A'},
        'B': {'model.shortcut': 'B'},
        'C': {'model.shortcut': 'C'},
    },
    'optimizers': {
        'momentum': {'optimizer.name': 'momentum', 'optimizer.learning_rate': 0.1},
        'nesterov': {'optimizer.name': 'nesterov', 'optimizer.learning_rate': 0.1},
        'adamw': {
            'optimizer.name': 'adamw',
            'optimizer.learning_rate': 2e-3,
            'optimizer.weight_decay': 0.05,
            'optimizer.weight_decay_mode': 'decoupled',
            'optimizer.decay_bn_and_bias': False,
        },
        'lars': {
            'optimizer.name': 'lars',
            'optimizer.learning_rate': 1.0,
            'optimizer.weight_decay': 1e-4,
            'optimizer.weight_decay_mode': 'decoupled',
            'optimizer.decay_bn_and_bias': False,
        },
    },
}
# Named model lists for --models: the paper's degradation experiment (Figure 6).
_DEPTHS = (20, 32, 44, 56)
MODEL_SETS = {
    'degradation': tuple(f'{family}{d}' for family in ('plain', 'resnet') for d in _DEPTHS),
    'degradation110': tuple(
        f'{family}{d}' for family in ('plain', 'resnet') for d in (*_DEPTHS, 110)
    ),
}


def expand_models(spec: str) -> list[str]:
    """'plain20,resnet20' or a named set ('degradation') -> model names, in order."""
    names = []
    for item in (x.strip() for x in spec.split(',')):
        if item:
            names.extend(MODEL_SETS.get(item, (item,)))
    return names


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # also the run's directory under the sweep's workdir
    config: ml_collections.ConfigDict


def load_config_module(path: str) -> Any:
    """The module of a config file (a path, as train.py's --config takes it, without ':arg')."""
    if not os.path.isfile(path):
        raise ValueError(f'config file {path!r} does not exist; expected e.g. configs/cifar10.py')
    spec = importlib.util.spec_from_file_location(f'_sweep_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, 'get_config', None)):
        raise ValueError(f'config file {path!r} has no get_config(arg) function')
    return module


def plan_runs(
    config_module: Any,
    model_names: Sequence[str],
    grid: str,
    overrides: dict[str, Any],
) -> list[Run]:
    """The runs of a sweep, in order, each with its complete config. Touches no files."""
    if grid not in GRIDS:
        raise ValueError(f'grid {grid!r}; expected one of {", ".join(GRIDS)}')
    if not model_names:
        raise ValueError('--models is empty; expected a comma-separated list such as resnet20')
    for name in model_names:
        if name not in models.MODEL_NAMES:
            raise ValueError(f'model {name!r}; expected one of {", ".join(models.MODEL_NAMES)}')
    runs = []
    for model_name in model_names:
        for variant, variant_overrides in GRIDS[grid].items():
            config = config_module.get_config(model_name)
            config_lib.apply_overrides(config, {'model.name': model_name, **variant_overrides})
            config_lib.apply_overrides(config, overrides)
            name = f'{model_name}-{variant}' if variant else model_name
            runs.append(Run(name, config))
    return runs


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """{'optimizer.learning_rate': 0.1, ...}: a nested dict by dotted keys."""
    return flax.traverse_util.flatten_dict(tree, sep='.')


def config_differences(recorded: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """The fields in which `config` differs from a run's recorded config, as 'key: old -> new'.

    A field the record lacks was added to the config after the run started; it differs only when
    `config` sets it away from its default (so a sweep resumes across such library upgrades).
    """
    old, new = _flatten(recorded), _flatten(config_json(config))
    defaults = _flatten(config_json(config_lib.base_config()))
    missing = object()
    differences = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, missing), new.get(key, missing)
        if before is missing and key in defaults and after == defaults[key]:
            continue
        if before != after:
            shown = ['(absent)' if v is missing else repr(v) for v in (before, after)]
            differences.append(f'{key}: {shown[0]} -> {shown[1]}')
    return differences


def _run_state(run_dir: str, config: ml_collections.ConfigDict) -> str:
    """'new', 'started' or 'finished'; ValueError if the directory holds another config's run."""
    record_path = os.path.join(run_dir, RUN_FILE)
    if paths.exists(record_path):
        record = json.loads(paths.read_text(record_path))
        differences = config_differences(record['config'], config)
        if differences:
            raise ValueError(
                f'{run_dir} holds a run of a different config ({"; ".join(differences)}); '
                'use another --workdir or delete it'
            )
        return record['status']
    return 'started' if paths.isdir(paths.join(run_dir, 'checkpoints')) else 'new'


def _write_record(run_dir: str, record: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    if not paths.is_url(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True)
    paths.write_text(os.path.join(run_dir, RUN_FILE), text)  # never half-written


def parameter_count(config: ml_collections.ConfigDict, num_classes: int) -> int:
    model = config_lib.create_model_from_config(config, num_classes)
    shape = (32, 32, 3) if models.family(config.model.name) == 'cifar' else (224, 224, 3)
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
    return counting.count_params(variables['params'])


def check_runs(runs: Sequence[Run], workdir: str) -> None:
    """Validates every run's config, and that no run directory holds another config's run."""
    for run in runs:
        config_lib.validate(run.config, jax.device_count(), jax.process_count())
        _run_state(os.path.join(workdir, run.name), run.config)


def run_sweep(runs: Sequence[Run], workdir: str) -> dict[str, dict[str, float]]:
    """Trains every run not yet finished; returns each run's final metrics."""
    from resnet_jax import sources, trainer

    check_runs(runs, workdir)  # every config is checked before anything trains
    results = {}
    for i, run in enumerate(runs, 1):
        run_dir = os.path.join(workdir, run.name)
        state = _run_state(run_dir, run.config)
        if state == 'finished':
            logger.info('[%d/%d] %s: finished earlier, skipped', i, len(runs), run.name)
            results[run.name] = json.loads(paths.read_text(paths.join(run_dir, RUN_FILE)))['final']
            continue
        logger.info(
            '[%d/%d] %s: %s',
            i,
            len(runs),
            run.name,
            'resuming' if state == 'started' else 'starting',
        )
        ds = run.config.dataset
        info = sources.dataset_info(ds.name, ds.data_dir)
        record = {
            'name': run.name,
            'model': run.config.model.name,
            'params': parameter_count(run.config, info.num_classes),
            'config': config_json(run.config),
            'status': 'started',
        }
        _write_record(run_dir, record)
        final = trainer.train_and_evaluate(run.config, run_dir)
        if checkpoint.latest_step(os.path.join(run_dir, 'checkpoints')) != run.config.total_steps:
            logger.warning('%s was preempted; rerun the same command to resume the sweep', run.name)
            break
        _write_record(run_dir, {**record, 'status': 'finished', 'final': final})
        results[run.name] = final
    return results


def sweep(
    config_file: str,
    models_spec: str | Sequence[str],
    workdir: str,
    *,
    grid: str = 'models',
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Plans, checks and trains a sweep (what the command does); returns each run's metrics.

    Args:
      config_file: a config file whose get_config(MODEL) gives each run's config.
      models_spec: 'plain20,resnet20', a named set ('degradation'), or a list of names.
      overrides: dotted keys to values, applied to every run after the grid's own.
    """
    module = load_config_module(config_file)
    names = expand_models(models_spec if isinstance(models_spec, str) else ','.join(models_spec))
    runs = plan_runs(module, names, grid, overrides or {})
    paths.check_path_text(workdir, '--workdir')  # '' would be the current directory
    paths.check_supported(workdir, '--workdir')
    check_runs(runs, paths.normalize(workdir))  # before anything is created
    workdir = paths.writable_dir(workdir, '--workdir')
    with WorkdirLock(workdir):  # one sweep per directory; each run also locks its own
        results = run_sweep(runs, workdir)
    logger.info(
        'sweep done: %d runs in %s; report: python -m resnet_jax report --workdir=%s',
        len(results),
        workdir,
        workdir,
    )
    return results
