"""One self-contained HTML page about a training run directory, to see at a glance how a run is going.

    python -m eval.report runs/x                 # writes runs/x/report/index.html and its PNGs beside it
    python -m eval.report runs/x --out /tmp/x    # anywhere else

The page: the run's position (steps, images seen, throughput), the training losses and the grad norm, the
validation losses at fixed times, the in-training evaluations (one plot per metric; PROXY ones labelled), the first
and the latest sample grid (copied beside the page) and the resolved config. It reads what is there, so it works on a
run still training (a torn last line of a JSONL file is dropped) and on one with only some of its files; a missing
piece is a line on the page.
"""
import argparse
import html
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

import yaml

from core.checkpoint import list_checkpoints, read_state
from core.fileio import atomic_path, write_text_atomic
from core.logging import EVALS, read_metrics

GRID_RE = re.compile(r"^step_(\d{8,})\.png$")  # monitor's samples/step_NNNNNNNN.png; skips `.tmpPID` leftovers
LOSS_KEYS = ("loss", "denoise_loss", "repa_loss")
VARIANT_LOSS_KEYS = ("attn_loss", "disp_loss")  # the REPA family's other terms, plotted when a run logs them
EVAL_META_KEYS = ("step", "kind", "num_samples", "seconds", "is_proxy", "held_out")
METRIC_NAMES = {"fid": ("FID", "lower is better"), "fd_dinov2": ("FD-DINOv2", "lower is better"),
                "clip_score": ("CLIP score", "higher is better")}
PROXY_NOTE = ("PROXY numbers come from random-init features and are comparable only to other proxy numbers of the "
              "same setup (never to a published FID or to numbers of real features).")
