"""data_prep on what real collections hold: the shipped photographs (tests/data/README.md: public domain / CC0)
re-encoded as users' folders have them, plus hostile files. Every input is stored right, or skipped and named."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from core.shards import ShardReader, read_manifest
from data_prep import coco, imagenet
from data_prep.cli import main_guard
from data_prep.images import center_crop_arr, load_image

PHOTOS = os.path.join(os.path.dirname(__file__), "data", "photos")
PIX = ["--resolution", "32", "--vae", "pixel-s2d4", "--workers", "0", "--batch-size", "4", "--store-images"]
LONG = "猫の写真" * 10 + ".jpg"  # 40 CJK characters: 123 bytes of UTF-8, past the 100 bytes of a plain tar name


def photo(name: str) -> Image.Image:
    with Image.open(os.path.join(PHOTOS, name)) as im:
        return im.copy()


def grey16(path: str) -> np.ndarray:
    """Save the greyscale photograph as 16 bits per pixel (v * 257: 8-bit 255 -> 65535); returns the 8 bits."""
    grey = np.asarray(photo("camera.jpg").convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    return grey


def exif_rotated(path: str) -> np.ndarray:
    """The rocket saved as a phone does: pixels as the sensor read them, EXIF Orientation 6 (display rotated 90
    degrees clockwise). Returns the upright pixels."""
    upright = np.asarray(photo("rocket.jpg"))
    sensor = np.rot90(upright, k=1).copy()  # stored a quarter turn counter-clockwise of upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sensor).save(path, quality=95, exif=exif)
    with Image.open(path) as im:  # the JPEG's own decoded pixels (lossy), turned clockwise by hand
        return np.rot90(np.asarray(im.convert("RGB")), k=-1).copy()


@pytest.fixture
def tree(tmp_path):
    """An ImageNet-style tree of real photos in the ways collections hold them."""
    root = tmp_path / "src"
    cat, dog, nested = root / "cat", root / "dog", root / "cat" / "sub" / "deeper"
    for d in (cat, dog, nested, root / ".thumbnails"):
        d.mkdir(parents=True)
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), cat / "0001.jpg")
    shutil.copy(os.path.join(PHOTOS, "coffee.jpg"), dog / "0001.jpg")  # the same name in another class
    photo("coffee.jpg").save(nested / "nested.png")  # in a sub-folder of the class folder
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), cat / "a.jpg")
    shutil.copy(os.path.join(PHOTOS, "coffee.jpg"), cat / "a_flip.jpg")  # the name a flip copy of a.jpg would get
    shutil.copy(os.path.join(PHOTOS, "rocket.jpg"), cat / LONG)
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), dog / "photo.JFIF")  # JPEG's other extension, upper case
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), dog / ".hidden.jpg")  # hidden: not an input
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), root / ".thumbnails" / "x.jpg")  # hidden folder: no class
    grey16(str(dog / "grey16.png"))
    grey16(str(dog / "grey16.tif"))
    exif_rotated(str(cat / "phone.jpg"))
    return root


def prep(src, out, *extra) -> int:
    return imagenet.main(["--src", str(src), "--out", str(out), *PIX, *extra])


def by_path(out) -> dict:
    """Decoded samples of a prepared dataset by their path.txt (flip copies under path + ' (flip)')."""
    reader = ShardReader(str(out))
    samples = {}
    for i in range(len(reader)):
        s = reader.decoded(i)
        samples[s["path.txt"] + (" (flip)" if s["__key__"].endswith("_flip") else "")] = s
    return samples


def one_class(tmp_path, *names: str):
    """src/cat/ holding copies of the named shipped photos."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for name in names:
        shutil.copy(os.path.join(PHOTOS, name), tmp_path / "src" / "cat" / name)
    return tmp_path / "src"


def test_16bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    root = one_class(tmp_path)
    grey = {name: grey16(str(root / "cat" / name)) for name in ("grey16.png", "grey16.tif")}
    for name in grey:
        loaded = load_image(str(root / "cat" / name), 32)
        want = center_crop_arr(Image.fromarray(grey[name]).convert("RGB"), 32)
        assert loaded.converted == "I;16" and np.abs(loaded.image.astype(int) - want).max() <= 1, name
        assert loaded.image.mean() < 200  # the whole photograph, not the white of 16-bit values clipped at 255
    assert prep(root, tmp_path / "out") == 0
    m = read_manifest(str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in m["converted_files"]["I;16"]) == ["grey16.png", "grey16.tif"]
    assert m["converted"]["I;16"] == 2


