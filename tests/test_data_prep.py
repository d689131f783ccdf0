"""data_prep: ADM crop, bad inputs, ImageNet shards (counts, shapes, determinism, crash-and-rerun, two processes),
and the class-conditional trainer reading them. Generated ImageNet-style trees with real JPEGs, CPU, seconds."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, cpu_env, run_train
from core.shards import ShardReader, read_manifest
from core.latents import build_autoencoder
from data_prep import imagenet, pipeline
from data_prep.cli import main_guard
from data_prep.images import center_crop_arr, load_image

PIX = ["--resolution", "32", "--vae", "pixel-s2d4", "--workers", "0", "--batch-size", "4"]


def make_imagenet_tree(root, classes=4, per_class=5, seed=0) -> dict:
    """Class folders of real JPEGs of random sizes, plus in class 0: RGBA and greyscale PNGs, a CMYK JPEG, a
    truncated JPEG and a non-image named .JPEG. Returns the expected counts."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(root, f"n{c:08d}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            w, h = rng.integers(40, 90, size=2)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
                os.path.join(d, f"n{c:08d}_{i}.JPEG"), quality=90)
    d0 = os.path.join(root, "n00000000")
    Image.fromarray(rng.integers(0, 256, size=(50, 60, 4), dtype=np.uint8), "RGBA").save(os.path.join(d0, "rgba.png"))
    Image.fromarray(rng.integers(0, 256, size=(50, 60), dtype=np.uint8), "L").save(os.path.join(d0, "grey.png"))
    Image.fromarray(rng.integers(0, 256, size=(50, 60, 3), dtype=np.uint8)).convert("CMYK").save(
        os.path.join(d0, "cmyk.jpg"))
    with open(os.path.join(d0, "n00000000_0.JPEG"), "rb") as f:
        data = f.read()
    with open(os.path.join(d0, "truncated.JPEG"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(d0, "garbage.JPEG"), "wb") as f:
        f.write(b"not an image")
    with open(os.path.join(root, "README.txt"), "w") as f:  # not a class folder, not an image: ignored
        f.write("x")
    return {"inputs": classes * per_class + 5, "unreadable": 2, "converted": {"CMYK": 1, "L": 1, "RGBA": 1}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return str(root), make_imagenet_tree(str(root))


def prep(src, out, *extra) -> int:
    return imagenet.main(["--src", src, "--out", str(out), *PIX, *extra])


def shard_files(out) -> list:
    return sorted(f for f in os.listdir(out) if f.endswith(".tar"))


# ------------------------------------------------------------------------------------------------------- images


def test_center_crop_is_adm():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(arr), 40), arr[:, 20:60])  # short side fits: crop only
    big = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(big), 32)  # 64 >= 2*32: one BOX halving (2x2 means), then exact size
    halved = big.reshape(32, 2, 48, 2, 3).astype(np.float64).mean((1, 3))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - halved[:, 8:40]).max() <= 1  # BOX rounding only
    small = center_crop_arr(Image.fromarray(arr[:20, :30]), 32)  # upsampled with BICUBIC
    assert small.shape == (32, 32, 3)


def test_load_image_bad_inputs(tree):
    src, _ = tree
    d0 = os.path.join(src, "n00000000")
    assert load_image(os.path.join(d0, "truncated.JPEG"), 32).skip.startswith("unreadable: OSError")
    assert load_image(os.path.join(d0, "garbage.JPEG"), 32).skip.startswith("unreadable:")
    assert load_image(os.path.join(d0, "nope.JPEG"), 32).skip == "missing_file"
    for name, mode in [("cmyk.jpg", "CMYK"), ("grey.png", "L"), ("rgba.png", "RGBA")]:
        loaded = load_image(os.path.join(d0, name), 32)
        assert loaded.converted == mode and loaded.image.shape == (32, 32, 3) and loaded.image.dtype == np.uint8
    ok = load_image(os.path.join(d0, "n00000000_1.JPEG"), 32)
    assert ok.skip is None and ok.converted is None and ok.image.flags["C_CONTIGUOUS"]


