"""Tests of the sweep runner, the report, and command-line config overrides."""

import json
import os
import shutil

import pytest

from configs import cifar10, smoke
from resnet_jax import config as config_lib
from resnet_jax import report, sweep
from resnet_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, 'configs', 'smoke.py')


# --- Overrides -------------------------------------------------------------------------------


def test_overrides_parse_each_value_as_its_fields_type():
    config = config_lib.base_config()
    config.lock()
    config_lib.apply_overrides(
        config,
        {
            'batch_size': '64',
            'optimizer.learning_rate': '1',  # an int where a float lives becomes a float
            'optimizer.boundaries': '(600, 900)',
            'model.scan_blocks': 'true',
            'dataset.test_split': '',
            'dataset.eval_split': 'test[:2000]',
        },
    )
    assert config.batch_size == 64
    assert config.optimizer.learning_rate == 1.0
    assert isinstance(config.optimizer.learning_rate, float)
    assert config.optimizer.boundaries == (600, 900)
    assert config.model.scan_blocks is True
    assert config.dataset.test_split == ''
    assert config.dataset.eval_split == 'test[:2000]'


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'nope': '1'}, "unknown config key nope: 'nope' is not a field of the config"),
        ({'optimizer.nope': '1'}, "unknown config key optimizer.nope: 'nope' is not a field"),
        ({'model.name.deeper': '1'}, "unknown config key model.name.deeper: 'deeper' is not"),
        ({'batch_size': '1.5'}, "config batch_size='1.5': expected int, like 128"),
        ({'model.scan_blocks': 'maybe'}, "model.scan_blocks='maybe': expected bool"),
    ],
)
def test_overrides_reject_unknown_keys_and_wrong_types(overrides, message):
    config = config_lib.base_config()
    config.lock()
    with pytest.raises(ValueError) as e:
        config_lib.apply_overrides(config, overrides)
    assert message in str(e.value)
    assert config.batch_size == 128  # nothing half-applied before the error


# --- Planning ----------------------------------------------------------------------------------


def test_plan_crosses_models_with_the_grid_and_command_line_wins():
    runs = sweep.plan_runs(
        cifar10, ['resnet20', 'resnet110'], 'optimizers', {'total_steps': '1000'}
    )
    assert [r.name for r in runs] == [
        f'{m}-{o}' for m in ('resnet20', 'resnet110') for o in sweep.GRIDS['optimizers']
    ]
    by_name = {r.name: r.config for r in runs}
    assert by_name['resnet20-adamw'].optimizer.name == 'adamw'
    assert by_name['resnet20-adamw'].optimizer.weight_decay_mode == 'decoupled'
    assert by_name['resnet20-lars'].optimizer.name == 'lars'
    assert all(c.total_steps == 1000 for c in by_name.values())
    # get_config(model) of the config file still applies: ResNet-110 warms up, as in the paper.
    assert by_name['resnet110-momentum'].optimizer.warmup_steps == 400
    assert by_name['resnet20-momentum'].optimizer.warmup_steps == 0
    for run in runs:
        config_lib.validate(run.config, device_count=1, process_count=1)


def test_named_model_sets_expand_to_the_papers_figure_6_nets():
    assert sweep.expand_models('degradation') == [
        'plain20',
        'plain32',
        'plain44',
        'plain56',
        'resnet20',
        'resnet32',
        'resnet44',
        'resnet56',
    ]
    assert sweep.expand_models('degradation110')[4] == 'plain110'
    assert sweep.expand_models('resnet20, plain20,') == ['resnet20', 'plain20']


def test_plan_of_the_shortcut_grid_and_of_a_config_that_ignores_its_argument():
    runs = sweep.plan_runs(smoke, ['plain20', 'resnet32'], 'shortcuts', {})
    assert [(r.config.model.name, r.config.model.shortcut) for r in runs] == [
        (m, s) for m in ('plain20', 'resnet32') for s in 'ABC'
    ]


