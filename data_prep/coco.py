"""MS-COCO (images + a captions_*.json annotation file) -> text-to-image shards (FORMATS.md).

    accelerate launch -m data_prep.coco --images /data/coco/train2014 \
        --captions /data/coco/annotations/captions_train2014.json --out /data/coco256 --resolution 256
    python -m data_prep.coco --images DIR --captions captions_val2014.json --out DIR --limit 64   # CPU smoke run

Images in sorted image-id order through pycocotools; every caption of an image (in annotation-id order) is
kept: member captions.json (K strings) and txt_emb.npy (K, L, D) float16 token embeddings. The empty caption's
embedding is written once per dataset. The val split also writes the caption list for FID generation and the
Inception statistics of the real val images at the dataset resolution (eval/fid.py).
"""
import os

import numpy as np
from pycocotools.coco import COCO

from core.fileio import atomic_write, write_json_atomic
from core.text_encoders import parse_text_encoder_spec
from data_prep.cli import (build_models, check_common, common_parser, feature_records, job_features,
                          main_guard, run_job, spread)
from data_prep.fid_ref import build_fid_extractor, write_fid_stats
from data_prep.pipeline import Item, Job, PrepError, finish_manifest, log

NULL_EMBEDDING = "empty_caption_emb.npy"  # float16 (L, D): the empty caption's embedding, the CFG null condition
FID_CAPTIONS = "fid_captions.json"  # val: [{"image_id", "file_name", "captions"}] of the prepared images


def list_coco(images: str, captions: str) -> tuple[list, dict]:
    """-> (items in sorted image-id order, input counts). Images without a caption are items marked
    skip="no_caption", entries without a file_name skip="no_file_name"; captions that are not text (null, a list,
    a number) or are empty are left out, counted and named; annotations naming an image id the file does not list
    are counted as orphans. A non-integer image id is a PrepError naming the entry."""
    if not os.path.isfile(captions):
        raise PrepError(f"--captions {captions!r}: no such annotation file (e.g. annotations/captions_train2014.json)")
    if not os.path.isdir(images):
        raise PrepError(f"--images {images!r} is not a directory")
    try:
        coco = COCO(captions)
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # json.JSONDecodeError is a ValueError
        raise PrepError(f"--captions {captions!r} is not a COCO captions file: {type(e).__name__}: {e}") from None
    if not coco.imgs:
        raise PrepError(f"--captions {captions!r} lists no images")
    bad = [i for i in coco.imgs if not isinstance(i, int) or isinstance(i, bool)]
    if bad:  # the sample key and the FID caption list are the integer id
        raise PrepError(f"--captions {captions!r}: the image entry {str(coco.imgs[bad[0]])[:200]} has id {bad[0]!r} "
                        f"({type(bad[0]).__name__}), and COCO image ids are integers ({len(bad)} such entries)")
    items, not_text, empty = [], [], []
    root = os.path.abspath(images)
    for img_id in sorted(coco.imgs):
        anns = sorted(coco.imgToAnns.get(img_id, []), key=lambda a: a["id"])
        caps = []
        for a in anns:
            cap = a.get("caption")
            if not isinstance(cap, str):  # str(None) would train on the text "None"
                not_text.append({"image_id": img_id, "annotation_id": a["id"], "caption": repr(cap)[:80]})
            elif not cap.strip():
                empty.append({"image_id": img_id, "annotation_id": a["id"]})
            else:
                caps.append(cap.strip())
        name = coco.imgs[img_id].get("file_name")
        if not isinstance(name, str) or not name:
            items.append(Item(f"{img_id:012d}", f"(image id {img_id}: no file_name)", captions=caps,
                              skip="no_file_name"))
            continue
        items.append(Item(f"{img_id:012d}", os.path.join(root, name), name=name, captions=caps,
                          skip=None if caps else "no_caption"))
    orphans = sum(1 for a in coco.anns.values() if a.get("image_id") not in coco.imgs)
    counts = {"images": len(coco.imgs), "captions": len(coco.anns), "orphan_captions": orphans,
              "captions_not_text": not_text, "captions_empty": empty}
    return items, counts


def parser():
    p = common_parser("MS-COCO images + captions -> text-to-image latent shards (data_prep/FORMATS.md)")
    p.add_argument("--images", required=True, help="image folder, e.g. /data/coco/train2014")
    p.add_argument("--captions", required=True, help="COCO captions file, e.g. annotations/captions_train2014.json")
    p.add_argument("--split", choices=("train", "val"), default=None,
                   help="val also writes the FID caption list and reference statistics (default: from the file name)")
    p.add_argument("--text-encoder", default="clip-l", help="core/text_encoders.py spec (clip-l: CLIP ViT-L/14 text)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="keep the first L caption tokens (default: all, 77 for CLIP as App. K); short captions lose "
                        "nothing and the MMDiT's joint attention gets shorter")
    p.add_argument("--fid-features", choices=("inception", "proxy", "none"), default="inception",
                   help="val: feature extractor of the reference statistics (proxy: an offline stand-in, labelled)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights for eval/fid.py (offline)")
    p.add_argument("--crop", choices=("uvit", "adm"), default="uvit",
                   help="uvit: U-ViT's COCO preprocessing, which the paper's T2I setup follows (centred square, "
                        "LANCZOS); adm: guided-diffusion's crop as for ImageNet (default %(default)s)")
    return p


