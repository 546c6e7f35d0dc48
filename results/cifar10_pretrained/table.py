"""Table 6 from trained nets: our test error of each converted net on the JPEG copy, beside the
published error of the same weights on the original CIFAR-10 and the paper's.

    python results/cifar10_pretrained/table.py --runs=DIR --weights=DIR --out=table.md

--runs holds one evaluation-only run per net (resnetN/metrics.jsonl, written by run.sh);
--weights the safetensors files, whose metadata carry their published accuracy.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', required=True)
    parser.add_argument('--weights', required=True)
    parser.add_argument('--out', required=True)
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


if __name__ == '__main__':
    main()
