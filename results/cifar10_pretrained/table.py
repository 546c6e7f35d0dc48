"""Table 6 from trained nets: our test error of each converted net on the JPEG copy, beside the
published error of the same weights on the original CIFAR-10 and the paper's.

    python results/cifar10_pretrained/table.py --runs=DIR --weights=DIR --out=table.md \
        [--finetuned=DIR --finetuned_out=finetune.md]

--runs holds one evaluation-only run per net (resnetN/metrics.jsonl, written by run.sh);
--weights the safetensors files, whose metadata carry their published accuracy. --finetuned
holds the same nets fine-tuned on the copy (finetune.sh): their test error before and after, in
--finetuned_out, and both against depth in finetune.png beside it.
"""

import argparse
import itertools
import os

import jax
from safetensors import safe_open

import resnet_jax as rj
from resnet_jax import metrics, report


def _row(name, runs, weights):
    records = metrics.read_metrics(os.path.join(runs, name, 'metrics.jsonl'))
    (test,) = [r for r in records if 'test/top1_acc' in r]
    with safe_open(os.path.join(weights, f'{name}.safetensors'), 'np') as f:
        published = 100 - float(f.metadata()['best_prec1_original_cifar10_test'])
    model = rj.create_model(name, num_classes=10)
    shapes = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), (32, 32, 3)))
    params = rj.count_params(shapes['params'])
    ours = 100 * (1 - test['test/top1_acc'])
    return (
        f'| {name} | {params / 1e6:.2f}M | {ours:.2f} ({int(test["test/num_examples"])} images) '
        f'| {published:.2f} | {ours - published:+.2f} | {report.PAPER_TEST_ERROR[name]:.2f} |'
    ), ours


def _test_error(run_dir):
    records = metrics.read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
    test = [r for r in records if 'test/top1_acc' in r][-1]
    return 100 * (1 - test['test/top1_acc']), max(r['step'] for r in records)


def finetune_table(names, runs, finetuned, weights, out):
    """Before and after fine-tuning on the copy, and finetune.png: both against depth."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lines = [
        '| net | original, published (%) | JPEG copy, as trained (%) | after fine-tuning on the '
        'copy (%) | change (points) | steps |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    before, after = [], []
    for name in names:
        with safe_open(os.path.join(weights, f'{name}.safetensors'), 'np') as f:
            published = 100 - float(f.metadata()['best_prec1_original_cifar10_test'])
        was, _ = _test_error(os.path.join(runs, name))
        now, steps = _test_error(os.path.join(finetuned, name))
        before.append(was)
        after.append(now)
        lines.append(
            f'| {name} | {published:.2f} | {was:.2f} | {now:.2f} | {now - was:+.2f} | {steps} |'
        )
    ordered = all(a > b for a, b in itertools.pairwise(after))
    lines += [
        '',
        f'Deeper is better after fine-tuning: {"yes" if ordered else "no"} '
        f'({" > ".join(f"{e:.2f}" for e in after)}).',
    ]
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    depths = [int(n.removeprefix('resnet')) for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(depths, before, 'o--', label='as trained (original CIFAR-10)')
    ax.plot(depths, after, 'o-', label='fine-tuned on the copy')
    ax.set(xlabel='depth', ylabel='test error on the JPEG copy (%)', xticks=depths)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(out) or '.', 'finetune.png'), dpi=120)
    plt.close(fig)
    print('\n'.join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', required=True)
    parser.add_argument('--weights', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--finetuned', help='the fine-tuned runs (finetune.sh)')
    parser.add_argument('--finetuned_out', help='their table (finetune.md)')
    args = parser.parse_args()
    names = sorted(os.listdir(args.runs), key=lambda n: int(n.removeprefix('resnet')))
    rows = [_row(n, args.runs, args.weights) for n in names]
    errors = [e for _, e in rows]
    ordered = all(a > b for a, b in itertools.pairwise(errors))
    lines = [
        '| net | params | test error here, JPEG copy (%) | published, original (%) '
        '| the copy costs (points) | paper, Table 6 (%) |',
        '|---|---:|---:|---:|---:|---:|',
        *[r for r, _ in rows],
        '',
        f'Deeper is better on the copy too: {"yes" if ordered else "no"} '
        f'({" > ".join(f"{e:.2f}" for e in errors)}).',
    ]
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    if args.finetuned:
        finetune_table(names, args.runs, args.finetuned, args.weights, args.finetuned_out)


if __name__ == '__main__':
    main()
