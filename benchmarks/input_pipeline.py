"""Input-pipeline throughput, bytes and cores: CIFAR host and in-memory paths, photographs.

    python benchmarks/input_pipeline.py --data_dir ~/.cache/resnet_jax/tfds \
        [--workers 0,1,2] [--batches 20] [--rounds 4] [--photos 256]

The model is idle: each row only consumes batches. The settings of a group are timed in turns
(`measure`), so the machine's drift falls on all of them alike.

* cifar_host: `pipelines.train_dataset` over the shared CIFAR-10 copy (TFDS ArrayRecord, JPEG
  decode, pad-crop-flip), batches of 128, for each Grain worker count.
* cifar_in_memory: `in_memory.in_memory_train_batch` (gather and augmentation inside jit) on the
  decoded uint8 arrays; the one-off decode time is printed separately.
* photos: ImageNet-like JPEGs made from real photographs (benchmarks/photos.py: about 500x375,
  110 KB) in a `dataset.name='folder'` layout, read by the trainer's pipeline (the files read
  undecoded, then per image: decode, the augmentation, uint8 out), batches of 64: the paper's
  `scale_crop_flip` and the Inception crop, for each worker count (one read thread each) and
  for 0 workers with 2 read threads.
* large photo: one 4000x3000 JPEG, an Inception crop of it decoded whole first against the
  crop-aware decode (`resnet_jax.decode`: libjpeg's reduced scale where the crop allows it).

Per row: images/s; the cores the pipeline kept busy (CPU time of this process and its Grain
workers over the wall time); images per CPU-second (the rate of one core); uint8 bytes per
image and per step as they leave the host (float32 batches were 4x). Then the 2-worker /
0-worker ratio and the cores a host needs for a ResNet-50 at 3,000 and 7,000 images/s (one
H100 in bfloat16 at the low and the high end), from the 2-worker row's rate per core. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import cv2
import jax
import numpy as np
import photos

from resnet_jax import in_memory, pipelines, preprocessing, sources

RESNET50_IMAGES_PER_S = (3000, 7000)


def _process_tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its descendants (Grain's workers)."""
    parents, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(pid)], cpu[int(pid)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu[p] for p in tree) / os.sysconf('SC_CLK_TCK')


