"""Input-pipeline throughput: CIFAR host path, CIFAR in-memory path, ImageNet-style JPEGs.

    python benchmarks/input_pipeline.py --data_dir ~/.cache/resnet_jax/tfds [--workers 0,2]

* cifar_host: `data.train_dataset` over the shared CIFAR-10 (TFDS ArrayRecord, JPEG decode,
  pad-crop-flip, per-pixel mean) in batches of 128, with each Grain worker count.
* cifar_in_memory: `data.in_memory_train_batch` (augmentation inside jit) on the decoded
  uint8 arrays; the one-off decode time is printed separately.
* imagenet_jpeg: a source that decodes JPEGs of ImageNet-like sizes (made here, about
  500x375) followed by Inception random-resized-crop to 224 and normalisation, batches of 64.

Each figure is images per second after one warm-up batch. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import data, datasets


def _rate(iterator, batches: int, batch_size: int) -> float:
    next(iterator)  # warm-up: worker start, first decode, compilation
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    jax.block_until_ready(batch)
    return batches * batch_size / (time.perf_counter() - start)


def _closing_rate(dataset, batches: int, batch_size: int) -> float:
    iterator = iter(dataset)
    try:
        return _rate(iterator, batches, batch_size)
    finally:
        if hasattr(iterator, 'close'):
            iterator.close()


class JpegSource:
    """Random-access JPEG records decoded on access, as TFDS does for ImageNet."""

    def __init__(self, count: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.encoded = []
        for _ in range(count):
            h, w = int(rng.integers(333, 500)), int(rng.integers(375, 500))
            # Smooth random images compress like photographs, unlike white noise.
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
            self.encoded.append(cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        image = cv2.imdecode(self.encoded[index], cv2.IMREAD_COLOR)[:, :, ::-1]
        return {'image': image, 'label': index % 1000, 'id': str(index)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_dir', required=True)
    parser.add_argument('--workers', default='0,2', help='comma-separated Grain worker counts')
    parser.add_argument('--batches', type=int, default=30)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(',')]
    results: dict = {
        'machine': f'{platform.machine()} CPU, {os.cpu_count()} cores, {jax.devices()[0].platform}'
    }

    source, info = data.open_split('cifar10_jpeg', 'train', args.data_dir)
    preprocess = data.make_preprocess(info, train=True, data_dir=args.data_dir)
    for n in workers:
        dataset = data.train_dataset(source, preprocess, batch_size=128, seed=0, num_workers=n)
        rate = _closing_rate(dataset, args.batches, 128)
        results[f'cifar_host_workers{n}'] = round(rate)
        print(f'cifar_host       workers={n}  batch 128  {rate:9.0f} images/s')

    start = time.perf_counter()
    images, labels = data.load_arrays(source, info)
    decode_s = time.perf_counter() - start
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    key = jax.random.key(0)
    steps = iter(
        data.in_memory_train_batch(images, labels, key, step, batch_size=128)
        for step in range(args.batches * 10 + 1)
    )
    rate = _rate(steps, args.batches * 10, 128)
    results['cifar_in_memory'] = round(rate)
    results['cifar_decode_all_s'] = round(decode_s, 1)
    print(f'cifar_in_memory  jit          batch 128  {rate:9.0f} images/s', end='')
    print(f'  (decode once: {decode_s:.1f} s)')

    jpegs = JpegSource(512)
    imagenet_info = data.DatasetInfo(
        'jpeg_bench', 1000, None, {'train': len(jpegs)}, spec=datasets.spec('imagenet2012')
    )
    inception = data.make_preprocess(
        imagenet_info, train=True, augmentation='inception_crop_flip', normalization='channel'
    )
    for n in workers:
        dataset = data.train_dataset(jpegs, inception, batch_size=64, seed=0, num_workers=n)
        rate = _closing_rate(dataset, max(args.batches // 3, 5), 64)
        results[f'imagenet_jpeg_workers{n}'] = round(rate)
        print(f'imagenet_jpeg    workers={n}  batch 64   {rate:9.0f} images/s')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
