"""Lever ablation: core.bench once per lever of a suite, each run in its own process, then one table.

    python -m core.bench_suite configs/bench/sit_xl2_in256.yaml          # one H100: the levers of the target
    python -m core.bench_suite configs/bench/class_cond_tiny.yaml        # anywhere, about two minutes
    python -m core.bench_suite --table outputs/bench.jsonl               # the table of lines written before

A suite (YAML, configs/bench/) names a training config, the core.bench arguments every run shares, and one entry
per lever: a label plus the overrides and flags that make it. The first lever is the baseline the others are
compared with. Each run is `python -m core.bench --config CONFIG ARGS --label LABEL --out OUT OVERRIDES` in a
fresh process, so a run that fails (CUDA out of memory at a batch that does not fit, a compile error) or passes
`--timeout` ends alone and is recorded as a failed line with its reason; `--deadline` stops starting runs when the
time left is short. `--repeat N` runs N rounds of all the levers, round-robin, so a drifting machine does not bias
the levers run last. The table lists, per lever: images/s per device (the median over repeats, with its range),
ms per step, peak memory, MFU (without and with the encoder forward) and the change against the baseline, under
the device, date, commit and command.
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import yaml

from core.bench import report
from core.fileio import append_line

SUITE_KEYS = {"config", "args", "launcher", "runs", "about"}
RUN_KEYS = {"label", "overrides", "args"}


class SuiteError(ValueError):
    pass


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SuiteError(f"{where} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_suite(path: str) -> dict:
    """The suite at `path`, checked: {"config", "args", "launcher", "runs": [{"label", "overrides", "args"}]}."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise SuiteError(f"cannot read suite {path}: {err.strerror or err}") from err
    if not isinstance(raw, dict):
        raise SuiteError(f"suite {path} must be a mapping with keys {sorted(SUITE_KEYS)}")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"suite {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(SUITE_KEYS))}")
    if not isinstance(raw.get("config"), str):
        raise SuiteError(f"suite {path}: 'config' (the training YAML to benchmark) is missing")
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SuiteError(f"suite {path}: 'runs' must be a non-empty list of {{label, overrides, args}}")
    checked, labels = [], set()
    for i, run in enumerate(runs):
        where = f"suite {path}, runs[{i}]"
        if not isinstance(run, dict) or not isinstance(run.get("label"), str) or not run["label"]:
            raise SuiteError(f"{where}: each run needs a 'label' (text naming the lever)")
        bad = sorted(set(run) - RUN_KEYS)
        if bad:
            raise SuiteError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(sorted(RUN_KEYS))}")
        if not all(c.isalnum() or c in "-_.+" for c in run["label"]):  # it names the run's log file
            raise SuiteError(f"{where}: label {run['label']!r} may hold letters, digits and - _ . + only")
        if run["label"] in labels:
            raise SuiteError(f"{where}: label {run['label']!r} is used twice")
        labels.add(run["label"])
        checked.append({"label": run["label"], "overrides": _strings(run.get("overrides"), f"{where}.overrides"),
                        "args": _strings(run.get("args"), f"{where}.args")})
    return {"config": raw["config"], "args": _strings(raw.get("args"), f"suite {path}: args"),
            "launcher": _strings(raw.get("launcher"), f"suite {path}: launcher") or [sys.executable, "-m"],
            "runs": checked, "about": str(raw.get("about", "")).strip()}


def run_command(suite: dict, run: dict, out: str) -> list[str]:
    """The core.bench command line of one lever (the suite's launcher, then the module and its arguments)."""
    return [*suite["launcher"], "core.bench", "--config", suite["config"], *suite["args"], *run["args"],
            "--label", run["label"], "--out", out, *run["overrides"]]


