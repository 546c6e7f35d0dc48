"""The paper's Table 6 and Figure 6 from the logs of a sweep (or of any train.py workdirs).

    python -m resnet_jax report --workdir=DIR [--out=DIR]

Reads DIR/*/metrics.jsonl (and DIR/*/run.json, written by resnet_jax.sweep, for the parameter
count and config) and writes to --out (default: DIR):
  table.md    model, parameters, iterations, training and test error, the paper's test error;
  figure6.png training error (dashed) and test error (bold) against iterations, plain nets on
              the left and residual nets on the right, as in the paper's Figure 6;
  runs/       when --out is elsewhere, a copy of each run's metrics.jsonl and run.json, so the
              report can be redrawn from --out alone (`--workdir=OUT/runs`).
Errors, not accuracies, as in the paper: error = 1 - top-1 accuracy, in percent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from resnet_jax import metrics, paths

# Table 6 of the paper: CIFAR-10 test error (%), original data, 64k iterations, best of 5 for 110.
PAPER_TEST_ERROR = {
    'resnet20': 8.75,
    'resnet32': 7.51,
    'resnet44': 7.17,
    'resnet56': 6.97,
    'resnet110': 6.43,
    'resnet1202': 7.93,
}


@dataclasses.dataclass
class RunLog:
    name: str
    model: str
    params: int | None
    train: list[tuple[int, float]]  # (iteration, training error %), one per logged interval
    test: list[tuple[int, float]]  # (iteration, error % on the eval split), one per evaluation
    final_test: float | None  # error % on the test split at the end, if the run had one
    eval_split: str
    test_split: str

    @property
    def iterations(self) -> int:
        return max([s for s, _ in self.train + self.test], default=0)

    @property
    def plain(self) -> bool:
        return self.model.startswith('plain')

    @property
    def depth(self) -> int:
        match = re.search(r'\d+', self.model)
        return int(match.group()) if match else 0


def _error(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def read_run(run_dir: str) -> RunLog:
    """One run's curves from its metrics.jsonl (and run.json when the sweep wrote one)."""
    records = metrics.read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
    run = _read_json(os.path.join(run_dir, 'run.json'))  # written by resnet_jax.sweep
    config = run.get('config') or _read_json(os.path.join(run_dir, 'config.json'))
    dataset = config.get('dataset', {})
    name = os.path.basename(os.path.normpath(run_dir))
    train, test, final_test = [], [], None
    for r in records:
        if 'train/top1_acc' in r:
            train.append((r['step'], _error(r['train/top1_acc'])))
        if 'eval/top1_acc' in r:
            test.append((r['step'], _error(r['eval/top1_acc'])))
        if 'test/top1_acc' in r:
            final_test = _error(r['test/top1_acc'])
    return RunLog(
        name=name,
        model=run.get('model') or config.get('model', {}).get('name') or name.split('-')[0],
        params=run.get('params'),
        train=train,
        test=test,
        final_test=final_test,
        eval_split=dataset.get('eval_split', 'eval'),
        test_split=dataset.get('test_split', 'test'),
    )


def _read_json(path: str) -> dict[str, Any]:
    """The object in a JSON file, {} if there is none; ValueError naming a damaged one."""
    try:
        value = json.loads(paths.read_text(path))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise ValueError(
            f'{path} is not valid JSON ({e}); expected the file train.py wrote'
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f'{path} holds a {type(value).__name__}; expected a JSON object')
    return value


def find_runs(workdir: str) -> list[RunLog]:
    """Every run under `workdir` (its subdirectories, or `workdir` itself), plain nets first."""
    paths.check_supported(workdir, '--workdir')
    if not paths.isdir(workdir):
        raise ValueError(f'--workdir {workdir!r} is not a directory')
    candidates = [paths.join(workdir, d) for d in paths.listdir(workdir)] + [workdir]
    runs = [read_run(d) for d in candidates if paths.isfile(paths.join(d, 'metrics.jsonl'))]
    if not runs:
        raise ValueError(
            f'no metrics.jsonl in {workdir!r} or its subdirectories; expected the --workdir of '
            'resnet_jax.sweep or of train.py'
        )
    return sorted(runs, key=lambda r: (not r.plain, r.depth, r.name))


