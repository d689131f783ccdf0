"""data_prep.coco: a generated COCO-format captions file with real JPEGs (one missing, one corrupt, one without
captions, greyscale and CMYK ones), tiny CLIP text, proxy FID statistics, and the t2i trainer reading the shards."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_train
from core.shards import ShardReader, read_manifest
from data_prep import coco
from data_prep.cli import main_guard

BASE = ["--resolution", "32", "--vae", "pixel-s2d4", "--text-encoder", "clip-tiny", "--workers", "0",
        "--batch-size", "4", "--shard-size", "4"]


def make_coco(root, n=10, split="val2014", seed=0) -> tuple[str, str]:
    """Images root/<split>/COCO_<split>_<id>.jpg and root/annotations/captions_<split>.json. Image 3's file is
    missing, 7's is corrupt, 8 has no caption, 5 is greyscale, 6 CMYK; one caption names an unlisted image id."""
    rng = np.random.default_rng(seed)
    img_dir, ann_dir = os.path.join(root, split), os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        iid = 1000 + 7 * i
        name = f"COCO_{split}_{iid:012d}.jpg"
        images.append({"id": iid, "file_name": name, "width": 64, "height": 48})
        im = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
        if i == 5:
            im = im.convert("L")
        if i == 6:
            im = im.convert("CMYK")
        if i != 3:
            im.save(os.path.join(img_dir, name), quality=90)
        if i == 7:
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(b"\xff\xd8\xff not a jpeg")
        for k in range(0 if i == 8 else 5 + i % 2):
            anns.append({"id": 100 * i + (9 - k), "image_id": iid, "caption": f" caption {k} of image {i} "})
    anns.append({"id": 99999, "image_id": 424242, "caption": "orphan"})
    path = os.path.join(ann_dir, f"captions_{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return img_dir, path


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return make_coco(str(tmp_path_factory.mktemp("coco")))


def test_coco_val_shards(val, tmp_path, capsys):
    images, captions = val
    out = tmp_path / "c"
    assert coco.main(["--images", images, "--captions", captions, "--out", str(out), *BASE, "--store-images",
                      "--fid-features", "proxy"]) == 0
    printed = capsys.readouterr().out
    m = read_manifest(str(out))
    assert (m["kind"], m["split"], m["text_encoder"], m["inputs"], m["prepared"], m["num_samples"]) == \
        ("t2i", "val", "clip-tiny", 10, 7, 7)
    assert m["skipped"] == {"missing_file": 1, "unreadable": 1, "no_caption": 1}
    assert m["converted"] == {"L": 1, "CMYK": 1}
    assert m["input_counts"] == {"images": 10, "captions": 51, "orphan_captions": 1, "captions_not_text": [],
                                 "captions_empty": []}
    assert m["text_embedding"] == {"shape": [77, 32], "dtype": "float16"}
    assert "10 inputs -> 7 prepared images -> 7 samples" in printed

    reader = ShardReader(str(out))
    samples = {s["__key__"]: s for s in (reader.decoded(i) for i in range(len(reader)))}
    assert sorted(samples) == [f"{1000 + 7 * i:012d}" for i in (0, 1, 2, 4, 5, 6, 9)]
    s = samples[f"{1000 + 7 * 1:012d}"]
    assert s["captions.json"] == [f"caption {k} of image 1" for k in reversed(range(6))]  # annotation-id order
    assert s["txt_emb.npy"].dtype == np.float16 and s["txt_emb.npy"].shape == (6, 77, 32)
    assert s["latent.npy"].dtype == np.float16 and s["latent.npy"].shape == (96, 8, 8)
    assert s["image.png"].shape == (32, 32, 3)
    from data_prep.images import center_crop_uvit

    assert m["crop"] == "uvit" and m["fid_stats"]["crop"] == "uvit"  # U-ViT's COCO preprocessing by default
    with Image.open(os.path.join(images, "COCO_val2014_000000001007.jpg")) as im:
        assert np.array_equal(s["image.png"], center_crop_uvit(im.convert("RGB"), 32))
    from core.text_encoders import load_text_encoder

    enc = load_text_encoder("clip-tiny")
    # data_prep encoded these captions in one batch with other images' (16), here alone (6): float32 round-off,
    # then float16 storage (2**-11 relative)
    np.testing.assert_allclose(s["txt_emb.npy"].astype(np.float32), enc.encode(s["captions.json"]).numpy(),
                               rtol=2**-10, atol=1e-5)

    null = np.load(out / m["null_text_embedding"], allow_pickle=False)
    assert m["null_text_embedding"] == "empty_caption_emb.npy" and null.dtype == np.float16 and null.shape == (77, 32)
    assert np.array_equal(null, enc.encode([""])[0].numpy().astype(np.float16))

    fid_caps = json.loads((out / m["fid_captions"]).read_text())
    assert [e["image_id"] for e in fid_caps] == [1000 + 7 * i for i in (0, 1, 2, 4, 5, 6, 9)]
    assert fid_caps[1]["file_name"] == "COCO_val2014_000000001007.jpg" and len(fid_caps[1]["captions"]) == 6

    from eval.fid import read_stats_file

    stats = m["fid_stats"]
    assert stats["is_proxy"] and "proxy" in stats["file"] and stats["num_images"] == 7
    assert "PROXY" in printed
    st = read_stats_file(str(out / stats["file"]))
    d = st["mu"].shape[0]
    assert st["sigma"].shape == (d, d) and str(st["is_proxy"]) == "True"


def test_coco_train_split_deterministic_and_t2i_trainer_reads_it(tmp_path):
    images, captions = make_coco(str(tmp_path / "coco"), n=12, split="train2014", seed=1)
    args = ["--images", images, "--captions", captions, *BASE, "--store-images", "--features", "dinov2-tiny"]
    assert coco.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert coco.main([*args, "--out", str(tmp_path / "b")]) == 0
    m = read_manifest(str(tmp_path / "a"))
    assert m["split"] == "train" and "fid_captions" not in m and "fid_stats" not in m  # split from the file name
    assert not os.path.exists(tmp_path / "a" / "fid_captions.json")
    names = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith((".tar", ".npy")))
    assert len(names) == 5  # 3 shards, the empty-caption embedding and the sample index (deterministic too)
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    assert ShardReader(str(tmp_path / "a")).decoded(0)["feat_dinov2-tiny.npy"].shape == (16, 32)
    proc = run_train(["--config", os.path.join(REPO, "configs/debug/t2i_tiny.yaml"), f"run.dir={tmp_path / 'run'}",
                      "data.kind=shards", f"data.path={tmp_path / 'a'}", "train.max_steps=3", "train.num_workers=0",
                      "train.tensorboard=false", "train.global_batch=4"], script="t2i/train.py")
    assert "training done at step 3" in proc.stdout + proc.stderr