def test_exif_orientation_is_applied_counted_and_recorded(tmp_path, capsys):
    root = one_class(tmp_path, "chelsea.jpg")
    upright = center_crop_arr(Image.fromarray(exif_rotated(str(root / "cat" / "phone.jpg"))), 32)
    assert prep(root, tmp_path / "a") == 0
    assert "turned upright by their EXIF orientation: 1" in capsys.readouterr().out
    m = read_manifest(str(tmp_path / "a"))
    assert (m["exif"], m["rotated"], [os.path.basename(p) for p in m["rotated_files"]]) == ("apply", 1, ["phone.jpg"])
    stored = by_path(tmp_path / "a")["cat/phone.jpg"]["image.png"]
    assert np.abs(stored.astype(int) - upright).max() <= 2  # the LANCZOS/BICUBIC crop of the turned JPEG
    # the reference preprocessing (ADM, U-ViT) ignores EXIF: kept possible, and recorded
    assert prep(root, tmp_path / "b", "--exif", "ignore") == 0
    m = read_manifest(str(tmp_path / "b"))
    assert (m["exif"], m["rotated"]) == ("ignore", 0)
    sideways = by_path(tmp_path / "b")["cat/phone.jpg"]["image.png"]
    assert np.abs(sideways.astype(int) - np.rot90(upright, k=1)).max() <= 2  # the sensor's pixel order
    assert np.abs(sideways.astype(int) - upright).mean() > 5


def test_every_image_is_stored_once_under_a_collision_free_key(tree, tmp_path):
    """Sub-folders are searched (as ImageFolder), the same name in two classes, a 123-byte name and a file named
    like a flip copy all make their own samples; the manifest agrees with what the reader finds."""
    root = tree
    assert prep(root, tmp_path / "out", "--flip") == 0
    m = read_manifest(str(tmp_path / "out"))
    samples = by_path(tmp_path / "out")
    names = {"cat/0001.jpg", "dog/0001.jpg", "cat/sub/deeper/nested.png", "cat/a.jpg", "cat/a_flip.jpg",
             f"cat/{LONG}", "dog/photo.JFIF", "dog/grey16.png", "dog/grey16.tif", "cat/phone.jpg"}
    assert set(samples) == names | {f"{n} (flip)" for n in names}
    assert m["inputs"] == m["prepared"] == 10 and m["num_samples"] == 20 == len(ShardReader(str(tmp_path / "out")))
    assert samples["cat/0001.jpg"]["cls"] == 0 and samples["dog/0001.jpg"]["cls"] == 1  # classes: cat, dog
    assert not np.array_equal(samples["cat/0001.jpg"]["image.png"], samples["dog/0001.jpg"]["image.png"])
    flip = samples["cat/a.jpg (flip)"]["image.png"]
    assert np.array_equal(flip, samples["cat/a.jpg"]["image.png"][:, ::-1])
    assert not np.array_equal(flip, samples["cat/a_flip.jpg"]["image.png"])
    assert len({s["__key__"] for s in samples.values()}) == 20


