"""Encoded images: sizes from headers, decoding at reduced scale, and the ImageNet crops that
decode only the pixels they need (resnet_jax.decode, resnet_jax.augment)."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from resnet_jax import augment, decode


def _photo(height, width, seed=0):
    """A JPEG with detail at every scale (noise on smooth shapes), as photographs have."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-6, 7, image.shape, np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image, **exif):
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    info = picture.getexif()
    for key, value in exif.items():
        info[{'orientation': 0x0112}[key]] = value
    picture.save(buffer, 'JPEG', quality=90, exif=info)
    return buffer.getvalue()


def test_the_header_gives_the_decoded_shape_exif_rotation_included():
    pixels = _photo(300, 500)
    plain = decode.EncodedImage(_jpeg(pixels))
    assert plain.shape == (300, 500, 3) == plain.decode().shape
    assert np.abs(plain.decode().astype(int) - pixels).mean() < 5  # JPEG at quality 90
    rotated = decode.EncodedImage(_jpeg(pixels, orientation=6))  # "rotate 90 degrees"
    assert rotated.shape == (500, 300, 3) == rotated.decode().shape
    # TFDS records are read as TensorFlow and torchvision read them: as stored.
    stored = decode.EncodedImage(_jpeg(pixels, orientation=6), orient=False)
    assert stored.shape == (300, 500, 3) == stored.decode().shape
    png = decode.EncodedImage(cv2.imencode('.png', pixels[..., ::-1])[1].tobytes())
    assert png.shape == (300, 500, 3)  # not a JPEG: its shape from decoding it, once
    assert png.decode() is png.decode()
    np.testing.assert_array_equal(png.decode(), pixels)  # lossless
    assert decode.decode_at_least(png, 8)[1:] == (1.0, 1.0)  # only JPEG decodes smaller


def test_a_damaged_exif_block_leaves_the_image_as_stored():
    jpeg = _jpeg(_photo(40, 60), orientation=6)
    start = jpeg.index(b'Exif\x00\x00') + 6
    damaged = jpeg[:start] + b'XXXX' + jpeg[start + 4 :]  # not a TIFF header any more
    image = decode.EncodedImage(damaged)
    assert image.shape == (40, 60, 3) == image.decode().shape


@pytest.mark.parametrize('shrink', [2, 4, 8])
def test_a_reduced_decode_is_the_image_at_that_scale(shrink):
    pixels = _photo(600, 808)
    image = decode.EncodedImage(_jpeg(pixels))
    reduced = image.decode(shrink)
    assert reduced.shape == (-(-600 // shrink), -(-808 // shrink), 3)
    area = cv2.resize(pixels, reduced.shape[1::-1], interpolation=cv2.INTER_AREA)
    # libjpeg's DCT scaling against area averaging of the original: both are the image at
    # that scale; they differ by rounding and JPEG's own error, never by content.
    assert np.abs(reduced.astype(int) - area).mean() < 4


def test_decode_at_least_keeps_enough_pixels_for_the_output():
    image = decode.EncodedImage(_jpeg(_photo(1600, 1200)))
    for factor, shrink in ((1.0, 1), (1.9, 1), (2.0, 2), (3.99, 2), (4.0, 4), (7.0, 4), (30, 8)):
        pixels, sy, sx = decode.decode_at_least(image, factor)
        assert pixels.shape[:2] == (1600 // shrink, 1200 // shrink), factor
        assert (sy, sx) == (1 / shrink, 1 / shrink)
    array = _photo(40, 60)
    assert decode.decode_at_least(array, 8) == (array, 1.0, 1.0)


def _ramps(height, width):
    """Red rises left to right, green top to bottom: a crop's pixels say where its box was."""
    red = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    return np.stack([red, green, np.full((height, width), 128.0)], -1).round().astype(np.uint8)


def test_the_crops_draw_the_same_boxes_from_encoded_and_decoded_images():
    """The same random numbers are drawn either way; where no reduced decode applies the
    crops are identical, and where one does they are the same box at the same size."""
    small = _jpeg(_photo(375, 500))  # ImageNet-sized: a 224 crop never needs 2x its pixels
    large = _jpeg(_ramps(1500, 2000))  # a photograph's size: most crops decode at 1/2..1/4
    for data, exact in ((small, True), (large, False)):
        encoded, decoded = decode.EncodedImage(data), decode.EncodedImage(data).decode()
        for op in ('inception_crop_flip', 'scale_crop_flip', 'resize_center_crop'):
            fn = augment.AUGMENTATIONS[op]
            assert fn.takes_encoded
            for seed in range(8):
                rngs = np.random.default_rng(seed), np.random.default_rng(seed)
                a = fn.host(encoded, rngs[0], augment.Context())
                b = fn.host(decoded, rngs[1], augment.Context())
                assert rngs[0].random() == rngs[1].random()  # as many draws
                assert a.shape == b.shape == (224, 224, 3) and a.dtype == np.uint8
                if exact:
                    np.testing.assert_array_equal(a, b)
                    continue
                # Box edges and centre, from the ramps: 1 level is 8 pixels of the image, so
                # they agree to the pixel or two a box rounded at 1/4 scale may move.
                for channel, axis in ((0, 0), (1, 1)):
                    edges = [np.sort(x[..., channel].mean(axis))[[0, -1]] for x in (a, b)]
                    np.testing.assert_allclose(edges[0], edges[1], atol=1.5, err_msg=f'{op} {seed}')


def test_operations_without_encoded_support_get_pixels():
    data = _jpeg(_photo(64, 64))
    ops = augment.parse_chain('inception_crop_flip+cutout')
    out = augment.apply_host(
        ops, decode.EncodedImage(data), np.random.default_rng(0), augment.Context()
    )
    assert isinstance(out, np.ndarray) and out.shape == (224, 224, 3)
    flipped = augment.apply_host(
        augment.parse_chain('flip'),
        decode.EncodedImage(data),
        np.random.default_rng(0),
        augment.Context(),
    )
    assert flipped.shape == (64, 64, 3)


def test_a_damaged_image_is_named():
    data = _jpeg(_photo(64, 64))
    with pytest.raises(
        ValueError, match=r"^record 7 of split 'x' is not a readable image; expected a JPEG"
    ):
        decode.EncodedImage(data[:50], "record 7 of split 'x'").decode()
    with pytest.raises(ValueError, match=r'^a file is not a readable image.*OpenCV cannot'):
        _ = decode.EncodedImage(b'not an image', 'a file').shape
    with pytest.raises(ValueError, match=r'^a JPEG is not a readable image.*\(\w+Error: '):
        _ = decode.EncodedImage(b'\xff\xd8\xff\xe0 and no header', 'a JPEG').shape  # header
