"""The paper's Figure 7: the standard deviation of every 3x3 layer's response.

    python -m resnet_jax analysis --workdir=SWEEP_DIR [--out=DIR] [--split=test]

Section 4.2: "the responses are the outputs of each 3x3 layer, after BN and before other
nonlinearity (ReLU/addition)". For each run of a sweep (or one train.py workdir) this restores
the newest checkpoint, runs the test split through the network in eval mode, and measures the
standard deviation of each such response over all images, positions and channels. It writes:

  figure7.csv   run, model, layer (1 = the stem's 3x3), module path, std;
  figure7.png   top: std by layer index; bottom: the same sorted in descending order;
  figure7.md    per run: the number of 3x3 layers and the mean and median std.

The paper's observations: residual functions respond less than the plain nets' layers (they are
closer to zero), and the deeper the ResNet, the smaller its responses.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import evaluation, layers, models, pipelines, sources, weights


def _response_pattern(model: models.ResNet) -> re.Pattern:
    """The BatchNorms that follow a 3x3 convolution: the CIFAR stem's, both of a basic block's
    (bn2 is the residual function's output, before the addition), a bottleneck's middle one.
    Projections are 1x1, the ImageNet stem 7x7."""
    bottleneck = issubclass(model.block_cls, layers.Bottleneck)
    patterns = ['/bn2$'] if bottleneck else ['/bn1$', '/bn2$']
    if model.stem == 'cifar':
        patterns.append('^stem_bn$')
    return re.compile('|'.join(patterns))


@dataclasses.dataclass(frozen=True)
class Responses:
    run: str
    model: str
    layers: list[str]  # module paths, in the network's order
    stds: list[float]

    @property
    def plain(self) -> bool:
        return self.model.startswith('plain')


def _ordered(paths: Iterable[str]) -> list[str]:
    """Module paths in the order the network runs them: the stem, then stage, block, layer."""
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', p)]
    return sorted(paths, key=lambda p: (not p.startswith('stem'), natural(p)))


def layer_response_stds(
    model: models.ResNet,
    variables: dict[str, Any],
    batches: Iterable[dict[str, np.ndarray]],
    normalize: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[list[str], list[float]]:
    """(module paths, std of each one's response) over every real example of `batches`.

    Args:
      model: a network of basic blocks (the CIFAR nets, ResNet-18/34); scanned models are
        analysed in their unrolled form.
      variables: its {'params', 'batch_stats'}.
      batches: eval batches with 'image' and 'mask' (`pipelines.eval_dataset`).
      normalize: turns their uint8 images into the network's input inside jit
        (`preprocessing.Preprocess.normalize`); None: the images are that input already.
    """
    if model.scan_blocks:
        model, variables = model.clone(scan_blocks=False), weights.to_unrolled(variables)
    pattern = _response_pattern(model)

    @jax.jit
    def sums(variables, images, mask):
        _, state = model.apply(
            variables,
            images if normalize is None else normalize(images),
            train=False,
            capture_intermediates=lambda mdl, _: pattern.search(_path(mdl)) is not None,
            mutable=['intermediates'],
        )
        out = {}
        for path, value in _flatten(state['intermediates']):
            x = value.astype(jnp.float32)
            weight = mask.astype(jnp.float32)[:, None, None, None] * jnp.ones_like(x)
            out[path] = jnp.stack([jnp.sum(weight), jnp.sum(x * weight), jnp.sum(x * x * weight)])
        return out

    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        for path, s in jax.device_get(sums(variables, batch['image'], batch['mask'])).items():
            totals[path] = totals.get(path, 0) + np.asarray(s, np.float64)
    if not totals:
        raise ValueError('no batches: the split is empty')
    paths = _ordered(totals)
    stds = []
    for path in paths:
        n, total, squares = totals[path]
        stds.append(float(np.sqrt(max(squares / n - (total / n) ** 2, 0.0))))
    return paths, stds


def _path(module: Any) -> str:
    return '/'.join(str(p) for p in module.scope.path)


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        if key == '__call__':
            yield '/'.join(prefix), value[0]
        else:
            yield from _flatten(value, (*prefix, key))


def analyse_run(run_dir: str, split: str = 'test') -> Responses:
    """The responses of a train.py workdir's newest checkpoint on `split` (the only data it
    reads), its images prepared as the run's own evaluations prepared them."""
    run = evaluation.read_run(run_dir)
    ds = run.config.dataset
    source, _ = sources.open_split(ds.name, split, ds.data_dir)
    preprocess = run.input.eval_preprocess()
    batches = pipelines.eval_dataset(
        source,
        preprocess,
        batch_size=500,
        reading=pipelines.Reading(process_index=0, process_count=1),
    )
    variables = evaluation.variables_on_host(run)
    names, stds = layer_response_stds(run.model, variables, batches, preprocess.normalize)
    return Responses(
        os.path.basename(os.path.normpath(run_dir)), run.config.model.name, names, stds
    )


def find_run_dirs(workdir: str) -> list[str]:
    """The train.py workdirs in `workdir` (its subdirectories, or itself) with checkpoints."""
    from resnet_jax import paths

    paths.check_supported(workdir, '--workdir')
    if not paths.isdir(workdir):
        raise ValueError(f'--workdir {workdir!r} is not a directory')
    candidates = [paths.join(workdir, d) for d in paths.listdir(workdir)] + [workdir]
    found = [d for d in candidates if paths.isdir(paths.join(d, 'checkpoints'))]
    if not found:
        raise ValueError(
            f'no checkpoints in {workdir!r} or its subdirectories; expected the --workdir of '
            'resnet_jax.sweep or train.py (run with checkpoints kept)'
        )
    return found


def write_csv(responses: Sequence[Responses], path: str) -> None:
    with open(path, 'w', newline='') as f:
        out = csv.writer(f)
        out.writerow(['run', 'model', 'layer', 'module', 'std'])
        for r in responses:
            for i, (layer, std) in enumerate(zip(r.layers, r.stds, strict=True), 1):
                out.writerow([r.run, r.model, i, layer, f'{std:.6f}'])


def summary_table(responses: Sequence[Responses]) -> str:
    """Per run: its 3x3 layers and the mean and median std of their responses."""
    lines = [
        '| run | model | 3x3 layers | mean std | median std |',
        '|---|---|---:|---:|---:|',
    ]
    for r in sorted(responses, key=lambda r: (not r.plain, len(r.stds), r.run)):
        lines.append(
            f'| {r.run} | {r.model} | {len(r.stds)} | {np.mean(r.stds):.3f} '
            f'| {np.median(r.stds):.3f} |'
        )
    return '\n'.join(lines) + '\n'


def plot_figure7(responses: Sequence[Responses], path: str, title: str = '') -> None:
    """Two panels as in the paper: std by layer index, and sorted in descending order."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5))
    ordered = sorted(responses, key=lambda r: (not r.plain, len(r.stds), r.run))
    colors = plt.cm.tab10(np.arange(len(ordered)) % 10)
    for color, r in zip(colors, ordered, strict=True):
        style = '--' if r.plain else '-'
        index = np.arange(1, len(r.stds) + 1)
        top.plot(index, r.stds, style, color=color, label=r.run, linewidth=1.4)
        bottom.plot(index, sorted(r.stds, reverse=True), style, color=color, linewidth=1.4)
    top.set_xlabel('layer index (original)')
    bottom.set_xlabel('layer index (sorted by magnitude)')
    for ax in (top, bottom):
        ax.set_ylabel('std')
        ax.grid(alpha=0.3)
    top.legend(fontsize=8, title='dashed: plain, solid: ResNet', title_fontsize=8)
    if title:
        top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figure7(workdir: str, out: str, split: str = 'test') -> tuple[str, str]:
    """Analyses every run of `workdir`; writes figure7.csv and figure7.png into `out`."""
    from resnet_jax import paths

    paths.check_path_text(workdir, '--workdir')  # '' would be the current directory
    run_dirs = find_run_dirs(paths.normalize(workdir))
    out = paths.writable_dir(out, '--out')
    responses = [analyse_run(d, split) for d in run_dirs]
    with tempfile.TemporaryDirectory() as staging:  # csv and matplotlib write local files
        write_csv(responses, os.path.join(staging, 'figure7.csv'))
        with open(os.path.join(staging, 'figure7.md'), 'w') as f:
            f.write(summary_table(responses))
        title = f'std of 3x3 layer responses (after BN) on {split}'
        plot_figure7(responses, os.path.join(staging, 'figure7.png'), title)
        for name in ('figure7.csv', 'figure7.md', 'figure7.png'):
            paths.upload(os.path.join(staging, name), paths.join(out, name))
    return paths.join(out, 'figure7.csv'), paths.join(out, 'figure7.png')