HTML_NAME = "index.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; }
.proxy { background: #c00; color: #fff; font-weight: bold; padding: 0 .3em; border-radius: 3px; }
.note { color: #a00; }
.missing { color: #777; font-style: italic; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


# ------------------------------------------------------------------------------------------------------- reading


def read_eval_records(run_dir: str) -> list[dict]:
    """The records of run_dir/eval.jsonl (kind "eval" or "val"), sorted by step then kind; [] without the file.

    A last line without its newline is being written (or was torn by a kill) and is dropped; a step logged twice
    for the same kind (a resumed run replaying it) keeps its later record. ValueError naming the file and line for a
    line that is not a JSON object with a "step" and a "kind"."""
    path = os.path.join(run_dir, EVALS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    by_key = {}
    for number, line in enumerate(lines[:-1], 1):  # the piece after the last newline is torn or empty
        if line.strip():
            record = _parse_eval_line(path, number, line)
            by_key[(record["step"], record["kind"])] = record
    return [by_key[k] for k in sorted(by_key)]


def _parse_eval_line(path: str, number: int, line: str) -> dict:
    """One line of eval.jsonl as a dict; ValueError naming `path` and line `number` when it is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "kind" not in record:
        raise ValueError(f"{path}, line {number}: a record needs an integer \"step\" and a \"kind\"")
    return record


def read_config(run_dir: str) -> dict:
    """run_dir/config.yaml as a dict ({} without the file); ValueError naming the file when it is not a mapping."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if config is None:  # written but still empty
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of config sections, got {type(config).__name__}")
    return config


def list_grids(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the sample grids run_dir/samples/step_NNNNNNNN.png, oldest first."""
    folder = os.path.join(run_dir, "samples")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := GRID_RE.match(name))]
    return sorted(found)


def read_world_size(checkpoints: list[tuple[int, str]]) -> int | None:
    """The "world_size" of the newest checkpoint's state.json among `checkpoints` [(step, path)], or None."""
    for _, path in reversed(checkpoints):
        try:
            size = read_state(path).get("world_size")
        except (OSError, ValueError):  # removed by keep_last since it was listed: an older one still tells
            continue
        if isinstance(size, int) and size > 0:
            return size
    return None


def load_run(run_dir: str) -> dict:
    """Everything the report shows of `run_dir`: {"run_dir", "config" (dict, {} without config.yaml), "metrics"
    (core.logging.read_metrics), "evals" (read_eval_records), "grids" ([(step, path)]), "world_size" (int or None),
    "checkpoints" ([step]), "exported" (bool: export/ema.safetensors exists), "metrics_mtime" (float or None)}.

    FileNotFoundError when `run_dir` is not a directory or holds neither metrics.jsonl nor config.yaml;
    ValueError naming the file for one that cannot be read."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path) and not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"{run_dir}: not a run directory (neither metrics.jsonl nor config.yaml in it)")
    try:
        metrics = read_metrics(run_dir)
    except (ValueError, KeyError) as err:  # read_metrics' own errors do not name the file
        raise ValueError(f"{metrics_path}: a line is not a metrics record ({err})") from None
    checkpoints = list_checkpoints(run_dir)
    return {"run_dir": run_dir, "config": read_config(run_dir), "metrics": metrics,
            "evals": read_eval_records(run_dir), "grids": list_grids(run_dir),
            "world_size": read_world_size(checkpoints), "checkpoints": [step for step, _ in checkpoints],
            "exported": os.path.isfile(os.path.join(run_dir, "export", "ema.safetensors")),
            "metrics_mtime": os.path.getmtime(metrics_path) if os.path.isfile(metrics_path) else None}


# ----------------------------------------------------------------------------------------------------- numbers


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records with a finite number under `key`."""
    kept = [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]
    return [s for s, _ in kept], [v for _, v in kept]


def summarize(run: dict) -> dict:
    """The header numbers of a load_run dict: {"step" (last logged or None), "max_steps", "global_batch",
    "images_seen" (step x global batch), "img_per_s_rank" (median over the records), "img_per_s_total" (that x the
    world size)}; a value that cannot be told is None."""
    train = _section(run["config"], "train")
    step = run["metrics"][-1]["step"] if run["metrics"] else None
    batch = train.get("global_batch") if isinstance(train.get("global_batch"), int) else None
    rates = series(run["metrics"], "img_per_s")[1]
    per_rank = statistics.median(rates) if rates else None
    total = per_rank * run["world_size"] if per_rank is not None and run["world_size"] else None
    return {"step": step, "max_steps": train.get("max_steps"), "global_batch": batch,
            "images_seen": step * batch if step is not None and batch else None,
            "img_per_s_rank": per_rank, "img_per_s_total": total}


def eval_metric_series(evals: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric key: (steps, values)} of the kind "eval" records. A metric of a record with "is_proxy" true is keyed
    "proxy_<name>" even where the writer left the prefix off, so proxy and real numbers never share a series."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in evals:
        if record["kind"] != "eval":
            continue
        for key, value in record.items():
            if key in EVAL_META_KEYS or not _finite(value):
                continue
            name = key if key.startswith("proxy_") or not record.get("is_proxy") else f"proxy_{key}"
            steps, values = out.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return out


def metric_title(key: str) -> str:
    """The display name of an eval metric key: "FID", "PROXY FD-DINOv2 (random-init features)", ..."""
    base = key.removeprefix("proxy_")
    name, direction = METRIC_NAMES.get(base, (base, ""))
    title = f"PROXY {name} (random-init features)" if key.startswith("proxy_") else name
    return f"{title}, {direction}" if direction else title


def val_times(records: list[dict]) -> list[tuple[float, str]]:
    """[(t, key)] of the "val_loss@t" keys of `records`, by time."""
    keys = {key for r in records for key in r if key.startswith("val_loss@")}
    found = []
    for key in keys:
        try:
            found.append((float(key.split("@", 1)[1]), key))
        except ValueError:  # a key of another writer's format: shown nowhere rather than misread
            continue
    return sorted(found)


# ------------------------------------------------------------------------------------------------------- plots


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    # heavy (matplotlib): imported only for the plots; the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), as matplotlib requires

    return plt


def _images_axis(ax, global_batch: int | None) -> None:
    """A second x-axis on top of `ax` in images seen (step x `global_batch`), when the batch is known."""
    if not global_batch:
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: s * global_batch, lambda n: n / global_batch))
    top.set_xlabel("images seen")
    top.xaxis.set_major_formatter(_eng_formatter())


def _eng_formatter():
    # heavy (matplotlib): the tick formatter lives beside pyplot, imported only for the plots
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")


def _save(fig, path: str) -> str:
    """Save `fig` to `path` atomically (a browser reloading the page never sees half a PNG), close it; returns path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _pyplot().close(fig)
    return path


def plot_training(run: dict, path: str) -> str:
    """The training curves of a load_run dict (loss, denoise_loss, repa_loss, the REPA family's attn_loss and
    disp_loss when logged, grad_norm against steps, images seen on top) as a PNG at `path`; returns `path`.
    ValueError when the run has no training records."""
    if not run["metrics"]:
        raise ValueError(f"{os.path.join(run['run_dir'], 'metrics.jsonl')}: no training records to plot")
    plt = _pyplot()
    batch = summarize(run)["global_batch"]
    extra = [k for k in VARIANT_LOSS_KEYS if any(k in r for r in run["metrics"])]
    keys = (*LOSS_KEYS, *extra, "grad_norm")
    rows = (len(keys) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.75 * rows), squeeze=False)
    titles = {"loss": "total loss", "denoise_loss": "denoising loss", "repa_loss": "REPA loss (negative cosine)",
              "attn_loss": "attention distillation (cross-entropy)", "disp_loss": "dispersive loss",
              "grad_norm": "grad norm"}
    colours = ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key, colour in zip(axes.flat, keys, colours[:len(keys) - 1] + ("tab:red",)):
        steps, values = series(run["metrics"], key)
        ax.set(title=titles[key], xlabel="step")
        if not steps:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.plot(steps, values, color=colour, marker="." if len(steps) < 50 else None)
        if key == "grad_norm" and min(values) > 0 and max(values) > 10 * min(values):  # spikes: keep the baseline
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        _images_axis(ax, batch)
    fig.tight_layout()
    return _save(fig, path)


def plot_validation(run: dict, path: str) -> str:
    """The validation losses of a load_run dict (one line per time t, the mean dashed) as a PNG at `path`;
    returns `path`. ValueError when the run has no validation records."""
    records = [r for r in run["evals"] if r["kind"] == "val"]
    if not records:
        raise ValueError(f"{os.path.join(run['run_dir'], 'eval.jsonl')}: no validation records to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    times = val_times(records)
    colours = plt.get_cmap("viridis")([i / max(len(times) - 1, 1) for i in range(len(times))])
    for (t, key), colour in zip(times, colours):
        ax.plot(*series(records, key), marker=".", color=colour, label=f"t = {t:g}")
    steps, values = series(records, "val_loss")
    if steps:
        ax.plot(steps, values, "k--", marker=".", label="mean")
    held_out = all(r.get("held_out", True) for r in records)
    ax.set(title="validation loss at fixed times" + ("" if held_out else " (training subset, not held out)"),
           xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    _images_axis(ax, summarize(run)["global_batch"])
    fig.tight_layout()
    return _save(fig, path)


def plot_eval_metric(key: str, steps: list[int], values: list[float], global_batch: int | None, path: str) -> str:
    """One small plot of the eval metric `key` (its values at `steps`) as a PNG at `path`; returns `path`. A proxy
    metric says PROXY in its title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(steps, values, marker="o", color="tab:red" if key.startswith("proxy_") else "tab:green")
    ax.set_title(metric_title(key), fontsize="medium", color="#c00" if key.startswith("proxy_") else "black")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    _images_axis(ax, global_batch)
    fig.tight_layout()
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------------- page


def _fmt(value, spec: str = ",") -> str:
    return "?" if value is None else format(value, spec)


def header_html(run: dict) -> str:
    """The table of the run's identity and position."""
    config, s = run["config"], summarize(run)
    missing = "<span class=missing>not in config.yaml</span>"
    task = html.escape(str(config["task"])) if "task" in config else missing
    preset = _section(config, "model").get("preset")
    steps = "<span class=missing>no training records yet</span>" if s["step"] is None else f"{s['step']:,}"
    if s["step"] is not None and isinstance(s["max_steps"], int) and s["max_steps"] > 0:
        steps += f" / {s['max_steps']:,} ({100 * s['step'] / s['max_steps']:.0f}%)"
    images = f"{s['images_seen']:,} (step x global batch {s['global_batch']:,})" if s["images_seen"] else (
        "<span class=missing>unknown (needs a logged step and train.global_batch)</span>")
    rows = [("run directory", f"<code>{html.escape(os.path.abspath(run['run_dir']))}</code>"), ("task", task),
            ("model preset", html.escape(str(preset)) if preset is not None else missing),
            ("steps logged", steps), ("images seen", images), ("throughput", throughput_html(run, s)),
            ("checkpoints", checkpoints_html(run)), ("last record", last_record_html(run))]
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def throughput_html(run: dict, s: dict) -> str:
    """Images per second per rank (median of the records), and over all ranks when the world size is known."""
    if s["img_per_s_rank"] is None:
        return "<span class=missing>no img_per_s logged yet</span>"
    count = len(series(run["metrics"], "img_per_s")[0])
    text = f"{s['img_per_s_rank']:,.1f} img/s per rank (median of {count} records)"
    if s["img_per_s_total"] is None:
        return text + ", world size unknown (no checkpoint's state.json yet)"
    return text + (f"; {s['img_per_s_total']:,.1f} img/s over {run['world_size']} rank{'s' * (run['world_size'] != 1)} (world size from the "
                   "newest checkpoint's state.json)")


def checkpoints_html(run: dict) -> str:
    """The checkpoint steps and whether the EMA export (training finished) is there."""
    steps = ", ".join(f"{s:,}" for s in run["checkpoints"]) or "none yet"
    return steps + ("; export/ema.safetensors written (training finished)" if run["exported"] else "")


def last_record_html(run: dict) -> str:
    """The newest training record's values and when metrics.jsonl was last written (a stalled run shows here)."""
    if not run["metrics"]:
        return "<span class=missing>none</span>"
    last = run["metrics"][-1]
    parts = [f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]}"
             for k in (*LOSS_KEYS, *VARIANT_LOSS_KEYS, "grad_norm", "lr", "skipped_steps", "corrupt_samples")
             if k in last]
    ago = time.time() - run["metrics_mtime"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["metrics_mtime"]))
    return html.escape(f"step {last['step']:,}: " + ", ".join(parts) + f" (metrics.jsonl written {when}, "
                       f"{_duration(ago)} ago)")


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def training_html(run: dict, out_dir: str) -> str:
    """The training plot (written into `out_dir`), or the line saying there is nothing yet."""
    if not run["metrics"]:
        return "<p class=missing>No training records yet (metrics.jsonl missing or empty).</p>"
    plot_training(run, os.path.join(out_dir, "training.png"))
    return '<img src="training.png" alt="training losses and grad norm">'


