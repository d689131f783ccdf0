"""ImageNet (a folder of class folders) -> class-conditional shards (FORMATS.md).

    accelerate launch -m data_prep.imagenet --src /data/imagenet/train --out /data/in256 --resolution 256
    python -m data_prep.imagenet --src DIR --out DIR --resolution 32 --vae pixel-s2d4 --limit 64   # CPU smoke run

Class index = position of the class folder in the sorted folder names (for ImageNet's synset folders, the standard
0..999 order). Images are taken in sorted (class folder, file name) order; the sample key is the file name without
its extension ('.' replaced by '_'). Each image gets the ADM centre crop; --flip adds a mirrored copy as sample
`<key>_flip` in the same shard.
"""
import os

from data_prep.cli import (build_models, check_common, common_parser, feature_records, job_features,
                          main_guard, run_job, spread)
from data_prep.images import IMAGE_EXTENSIONS
from data_prep.pipeline import Item, Job, PrepError, finish_manifest


def list_imagenet(src: str) -> tuple[list, list]:
    """-> (classes: sorted class-folder names, items: Item per image in sorted order with its class index)."""
    if not os.path.isdir(src):
        raise PrepError(f"--src {src!r} is not a directory")
    src = os.path.abspath(src)  # the job record compares paths: a rerun from another directory is the same job
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PrepError(f"--src {src!r} has no class folders: expected {src}/<class>/<image> (e.g. n01440764/...)")
    items, keys = [], {}
    for label, cls in enumerate(classes):
        folder = os.path.join(src, cls)
        names = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        for name in names:
            key = os.path.splitext(name)[0].replace(".", "_")
            path = os.path.join(folder, name)
            if key in keys:
                raise PrepError(f"two images give the sample key {key!r}: {keys[key]} and {path}")
            keys[key] = path
            items.append(Item(key, path, label=label))
    if not items:
        raise PrepError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {src!r}")
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
              args.workers, record)
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
