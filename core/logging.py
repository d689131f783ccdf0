"""Training metrics to stdout, JSONL files, TensorBoard and (optionally) Weights & Biases, from rank 0 only."""
import json
import os
import secrets

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.fileio import append_line, write_text_atomic

JSONL_KEYS = ("step", "loss", "denoise_loss", "repa_loss", "grad_norm", "lr", "img_per_s")
METRICS, EVALS = "metrics.jsonl", "eval.jsonl"  # training records; the monitor's evaluation records
WANDB_ID = "wandb_id"  # run.dir's W&B run id: a resumed run continues the same W&B run


class MetricsLogger:
    """One JSON object per logged step in run.dir/metrics.jsonl (keys JSONL_KEYS plus counters), one per
    evaluation in run.dir/eval.jsonl (log_eval), the same scalars and the sample grids (log_image) to TensorBoard
    under run.dir/tb and, with `wandb` ({"project", "mode", "config"}), to Weights & Biases, and a line on stdout.

    `resume_step`: the run resumes from the checkpoint of that step, so what was logged past it (steps the resumed
    run replays) is dropped: the JSONL files are rewritten without those records and TensorBoard purges its
    events from the next step on, so they read as one run."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int | None = None,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.path, self.eval_path = os.path.join(run_dir, METRICS), os.path.join(run_dir, EVALS)
        self.tb = self.wandb = None
        if enabled and resume_step is not None:
            truncate_metrics(self.path, resume_step)
            truncate_metrics(self.eval_path, resume_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (heavy): only when enabled

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)
        if enabled and wandb is not None:
            self.wandb = start_wandb(run_dir, **wandb)

    def _scalars(self, record: dict, prefix: str) -> None:
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record))  # a line is written whole or not at all
        self._scalars(record, "train")
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        tqdm.write(" ".join(parts))

    def log_eval(self, record: dict) -> None:
        """A record {"step", "kind", metric: value, ...} of an in-training evaluation (eval.jsonl)."""
        if not self.enabled:
            return
        append_line(self.eval_path, json.dumps(record))
        self._scalars(record, record.get("kind", "eval"))
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def log_image(self, tag: str, path: str, step: int) -> None:
        """The image file at `path` (a sample grid) to TensorBoard and W&B under `tag` at `step`."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb  # the optional W&B package: imported only when W&B logging is on

            self.wandb.log({tag: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: str, project: str, mode: str, config: dict):
    """The W&B run of run.dir: the id in run.dir/wandb_id is reused, so a resumed run continues the same W&B run;
    its files go under run.dir/wandb (mode offline: `wandb sync` them later)."""
    import wandb  # the optional W&B package: imported only when W&B logging is on

    id_path = os.path.join(run_dir, WANDB_ID)
    if os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids are [a-z0-9]
        write_text_atomic(id_path, run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=run_dir, mode=mode, config=config,
                      name=os.path.basename(os.path.abspath(run_dir)))


def truncate_metrics(path: str, last_step: int) -> None:
    """Rewrite the metrics file at `path` (atomically) without the records of steps after `last_step`, and without
    a last line torn by a kill."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")[:-1]  # a last line without its newline is torn
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines) or not text.endswith("\n"):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run.dir/metrics.jsonl (for plots and tests), one per step in step order.

    A resumed run drops what was logged past its checkpoint (MetricsLogger), so each step appears once; in a file
    of an older version a replayed step can appear twice, and the later record is returned."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    by_step = {}
    for line in lines[:-1]:  # a last line torn by a kill is dropped
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