def measure(streams: dict, batches: int, batch_size: int, rounds: int = 4) -> dict:
    """images/s and cores busy of each of `streams` (name -> iterable), over `batches`
    batches each, timed in `rounds` turns round the group.

    Timing the settings in turn, a slice at a time, exposes each to the same machine (this
    shared 2-core machine's speed drifts by 20% within minutes). A pipeline waiting for its
    turn has its workers' batches ready: each turn first takes (and does not time) three
    batches, so the timed ones are made while it is timed.
    """
    iterators = {name: iter(p) for name, p in streams.items()}
    wall = dict.fromkeys(streams, 0.0)
    cpu = dict.fromkeys(streams, 0.0)
    per_round = -(-batches // rounds)
    try:
        for iterator in iterators.values():  # warm-up: worker start-up, first reads
            jax.block_until_ready([next(iterator) for _ in range(2)])
        for _ in range(rounds):
            for name, iterator in iterators.items():
                jax.block_until_ready([next(iterator) for _ in range(3)])
                start, cpu_start = time.perf_counter(), _process_tree_cpu_s()
                for _ in range(per_round):
                    batch = next(iterator)
                jax.block_until_ready(batch)
                wall[name] += time.perf_counter() - start
                cpu[name] += _process_tree_cpu_s() - cpu_start
    finally:
        for iterator in iterators.values():
            if hasattr(iterator, 'close'):
                iterator.close()
    images = rounds * per_round * batch_size
    image_bytes = int(np.prod(batch['image'].shape[1:])) * batch['image'].dtype.itemsize
    return {
        name: {
            'images_per_s': images / wall[name],
            'cores': cpu[name] / wall[name],
            'images_per_cpu_s': images / cpu[name] if cpu[name] > 0 else float('nan'),
            'bytes_per_image': image_bytes,
            'bytes_per_step': image_bytes * batch_size,
            'dtype': str(batch['image'].dtype),
        }
        for name in streams
    }


def _row(name: str, settings: str, r: dict) -> str:
    return (
        f'| {name} | {settings} | {r["images_per_s"]:,.0f} | {r["cores"]:.2f} | '
        f'{r["images_per_cpu_s"]:,.0f} | {r["bytes_per_image"]:,} | '
        f'{r["bytes_per_step"] / 2**20:.2f} MiB |'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_dir', required=True)
    parser.add_argument('--workers', default='0,1,2', help='comma-separated Grain worker counts')
    parser.add_argument('--batches', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=4, help='turns round each group')
    parser.add_argument('--photos', type=int, default=256, help='JPEGs made for the photo rows')
    args = parser.parse_args()
    try:
        workers = [int(w) for w in args.workers.split(',')]
    except ValueError:
        parser.error(f'--workers={args.workers!r}: expected comma-separated worker counts')
    for name, value, least in (
        ('batches', args.batches, 1),
        ('rounds', args.rounds, 1),
        ('photos', args.photos, 128),
        ('workers', min(workers), 0),
    ):
        if value < least:
            parser.error(f'--{name}={value}: expected at least {least}')
    results: dict = {
        'machine': f'{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}',
        'rows': [],
    }
    print(f'machine: {results["machine"]}')
    print('| pipeline | settings | images/s | cores busy | images per CPU-s | bytes/image | '
          'bytes/step |')  # fmt: skip
    print('|---|---|---|---|---|---|---|')

    def record(name, settings, r):
        results['rows'].append({'pipeline': name, 'settings': settings, **r})
        print(_row(name, settings, r), flush=True)

    source, info = sources.open_split('cifar10_jpeg', 'train', args.data_dir)
    preprocess = preprocessing.make_preprocess(info, train=True, data_dir=args.data_dir)
    streams = {
        f'{n} workers, batch 128': pipelines.train_dataset(
            source, preprocess, batch_size=128, seed=0, reading=pipelines.Reading(num_workers=n)
        )
        for n in workers
    }
    for settings, r in measure(streams, args.batches, 128, args.rounds).items():
        record('CIFAR-10 host', settings, r)

    start = time.perf_counter()
    images, labels = in_memory.load_arrays(source, info)
    results['cifar_decode_all_s'] = time.perf_counter() - start
    images, labels = jax.device_put(images), jax.device_put(labels)
    key = jax.random.key(0)
    steps = (
        in_memory.in_memory_train_batch(images, labels, key, step, batch_size=128)
        for step in range(2**31)
    )
    r = measure({'jit, batch 128': steps}, 10 * args.batches, 128, args.rounds)
    record('CIFAR-10 in memory', 'jit, batch 128', r['jit, batch 128'])

    with tempfile.TemporaryDirectory() as root:
        results['photos'] = photos.write_folder(root, args.photos)
        source, info = sources.open_split('folder', 'train', root)
        for augmentation in ('scale_crop_flip', 'inception_crop_flip'):
            preprocess = preprocessing.make_preprocess(info, train=True, augmentation=augmentation)
            streams = {
                f'{n} workers x {threads} threads': pipelines.train_dataset(
                    source, preprocess, batch_size=64, seed=0, reading=pipelines.Reading(n, threads)
                )
                for n, threads in [(n, 1) for n in workers] + [(0, 2)]
            }
            for settings, r in measure(streams, args.batches, 64, args.rounds).items():
                record(f'photos, {augmentation}', settings, r)
    results['large_photo'] = large_photo_crop(repeats=max(3, args.batches // 4))
    summarize(results, workers)
    print(json.dumps(results))


def large_photo_crop(repeats: int) -> dict:
    """ms per Inception crop of one 4000x3000 JPEG (a camera photograph's size): decoded
    whole first, against the crop decoding only what it needs (`resnet_jax.decode`)."""
    from resnet_jax import augment, decode

    rng = np.random.default_rng(0)
    photo = cv2.resize(photos.photographs()[2], (4000, 3000), interpolation=cv2.INTER_CUBIC)
    photo = np.clip(photo + rng.normal(0, photos.GRAIN, photo.shape), 0, 255).astype(np.uint8)
    jpeg = cv2.imencode('.jpg', photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    encoded = decode.EncodedImage(jpeg.tobytes(), 'a 4000x3000 photograph')
    crop = augment.AUGMENTATIONS['inception_crop_flip'].host
    timings = {}
    for name, prepare in (('whole_then_crop', decode.as_array), ('crop_aware', lambda x: x)):
        crop(prepare(encoded), np.random.default_rng(0), augment.Context())  # warm-up
        start = time.perf_counter()
        for i in range(repeats):
            crop(prepare(encoded), np.random.default_rng(i), augment.Context())
        timings[f'{name}_ms'] = (time.perf_counter() - start) / repeats * 1e3
    timings['bytes'] = len(encoded.data)
    return timings


def summarize(results: dict, workers: list[int]) -> None:
    """The 2-worker / 0-worker ratio and the cores a host needs per accelerator."""
    rows = {(r['pipeline'], r['settings']): r for r in results['rows']}
    large = results['large_photo']
    print(
        f'\n4000x3000 JPEG ({large["bytes"] / 1e6:.1f} MB), Inception crop: decoded whole then '
        f'cropped {large["whole_then_crop_ms"]:.0f} ms, crop-aware decode '
        f'{large["crop_aware_ms"]:.0f} ms'
    )
    stats = results['photos']
    print(
        f'\nphotos: {stats["count"]} JPEGs, mean {stats["mean_bytes"] / 1e3:.0f} KB, '
        f'{stats["mean_pixels"] / 1e3:.0f} K pixels'
    )
    if not {0, 2} <= set(workers):
        return
    for augmentation in ('scale_crop_flip', 'inception_crop_flip'):
        one = rows[(f'photos, {augmentation}', '0 workers x 1 threads')]
        two = rows[(f'photos, {augmentation}', '2 workers x 1 threads')]
        ratio = two['images_per_s'] / one['images_per_s']
        cores = {n: n / two['images_per_cpu_s'] for n in RESNET50_IMAGES_PER_S}
        results[f'{augmentation}_workers2_over_0'] = ratio
        results[f'{augmentation}_cores_for'] = cores
        print(
            f'{augmentation}: 2 workers / 0 workers = {ratio:.2f}x; '
            f'{two["images_per_cpu_s"]:.0f} images per CPU-second with 2 workers, so a ResNet-50 '
            + ', '.join(f'at {n:,} images/s needs {c:.1f} cores' for n, c in cores.items())
        )


if __name__ == '__main__':
    main()
