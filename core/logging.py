"""Training metrics to stdout, a JSONL file and TensorBoard, from rank 0 only."""
import json
import os

from tqdm import tqdm

from core.fileio import append_line, write_text_atomic

JSONL_KEYS = ("step", "loss", "denoise_loss", "repa_loss", "grad_norm", "lr", "img_per_s")


class MetricsLogger:
    """One JSON object per logged step in run.dir/metrics.jsonl (keys JSONL_KEYS plus counters), the same scalars
    to TensorBoard under run.dir/tb, and a line on stdout.

    `resume_step`: the run resumes from the checkpoint of that step, so what was logged past it (steps the resumed
    run replays) is dropped: metrics.jsonl is rewritten without those records and TensorBoard purges its events
    from the next step on, so both read as one run."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled and resume_step is not None:
            truncate_metrics(self.path, resume_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (heavy): only when enabled

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record))  # a line is written whole or not at all
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
            self.tb.flush()
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        tqdm.write(" ".join(parts))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
