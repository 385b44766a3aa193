"""
Image decoding for mappers whose inputs are much smaller than the photographs.

A 12-megapixel JPEG takes 150-250 ms to decode and as long again to resize on one CPU core, several
times a training step of the small models here. libjpeg can decode at 1/2, 1/4 or 1/8 of the size
directly from the DCT coefficients for a fraction of that. :func:`read_image_reduced` uses the
smallest such scale whose shorter side stays at least ``REDUCE_MARGIN`` times the input size the
model will see, so that the resize after it still averages several decoded pixels per input pixel:
images less than twice as large as the input are decoded exactly as ``read_image`` does.
"""

import math
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

__all__ = ["read_image_reduced", "read_dataset_image", "decode_short_side", "REDUCE_MARGIN"]

# decoded shorter side >= this many times the model's input shorter side
REDUCE_MARGIN = 2.0


def read_image_reduced(
    file_name: str,
    format: Optional[str] = None,
    min_short_side: int = 0,
    read_full: Optional[Callable[[str, Optional[str]], np.ndarray]] = None,
) -> Tuple[np.ndarray, Optional[T.ScaleTransform]]:
    """
    ``detectron2.data.detection_utils.read_image``, but a JPEG whose shorter side is at least
    2 × ``REDUCE_MARGIN`` × ``min_short_side`` is decoded at a reduced scale (1/2, 1/4 or 1/8).

    Args:
        file_name: image file.
        format: as in ``read_image`` ("BGR", "RGB", "L", ...).
        min_short_side: the shorter side of the model's input after resizing (the largest of
            the training sizes); 0: always decode at full size.
        read_full: ``(file_name, format) -> image`` for the images decoded at full size
            (default ``read_image``), e.g. a stage's own reader, so that they stay as they were.

    Returns:
        image: (H', W', C) uint8 array in ``format``, EXIF orientation applied.
        scale: None when decoded at full size, else the ``ScaleTransform`` from the full image
            (H, W), the frame of the dataset dict's "height" / "width" and annotations, to
            (H', W'); prepend it to the augmentations' transforms for annotations and proposals.
    """
    if read_full is None:
        read_full = utils.read_image
    if min_short_side <= 0:
        return read_full(file_name, format), None
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        full_w, full_h = image.size
        factor = min(full_w, full_h) / (REDUCE_MARGIN * min_short_side)
        if image.format != "JPEG" or factor < 2:
            image = None  # decode as read_image does, below (outside the open file)
        else:
            # draft() picks the largest reduction that keeps the size >= the requested one
            image.draft(image.mode, (math.ceil(full_w / factor), math.ceil(full_h / factor)))
            reduced_w, reduced_h = image.size
            # EXIF orientations 5-8 turn the picture by 90 degrees (read from the tag: a reduced
            # size can round to a square where the full size is not)
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
            image = ImageOps.exif_transpose(image)
            array = utils.convert_PIL_to_numpy(image, format)
    if image is None:
        return read_full(file_name, format), None
    if (reduced_w, reduced_h) == (full_w, full_h):
        return array, None
    if turned:
        full_w, full_h = full_h, full_w
    return array, T.ScaleTransform(full_h, full_w, array.shape[0], array.shape[1])


def decode_short_side(cfg, is_train: bool) -> int:
    """The ``min_short_side`` of :func:`read_image_reduced` for a mapper of ``cfg``: the largest
    of ``INPUT.MIN_SIZE_TRAIN`` (training) or ``INPUT.MIN_SIZE_TEST``; 0 (full decode) with
    ``INPUT.REDUCED_DECODE`` off or where the input keeps the image's size (a size 0)."""
    sizes = cfg.INPUT.MIN_SIZE_TRAIN if is_train else (cfg.INPUT.MIN_SIZE_TEST,)
    if not cfg.INPUT.REDUCED_DECODE or min(sizes) <= 0:
        return 0
    return int(max(sizes))


def read_dataset_image(
    dataset_dict: dict, format: Optional[str] = None, min_short_side: int = 0
) -> Tuple[np.ndarray, Optional[T.ScaleTransform]]:
    """
    :func:`read_image_reduced` of ``dataset_dict["file_name"]``, with
    ``detection_utils.check_image_size`` against the full image's size (it fills in a missing
    "height" / "width" with the full size, so they always give the full frame afterwards).
    """
    image, scale = read_image_reduced(dataset_dict["file_name"], format, min_short_side)
    # only the shape is read: the full size where the image was decoded reduced
    full = image if scale is None else np.empty((scale.h, scale.w, 0), np.uint8)
    utils.check_image_size(dataset_dict, full)
    return image, scale