def failure_reason(log: str) -> str:
    """The line of a failed run's output that says why: its last error line, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Killed" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run(cmd: list[str], log_path: str, timeout: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, the output) of `cmd`, its output also written to `log_path`. The run is
    its own process group, killed whole (a launcher's ranks too) on timeout, Ctrl-C or SIGTERM: an orphaned run
    would keep the GPU's memory and spoil the runs after it."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException as err:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not isinstance(err, subprocess.TimeoutExpired):
                    raise
                rc = None
    finally:
        signal.signal(signal.SIGTERM, previous)
    with open(log_path, errors="replace") as f:
        return rc, f.read()


def run_suite(suite_path: str, out: str, logs: str, timeout: float, deadline: float | None,
              only: list[str] | None, repeat: int = 1) -> list[dict]:
    """Run the suite's levers, `repeat` rounds of all of them (round-robin, so a drift of the machine spreads over
    every lever instead of biasing the last ones); return this session's JSON records (bench results and failures)
    in run order."""
    suite = load_suite(suite_path)
    runs = suite["runs"]
    if repeat < 1:
        raise SuiteError(f"--repeat must be >= 1, got {repeat}")
    if only:
        missing = [label for label in only if label not in {r["label"] for r in runs}]
        if missing:
            raise SuiteError(f"--only {missing[0]!r} is not a label of {suite_path}: "
                             f"{', '.join(r['label'] for r in runs)}")
        runs = [r for r in runs if r["label"] in only]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    schedule = [(k, run) for k in range(repeat) for run in runs]
    start, records = time.monotonic(), []
    for i, (k, run) in enumerate(schedule):
        cmd = run_command(suite, run, out)
        shown = " ".join(shlex.quote(c) for c in ["python", "-m", *cmd[len(suite["launcher"]):]]) \
            if suite["launcher"] == [sys.executable, "-m"] else " ".join(shlex.quote(c) for c in cmd)
        left = None if deadline is None else deadline - (time.monotonic() - start)
        if left is not None and left < 1:
            record = {"label": run["label"], "command": shown, "failed": "not run: --deadline reached"}
        else:
            print(f"[{i + 1}/{len(schedule)}] {run['label']}: {shown}", flush=True)
            before = len(_read_lines(out)) if os.path.exists(out) else 0
            log_path = os.path.join(logs, f"{run['label']}.log" if repeat == 1 else f"{run['label']}.{k + 1}.log")
            t0 = time.monotonic()
            rc, text = _run(cmd, log_path, timeout if left is None else min(timeout, left))
            written = _read_lines(out)[before:] if rc == 0 else []
            if rc == 0 and written:
                record = written[-1]
                print(report(record), flush=True)
            else:
                why = f"timed out after {time.monotonic() - t0:.0f} s" if rc is None else failure_reason(text)
                record = {"label": run["label"], "command": shown, "failed": why, "rc": rc, "log": log_path}
                print(f"  failed: {why} (log: {log_path})", flush=True)
        if "failed" in record:
            record.update(date=datetime.datetime.now().isoformat(timespec="seconds"), suite=suite_path)
            append_line(out, json.dumps(record))
        records.append(record)
    return records


def _read_lines(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SuiteError(f"{path} line {n} is not a JSON line ({err.msg})") from err
    return records


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _changes(r: dict) -> str:
    """The overrides and lever flags of a result record, as the table's "what changes" cell."""
    cmd = r.get("command", "")
    flags = [f for f in ("--features", "--data loader") if f in cmd]
    return " ".join(x for x in [" ".join(r.get("overrides", []))] + flags if x) or "—"


