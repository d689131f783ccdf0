"""eval.report on fake run directories: the header numbers, PROXY labels, copied grids, plots, partial and live runs."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from conftest import REPO, cpu_env
from eval.report import load_run, main, plot_training, read_eval_records, write_report

GLOBAL_BATCH = 32
MAX_STEPS = 600
STEPS = [20 * (i + 1) for i in range(12)]  # a dozen logged steps, the last 240


def write_lines(path, records, torn: str = "") -> None:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + torn)


def metrics_records() -> list[dict]:
    return [{"step": s, "loss": 1.0 / (1 + i), "denoise_loss": 1.2 / (1 + i), "repa_loss": -0.1 * i,
             "grad_norm": 0.5 + 0.1 * i, "lr": 1e-3, "img_per_s": 100.0 + i, "skipped_steps": 0,
             "corrupt_samples": 0} for i, s in enumerate(STEPS)]


def eval_records() -> list[dict]:
    val = {"kind": "val", "num_samples": 64, "held_out": True}
    return [
        {"step": 100, "kind": "eval", "fid": 80.5, "fd_dinov2": 900.0, "num_samples": 1000, "seconds": 12.0,
         "is_proxy": False},
        {"step": 200, "kind": "eval", "proxy_fid": 43.21, "num_samples": 1000, "seconds": 9.0, "is_proxy": True},
        {"step": 100, **val, "val_loss": 0.5, "val_loss@0.1": 0.2, "val_loss@0.5": 0.5, "val_loss@0.9": 0.8},
        {"step": 200, **val, "val_loss": 0.4, "val_loss@0.1": 0.15, "val_loss@0.5": 0.4, "val_loss@0.9": 0.7},
    ]


def grid(path, colour) -> None:
    Image.new("RGB", (64, 48), colour).save(path)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with every file the report reads, as a two-rank run at step 240 leaves it."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    config = {"task": "class_cond", "run": {"dir": str(run), "seed": 0}, "model": {"preset": "tiny"},
              "repa": {"coeff": 0.5, "depth": 2, "encoders": ["dinov2-tiny"]},
              "train": {"global_batch": GLOBAL_BATCH, "max_steps": MAX_STEPS, "lr": 1e-3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_lines(run / "metrics.jsonl", metrics_records())
    write_lines(run / "eval.jsonl", eval_records())
    grid(run / "samples" / "step_00000100.png", (255, 0, 0))
    grid(run / "samples" / "step_00000200.png", (0, 0, 255))
    (run / "samples" / "step_00000300.png.tmp123").write_bytes(b"half")  # a grid being written: not a grid
    for step, ranks in ((100, 4), (200, 2)):  # the newest checkpoint's world size is the one that counts
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step, "world_size": ranks}))
    return run


def test_load_run_reads_every_piece(run_dir):
    run = load_run(str(run_dir))
    assert run["config"]["model"]["preset"] == "tiny"
    assert [r["step"] for r in run["metrics"]] == STEPS
    assert [(r["step"], r["kind"]) for r in run["evals"]] == [(100, "eval"), (100, "val"), (200, "eval"),
                                                             (200, "val")]
    assert [step for step, _ in run["grids"]] == [100, 200]
    assert all(os.path.isfile(path) for _, path in run["grids"])
    assert run["world_size"] == 2 and run["checkpoints"] == [100, 200] and run["exported"] is False


def test_the_page_shows_the_run(run_dir, tmp_path):
    out = tmp_path / "report"
    path = write_report(str(run_dir), str(out))
    assert path == str(out / "index.html")
    page = (out / "index.html").read_text()
    assert str(run_dir) in page and "class_cond" in page and "tiny" in page
    assert f"{STEPS[-1]:,} / {MAX_STEPS:,}" in page
    assert f"{STEPS[-1] * GLOBAL_BATCH:,}" in page  # images seen = 240 x 32 = 7,680
    # median img/s of 100..111 is 105.5 per rank; two ranks (newest checkpoint) give 211.0
    assert "105.5 img/s per rank" in page and "211.0 img/s over 2 ranks" in page
    # the proxy metric is labelled where it is shown, with the sentence saying what it is comparable to
    assert re.search(r"<span class=proxy>PROXY</span> FID \(random-init features", page)
    assert "comparable only to other proxy numbers of the same setup" in page
    assert "43.21" in page and "80.5" in page
    row_of_real_fid = next(row for row in page.split("<tr>") if "80.5" in row)
    assert "PROXY" not in row_of_real_fid  # the real FID is not labelled proxy
    assert "<pre>" in page and "global_batch: 32" in page


def test_grids_are_copied_and_the_page_points_at_them(run_dir, tmp_path):
    out = tmp_path / "report"
    write_report(str(run_dir), str(out))
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    for step, colour in ((100, (255, 0, 0)), (200, (0, 0, 255))):
        name = f"samples_step_{step:08d}.png"
        assert name in sources
        with Image.open(out / name) as im:
            assert im.getpixel((0, 0)) == colour
    assert not any("tmp" in s for s in sources)
    for name in sources:  # every image of the page lies beside it: the folder is self-contained
        assert not os.path.isabs(name) and (out / name).is_file(), name


def test_plots_are_real_pngs(run_dir, tmp_path):
    out = tmp_path / "report"
    write_report(str(run_dir), str(out))
    expected = ["training.png", "validation.png", "eval_fid.png", "eval_fd_dinov2.png", "eval_proxy_fid.png"]
    for name in expected:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200, (name, im.size)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 10, name  # drawn, not blank
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # the atomic writes left no temporaries
    path = plot_training(load_run(str(run_dir)), str(tmp_path / "t.png"))
    with Image.open(path) as im:
        assert im.size == (1100, 750)


def test_a_torn_last_line_is_dropped_and_a_repeated_step_keeps_the_later_record(run_dir):
    records = eval_records() + [{"step": 200, "kind": "eval", "proxy_fid": 40.0, "num_samples": 1000,
                                 "is_proxy": True}]
    write_lines(run_dir / "eval.jsonl", records, torn='{"step": 300, "kind": "eval", "proxy_f')
    got = read_eval_records(str(run_dir))
    assert [(r["step"], r["kind"]) for r in got] == [(100, "eval"), (100, "val"), (200, "eval"), (200, "val")]
    assert next(r for r in got if r["step"] == 200 and r["kind"] == "eval")["proxy_fid"] == 40.0


def test_a_corrupt_line_in_the_middle_names_the_file_and_line(run_dir, capsys):
    (run_dir / "eval.jsonl").write_text('{"step": 100, "kind": "eval", "fid": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"eval\.jsonl, line 2: not JSON"):
        read_eval_records(str(run_dir))
    assert main([str(run_dir)]) == 2
    assert "eval.jsonl, line 2" in capsys.readouterr().err


def test_a_run_with_only_metrics_renders_with_lines_for_what_is_missing(tmp_path, capsys):
    run = tmp_path / "young"
    run.mkdir()
    write_lines(run / "metrics.jsonl", metrics_records()[:3], torn='{"step": 80, "lo')
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "index.html")  # the default --out
    page = (run / "report" / "index.html").read_text()
    assert "No evaluations yet" in page and "No validation losses yet" in page and "No sample grids yet" in page
    assert "No config.yaml" in page and "world size unknown" in page
    assert "60 / " not in page and ">60<" in page  # steps logged without a max_steps to compare with
    assert os.path.isfile(run / "report" / "training.png")


def test_a_run_with_only_a_config_renders(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "config.yaml").write_text("task: t2i\nmodel: {preset: tiny}\ntrain: {global_batch: 8, max_steps: 10}\n")
    with open(write_report(str(run), str(tmp_path / "out"))) as f:
        page = f.read()
    assert "t2i" in page and "No training records yet" in page
    with pytest.raises(ValueError, match="no training records"):
        plot_training(load_run(str(run)), str(tmp_path / "t.png"))


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_run_is_one_line_and_exit_2(tmp_path, capsys, make):
    run = tmp_path / "nope"
    if make == "empty":
        run.mkdir()
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_command_line(run_dir, tmp_path):
    """python -m eval.report as a user runs it: the page at --out, and exit 2 without a traceback for no run."""
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "eval.report", str(run_dir), "--out", str(out)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.html").is_file()
    proc = subprocess.run([sys.executable, "-m", "eval.report", str(tmp_path / "absent")], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path / "absent") in proc.stderr and "Traceback" not in proc.stderr
