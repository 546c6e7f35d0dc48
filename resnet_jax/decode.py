"""Encoded images: their size from the header, and decoding to uint8 RGB, at reduced scale
where a crop needs fewer pixels than the file holds.

The input pipeline reads records with their images still encoded (`EncodedImage`) and leaves
the decode to the first augmentation that knows which pixels it needs: a random-resized crop
of a 4000x3000 photograph to 224x224 needs a fraction of them, and libjpeg decodes a JPEG at
1/2, 1/4 or 1/8 scale for a fraction of the cost (its DCT scaling: no full image is decoded and
then shrunk). `decode_at_least(image, factor)` is that decision; operations that need every
pixel call `as_array`. Everything is decoded by OpenCV (libjpeg-turbo), in the worker that
augments the image; TensorFlow is never imported.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import cv2
import numpy as np

# libjpeg's DCT scaling factors (OpenCV's IMREAD_REDUCED_COLOR_N), largest first.
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap height and width
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedImage:
    """The bytes of an image file (JPEG, PNG, BMP, WebP), decoded only when asked.

    `shape` is (height, width, 3) as `decode()` returns it (EXIF orientation applied, as
    OpenCV applies it), read from the header without decoding. `where` names the image in
    errors (a file, or a record of a dataset).
    """

    data: bytes
    where: str = 'image'

    @functools.cached_property
    def shape(self) -> tuple[int, int, int]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as image:
                width, height = image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception as e:  # Pillow raises many kinds for a damaged header
            raise self._unreadable(f'{type(e).__name__}: {e}') from None
        if orientation in _ROTATED:
            width, height = height, width
        return height, width, 3

    def decode(self, shrink: int = 1) -> np.ndarray:
        """uint8 RGB (height, width, 3), at 1/`shrink` of the size (1, 2, 4 or 8: a JPEG is
        decoded at that scale; another format is decoded whole and reduced)."""
        flags = dict(_REDUCED).get(shrink, cv2.IMREAD_COLOR) if shrink > 1 else cv2.IMREAD_COLOR
        buffer = np.frombuffer(self.data, np.uint8)
        # IMREAD_COLOR: grayscale is repeated to three channels, alpha is dropped, 16-bit is
        # scaled, the EXIF orientation is applied.
        image = cv2.imdecode(buffer, flags) if buffer.size else None
        if image is None:
            raise self._unreadable('OpenCV cannot decode it')
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _unreadable(self, why: str) -> ValueError:
        return ValueError(
            f'{self.where} is not a readable image; expected a JPEG, PNG, BMP or WebP file ({why})'
        )


Image = np.ndarray | EncodedImage


def as_array(image: Image) -> np.ndarray:
    """The decoded pixels: `image` itself if it is an array already."""
    return image.decode() if isinstance(image, EncodedImage) else image


def decode_at_least(image: Image, factor: float) -> tuple[np.ndarray, float, float]:
    """The pixels of `image` at the smallest scale that still keeps `factor` times the pixels
    of the output in each direction (factor = the crop's side / the output's side): a JPEG is
    decoded at 1/8, 1/4 or 1/2 where that is no larger than `factor`, so what follows still
    shrinks (or keeps) the image and no detail of the output is lost.

    Returns:
      (pixels, scale_y, scale_x): coordinates on the full image times scale are coordinates on
      the pixels (1.0 for an array, or where no reduction applies).
    """
    if not isinstance(image, EncodedImage):
        return image, 1.0, 1.0
    shrink = next((s for s, _ in _REDUCED if s <= factor), 1)
    pixels = image.decode(shrink)
    height, width = image.shape[:2]
    return pixels, pixels.shape[0] / height, pixels.shape[1] / width
