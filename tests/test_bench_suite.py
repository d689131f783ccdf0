"""core.bench_suite: one core.bench process per lever of a suite, failures recorded with their reason, one table."""
import json
import os
import subprocess
import sys

import pytest

from core import bench_suite
from conftest import REPO, cpu_env

SUITES = os.path.join(REPO, "configs", "bench")


def write_suite(tmp_path, text: str) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return str(path)


def suite_cli(*args):
    return subprocess.run([sys.executable, "-m", "core.bench_suite", *args], cwd=REPO,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("name", sorted(os.listdir(SUITES)))
def test_shipped_suites_load_and_name_existing_configs(name):
    suite = bench_suite.load_suite(os.path.join(SUITES, name))
    assert os.path.isfile(os.path.join(REPO, suite["config"]))
    for run in suite["runs"]:
        for o in run["overrides"]:
            key, _, value = o.partition("=")
            if key == "train.ds_config":
                assert os.path.isfile(os.path.join(REPO, value)), o
    assert suite["runs"][0]["label"].endswith("baseline")


@pytest.mark.parametrize("text, message", [
    ("runs: [{label: a}]", "'config' (the training YAML to benchmark) is missing"),
    ("config: c.yaml\nrunz: []", "unknown key 'runz'; valid keys: about, args, config, launcher, runs"),
    ("config: c.yaml\nruns: []", "'runs' must be a non-empty list"),
    ("config: c.yaml\nruns: [{overrides: [a=1]}]", "runs[0]: each run needs a 'label'"),
    ("config: c.yaml\nruns: [{label: a}, {label: a}]", "runs[1]: label 'a' is used twice"),
    ("config: c.yaml\nruns: [{label: a, overrides: train.compile=true}]", "runs[0].overrides must be a list"),
    ("config: c.yaml\nruns: [{label: a, flags: [x]}]", "runs[0]: unknown key 'flags'"),
    ("config: c.yaml\nruns: [{label: zero1/fp32}]", "label 'zero1/fp32' may hold letters, digits and - _ . + only"),
])
def test_bad_suites_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(bench_suite.SuiteError, match=None) as err:
        bench_suite.load_suite(write_suite(tmp_path, text))
    assert message in str(err.value)


def test_a_suite_runs_each_lever_and_records_a_failure_with_its_reason(tmp_path):
    suite = write_suite(tmp_path, "config: configs/debug/class_cond_tiny.yaml\n"
                                  "args: [--steps, 2, --warmup, 0]\n"
                                  "runs:\n"
                                  "  - {label: baseline, overrides: [train.global_batch=8]}\n"
                                  "  - {label: bad-batch, overrides: [train.global_batch=8, train.micro_batch=3]}\n")
    out, md = tmp_path / "b.jsonl", tmp_path / "table.md"
    proc = suite_cli(suite, "--out", str(out), "--logs", str(tmp_path / "logs"), "--markdown", str(md))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one lever failed
    ok, bad = [json.loads(line) for line in out.read_text().splitlines()]
    assert ok["label"] == "baseline" and ok["mode"] == "step" and ok["batch_per_device"] == 8
    assert bad["label"] == "bad-batch" and bad["rc"] == 2 and "train.micro_batch=3" in bad["command"]
    assert bad["failed"].startswith("config error:") and "multiple of the micro-batch" in bad["failed"]
    assert os.path.isfile(bad["log"])
    text = md.read_text()
    assert "| baseline | `train.global_batch=8` |" in text and "| bad-batch |" in text
    assert "failed: config error:" in text and "images/s per device" in proc.stdout
    # The table of the file alone gives the same rows.
    again = suite_cli("--table", str(out))
    assert again.returncode == 0 and "| baseline |" in again.stdout and "failed: config error:" in again.stdout


def test_deadline_records_the_runs_it_did_not_start(tmp_path):
    suite = write_suite(tmp_path, "config: configs/debug/class_cond_tiny.yaml\nruns: [{label: a}, {label: b}]\n")
    out = tmp_path / "b.jsonl"
    records = bench_suite.run_suite(suite, str(out), str(tmp_path / "logs"), timeout=60, deadline=0, only=None)
    assert [r["failed"] for r in records] == ["not run: --deadline reached"] * 2
    assert len(out.read_text().splitlines()) == 2 and not os.listdir(tmp_path / "logs")


def test_only_names_unknown_labels(tmp_path):
    suite = write_suite(tmp_path, "config: configs/debug/class_cond_tiny.yaml\nruns: [{label: a}, {label: b}]\n")
    with pytest.raises(bench_suite.SuiteError, match="--only 'c' is not a label of .*: a, b"):
        bench_suite.run_suite(suite, str(tmp_path / "b.jsonl"), str(tmp_path / "logs"), 60, None, ["a", "c"])


def test_a_run_past_its_timeout_is_killed(tmp_path):
    rc, _ = bench_suite._run([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"],
                             str(tmp_path / "log"), timeout=2)
    assert rc is None and (tmp_path / "log").read_text() == "x\n"


def test_a_stopped_suite_kills_its_running_benchmark(tmp_path):
    """SIGTERM (or Ctrl-C) to the suite must not leave the run it started behind (it would keep the GPU)."""
    import signal
    import time

    log = tmp_path / "log"
    script = ("import sys; from core.bench_suite import _run; "
              f"_run([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'], "
              f"{str(log)!r}, 120)")
    suite = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=cpu_env())
    for _ in range(100):
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.1)
    child = int(log.read_text())
    suite.send_signal(signal.SIGTERM)
    assert suite.wait(timeout=30) != 0
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_blank_line_in_the_output_file_does_not_hide_a_result(tmp_path, monkeypatch):
    out = tmp_path / "b.jsonl"
    out.write_text(json.dumps({"label": "old", "failed": "x"}) + "\n\n")
    suite = write_suite(tmp_path, "config: configs/debug/class_cond_tiny.yaml\nruns: [{label: a}]\n")

    def fake_run(cmd, log_path, timeout):  # the bench appends its line and exits 0
        with open(out, "a") as f:
            f.write(json.dumps(step_record("a", 100.0)) + "\n")
        return 0, ""

    monkeypatch.setattr(bench_suite, "_run", fake_run)
    monkeypatch.setattr(bench_suite, "report", lambda r: "")
    (record,) = bench_suite.run_suite(suite, str(out), str(tmp_path / "logs"), 60, None, None)
    assert record["label"] == "a" and "failed" not in record


