"""What a user can get wrong is one line naming the file or the option, exit code 2, within seconds: missing
default weights on an offline machine, truncated or corrupt files."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import core.hub
from conftest import REPO, cpu_env
from test_eval_generate import write_export


@pytest.fixture
def offline(monkeypatch):
    """No network and an empty hub cache, whatever this machine has."""
    monkeypatch.setattr(core.hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(core.hub, "in_hub_cache", lambda repo, filename="config.json": False)


def test_default_weights_that_are_not_here_name_the_option_that_points_at_a_copy(offline, monkeypatch):
    from core.encoders import load_encoder
    from core.latents import build_autoencoder
    from core.text_encoders import load_text_encoder
    from eval import fid

    cases = [(lambda: build_autoencoder("stabilityai/sd-vae-ft-ema"), "the autoencoder 'stabilityai/sd-vae-ft-ema'",
              "point --vae at it"),
             (lambda: load_encoder("dinov2-b", 256), "encoder 'dinov2-b': its weights 'facebook/dinov2-base'",
              "name the copy as dinov2-b@DIR"),
             (lambda: load_text_encoder("clip-l"), "text encoder 'clip-l': its model 'openai/clip-vit-large-patch14'",
              "name the copy as clip-l@DIR")]
    for load, what, how in cases:
        with pytest.raises(core.hub.WeightsUnavailable) as err:
            load()
        assert what in str(err.value) and "is not on this machine and the hub cannot be reached" in str(err.value)
        assert how in str(err.value) and "hf download" in str(err.value)
    assert core.hub.require_weights(REPO, "a local folder", "unused") is None  # a path that exists is fine
    monkeypatch.setattr(fid, "reachable", lambda url: False)
    monkeypatch.setattr(fid.os.path, "isfile", lambda p: False)  # no clean-fid download in /tmp either
    with pytest.raises(core.hub.WeightsUnavailable, match="pass --inception-weights FILE"):
        fid.build_extractor("inception")


def test_an_imported_checkpoint_offline_fails_at_once_with_one_line(tmp_path):
    """The official checkpoint's record names the hub's SD-VAE: offline, eval.generate stops within seconds (it
    used to retry the hub for half a minute and end in a traceback)."""
    export = write_export(tmp_path / "repa.safetensors")
    meta = json.loads(export.with_suffix(".json").read_text())
    meta["latent"] = {"autoencoder": "stabilityai/sd-vae-ft-ema", "scale_factor": 0.18215, "shift": 0.0,
                      "shape": meta["latent"]["shape"]}
    export.with_suffix(".json").write_text(json.dumps(meta))
    env = cpu_env(HF_HOME=str(tmp_path / "empty_hub_cache"))  # HF_HUB_OFFLINE=1 (cpu_env) and nothing cached
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "eval.generate", "--run", str(export), "--num-samples", "2",
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 60, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "the autoencoder 'stabilityai/sd-vae-ft-ema' is not on this machine" in proc.stderr and "--vae" in proc.stderr


def test_a_truncated_reference_npz_is_one_line_naming_it(tmp_path, capsys):
    from eval.fid import main as fid_main

    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    ref.write_bytes(ref.read_bytes()[:100])  # an interrupted download
    images = tmp_path / "samples"
    images.mkdir()
    with pytest.raises(SystemExit) as exc:
        fid_main([str(images), "--ref", str(ref), "--features", "proxy"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{str(ref)!r} is not a readable .npz (truncated" in err and "Traceback" not in err


def test_a_corrupt_weights_file_is_one_line_naming_it(tmp_path, capsys):
    from eval.generate import main as generate_main

    export = write_export(tmp_path / "ema.safetensors")
    export.write_bytes(export.read_bytes()[:-50])  # cut short
    with pytest.raises(SystemExit) as exc:
        generate_main(["--run", str(export), "--num-samples", "1", "--steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is not a readable safetensors file" in err and str(export) in err
    assert err.count("\n") == 1


def test_small_things_a_new_user_meets(tmp_path, capsys):
    """A four-prompt grid is four cells wide; exported weights are as readable as their .json; a FID of a few
    samples says why it is not a FID (no raw 'Matrix is singular' warning)."""
    import warnings

    from core.checkpoint import export_ema  # noqa: F401  (the export path writes through core.fileio.atomic_path)
    from core.fileio import atomic_path
    from eval.fid import main as fid_main
    from safetensors.torch import save_file
    from eval.generate import caption_grid
    import torch

    grid = caption_grid(np.zeros((4, 8, 8, 3), np.uint8), ["a red circle"] * 4)
    assert grid.size[0] == 4 * 160  # one row of four cells, not eight columns with four empty
    with atomic_path(str(tmp_path / "w.safetensors")) as tmp:
        save_file({"w": torch.zeros(2)}, tmp)  # safetensors creates its file 0600
    (tmp_path / "w.json").write_text("{}")
    assert os.stat(tmp_path / "w.safetensors").st_mode & 0o777 == os.stat(tmp_path / "w.json").st_mode & 0o777
    assert "weights/" in open(os.path.join(REPO, ".gitignore")).read().split()
    from PIL import Image

    for d in ("s", "r"):
        (tmp_path / d).mkdir()
        for i in range(6):
            Image.fromarray(np.random.default_rng([i, ord(d)]).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / d / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the run
        fid_main([str(tmp_path / "s"), "--ref", str(tmp_path / "r"), "--features", "proxy", "--no-is"])
    out = capsys.readouterr().out
    assert "note: 6 samples of 64-dimensional features: their covariance is singular" in out