@pytest.mark.parametrize(
    'models, grid, overrides, message',
    [
        (['resnet21'], 'models', {}, "model 'resnet21'; expected one of"),
        ([], 'models', {}, '--models is empty'),
        (['resnet20'], 'depths', {}, "grid 'depths'; expected one of models, shortcuts"),
        (['resnet20'], 'models', {'optimizer.lr': '0.1'}, "unknown config key optimizer.lr: 'lr'"),
    ],
)
def test_plan_rejects_bad_input(models, grid, overrides, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
        sweep.plan_runs(cifar10, models, grid, overrides)


# --- A tiny sweep end to end, on the real CIFAR-10 -------------------------------------------


def _tiny_sweep(workdir, data_dir, **extra):
    return sweep.sweep(
        SMOKE,
        'plain20,resnet20',
        str(workdir),
        overrides={
            'dataset.data_dir': str(data_dir),
            'total_steps': 4,
            'checkpoint_every_steps': 2,
            'eval_every_steps': 2,
            **extra,
        },
    )


def test_sweep_trains_each_run_once_resumes_unfinished_and_reports(tmp_path, cifar10_data_dir):
    workdir = tmp_path / 'sweep'
    results = _tiny_sweep(workdir, cifar10_data_dir)
    assert sorted(results) == ['plain20', 'resnet20']
    for name in ('plain20', 'resnet20'):
        record = json.loads((workdir / name / 'run.json').read_text())
        assert record['status'] == 'finished'
        assert record['model'] == name
        assert record['params'] == 269_722  # 0.27M, as in the paper; plain nets have the same
        assert record['config']['total_steps'] == 4
        assert set(record['final']) >= {'eval/top1_acc', 'eval/loss'}

    # Finished runs are never rerun: their logs do not grow.
    lines = {n: len(read_metrics(workdir / n / 'metrics.jsonl')) for n in ('plain20', 'resnet20')}
    assert _tiny_sweep(workdir, cifar10_data_dir) == results
    assert lines == {n: len(read_metrics(workdir / n / 'metrics.jsonl')) for n in lines}

    # An unfinished run (as a kill after step 2 leaves it) resumes from its checkpoint.
    run_dir = workdir / 'resnet20'
    record = json.loads((run_dir / 'run.json').read_text())
    (run_dir / 'run.json').write_text(json.dumps({**record, 'status': 'started'}))
    shutil.rmtree(run_dir / 'checkpoints' / '4')
    _tiny_sweep(workdir, cifar10_data_dir)
    steps_logged = [r['step'] for r in read_metrics(run_dir / 'metrics.jsonl') if 'train/loss' in r]
    assert steps_logged == [2, 4]  # step 4 retrained from step 2's checkpoint, logged once
    assert json.loads((run_dir / 'run.json').read_text())['status'] == 'finished'

    # The report: the paper's table and Figure 6.
    out = tmp_path / 'report'
    report.write_report(str(workdir), str(out))
    table = (out / 'table.md').read_text()
    assert '| plain20 | 0.27M | 4 |' in table
    assert '| resnet20 | 0.27M | 4 |' in table and '| 8.75 |' in table
    png = (out / 'figure6.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000
    # The logs travel with the report, which redraws from them alone.
    assert (out / 'runs' / 'plain20' / 'run.json').read_text() == (
        workdir / 'plain20' / 'run.json'
    ).read_text()
    report.write_report(str(out / 'runs'), str(tmp_path / 'again'))
    assert (tmp_path / 'again' / 'table.md').read_text() == table

    # The same workdir with another config is refused, and nothing in it changes.
    before = (run_dir / 'run.json').read_text()
    with pytest.raises(ValueError, match=r'holds a run of a different config \(seed: 0 -> 1\)'):
        _tiny_sweep(workdir, cifar10_data_dir, seed=1)
    assert (run_dir / 'run.json').read_text() == before


def test_a_run_recorded_before_a_config_field_existed_still_matches():
    config = cifar10.get_config('resnet20')
    recorded = sweep.config_json(config)
    del recorded['init_from']  # a field added to the config after the run started
    assert sweep.config_differences(recorded, config) == []
    # ... unless this invocation sets it away from its default, or changes a recorded field.
    config.init_from = '/weights/resnet20.th'
    config.seed = 7
    assert sweep.config_differences(recorded, config) == [
        "init_from: (absent) -> '/weights/resnet20.th'",
        'seed: 0 -> 7',
    ]


def test_sweep_and_report_command_lines_fail_with_one_clear_line(tmp_path, run_process):
    def run(command, *args):
        return run_process(['-m', 'resnet_jax', command, *args])

    bad_config = run(
        'sweep', '--config=configs/nope.py', '--models=resnet20', f'--workdir={tmp_path}'
    )
    assert bad_config.returncode == 2
    assert bad_config.stderr == (
        "error: config file 'configs/nope.py' does not exist; expected e.g. configs/cifar10.py\n"
    )

    bad_key = run(
        'sweep',
        '--config=configs/cifar10.py',
        '--models=resnet20',
        f'--workdir={tmp_path / "w"}',
        '--config.optimizer.lr=1',
    )
    assert bad_key.returncode == 2
    assert bad_key.stderr.startswith("error: unknown config key in --config.optimizer.lr=1: 'lr'")
    assert bad_key.stderr.count('\n') == 1
    assert not (tmp_path / 'w').exists()

    bad_model = run(
        'sweep',
        '--config=configs/cifar10.py',
        '--models=resnet21',
        f'--workdir={tmp_path / "w"}',
    )
    assert bad_model.returncode == 1
    assert bad_model.stderr.startswith("error: model 'resnet21'; expected one of")
    assert not (tmp_path / 'w').exists()

    no_runs = run('report', f'--workdir={tmp_path}')
    assert no_runs.returncode == 1
    assert no_runs.stderr.startswith('error: no metrics.jsonl in')
    assert no_runs.stderr.count('\n') == 1