def test_a_class_folder_without_images_is_refused_by_name(tmp_path, capsys):
    root = one_class(tmp_path, "chelsea.jpg")
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._0001.jpg").write_bytes(b"\x00resource fork")  # what an unzip leaves
    assert main_guard(lambda argv: prep(root, tmp_path / "out"), []) == 2
    err = capsys.readouterr().err
    assert "1 class folder(s) hold no image (__MACOSX)" in err and "shift every later label" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_rerun_reads_skipped_files_again_and_an_all_bad_set_names_them(tmp_path, capsys):
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), root / "cat" / "good.jpg")
    data = open(os.path.join(PHOTOS, "coffee.jpg"), "rb").read()
    (root / "cat" / "cut.jpg").write_bytes(data[: len(data) // 3])  # a download cut short
    assert prep(root, tmp_path / "out") == 0
    m = read_manifest(str(tmp_path / "out"))
    assert m["prepared"] == 1 and list(m["skipped_files"]) == [str(root / "cat" / "cut.jpg")]
    assert "cut.jpg" in capsys.readouterr().out  # named in the last lines, not only in the log
    (root / "cat" / "cut.jpg").write_bytes(data)  # the user fetches it again and reruns the same command
    assert prep(root, tmp_path / "out") == 0
    m = read_manifest(str(tmp_path / "out"))
    assert m["prepared"] == 2 and m["skipped"] == {} and "cat/cut.jpg" in by_path(tmp_path / "out")
    bad = tmp_path / "bad"
    (bad / "cat").mkdir(parents=True)
    for name in ("x.jpg", "y.png"):
        (bad / "cat" / name).write_bytes(b"not an image")
    assert main_guard(lambda argv: prep(bad, tmp_path / "bad_out"), []) == 2
    for _ in range(2):  # the rerun says it again, with the names
        err = capsys.readouterr().err
        assert "all were skipped" in err and "x.jpg (unreadable" in err and "y.png (unreadable" in err
        assert main_guard(lambda argv: prep(bad, tmp_path / "bad_out"), []) == 2


def test_a_large_image_warning_names_its_file(tmp_path, monkeypatch, caplog):
    root = one_class(tmp_path, "chelsea.jpg", "coffee.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12000)  # coffee (150x100) is above it, below 2x (an error)
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        assert prep(root, tmp_path / "out") == 0
    warned = [r.getMessage() for r in caplog.records if "exceeds limit" in r.getMessage()]
    assert len(warned) == 1 and "cat/coffee.jpg" in warned[0]


def coco_set(tmp_path, images, annotations) -> tuple[str, str]:
    img_dir = tmp_path / "train2014"
    img_dir.mkdir(exist_ok=True)
    for im in images:
        if im.get("file_name"):
            shutil.copy(os.path.join(PHOTOS, "chelsea.jpg"), img_dir / im["file_name"])
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(img_dir), str(path)


COCO = ["--resolution", "32", "--vae", "pixel-s2d4", "--workers", "0", "--text-encoder", "clip-tiny",
        "--fid-features", "none", "--split", "train"]


def test_coco_captions_that_are_not_text_or_empty_are_counted_and_named(tmp_path, capsys):
    caps = ["a cat on a sofa", None, ["a", "list"], 7, "   ", ""]
    images, annotations = coco_set(tmp_path, [{"id": 1, "file_name": "cat.jpg"}, {"id": 2}],  # 2: no file_name
                                   [{"id": 10 + k, "image_id": 1, "caption": c} for k, c in enumerate(caps)]
                                   + [{"id": 20, "image_id": 2, "caption": "lost"}])
    out = tmp_path / "out"
    assert coco.main(["--images", images, "--captions", annotations, "--out", str(out), *COCO]) == 0
    m = read_manifest(str(out))
    (s,) = [ShardReader(str(out)).decoded(i) for i in range(1)]
    assert s["captions.json"] == ["a cat on a sofa"] and s["txt_emb.npy"].shape[0] == 1 and s["path.txt"] == "cat.jpg"
    counts = m["input_counts"]
    assert [(e["annotation_id"], e["caption"]) for e in counts["captions_not_text"]] == \
        [(11, "None"), (12, "['a', 'list']"), (13, "7")]
    assert [e["annotation_id"] for e in counts["captions_empty"]] == [14, 15]
    assert m["skipped"] == {"no_file_name": 1} and list(m["skipped_files"]) == ["(image id 2: no file_name)"]
    printed = capsys.readouterr().out
    assert "captions left out as not text (null, a list or a number): 3" in printed and "empty: 2" in printed


def test_coco_string_image_ids_are_one_clear_error(tmp_path, capsys):
    images, annotations = coco_set(tmp_path, [{"id": "abc", "file_name": "cat.jpg"}],
                                   [{"id": 1, "image_id": "abc", "caption": "a cat"}])
    argv = ["--images", images, "--captions", annotations, "--out", str(tmp_path / "out"), *COCO]
    assert main_guard(coco.main, argv) == 2
    err = capsys.readouterr().err
    assert "has id 'abc' (str), and COCO image ids are integers" in err and "cat.jpg" in err
    assert "Traceback" not in err
