"""Image loading and the centre crops, shared by data preparation and evaluation (reference images for FID).

Two crops, each the one its benchmark's numbers were made with: "adm" (guided-diffusion; ImageNet for DiT, SiT and
REPA) and "uvit" (U-ViT's MS-COCO preprocessing, which the paper's text-to-image setup follows, App. K).

Bad inputs never raise here: `load_image` reports an unreadable or truncated file as a reason string, and a
non-RGB file (CMYK, greyscale, palette, with alpha) as converted, naming its original mode.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT/SiT/REPA): halve with BOX while the short side is at least
    2 * size, resize with BICUBIC so the short side is `size`, then crop the centre. -> uint8 (size, size, C)."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def center_crop_uvit(image: Image.Image, size: int) -> np.ndarray:
    """U-ViT's MS-COCO centre crop: the centred square of the short side, resized to `size` with LANCZOS.
    -> uint8 (size, size, C)."""
    w, h = image.size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2
    square = image.crop((left, top, left + crop, top + crop))
    return np.asarray(square.resize((size, size), resample=Image.LANCZOS))


CROPS = {"adm": center_crop_arr, "uvit": center_crop_uvit}


@dataclass
class Loaded:
    """One input image after loading: `image` uint8 (size, size, 3) or None when skipped (`skip` says why);
    `converted` is the original PIL mode when it was not RGB."""

    image: Optional[np.ndarray]
    skip: Optional[str] = None
    converted: Optional[str] = None


def load_image(path: str, size: int, crop: str = "adm") -> Loaded:
    """Read `path`, convert to RGB, centre-crop to `size` px with `crop` (CROPS). Missing, unreadable or truncated
    files are reported in `Loaded.skip` ("missing_file" or "unreadable: <error>"), never raised."""
    crop_fn = CROPS[crop]
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file raises here, not later
            mode = im.mode
            rgb = im if mode == "RGB" else im.convert("RGB")  # as the reference: PIL's conversion, alpha dropped
            arr = crop_fn(rgb, size)
    except FileNotFoundError:
        return Loaded(None, "missing_file")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return Loaded(None, f"unreadable: {type(e).__name__}: {e}")
    if arr.shape != (size, size, 3):
        return Loaded(None, f"unreadable: decoded to shape {arr.shape}")
    return Loaded(np.ascontiguousarray(arr), None, None if mode == "RGB" else mode)