def _fmt(value: float | None, spec: str = '.2f') -> str:
    return '—' if value is None else format(value, spec)


def markdown_table(runs: Sequence[RunLog]) -> str:
    """The paper's Table 6 layout, with our training error and iterations beside it."""
    lines = [
        '| run | params | iterations | training error (%) | test error (%) | paper (%) |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    from_curve = False
    for r in runs:
        params = '—' if r.params is None else f'{r.params / 1e6:.2f}M'
        last_train = r.train[-1][1] if r.train else None
        test = _fmt(r.final_test)
        if r.final_test is None and r.test:
            # No test-split pass yet (an unfinished run): say so rather than pass the eval
            # split's last value off as the final number.
            test, from_curve = f'{_fmt(r.test[-1][1])} *', True
        lines.append(
            f'| {r.name} | {params} | {r.iterations:,} | {_fmt(last_train)} | {test} '
            f'| {_fmt(PAPER_TEST_ERROR.get(r.model))} |'
        )
    if from_curve:
        lines.append('\n\\* no test-split result yet: the last error on the eval split.')
    return '\n'.join(lines) + '\n'


def plot_figure6(runs: Sequence[RunLog], path: str) -> None:
    """Training error (dashed) and test error (bold) vs iterations; plain left, residual right."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [('plain', [r for r in runs if r.plain]), ('ResNet', [r for r in runs if not r.plain])]
    panels = [(title, rs) for title, rs in panels if rs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    top = max((e for r in runs for _, e in r.train + r.test), default=100.0)
    for ax, (title, group) in zip(axes[0], panels, strict=True):
        colors = plt.cm.viridis_r(
            [0.15 + 0.7 * i / max(1, len(group) - 1) for i in range(len(group))]
        )
        for color, r in zip(colors, group, strict=True):
            if r.train:
                ax.plot(*zip(*r.train, strict=True), '--', color=color, linewidth=1)
            if r.test:
                ax.plot(*zip(*r.test, strict=True), '-', color=color, linewidth=2.5, label=r.name)
        ax.set_title(title)
        ax.set_xlabel('iterations')
        ax.set_ylabel('error (%)')
        ax.set_ylim(0, min(100, top * 1.05))
        ax.grid(alpha=0.3)
        ax.legend(title='bold: test, dashed: train', fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _copy_logs(workdir: str, runs: Sequence[RunLog], out: str) -> None:
    for r in runs:
        source = paths.join(workdir, r.name) if r.name != os.path.basename(workdir) else workdir
        target = paths.join(out, 'runs', r.name)
        if not paths.is_url(target):
            os.makedirs(target, exist_ok=True)
        for name in ('metrics.jsonl', 'run.json'):
            if paths.exists(paths.join(source, name)):
                paths.copy_file(paths.join(source, name), paths.join(target, name))


def write_report(workdir: str, out: str) -> tuple[str, str]:
    """Writes table.md and figure6.png (and, out of `workdir`, runs/) into `out`."""
    paths.check_path_text(workdir, '--workdir')  # '' would be the current directory
    workdir = paths.normalize(workdir)
    runs = find_runs(workdir)
    out = paths.writable_dir(out, '--out')
    table_path = paths.join(out, 'table.md')
    figure_path = paths.join(out, 'figure6.png')
    splits = sorted(
        {f'curves: {r.eval_split}; final: {r.test_split or r.eval_split}' for r in runs}
    )
    table = markdown_table(runs)
    table += f'\nTest error: {"; ".join(splits)}. Paper: Table 6, 64k iterations.\n'
    paths.write_text(table_path, table)
    with tempfile.TemporaryDirectory() as staging:  # matplotlib writes local files only
        plot_figure6(runs, os.path.join(staging, 'figure6.png'))
        paths.upload(os.path.join(staging, 'figure6.png'), figure_path)
    if not (out == workdir or out.startswith(workdir + '/')):
        _copy_logs(workdir, runs, out)
    return table_path, figure_path