def test_coco_bad_inputs_are_clear_errors(val, tmp_path, capsys):
    images, captions = val
    run = lambda *a: main_guard(coco.main, ["--images", images, "--out", str(tmp_path / "o"), *BASE, *a])  # noqa
    assert run("--captions", str(tmp_path / "captions_val2014.json")) == 2
    assert "no such annotation file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert run("--captions", str(tmp_path / "bad.json")) == 2
    assert "is not a COCO captions file" in capsys.readouterr().err
    assert run("--captions", captions, "--text-encoder", "t5-xxl") == 2
    assert "unknown text encoder" in capsys.readouterr().err
    assert run("--captions", captions, "--text-tokens", "78") == 2
    assert "--text-tokens must be in 1..77, got 78" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_text_tokens_keep_the_first_tokens_and_eval_cuts_a_longer_val_split(val, tmp_path):
    """--text-tokens 6 stores the first 6 tokens of the full-length embeddings (causal encoder: exactly them) and
    counts the captions it cuts; a run trained on 6 tokens evaluates against a 77-token val split cut to 6, and
    not the other way round."""
    from t2i.evaluation import CaptionConditioner

    images, captions = val
    full, short = str(tmp_path / "full"), str(tmp_path / "short")
    assert coco.main(["--images", images, "--captions", captions, "--out", full, *BASE, "--fid-features", "none"]) == 0
    assert coco.main(["--images", images, "--captions", captions, "--out", short, *BASE, "--fid-features", "none",
                      "--text-tokens", "6"]) == 0
    m = read_manifest(short)
    assert m["text_embedding"]["shape"] == [6, 32] and read_manifest(full)["captions_cut"] == 0
    assert m["captions_cut"] == 50  # " caption k of image i " is 7 tokens with start/end; 50 listed captions
    assert np.load(os.path.join(short, m["null_text_embedding"])).shape == (6, 32)
    a, b = ShardReader(full).decoded(0)["txt_emb.npy"], ShardReader(short).decoded(0)["txt_emb.npy"]
    assert a.shape[1:] == (77, 32) and np.array_equal(a[:, :6], b)
    trained_on = lambda L: {"data": {"text_encoder": "clip-tiny", "text_embedding": {"shape": [L, 32]}}}  # noqa
    cond = CaptionConditioner(trained_on(6), {"cond_file": full})
    assert cond.cond([0, 1], "cpu")["context"].shape == (2, 6, 32) and cond.null_context.shape == (6, 32)
    assert CaptionConditioner(trained_on(77), {"cond_file": full}).cond([0], "cpu")["context"].shape == (1, 77, 32)
    with pytest.raises(ValueError, match="trained on 77 caption tokens but .* stores 6"):
        CaptionConditioner(trained_on(77), {"cond_file": short})