def validation_html(run: dict, out_dir: str) -> str:
    """The validation plot and its newest values, or the line saying there are none."""
    records = [r for r in run["evals"] if r["kind"] == "val"]
    if not records:
        return "<p class=missing>No validation losses yet (no kind \"val\" record in eval.jsonl).</p>"
    plot_validation(run, os.path.join(out_dir, "validation.png"))
    last = records[-1]
    values = ", ".join(f"t = {t:g}: {last[k]:.4g}" for t, k in val_times([last]) if _finite(last.get(k)))
    mean = f"mean {last['val_loss']:.4g}" if _finite(last.get("val_loss")) else "no mean"
    text = f"Newest (step {last['step']:,}, {last.get('num_samples', '?')} samples): {mean}; {values}."
    note = "" if all(r.get("held_out", True) for r in records) else (
        "<p class=note>The validation subset comes from the training data (held_out false): these losses do not "
        "measure generalisation.</p>")
    return f'<p>{html.escape(text)}</p>{note}<img src="validation.png" alt="validation losses">'


def evaluation_html(run: dict, out_dir: str) -> str:
    """One plot per eval metric (written into `out_dir`) and a table of newest and best values, PROXY labelled."""
    metrics = eval_metric_series(run["evals"])
    if not metrics:
        return "<p class=missing>No evaluations yet (no kind \"eval\" record in eval.jsonl).</p>"
    batch = summarize(run)["global_batch"]
    rows, figures = [], []
    for key, (steps, values) in sorted(metrics.items()):
        name = f"eval_{re.sub(r'[^A-Za-z0-9_]', '_', key)}.png"
        plot_eval_metric(key, steps, values, batch, os.path.join(out_dir, name))
        label = html.escape(metric_title(key))
        if key.startswith("proxy_"):
            label = "<span class=proxy>PROXY</span> " + html.escape(metric_title(key).removeprefix("PROXY "))
        rows.append(f"<tr><td>{label}</td><td>{values[-1]:.4g} (step {steps[-1]:,})</td>"
                    f"<td>{best_html(key, steps, values)}</td><td>{len(values)}</td></tr>")
        figures.append(f'<figure><img src="{name}" alt="{html.escape(key)}"><figcaption>{label}</figcaption></figure>')
    last = [r for r in run["evals"] if r["kind"] == "eval"][-1]
    proxy = html.escape(PROXY_NOTE).replace("PROXY", "<span class=proxy>PROXY</span>", 1)
    note = f"<p class=note>{proxy}</p>" if any(
        k.startswith("proxy_") for k in metrics) else ""
    return (f"<p>Of the EMA model; newest at step {last['step']:,} on {last.get('num_samples', '?')} samples"
            f"{_seconds(last)}.</p>{note}<table><tr><th>metric</th><th>newest</th><th>best</th><th>evaluations</th>"
            f"</tr>{''.join(rows)}</table><div class=plots>{''.join(figures)}</div>")


