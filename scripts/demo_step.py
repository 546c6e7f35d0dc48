"""Forward/backward demo: a CIFAR ResNet fits a few hundred real CIFAR-10 images.

What `make train` runs until the trainer lands. It reads the shared TFDS copy of CIFAR-10
(no TensorFlow), builds the model with `resnet_jax.create_model`, and runs jitted SGD steps
that carry the BatchNorm statistics explicitly, printing the loss as it falls.

    python scripts/demo_step.py --data_dir ~/.cache/resnet_jax/tfds [--model resnet20]

On a 2-core CPU the default (resnet20, 40 steps of batch 64) takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import resnet_jax as rj

DATASET = 'cifar10_jpeg'


def load_images(data_dir: str, split: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` random (image, label) pairs of a TFDS split, decoded to uint8 NHWC."""
    import tensorflow_datasets as tfds

    if not os.path.isdir(os.path.join(data_dir, DATASET)):
        raise SystemExit(
            f'error: dataset {DATASET!r} not found in data_dir {data_dir!r}; extract '
            f'../shared/data/cifar10_jpeg.tar.xz there (make data DATA_DIR={data_dir})'
        )
    source = tfds.data_source(DATASET, data_dir=data_dir, split=split)
    if count > len(source):
        raise SystemExit(f'error: asked for {count} images, {split!r} has {len(source)}')
    # The train split is stored grouped by class: sample at random.
    indices = np.random.default_rng(seed).choice(len(source), count, replace=False)
    records = [source[int(i)] for i in indices]
    images = np.stack([r['image'] for r in records])
    labels = np.array([r['label'] for r in records], np.int32)
    return images, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_dir', required=True, help='TFDS data_dir holding cifar10_jpeg')
    parser.add_argument('--model', default='resnet20', choices=rj.CIFAR_MODELS)
    parser.add_argument('--num_images', type=int, default=512)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--learning_rate', type=float, default=0.1)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ('num_images', 'batch_size', 'steps'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be a positive int, got {getattr(args, flag)}')
    if args.batch_size > args.num_images:
        parser.error(f'--batch_size {args.batch_size} exceeds --num_images {args.num_images}')

    images, labels = load_images(args.data_dir, 'train', args.num_images, args.seed)
    test_images, test_labels = load_images(args.data_dir, 'test', args.num_images, args.seed)
    # Per-channel standardisation with this sample's own statistics.
    mean = images.mean(axis=(0, 1, 2))
    std = images.std(axis=(0, 1, 2))
    normalise = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
    x_train, x_test = normalise(images), normalise(test_images)

    model = rj.create_model(args.model, num_classes=10)
    variables = rj.init_variables(model, jax.random.key(args.seed), images.shape[1:])
    optimizer = optax.sgd(args.learning_rate, momentum=0.9)
    opt_state = optimizer.init(variables['params'])
    print(
        f'{args.model}: {rj.count_params(variables["params"]):,} parameters, '
        f'{args.num_images} real CIFAR-10 images, batch {args.batch_size}, {jax.devices()[0]}'
    )

    @jax.jit
    def train_step(variables, opt_state, x, y):
        def loss_fn(params):
            logits, batch_stats = rj.apply_model(
                model, {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables['params']
        )
        updates, opt_state = optimizer.update(grads, opt_state, variables['params'])
        params = optax.apply_updates(variables['params'], updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return {'params': params, 'batch_stats': batch_stats}, opt_state, loss, accuracy

    @jax.jit
    def accuracy(variables, x, y):
        logits, _ = rj.apply_model(model, variables, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(args.seed)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.choice(args.num_images, args.batch_size, replace=False)
        variables, opt_state, loss, acc = train_step(
            variables, opt_state, x_train[batch], labels[batch]
        )
        losses.append(float(loss))
        if step == 1:
            start = time.perf_counter()  # exclude compilation from the rate
            print(f'step {step:4d}  loss {losses[-1]:.3f}  batch accuracy {float(acc):.2f}')
        elif step % 10 == 0 or step == args.steps:
            rate = (step - 1) * args.batch_size / (time.perf_counter() - start)
            print(
                f'step {step:4d}  loss {losses[-1]:.3f}  batch accuracy {float(acc):.2f}  '
                f'{rate:.0f} images/s'
            )
    train_acc = float(accuracy(variables, x_train, labels))
    test_acc = float(accuracy(variables, x_test, test_labels))
    print(
        f'eval mode: accuracy {train_acc:.2f} on the {args.num_images} training images, '
        f'{test_acc:.2f} on {args.num_images} test images (chance: 0.10; running BN '
        'statistics lag the weights this early in training)'
    )
    if not np.all(np.isfinite(losses)):
        sys.exit('error: the loss became non-finite')


if __name__ == '__main__':
    main()
