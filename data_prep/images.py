"""Image loading and the centre crops, shared by data preparation and evaluation (reference images for FID).

Two crops, each the one its benchmark's numbers were made with: "adm" (guided-diffusion; ImageNet for DiT, SiT and
REPA) and "uvit" (U-ViT's MS-COCO preprocessing, which the paper's text-to-image setup follows, App. K).

Bad inputs never raise here: `load_image` reports an unreadable or truncated file as a reason string, a non-RGB
file (CMYK, greyscale, 16-bit greyscale, palette, with alpha) as converted, naming its original mode, and an image
turned upright by its EXIF Orientation tag as rotated.
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# What PIL opens, by extension (lower case): JPEG's other names (.jpe, .jfif) included.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
# 16- and 32-bit integer greyscale (16-bit PNG and TIFF open as I;16): PIL's convert("RGB") clips them at 255.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
EXIF_CHOICES = ("apply", "ignore")  # apply the EXIF Orientation tag, or ignore it as the ADM and U-ViT scripts do
ORIENTATION = 0x0112  # the EXIF tag


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
    `converted` is the original PIL mode when it was not RGB; `rotated`: its EXIF orientation was applied;
    `warning`: what PIL warned of while decoding it (e.g. a very large image)."""

    image: Optional[np.ndarray]
    skip: Optional[str] = None
    converted: Optional[str] = None
    rotated: bool = False
    warning: Optional[str] = None


def to_rgb(im: Image.Image) -> Image.Image:
    """An RGB copy of `im`: PIL's conversion (alpha dropped, as the reference), except for wide integer greyscale,
    scaled to 8 bits first (round(v / 257): 65535 -> 255) where PIL would clip every value above 255."""
    if im.mode in WIDE_GREY_MODES:
        grey = np.asarray(im).astype(np.float64) / 257.0
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path: str, size: int, crop: str = "adm", exif: str = "apply") -> Loaded:
    """Read `path`, turn it upright by its EXIF Orientation (exif="apply"; "ignore" keeps the stored pixel order),
    convert to RGB (to_rgb), centre-crop to `size` px with `crop` (CROPS). Missing, unreadable or truncated files
    are reported in `Loaded.skip` ("missing_file" or "unreadable: <error>"), never raised."""
    crop_fn = CROPS[crop]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)  # before open, which warns
            with Image.open(path) as im:
                im.load()  # decodes fully: a truncated file raises here, not later
                mode = im.mode
                rotated = exif == "apply" and im.getexif().get(ORIENTATION, 1) in range(2, 9)  # 1: upright
                upright = ImageOps.exif_transpose(im) if rotated else im
                arr = crop_fn(to_rgb(upright), size)
    except FileNotFoundError:
        return Loaded(None, "missing_file")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return Loaded(None, f"unreadable: {type(e).__name__}: {e}")
    if arr.shape != (size, size, 3):
        return Loaded(None, f"unreadable: decoded to shape {arr.shape}")
    warning = "; ".join(str(w.message) for w in caught) or None
    return Loaded(np.ascontiguousarray(arr), None, None if mode == "RGB" else mode, rotated, warning)
