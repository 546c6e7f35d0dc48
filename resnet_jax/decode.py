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


_JPEG_START = b'\xff\xd8\xff'


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedImage:
    """The bytes of an image file (JPEG, PNG, BMP, WebP), decoded only when asked.

    `shape` is (height, width, 3) as `decode()` returns it: for a JPEG read from its header
    (with the EXIF orientation, where `orient`), for other formats from decoding it (kept, so
    it is decoded once). `orient`: apply the EXIF orientation, as photographs from cameras need
    (image folders); TFDS datasets are decoded without it, as TensorFlow and torchvision decode
    them (the pixels that weights trained there saw). `where` names the image in errors (a
    file, or a record of a dataset).
    """

    data: bytes
    where: str = 'image'
    orient: bool = True
    # Set once, by the thread that works on this image (one per image: no lock needed).
    _shape: tuple[int, int, int] | None = dataclasses.field(default=None, init=False, repr=False)
    _pixels: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def is_jpeg(self) -> bool:
        return bytes(self.data[:3]) == _JPEG_START

    @property
    def shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            shape = self._jpeg_shape() if self.is_jpeg else self.decode().shape
            object.__setattr__(self, '_shape', tuple(shape))
        return self._shape

    def _jpeg_shape(self) -> tuple[int, int, int]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as image:  # reads the markers up to SOF
                width, height = image.size
                exif = image.info.get('exif')
        except Exception as e:  # Pillow raises many kinds for a damaged header
            raise self._unreadable(f'{type(e).__name__}: {e}') from None
        if self.orient and exif and _orientation(exif) in _ROTATED:
            width, height = height, width
        return height, width, 3

    def decode(self, shrink: int = 1) -> np.ndarray:
        """uint8 RGB (height, width, 3), at 1/`shrink` of the size for a JPEG (1, 2, 4 or 8:
        decoded at that scale by libjpeg); other formats are always decoded whole."""
        if self._pixels is not None:
            return self._pixels
        reduced = self.is_jpeg and shrink > 1
        flags = dict(_REDUCED)[shrink] if reduced else cv2.IMREAD_COLOR
        if not self.orient:
            flags |= cv2.IMREAD_IGNORE_ORIENTATION
        buffer = np.frombuffer(self.data, np.uint8)
        # IMREAD_COLOR: grayscale is repeated to three channels, alpha is dropped, 16-bit is
        # scaled.
        image = cv2.imdecode(buffer, flags) if buffer.size else None
        if image is None:
            raise self._unreadable('OpenCV cannot decode it')
        pixels = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if not self.is_jpeg:  # its shape came from this decode: keep it for the next caller
            object.__setattr__(self, '_pixels', pixels)
        return pixels

    def _unreadable(self, why: str) -> ValueError:
        return ValueError(
            f'{self.where} is not a readable image; expected a JPEG, PNG, BMP or WebP file ({why})'
        )


def _orientation(exif: bytes) -> int:
    """The EXIF orientation tag (1 where it is absent or the block is unreadable: OpenCV then
    leaves the image as stored too)."""
    from PIL import Image

    try:
        tags = Image.Exif()
        tags.load(exif)
        return int(tags.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block does not make the image unreadable
        return 1


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
    if not isinstance(image, EncodedImage) or not image.is_jpeg:  # only JPEG decodes smaller
        return as_array(image), 1.0, 1.0
    shrink = next((s for s, _ in _REDUCED if s <= factor), 1)
    pixels = image.decode(shrink)
    height, width = image.shape[:2]
    return pixels, pixels.shape[0] / height, pixels.shape[1] / width
