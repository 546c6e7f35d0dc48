"""Bytes the input pipeline reads from disk per image, and the read rate a host then needs.

    python benchmarks/read_bytes.py --data_dir ~/.cache/resnet_jax/tfds [--reads 2000]
        [--photos 256] [--rates 8000,10000]

Every host of a pod reads random rows of every global batch (docs/scaling.md, "The data on a
pod"), so the disk under it serves small random reads, one record per image. Measured here,
each as the bytes the process asked the kernel for (`rchar` of /proc/self/io: page-cache hits
included, the device's readahead not) over `--reads` random records:

* cifar10: the shared CIFAR-10 copy (TFDS ArrayRecord) through `sources.open_split`, the
  trainer's source; beside it the file's bytes per record.
* imagenet-like: ImageNet-like JPEGs made from real photographs (benchmarks/photos.py, about
  110 KB as ImageNet's) written into an ArrayRecord file with the options TFDS writes
  (`group_size:1`), read through ArrayRecord's data source, the reader under
  `tfds.data_source`.

Then, for each of `--rates` images/s on one host, the MB/s and reads/s its disk must serve at
the imagenet-like ArrayRecord figure. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import numpy as np
import photos

from resnet_jax import sources

TFDS_ARRAY_RECORD_OPTIONS = 'group_size:1'  # what tensorflow_datasets writes


def _rchar() -> int:
    """Bytes this process has asked read()/pread() for so far."""
    with open('/proc/self/io') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('rchar'))


def bytes_per_read(source, reads: int, seed: int = 0) -> float:
    """Mean bytes read per record over `reads` records of `source` in random order."""
    order = np.random.default_rng(seed).permutation(len(source))[:reads]
    source[int(order[-1])]  # opens the files: their headers are not a record's cost
    start = _rchar()
    for i in order:
        source[int(i)]
    return (_rchar() - start) / len(order)


def _write_array_record(path: str, records: list[bytes]) -> None:
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, TFDS_ARRAY_RECORD_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()


def _jpegs(root: str) -> list[bytes]:
    paths = sorted(
        os.path.join(d, name) for d, _, names in os.walk(root) for name in names if '.jp' in name
    )
    out = []
    for path in paths:
        with open(path, 'rb') as f:
            out.append(f.read())
    return out


def imagenet_like(count: int, reads: int) -> dict:
    """Bytes per random read of ImageNet-like JPEGs in an ArrayRecord file."""
    from array_record.python import array_record_data_source

    with tempfile.TemporaryDirectory() as root:
        stats = photos.write_folder(os.path.join(root, 'folder'), count)
        jpegs = _jpegs(os.path.join(root, 'folder'))
        path = os.path.join(root, 'photos.array_record')
        _write_array_record(path, jpegs)
        array_record = array_record_data_source.ArrayRecordDataSource([path])
        return {
            'count': count,
            'mean_jpeg_bytes': stats['mean_bytes'],
            'file_bytes_per_record': os.path.getsize(path) / count,
            'array_record_bytes_per_read': bytes_per_read(array_record, min(reads, count)),
        }


def cifar10(data_dir: str, reads: int) -> dict:
    source, _ = sources.open_split('cifar10_jpeg', 'train', data_dir)
    files = glob.glob(os.path.join(data_dir, 'cifar10_jpeg', '*', '*-train.array_record-*'))
    return {
        'records': len(source),
        'bytes_per_read': bytes_per_read(source, reads),
        'file_bytes_per_record': sum(map(os.path.getsize, files)) / len(source),
    }


def _rates(text: str) -> list[int]:
    values = [int(v) for v in text.split(',') if v.strip().isdigit()]
    if len(values) != len(text.split(',')) or min(values, default=0) < 1:
        raise ValueError(f'--rates={text!r}: expected comma-separated positive ints')
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_dir', default=os.path.expanduser('~/.cache/resnet_jax/tfds'))
    parser.add_argument('--reads', type=int, default=2000)
    parser.add_argument('--photos', type=int, default=256)
    parser.add_argument('--rates', default='8000,10000')
    args = parser.parse_args()
    if args.reads < 1 or args.photos < 1:
        parser.error(f'--reads={args.reads} --photos={args.photos}: expected positive ints')
    try:
        rates = _rates(args.rates)
    except ValueError as e:
        parser.error(str(e))
    results = {
        'cifar10': cifar10(args.data_dir, args.reads),
        'imagenet_like': imagenet_like(args.photos, args.reads),
    }
    per_image = results['imagenet_like']['array_record_bytes_per_read']
    results['host_needs'] = {
        str(rate): {'MB_per_s': rate * per_image / 1e6, 'reads_per_s': rate} for rate in rates
    }
    c, p = results['cifar10'], results['imagenet_like']
    print(
        f'cifar10 (ArrayRecord, {c["records"]} records): {c["bytes_per_read"]:,.0f} bytes read '
        f'per random record; {c["file_bytes_per_record"]:,.0f} on disk'
    )
    print(
        f'imagenet-like ({p["count"]} JPEGs of {p["mean_jpeg_bytes"]:,.0f} bytes on average): '
        f'ArrayRecord {p["array_record_bytes_per_read"]:,.0f} bytes per random read '
        f'({p["file_bytes_per_record"]:,.0f} on disk)'
    )
    for rate, need in results['host_needs'].items():
        print(f'{rate} images/s on one host: {need["MB_per_s"]:,.0f} MB/s in {rate} random reads/s')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