def best_html(key: str, steps: list[int], values: list[float]) -> str:
    """The best value of an eval metric and its step, "?" for a metric whose better direction is not known."""
    direction = METRIC_NAMES.get(key.removeprefix("proxy_"), ("", ""))[1]
    if not direction:
        return "?"
    value, step = (max if direction.startswith("higher") else min)(zip(values, steps))
    return f"{value:.4g} (step {step:,})"


def _seconds(record: dict) -> str:
    return f" in {record['seconds']:.0f} s" if _finite(record.get("seconds")) else ""


def samples_html(run: dict, out_dir: str) -> str:
    """The first and the newest sample grid, copied into `out_dir`, or the line saying there are none."""
    if not run["grids"]:
        return "<p class=missing>No sample grids yet (no samples/step_NNNNNNNN.png).</p>"
    shown = [run["grids"][-1]] + ([run["grids"][0]] if len(run["grids"]) > 1 else [])
    figures = []
    for step, src in shown:
        name = f"samples_{os.path.basename(src)}"
        with atomic_path(os.path.join(out_dir, name)) as tmp:
            shutil.copyfile(src, tmp)
        which = "newest" if step == shown[0][0] else "first"
        figures.append(f'<figure><img src="{name}" alt="samples at step {step}">'
                       f"<figcaption>{which}: step {step:,}</figcaption></figure>")
    return f"<p>EMA samples, {len(run['grids'])} grids in all.</p><div class=plots>{''.join(figures)}</div>"


