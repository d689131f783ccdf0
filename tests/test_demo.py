"""A shortened `make demo`: the whole pipeline runs and writes every promised output."""
import json

from conftest import run_train


def test_shortened_demo_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    proc = run_train(["--out", str(out), "--train-images", "64", "--steps", "6", "--samples", "8",
                      "--sde-steps", "10"], script="t2i/demo.py", timeout=600)
    for name in ("samples_ode.png", "samples_sde.png", "loss.png", "metrics.json", "report.md"):
        assert (out / name).is_file(), name
    m = json.load(open(out / "metrics.json"))
    assert m["ode"]["num_samples"] == 8 and m["sde"]["nfe"] == 10
    assert 0 <= m["ode"]["colour_match"]["both"] <= 1 and m["ode"]["proxy_fid"] > 0
    report = (out / "report.md").read_text()
    assert "PROXY FID" in report and "random-init" in report and "deepspeed --num_gpus 2" in report
    assert "PROXY FID (random-init features" in proc.stdout  # the printed number is labelled too
    # what the training showed of itself while it ran: its grids, validation curve, proxy scores, its own page
    assert "## While it trained" in report and m["in_training"] and "proxy_clip_score" in m["in_training"][-1]
    for name in ("first_grid", "last_grid", "validation", "page"):
        assert (out / m["pictures"][name]).is_file(), name