def table(records: list[dict]) -> str:
    """A markdown table of benchmark records: one row per label (its repeats merged: medians, with the range of
    images/s when there are several), the first label with a successful step as the baseline."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get("label") or "(no label)", []).append(r)
    heads = sorted({(r["device"], r.get("torch", ""), r.get("commit", "")) for r in records if "device" in r})
    dates = sorted(r["date"][:10] for r in records if r.get("date"))
    devices = "; ".join(f"{d} (torch {t}, commit {c or '?'})" for d, t, c in heads) or "unknown"
    when = f"{dates[0]} to {dates[-1]}" if dates and dates[-1] != dates[0] else (dates[0] if dates else "?")
    lines = [f"Device: {devices}; date {when}"]
    configs = sorted({r["config"] for r in records if "config" in r})
    if configs:
        lines.append(f"Config: {', '.join(configs)}")
    lines += ["", "| lever | what changes | img/s per device | ms/step | peak mem GiB | MFU | MFU incl. encoder | "
                  "vs first |", "|---|---|---|---|---|---|---|---|"]
    base, first_cmd = None, None
    for label, group in groups.items():
        ok = [r for r in group if r.get("mode") == "step"]
        loader = [r for r in group if r.get("mode") == "loader-only"]
        failed = [r for r in group if "failed" in r]
        note = f"; {len(failed)} of {len(group)} runs failed: {failed[-1]['failed']}" if failed and (ok or loader) else ""
        if not ok and not loader:
            lines.append(f"| {label} | `{failed[-1].get('command', '')}` | failed: {failed[-1]['failed']} | | | | | |")
            continue
        if loader:
            rates = [r["samples_per_s"] for r in loader]
            spread = f" ({min(rates):.1f}–{max(rates):.1f}, n={len(rates)})" if len(rates) > 1 else ""
            lines.append(f"| {label} | loader only, {loader[0]['num_workers']} workers: `{_changes(loader[0])}`{note} "
                         f"| {_median(rates):.1f} samples/s{spread} | "
                         f"{_median([r['ms_per_batch_median'] for r in loader]):.1f} per batch | | | | |")
            continue
        img = [r["img_per_s_per_device"] for r in ok]
        spread = f" ({min(img):.1f}–{max(img):.1f}, n={len(img)})" if len(img) > 1 else ""
        mfu = [r["mfu"] for r in ok if r.get("mfu") is not None]
        mfu_enc = [r["mfu_with_encoder"] for r in ok if r.get("mfu_with_encoder") is not None]
        if base is None:
            base, first_cmd, vs = _median(img), ok[0].get("command", ""), "—"
        else:
            vs = f"{100 * (_median(img) / base - 1):+.0f}%"
        lines.append(f"| {label} | `{_changes(ok[0])}`{note} | {_median(img):.1f}{spread} | "
                     f"{_median([r['ms_per_step_median'] for r in ok]):.1f} | "
                     f"{max(r['peak_memory_gib'] for r in ok):.1f} | {_pct(_median(mfu) if mfu else None)} | "
                     f"{_pct(_median(mfu_enc) if mfu_enc else None)} | {vs} |")
    if first_cmd:
        lines += ["", f"Each row: `{first_cmd}` with the row's changes (the command of each run is in its JSON "
                      "line); with repeats, the medians over them."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.bench_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", nargs="?", help="suite YAML, e.g. configs/bench/sit_xl2_in256.yaml")
    p.add_argument("--table", metavar="JSONL", help="print the table of an existing bench JSON lines file; run nothing")
    p.add_argument("--out", default="outputs/bench.jsonl", help="JSON lines file appended to (default %(default)s)")
    p.add_argument("--logs", default="outputs/bench_logs", help="one log per run (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one run may take (default %(default)s)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole suite: runs not started by then are recorded as not run")
    p.add_argument("--only", default=None, help="comma-separated labels to run (default: all)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all the levers, round-robin; the table shows medians and the range (default 1)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if bool(args.suite) == bool(args.table):
        print("core.bench_suite: give a suite YAML to run, or --table JSONL to print, not both", file=sys.stderr)
        return 2
    try:
        if args.table:
            if not os.path.exists(args.table):
                raise SuiteError(f"--table {args.table}: no such file")
            records = _read_lines(args.table)
        else:
            records = run_suite(args.suite, args.out, args.logs, args.timeout, args.deadline,
                                args.only.split(",") if args.only else None, args.repeat)
    except SuiteError as err:
        print(f"core.bench_suite: {err}", file=sys.stderr)
        return 2
    text = table(records)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 1 if any("failed" in r for r in records) and not args.table else 0


if __name__ == "__main__":
    sys.exit(main())
