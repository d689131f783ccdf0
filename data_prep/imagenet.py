"""ImageNet (a folder of class folders) -> class-conditional shards (FORMATS.md).

    accelerate launch -m data_prep.imagenet --src /data/imagenet/train --out /data/in256 --resolution 256
    python -m data_prep.imagenet --src DIR --out DIR --resolution 32 --vae pixel-s2d4 --limit 64   # CPU smoke run

Class index = position of the class folder in the sorted folder names (for ImageNet's synset folders, the standard
0..999 order), as torchvision's ImageFolder. The images of a class are every file with an image extension
(data_prep.images.IMAGE_EXTENSIONS, any case) in its folder and the folders below it, as ImageFolder and the ADM
loader find them; hidden files and folders (a leading '.') are left out. A class folder with no image is refused
(every later label would shift by one), naming it. Images are taken in sorted (class, relative path) order; the
sample key is the image's position in that order (8 digits), and `path.txt` keeps its path relative to --src.
Each image gets the ADM centre crop; --flip adds a mirrored copy as sample `<key>_flip` in the same shard.
"""
import os

from data_prep.cli import (build_models, check_common, common_parser, feature_records, job_features,
                          main_guard, run_job, spread)
from data_prep.images import IMAGE_EXTENSIONS
from data_prep.pipeline import Item, Job, PrepError, finish_manifest


def class_images(folder: str) -> list[str]:
    """Paths relative to `folder` of the images in it and below it, sorted; hidden files and folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, folder)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def list_imagenet(src: str) -> tuple[list, list]:
    """-> (classes: sorted class-folder names, items: Item per image in sorted order with its class index)."""
    if not os.path.isdir(src):
        raise PrepError(f"--src {src!r} is not a directory")
    src = os.path.abspath(src)  # the job record compares paths: a rerun from another directory is the same job
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PrepError(f"--src {src!r} has no class folders: expected {src}/<class>/<image> (e.g. n01440764/...)")
    per_class = {cls: class_images(os.path.join(src, cls)) for cls in classes}
    empty = [cls for cls in classes if not per_class[cls]]
    if empty:
        raise PrepError(f"--src {src!r}: {len(empty)} class folder(s) hold no image ({', '.join(empty[:5])}"
                        f"{', ...' if len(empty) > 5 else ''}); as a class they would shift every later label by "
                        f"one. Remove them (e.g. a __MACOSX folder from an unzip) or add their images")
    items = []
    for label, cls in enumerate(classes):
        for rel in per_class[cls]:
            name = os.path.join(cls, rel)
            items.append(Item(f"{len(items):08d}", os.path.join(src, name), name=name, label=label))
    return classes, items


def parser():
    p = common_parser("ImageNet class folders -> class-conditional latent shards (data_prep/FORMATS.md)")
    p.add_argument("--src", required=True, help="folder of class folders, e.g. /data/imagenet/train")
    p.add_argument("--flip", action="store_true", help="add a horizontally flipped copy of each image")
    return p


def make_job(args) -> tuple[Job, list]:
    check_common(args)
    classes, items = list_imagenet(args.src)
    items = spread(items, args.limit)
    record = {"kind": "class_cond", "source": os.path.abspath(args.src), "vae": args.vae,
              **job_features(args), "num_classes": len(classes)}
    job = Job(args.out, items, args.resolution, args.shard_size, args.flip, args.store_images, args.batch_size,
              args.workers, record, exif=args.exif)
    return job, classes


def main(argv=None, single_process: bool = False) -> int:
    """The command line; `single_process` ignores a launcher's environment (see cli.run_job)."""
    args = parser().parse_args(argv)
    job, classes = make_job(args)
    if single_process or int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.src}: {len(job.items)} images in {len(classes)} classes -> {job.num_shards} shards of "
              f"{job.shard_size} samples at {args.resolution} px")

    def finish(job, models):
        finish_manifest(job, "class_cond", models.autoencoder, feature_records(models),
                        {"num_classes": len(classes), "classes": classes})

    return run_job(job, lambda device: build_models(args, device), finish, single_process)


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