def test_failure_reason_prefers_the_error_line():
    log = "loading\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n[rank0] exiting\n"
    assert bench_suite.failure_reason(log).startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert bench_suite.failure_reason("a\nb\n") == "b" and bench_suite.failure_reason("") == "(no output)"


def step_record(label, img_s, mfu=None, **kw):
    return {"mode": "step", "label": label, "device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "commit": "abc",
            "date": "2026-11-30T10:00:00", "config": "configs/x.yaml", "overrides": kw.get("overrides", []),
            "command": "python -m core.bench --config configs/x.yaml" + kw.get("flags", ""),
            "img_per_s_per_device": img_s, "ms_per_step_median": 256e3 / img_s, "peak_memory_gib": 60.0,
            "mfu": mfu, "mfu_with_encoder": None if mfu is None else mfu * 1.06}


def test_table_compares_with_the_first_step_record():
    records = [step_record("baseline", 400.0, 0.293),
               step_record("compile", 500.0, 0.366, overrides=["train.compile=true"]),
               step_record("features", 420.0, 0.307, flags=" --features"),
               {"label": "batch512", "command": "python -m core.bench ... train.global_batch=512",
                "failed": "torch.OutOfMemoryError: CUDA out of memory", "date": "2026-11-30T10:30:00"},
               {"mode": "loader-only", "label": "loader", "num_workers": 4, "samples_per_s": 1234.5,
                "ms_per_batch_median": 207.4, "overrides": ["train.num_workers=4"], "command": "..."}]
    text = bench_suite.table(records)
    assert "Device: NVIDIA H100 80GB HBM3 (torch 2.13.0, commit abc); date 2026-11-30" in text
    assert "| baseline | `—` | 400.0 | 640.0 | 60.0 | 29.3% | 31.1% | — |" in text
    assert "| compile | `train.compile=true` | 500.0 | 512.0 | 60.0 | 36.6% | 38.8% | +25% |" in text
    assert "| features | `--features` | 420.0 |" in text and "| +5% |" in text
    assert "| batch512 | `python -m core.bench ... train.global_batch=512` | failed: torch.OutOfMemoryError" in text
    assert "| loader | loader only, 4 workers: `train.num_workers=4` | 1234.5 samples/s | 207.4 per batch |" in text


def test_repeats_run_round_robin_and_the_table_shows_medians_and_range(tmp_path, monkeypatch):
    suite = write_suite(tmp_path, "config: configs/debug/class_cond_tiny.yaml\nruns: [{label: a}, {label: b}]\n")
    out, order = tmp_path / "b.jsonl", []
    rates = {"a": iter([100.0, 120.0, 110.0]), "b": iter([150.0, 0, 160.0])}

    def fake_run(cmd, log_path, timeout):
        label = cmd[cmd.index("--label") + 1]
        order.append((label, os.path.basename(log_path)))
        rate = next(rates[label])
        if not rate:
            return 1, "torch.OutOfMemoryError: CUDA out of memory"
        with open(out, "a") as f:
            f.write(json.dumps(step_record(label, rate, 0.1 * rate / 100)) + "\n")
        return 0, ""

    monkeypatch.setattr(bench_suite, "_run", fake_run)
    monkeypatch.setattr(bench_suite, "report", lambda r: "")
    records = bench_suite.run_suite(suite, str(out), str(tmp_path / "logs"), 60, None, None, repeat=3)
    assert order == [("a", "a.1.log"), ("b", "b.1.log"), ("a", "a.2.log"), ("b", "b.2.log"), ("a", "a.3.log"),
                     ("b", "b.3.log")]
    assert [r.get("failed") for r in records].count("torch.OutOfMemoryError: CUDA out of memory") == 1
    text = bench_suite.table(records)
    assert "| a | `—` | 110.0 (100.0–120.0, n=3) | 2327.3 | 60.0 | 11.0% | 11.7% | — |" in text
    assert "| b | `—`; 1 of 3 runs failed: torch.OutOfMemoryError: CUDA out of memory | 155.0 (150.0–160.0, n=2) |" in text
    assert "| +41% |" in text
    with pytest.raises(bench_suite.SuiteError, match="--repeat must be >= 1, got 0"):
        bench_suite.run_suite(suite, str(out), str(tmp_path / "logs"), 60, None, None, repeat=0)


def test_table_mode_names_a_bad_file(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"label": "a"}\nnot json\n')
    proc = suite_cli("--table", str(bad))
    assert proc.returncode == 2 and "line 2 is not a JSON line" in proc.stderr
    proc = suite_cli("--table", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = suite_cli()
    assert proc.returncode == 2 and "give a suite YAML to run, or --table JSONL" in proc.stderr
