"""A generated caption-image set in MS-COCO format, where the caption decides the content exactly.

Each image shows two shapes, one above the other, in colours named by its captions ("a red circle above a blue
square"), on a light background. Five paraphrased captions per image, like COCO. Because the colours are known,
the caption faithfulness of generated images is measurable: `colour_match` reads the dominant colour of the top
and bottom halves of an image and compares them with the caption's.
"""
import json
import os

import numpy as np
from PIL import Image

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 70, 215), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
TEMPLATES = (
    "a {c1} {s1} above a {c2} {s2}",
    "a {c2} {s2} below a {c1} {s1}",
    "{c1} {s1} on top, {c2} {s2} underneath",
    "a picture of a {c1} {s1} over a {c2} {s2}",
    "a {c2} {s2} with a {c1} {s1} above it",
)


def _draw(img: np.ndarray, shape: str, colour, cy: int, cx: int, r: int) -> None:
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:  # triangle pointing up
        mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = colour


def render(c1: str, s1: str, c2: str, s2: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3): shape s1 in colour c1 in the top half, s2 in c2 in the bottom half, jittered."""
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[:] = BACKGROUND
    r, jitter = max(2, resolution // 5), max(1, resolution // 16)  # large shapes: learnable in CPU minutes
    for (colour, shape), half in (((c1, s1), 0), ((c2, s2), 1)):
        cy = half * resolution // 2 + resolution // 4 + int(rng.integers(-jitter, jitter + 1))
        cx = resolution // 2 + int(rng.integers(-2 * jitter, 2 * jitter + 1))
        _draw(img, shape, COLOURS[colour], cy, cx, r)
    return img


def captions_for(c1: str, s1: str, c2: str, s2: str) -> list[str]:
    return [t.format(c1=c1, s1=s1, c2=c2, s2=s2) for t in TEMPLATES]


def make_shapes_coco(root: str, split: str, num_images: int, resolution: int = 32, seed: int = 0) -> tuple[str, str]:
    """Write `num_images` PNGs to root/<split>/ and a COCO captions file root/annotations/captions_<split>.json.

    Returns (image directory, captions JSON path). Deterministic in (split, seed); the two colours differ.
    """
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2)])
    img_dir, ann_dir = os.path.join(root, split), os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)

    images, annotations, names = [], [], list(COLOURS)
    for i in range(num_images):
        c1, c2 = rng.choice(len(names), size=2, replace=False)
        s1, s2 = rng.choice(len(SHAPES), size=2)
        spec = (names[c1], SHAPES[s1], names[c2], SHAPES[s2])
        file_name = f"shapes_{split}_{i:06d}.png"
        Image.fromarray(render(*spec, resolution, rng)).save(os.path.join(img_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": resolution, "height": resolution})
        for caption in captions_for(*spec):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
    ann_path = os.path.join(ann_dir, f"captions_{split}.json")
    with open(ann_path, "w") as f:
        json.dump({"info": {"description": f"generated shapes ({split}, seed {seed})"}, "images": images,
                   "annotations": annotations, "licenses": []}, f)
    return img_dir, ann_path


def parse_colours(caption: str) -> tuple[str, str] | None:
    """(top colour, bottom colour) named by a caption of TEMPLATES, or None if it names no two colours."""
    words = caption.replace(",", " ").split()
    found = [w for w in words if w in COLOURS]
    if len(found) != 2:
        return None
    bottom_first = "below" in words or "with" in words  # the templates that name the lower shape first
    return (found[1], found[0]) if bottom_first else (found[0], found[1])


def dominant_colour(region: np.ndarray) -> str | None:
    """The palette colour nearest to most non-background pixels of region (H, W, 3) uint8, or None if none."""
    px = region.reshape(-1, 3).astype(np.int64)
    px = px[np.abs(px - np.array(BACKGROUND)).sum(1) > 90]  # foreground only
    if len(px) == 0:
        return None
    palette = np.array(list(COLOURS.values()))
    nearest = np.argmin(((px[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return list(COLOURS)[np.bincount(nearest, minlength=len(COLOURS)).argmax()]


def colour_match(images: np.ndarray, captions: list[str]) -> dict:
    """Caption faithfulness of generated images (N, H, W, 3) uint8: the fraction whose top and bottom halves'
    dominant colours are the caption's, per half and both; chance level is 1/4 per half and 1/12 for both."""
    top = bottom = both = 0
    for img, caption in zip(images, captions):
        want = parse_colours(caption)
        h = img.shape[0] // 2
        got = (dominant_colour(img[:h]), dominant_colour(img[h:]))
        top += got[0] == want[0]
        bottom += got[1] == want[1]
        both += got == want
    n = max(len(captions), 1)
    return {"top": top / n, "bottom": bottom / n, "both": both / n, "n": len(captions),
            "chance_both": 1 / (len(COLOURS) * (len(COLOURS) - 1))}