def test_eval_captions_follow_the_uvit_protocol(val, tmp_path):
    """Sample i: the i-th image of a seeded order of the val images with one seeded caption of its own, every image
    once per epoch (U-ViT's shuffled val loader), then a new epoch; the same for every evaluation."""
    from t2i.evaluation import CaptionConditioner

    images, captions = val
    out = str(tmp_path / "v")
    assert coco.main(["--images", images, "--captions", captions, "--out", out, *BASE, "--fid-features", "none"]) == 0
    meta = {"data": {"text_encoder": "clip-tiny"}}
    cond = CaptionConditioner(meta, {"cond_file": out})
    n = len(cond.images)
    assert n == read_manifest(out)["num_samples"] == 7 and cond.num_available is None
    pairs = [cond.pair(i) for i in range(3 * n)]
    for epoch in range(3):
        assert sorted(p[0] for p in pairs[epoch * n:(epoch + 1) * n]) == list(range(n))  # each image once
    reader = ShardReader(out)
    for sample, k, text in pairs:
        assert reader.decoded(sample)["captions.json"][k] == text  # a caption of that very image
    assert [p[0] for p in pairs[:n]] != [p[0] for p in pairs[n:2 * n]]  # a new order per epoch
    assert len({p[1] for p in pairs}) > 1  # not always the first caption
    assert CaptionConditioner(meta, {"cond_file": out}).captions(range(3 * n)) == [p[2] for p in pairs]


def test_inception_flag_path_fails_fast_without_weights(val, tmp_path, capsys):
    images, captions = val
    code = main_guard(coco.main, ["--images", images, "--captions", captions, "--out", str(tmp_path / "o"), *BASE,
                                  "--fid-features", "inception", "--inception-weights", str(tmp_path / "none.pt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot build the inception FID feature extractor" in err and "--fid-features proxy" in err
    assert not os.path.exists(tmp_path / "o")  # failed before any work


def test_rerun_recomputes_nothing_and_keeps_stats(val, tmp_path, monkeypatch):
    images, captions = val
    args = ["--images", images, "--captions", captions, "--out", str(tmp_path / "c"), *BASE, "--fid-features", "proxy"]
    assert coco.main(args) == 0
    import eval.fid

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(eval.fid, "stats_from_images", boom)
    monkeypatch.setattr("data_prep.pipeline.encode_batch", boom)
    assert coco.main(args) == 0  # every shard and the statistics exist: only the manifest is rewritten
    assert read_manifest(str(tmp_path / "c"))["num_samples"] == 7
