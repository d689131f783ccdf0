"""Training metrics to stdout, a JSONL file and TensorBoard, from rank 0 only."""
import json
import os

from tqdm import tqdm

from core.fileio import append_line

JSONL_KEYS = ("step", "loss", "denoise_loss", "repa_loss", "grad_norm", "lr", "img_per_s")


class MetricsLogger:
    """One JSON object per logged step in run.dir/metrics.jsonl (keys JSONL_KEYS plus counters), the same scalars
    to TensorBoard under run.dir/tb, and a line on stdout."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (heavy): only when enabled

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

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


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run.dir/metrics.jsonl (for plots and tests), one per step in step order.

    A run stopped after logging a step but before checkpointing it logs that step again when resumed (it replays
    it); the file keeps both lines, and the later one is the record returned."""
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
