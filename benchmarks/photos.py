"""ImageNet-like JPEGs made from real photographs, for input-pipeline measurements.

    python benchmarks/photos.py DIR [--count=256]     # writes DIR/class_K/NNNN.jpg

The photographs are the colour ones scikit-image ships in `skimage/data` (astronaut, coffee,
chelsea, rocket, the stereo motorcycle pair, the Hubble deep field, a retina, a stained tissue
section): real camera images, so they decode at the cost photographs do (smooth synthetic
images compress several times smaller and decode faster). Each JPEG is a random crop of one,
resized to an ImageNet size (shorter side 333-500, longer side about 500, both orientations),
flipped at random, with a small change of exposure and sensor-like grain (the shipped photos are
cleaner than typical web photographs), saved at JPEG quality 96: 110 KB and 197 K pixels on
average, about the size and file size of ImageNet's training JPEGs (500x375, 110 KB). The same
seed gives the same files.

Where scikit-image is absent (a GPU machine's image may lack it), `photographs_or_synthetic`
stands in synthetic scenes drawn with OpenCV (smooth shading, shapes with edges, texture);
benchmarks/gpu_check.py uses it and records which source it had.
"""

from __future__ import annotations

import argparse
import os

import cv2
import numpy as np

PHOTOS = (
    'astronaut.png',
    'chelsea.png',
    'coffee.png',
    'hubble_deep_field.jpg',
    'ihc.png',
    'motorcycle_left.png',
    'motorcycle_right.png',
    'retina.jpg',
    'rocket.jpg',
)
QUALITY = 96
GRAIN = 4.0  # standard deviation of the added noise, in 0..255 levels


def photographs() -> list[np.ndarray]:
    """scikit-image's colour photographs, BGR as OpenCV reads them."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit(
            "error: the photographs come from scikit-image: pip install -e '.[dev]'"
        ) from None
    folder = os.path.dirname(skimage.data.__file__)
    return [cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR) for name in PHOTOS]


def synthetic_photographs(count: int = len(PHOTOS), seed: int = 0) -> list[np.ndarray]:
    """`count` 1024x768 BGR scenes with a photograph's mix of smooth areas, edges and texture
    (not its statistics: where scikit-image is missing, and recorded as such)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        h, w = 768, 1024
        shading = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
        image = cv2.resize(shading, (w, h), interpolation=cv2.INTER_CUBIC)
        texture = rng.normal(0, 30, (h // 8, w // 8, 3)).astype(np.float32)
        image += cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)
        for _ in range(int(rng.integers(8, 20))):
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            size = int(rng.integers(20, 200))
            if rng.random() < 0.5:
                cv2.circle(image, (x, y), size, colour, -1, cv2.LINE_AA)
            else:
                cv2.rectangle(image, (x, y), (x + size, y + size // 2), colour, -1)
        scenes.append(np.clip(image, 0, 255).astype(np.uint8))
    return scenes


def photographs_or_synthetic() -> tuple[list[np.ndarray], str]:
    """scikit-image's photographs where it is installed, else `synthetic_photographs()`; and
    which of the two."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return synthetic_photographs(), 'synthetic scenes (scikit-image is not installed)'
    return photographs(), "scikit-image's photographs"


def imagenet_like(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `photo` at an ImageNet size, flipped, re-exposed and grained."""
    long_side = 500 if rng.random() < 0.85 else int(rng.integers(400, 501))
    short_side = int(rng.choice([333, 375, 375, 375, 400, 450, 500]))
    short_side = min(short_side, long_side)
    h, w = (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)
    scale = min(photo.shape[0] / h, photo.shape[1] / w) * rng.uniform(0.7, 1.0)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y = int(rng.integers(0, photo.shape[0] - ch + 1))
    x = int(rng.integers(0, photo.shape[1] - cw + 1))
    shrink = ch > h
    image = cv2.resize(
        photo[y : y + ch, x : x + cw],
        (w, h),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC,
    )
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image.astype(np.float32) * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    grain = rng.normal(0, GRAIN * rng.uniform(0.5, 1.5), (h, w))[..., None]
    image += grain + rng.normal(0, GRAIN / 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpegs(count: int, seed: int = 1234, sources: list[np.ndarray] | None = None):
    """Yields (JPEG bytes, pixels) of `count` ImageNet-like images made from `sources`
    (default: the photographs), in order; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    sources = photographs() if sources is None else sources
    for i in range(count):
        image = imagenet_like(sources[i % len(sources)], rng)
        ok, encoded = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
        assert ok
        yield encoded.tobytes(), image.shape[0] * image.shape[1]


def write_folder(root: str, count: int = 256, classes: int = 4, seed: int = 1234) -> dict:
    """Writes `count` JPEGs as `root/class_K/NNNN.jpg` (a `dataset.name='folder'` layout);
    returns their mean size in bytes and pixels."""
    sizes, pixels = [], []
    for k in range(classes):
        os.makedirs(os.path.join(root, f'class_{k}'), exist_ok=True)
    for i, (data, area) in enumerate(jpegs(count, seed)):
        path = os.path.join(root, f'class_{i % classes}', f'{i:04d}.jpg')
        with open(path, 'wb') as f:
            f.write(data)
        sizes.append(len(data))
        pixels.append(area)
    return {
        'count': count,
        'mean_bytes': float(np.mean(sizes)),
        'mean_pixels': float(np.mean(pixels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root')
    parser.add_argument('--count', type=int, default=256)
    args = parser.parse_args()
    stats = write_folder(args.root, args.count)
    print(
        f'{stats["count"]} JPEGs in {args.root}: mean {stats["mean_bytes"] / 1e3:.1f} KB, '
        f'{stats["mean_pixels"] / 1e3:.0f} K pixels'
    )


if __name__ == '__main__':
    main()