def make_job(args) -> tuple[Job, dict]:
    check_common(args)
    parse_text_encoder_spec(args.text_encoder)  # ValueError naming the valid forms, before any work
    if args.text_tokens is not None and not 1 <= args.text_tokens <= 77:
        raise ValueError(f"--text-tokens must be in 1..77, got {args.text_tokens}")
    if args.split is None:
        args.split = "val" if "val" in os.path.basename(args.captions) else "train"
    items, counts = list_coco(args.images, args.captions)
    items = spread(items, args.limit)
    record = {"kind": "t2i", "source": os.path.abspath(args.images), "captions": os.path.abspath(args.captions),
              "split": args.split, "vae": args.vae, **job_features(args),
              "text_encoder": args.text_encoder, "text_tokens": args.text_tokens, "crop": args.crop}
    job = Job(args.out, items, args.resolution, args.shard_size, False, args.store_images, args.batch_size,
              args.workers, record, crop=args.crop, exif=args.exif)
    return job, counts


def captions_cut(job: Job, text_encoder) -> int:
    """How many captions have more tokens than the encoder keeps (0 without --text-tokens: CLIP's own 77-token
    truncation is the model's, as in U-ViT)."""
    if text_encoder.max_length >= text_encoder.context_length:
        return 0
    counts = text_encoder.token_counts([c for it in job.items for c in it.captions])
    return sum(n > text_encoder.max_length for n in counts)


def write_null_embedding(out: str, text_encoder) -> None:
    emb = text_encoder.encode([""])[0].cpu().numpy().astype(np.float16)
    with atomic_write(os.path.join(out, NULL_EMBEDDING), "wb") as f:
        np.save(f, emb, allow_pickle=False)


def write_fid_captions(job: Job, skipped_files: dict) -> int:
    """The caption list for FID generation: the prepared (not skipped) images with their captions."""
    entries = [{"image_id": int(it.key), "file_name": it.name, "captions": it.captions}
               for it in job.items if it.path not in skipped_files]
    write_json_atomic(os.path.join(job.out, FID_CAPTIONS), entries)
    return len(entries)


def main(argv=None, single_process: bool = False) -> int:
    """The command line; `single_process` ignores a launcher's environment (see cli.run_job)."""
    args = parser().parse_args(argv)
    job, counts = make_job(args)
    extractor, is_main = None, single_process or int(os.environ.get("RANK", "0")) == 0
    if args.split == "val" and args.fid_features != "none" and is_main:
        extractor = build_fid_extractor(args.fid_features, args.inception_weights)  # fails fast, before the work
    if is_main:
        print(f"{args.captions}: {counts['images']} images, {counts['captions']} captions"
              + (f", {counts['orphan_captions']} captions of unlisted image ids (ignored)" if counts["orphan_captions"]
                 else "")
              + f" -> {len(job.items)} images, {job.num_shards} shards of {job.shard_size} at {args.resolution} px "
              f"({args.split} split)")

    def before_manifest(models, totals: dict) -> dict:
        write_null_embedding(job.out, models.text)
        extra = {"null_text_embedding": NULL_EMBEDDING}
        if args.split == "val":
            extra["fid_captions"] = FID_CAPTIONS
            write_fid_captions(job, totals["skipped_files"])
            if extractor is not None:
                extra["fid_stats"] = write_fid_stats(job, extractor, totals["skipped_files"])
        return extra

    def finish(job, models):
        L, D = models.text.max_length, models.text.dim
        cut = captions_cut(job, models.text)
        if cut:
            log.warning("%d of %d captions are longer than --text-tokens %d (with start/end tokens) and are cut",
                        cut, sum(len(it.captions) for it in job.items), L)
        finish_manifest(job, "t2i", models.autoencoder, feature_records(models),
                        {"split": args.split, "text_encoder": models.text.id, "captions_cut": cut,
                         "text_embedding": {"shape": [L, D], "dtype": "float16"}, "input_counts": counts},
                        before_manifest=lambda totals: before_manifest(models, totals))
        for what, entries in (("not text (null, a list or a number)", counts["captions_not_text"]),
                              ("empty", counts["captions_empty"])):
            if entries:
                named = ", ".join(f"annotation {e['annotation_id']} of image {e['image_id']}" for e in entries[:3])
                print(f"  captions left out as {what}: {len(entries)} ({named}{', ...' if len(entries) > 3 else ''};"
                      " all under input_counts in manifest.json)")

    if counts["orphan_captions"]:
        log.warning("%d captions name image ids that %s does not list; they are ignored",
                    counts["orphan_captions"], args.captions)
    make_models = lambda device: build_models(args, device, text_encoder=args.text_encoder,
                                                 text_tokens=args.text_tokens)  # noqa: E731
    return run_job(job, make_models, finish, single_process)


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