# -------------------------------------------------------------------------------------------------- end to end


def test_imagenet_shards_counts_shapes_and_determinism(tree, tmp_path, capsys):
    src, expect = tree
    args = ["--flip", "--store-images", "--features", "dinov2-tiny", "--shard-size", "8"]
    assert prep(src, tmp_path / "a", *args) == 0
    printed = capsys.readouterr().out
    m = read_manifest(str(tmp_path / "a"))
    prepared = expect["inputs"] - expect["unreadable"]
    assert (m["kind"], m["num_classes"], m["inputs"], m["prepared"]) == ("class_cond", 4, expect["inputs"], prepared)
    assert m["num_samples"] == 2 * prepared and m["skipped"] == {"unreadable": 2}
    assert m["converted"] == expect["converted"] and len(m["skipped_files"]) == 2
    assert f"{expect['inputs']} inputs -> {prepared} prepared images -> {2 * prepared} samples" in printed
    assert m["latent"]["shape"] == [48, 8, 8] and m["resolution"] == 32 and m["crop"] == "adm"  # ImageNet: ADM
    # the spec as given and the token grid: latent side 8 / patch 2 -> 4x4 tokens, the tiny /2 model's
    assert m["features"] == [{"name": "dinov2-tiny", "spec": "dinov2-tiny", "tokens": 16, "dim": 32}]
    assert len(m["shards"]) == 7 and all(s["num_samples"] <= 8 for s in m["shards"])
    assert [s["num_samples"] for s in m["shards"]][1:] == [8, 6, 8, 8, 8, 2]  # inputs 4..: class 0's last 2 are bad

    reader = ShardReader(str(tmp_path / "a"))
    # keys are positions in the sorted input list; path.txt names the input (flip copies: key + "_flip")
    decoded = (reader.decoded(i) for i in range(len(reader)))
    samples = {(s["path.txt"], s["__key__"].endswith("_flip")): s for s in decoded}
    assert len(samples) == 2 * prepared
    s, f = samples[("n00000002/n00000002_3.JPEG", False)], samples[("n00000002/n00000002_3.JPEG", True)]
    assert f["__key__"] == s["__key__"] + "_flip" and s["__key__"].isdigit()
    assert s["cls"] == 2 and f["cls"] == 2 and samples[("n00000000/cmyk.jpg", False)]["cls"] == 0
    assert s["latent.npy"].dtype == np.float16 and s["latent.npy"].shape == (96, 8, 8)
    assert s["feat_dinov2-tiny.npy"].dtype == np.float16 and s["feat_dinov2-tiny.npy"].shape == (16, 32)
    assert s["image.png"].shape == (32, 32, 3) and np.array_equal(f["image.png"], s["image.png"][:, ::-1])
    expected = load_image(os.path.join(src, "n00000002", "n00000002_3.JPEG"), 32).image
    assert np.array_equal(s["image.png"], expected)
    # the pixel autoencoder is exact: the stored latent decodes to the stored image (up to fp16)
    decoded = torch.nn.functional.pixel_shuffle(torch.from_numpy(s["latent.npy"][:48].astype(np.float32))[None], 4)
    assert np.abs(((decoded[0].permute(1, 2, 0).numpy() + 1) * 127.5) - s["image.png"]).max() < 0.6
    assert not np.array_equal(s["feat_dinov2-tiny.npy"], f["feat_dinov2-tiny.npy"])  # features of the flip

    assert prep(src, tmp_path / "b", *args) == 0  # determinism: same bytes
    for name in shard_files(tmp_path / "a"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name


def test_sd_vae_path_with_tiny_autoencoderkl(tree, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    src, expect = tree
    assert imagenet.main(["--src", src, "--out", str(tmp_path / "o"), "--resolution", "32", "--workers", "0",
                          "--vae", str(tmp_path / "vae"), "--limit", "6"]) == 0
    m = read_manifest(str(tmp_path / "o"))
    stats = m["latent"].pop("channel_stats")  # tests/test_latent_norm.py checks them
    assert m["latent"] == {"autoencoder": str(tmp_path / "vae"), "scale_factor": 0.18215, "shift": 0.0,
                           "shape": [4, 16, 16], "moments": "mean||std float16"}
    assert len(stats["mean"]) == len(stats["std"]) == 4 and stats["count"] == m["num_samples"] * 16 * 16
    assert m["inputs"] == 6 and m["num_samples"] + sum(m["skipped"].values()) == 6
    lat = ShardReader(str(tmp_path / "o")).decoded(0)["latent.npy"]
    assert lat.dtype == np.float16 and lat.shape == (8, 16, 16) and (lat[4:] > 0).all()  # mean || positive std
    assert sorted({ShardReader(str(tmp_path / "o")).decoded(i)["cls"] for i in range(m["num_samples"])}) \
        == [0, 1, 2, 3]  # --limit spreads over the sorted list


def test_crash_and_rerun_completes_identically(tree, tmp_path, monkeypatch):
    src, expect = tree
    args = ["--flip", "--shard-size", "8"]
    assert prep(src, tmp_path / "clean", *args) == 0
    real, calls = pipeline.write_shard, []

    def failing(path, samples):
        if calls:
            raise KeyboardInterrupt("killed")  # a crash after the first shard
        calls.append(path)
        real(path, samples)

    monkeypatch.setattr(pipeline, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prep(src, tmp_path / "crash", *args)
    assert shard_files(tmp_path / "crash") == ["shard-000000.tar"]
    assert not os.path.exists(tmp_path / "crash" / "manifest.json")
    assert not [f for f in os.listdir(tmp_path / "crash") if ".tmp" in f]  # no partial shard left
    monkeypatch.setattr(pipeline, "write_shard", real)
    before = os.path.getmtime(tmp_path / "crash" / "shard-000000.tar")
    assert prep(src, tmp_path / "crash", *args) == 0
    assert os.path.getmtime(tmp_path / "crash" / "shard-000000.tar") == before  # finished shard not redone
    assert shard_files(tmp_path / "crash") == shard_files(tmp_path / "clean")
    for name in shard_files(tmp_path / "clean"):
        assert filecmp.cmp(tmp_path / "clean" / name, tmp_path / "crash" / name, shallow=False), name
    a, b = read_manifest(str(tmp_path / "clean")), read_manifest(str(tmp_path / "crash"))
    for key in ("shards", "num_samples", "skipped", "converted", "skipped_files", "prepared"):
        assert a[key] == b[key], key  # the skipped inputs of shard 0 (written before the crash) still counted
    assert b["skipped"] == {"unreadable": expect["unreadable"]}


def test_two_ranks_take_disjoint_shards(tree, tmp_path):
    src, _ = tree
    args = imagenet.parser().parse_args(["--src", src, "--out", str(tmp_path / "r"), *PIX, "--shard-size", "4"])
    job, classes = imagenet.make_job(args)
    pipeline.check_job_record(job, write=True)
    models = pipeline.Models(build_autoencoder("pixel-s2d4"))
    assert pipeline.rank_shards(job, 0, 2) == [0, 2, 4, 6] and pipeline.rank_shards(job, 1, 2) == [1, 3, 5]
    pipeline.prepare_rank(job, models, rank=1, world=2, progress=False)
    assert shard_files(tmp_path / "r") == ["shard-000001.tar", "shard-000003.tar", "shard-000005.tar"]
    with pytest.raises(pipeline.PrepError, match="4 shard.s. are not written yet"):
        pipeline.finish_manifest(job, "class_cond", models.autoencoder, [], {"num_classes": 4})
    pipeline.prepare_rank(job, models, rank=0, world=2, progress=False)
    m = pipeline.finish_manifest(job, "class_cond", models.autoencoder, [], {"num_classes": 4})
    keys = [s["__key__"] for s in (ShardReader(str(tmp_path / "r"))[i] for i in range(m["num_samples"]))]
    assert len(keys) == len(set(keys)) == m["num_samples"] == 23


def test_two_processes_through_accelerate_match_one(tree, tmp_path):
    src, _ = tree
    args = ["--src", src, *PIX, "--shard-size", "4", "--store-images"]
    assert imagenet.main([*args, "--out", str(tmp_path / "one")]) == 0
    # python -m accelerate.commands.launch is `accelerate launch` (the console script imports timm first, which
    # fails on this CPU machine's CUDA torchvision); --multi_gpu means torchrun-style processes, gloo without GPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(__import__("conftest").free_port()), "-m", "data_prep.imagenet", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" in proc.stderr
    assert proc.stdout.count("23 prepared images") == 1  # the final counts, printed once by the main process
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    for name in shard_files(tmp_path / "one"):
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False), name
    assert read_manifest(str(tmp_path / "two"))["num_samples"] == 23


def test_bad_arguments_and_mismatching_rerun(tree, tmp_path, capsys):
    src, _ = tree
    assert main_guard(imagenet.main, ["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *PIX]) == 2
    assert "is not a directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    assert main_guard(imagenet.main, ["--src", str(tmp_path / "flat"), "--out", str(tmp_path / "o"), *PIX]) == 2
    assert "no class folders" in capsys.readouterr().err
    assert main_guard(imagenet.main, ["--src", src, "--out", str(tmp_path / "o"), *PIX, "--flip",
                                      "--shard-size", "5"]) == 2
    assert "must be even" in capsys.readouterr().err
    assert main_guard(imagenet.main, ["--src", src, "--out", str(tmp_path / "o"), *PIX,
                                      "--features", "dinov9"]) == 2
    assert "unknown encoder 'dinov9'" in capsys.readouterr().err

    assert prep(src, tmp_path / "o", "--shard-size", "10") == 0
    snapshot = {f: (tmp_path / "o" / f).read_bytes() for f in os.listdir(tmp_path / "o")
                if f.endswith((".tar", ".json"))}
    assert main_guard(imagenet.main, ["--src", src, "--out", str(tmp_path / "o"), *PIX, "--shard-size", "12"]) == 2
    err = capsys.readouterr().err
    assert "shard_size" in err and "another --out" in err
    assert {f: (tmp_path / "o" / f).read_bytes() for f in snapshot} == snapshot  # nothing written is lost
    assert prep(src, tmp_path / "o", "--shard-size", "10") == 0  # the same command again: a no-op rerun
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["num_samples"] == 23


def test_class_cond_trainer_reads_prepared_imagenet(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "in32"
    assert prep(src, out, "--flip", "--store-images", "--features", "dinov2-tiny", "--shard-size", "16") == 0
    proc = run_train(["--config", os.path.join(REPO, "configs/debug/class_cond_tiny.yaml"),
                      f"run.dir={tmp_path / 'run'}", "data.kind=shards", f"data.path={out}", "train.max_steps=4",
                      "train.num_workers=0", "train.tensorboard=false", "train.global_batch=8"])
    assert "training done at step 4" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_uvit_crop_is_the_centred_square_resized_with_lanczos():
    """U-ViT's COCO preprocessing (the paper's T2I setup): crop the centred square of the short side, then LANCZOS
    to the target; ADM's halves with BOX and resizes with BICUBIC first, so the two differ on a large image."""
    from data_prep.images import CROPS, center_crop_uvit

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 131, 3), dtype=np.uint8)  # odd margins: (131 - 90) // 2 = 20 on the left
    square = Image.fromarray(arr[:, 20:110])
    assert np.array_equal(center_crop_uvit(Image.fromarray(arr), 32), np.asarray(square.resize((32, 32), Image.LANCZOS)))
    assert np.array_equal(center_crop_uvit(Image.fromarray(arr), 90), arr[:, 20:110])  # no resize at the crop size
    assert not np.array_equal(center_crop_uvit(Image.fromarray(arr), 32), CROPS["adm"](Image.fromarray(arr), 32))
