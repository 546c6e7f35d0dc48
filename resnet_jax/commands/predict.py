"""The most likely classes of your own images, from a run or from a weights file.

    python -m resnet_jax predict --workdir=DIR [--step=N] IMAGE [IMAGE ...]
    python -m resnet_jax predict --weights=FILE --model=resnet20 [--dataset=cifar10_jpeg] \
        [--normalization=imagenet] IMAGE [IMAGE ...]

With `--workdir`, the run's checkpoint (the latest, or `--step`) is restored with its recorded
config: the weights it evaluates with (the moving average where the run kept one), its input
normalisation, its dataset's eval preprocessing and class names. With `--weights`, a PyTorch
state dict (.pth/.th/.safetensors, converted as `config.init_from` converts it) or a file written
by `evaluate --export` (.msgpack); the class names are the dataset's when it is prepared under
`--data_dir`, else class numbers.

Each image (JPEG or PNG; grayscale and RGBA are made RGB) goes through the eval preprocessing of
the dataset: ImageNet-style resize and centre crop, or, for the fixed-size CIFAR nets, a resize
to their 32x32. Prints the top-k classes with their probabilities, image by image.
"""

import os

from absl import flags

from resnet_jax import paths, prediction
from resnet_jax.commands import cli
from resnet_jax.folder import read_image

FLAGS = flags.FLAGS


def format_predictions(path: str, predictions: list[tuple[str, float]]) -> str:
    lines = [path] + [f'  {p:7.2%}  {name}' for name, p in predictions]
    return '\n'.join(lines)


def main(argv: list[str]) -> None:
    images = argv[1:]
    if not images:
        raise cli.UserError('no images given; expected IMAGE paths after the flags')
    for flag in ('workdir', 'weights'):  # '--workdir=' must not count as not given
        if FLAGS[flag].value is not None:
            paths.check_path_text(FLAGS[flag].value, f'--{flag}')
    if bool(FLAGS.workdir) == bool(FLAGS.weights):
        raise cli.UserError('pass exactly one of --workdir=DIR and --weights=FILE')
    if FLAGS.weights and not FLAGS.model:
        raise cli.UserError('--weights needs --model (e.g. --model=resnet20)')
    if FLAGS.top_k < 1:  # 0 would print each image's name and no class at all
        raise cli.UserError(f'--top_k={FLAGS.top_k}; expected a positive int (classes per image)')
    if FLAGS.step is not None and FLAGS.step < 0:
        raise cli.UserError(f'--step={FLAGS.step}; expected a checkpoint step >= 0 (or none)')
    # Flags of the other source would be ignored without a word: a run has its own network,
    # dataset and normalisation (recorded), a weights file one set of weights.
    other = ('model', 'dataset', 'normalization') if FLAGS.workdir else ('step',)
    given = [f'--{name}' for name in other if FLAGS[name].present]
    if given:
        source = '--workdir (the run recorded them)' if FLAGS.workdir else '--weights'
        raise cli.UserError(f'{", ".join(given)} cannot be used with {source}')
    pixels = [read_image(path) for path in images]  # every file checked before the model loads
    if FLAGS.workdir:
        predictor = prediction.from_workdir(FLAGS.workdir, FLAGS.step)
    else:
        predictor = prediction.from_weights(
            FLAGS.weights,
            FLAGS.model,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            normalization=FLAGS.normalization,
        )
    for path, predictions in zip(images, predictor(pixels, FLAGS.top_k), strict=True):
        print(format_predictions(path, predictions))


def define_flags() -> None:
    flags.DEFINE_string('workdir', None, 'A training workdir (its checkpoint and config).')
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
    flags.DEFINE_string('weights', None, 'A weights file: .msgpack, .pth, .th or .safetensors.')
    flags.DEFINE_string('model', None, 'With --weights: the network, e.g. resnet20.')
    flags.DEFINE_string('dataset', None, 'With --weights: its classes (default by model).')
    flags.DEFINE_string(
        'data_dir', os.path.join(paths.cache_dir(), 'tfds'), 'Where --dataset is prepared.'
    )
    flags.DEFINE_string('normalization', 'imagenet', 'With --weights: the input normalisation.')
    flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')


def run() -> None:
    define_flags()
    cli.run(main, positional=True)


if __name__ == '__main__':
    run()