def config_html(run: dict) -> str:
    """The resolved config as a <pre> block, or the line saying there is none."""
    if not run["config"]:
        return "<p class=missing>No config.yaml in the run directory.</p>"
    return f"<pre>{html.escape(yaml.safe_dump(run['config'], sort_keys=False, default_flow_style=False))}</pre>"


def write_report(run_dir: str, out_dir: str) -> str:
    """Render the report of `run_dir` into `out_dir` (index.html, its plots and copies of the grids; created if
    needed); returns the HTML's path. Errors as load_run's."""
    run = load_run(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(os.path.abspath(run_dir))
    sections = [("Training", training_html(run, out_dir)), ("Validation", validation_html(run, out_dir)),
                ("Evaluation", evaluation_html(run, out_dir)), ("Samples", samples_html(run, out_dir)),
                ("Config", config_html(run))]
    body = "".join(f"<h2>{title}</h2>\n{content}\n" for title, content in sections)
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>run {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>Run {html.escape(name)}</h1>\n"
            f"<p class=missing>Report written {time.strftime('%Y-%m-%d %H:%M:%S')} by python -m eval.report.</p>\n"
            f"{header_html(run)}\n{body}</body></html>\n")
    path = os.path.join(out_dir, HTML_NAME)
    write_text_atomic(path, page)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code: 0, or 2 with one line on stderr for a run that cannot be read."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="a training run directory (run.dir)")
    p.add_argument("--out", help="folder for the page and its PNGs (default: RUN/report)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.run, args.out or os.path.join(args.run, "report"))
    except (ValueError, OSError) as err:  # a missing run, an unreadable file, a full disk: a line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
