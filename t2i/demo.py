"""The one-command demo: the real text-to-image pipeline, small, on CPU (`make demo`).

    python -m t2i.demo --out outputs/demo

1. builds a caption-image set in MS-COCO format (coloured shapes, "a red circle above a blue square"),
2. prepares it with data_prep.coco (pycocotools, exact pixel "latents", random-init tiny CLIP text),
3. trains the tiny MMDiT + REPA (random-init tiny DINOv2 target) with the deepspeed launcher on two CPU ranks,
4. samples val captions with the ODE and SDE samplers and classifier-free guidance (eval.generate),
5. evaluates a proxy FID (random-init features: not comparable to any published FID) and the colour-match rate,
   the caption faithfulness the toy data makes exact, against chance and against null-caption samples,
6. writes samples_ode.png, samples_sde.png, loss.png, metrics.json and report.md into --out.

Every stage is the command a user would run, printed before it runs; rerunning resumes (data, training and
generation all skip finished work).
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from core.config import load_config
from core.dist import free_port
from core.shards import read_manifest
from eval.generate import caption_grid
from eval.loading import load_eval_model
from eval.report import load_run, plot_training, plot_validation, read_eval_records
from eval.report import write_report as write_run_report
from t2i.data import load_null_context, make_synthetic_t2i
from t2i.evaluation import CaptionConditioner
from t2i.sample import sample_images
from t2i.shapes import colour_match
from t2i.task import T2IConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONFIG = "configs/debug/t2i_tiny.yaml"


def run(cmd: list[str], log: list) -> float:
    """Run a stage command with its output streaming to the terminal; returns its seconds, records it."""
    shown = shlex.join(os.path.relpath(c, REPO) if c.startswith(REPO + os.sep) else c for c in cmd)
    print(f"\n$ {shown}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # One thread per process: on a small CPU shared with anything else, torch's default thread count makes
    # OpenMP spin and each op ~50x slower (measured: eval.generate at 0.8 img/s beside a busy process).
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    seconds = time.perf_counter() - t0
    log.append({"command": shown, "seconds": round(seconds, 1)})
    return seconds


def monitor_overrides(steps: int, samples: int) -> list[str]:
    """What the training shows of itself while it runs (eval/monitor.py): grids three times, validation losses
    six times and proxy FID / FD-DINOv2 / CLIP score at the end, the evaluation on `samples` val captions."""
    every = lambda n: max(1, steps // n)  # noqa: E731
    return [f"monitor.sample_every={every(3)}", "monitor.sample_count=8", f"monitor.val_every={every(6)}",
            "monitor.val_samples=64", f"monitor.eval_every={steps}", f"monitor.eval_samples={samples}",
            "monitor.eval_steps=25", "monitor.eval_cfg=3.0", "monitor.eval_features=proxy", "monitor.clip_score=tiny"]


def in_training_pictures(run_dir: str, out: str) -> dict:
    """The run's curves (eval.report's plots) and its first and last in-training grids, copied into `out`;
    returns {name: file name} of what was written, and the run's own report page."""
    run = load_run(run_dir)
    made = {"loss": os.path.basename(plot_training(run, os.path.join(out, "loss.png")))}
    if any(r.get("kind") == "val" for r in run["evals"]):
        made["validation"] = os.path.basename(plot_validation(run, os.path.join(out, "validation.png")))
    for label, (step, path) in (("first_grid", run["grids"][0]), ("last_grid", run["grids"][-1])) if run["grids"] \
            else ():
        made[label] = f"grid_step_{step}.png"
        shutil.copyfile(path, os.path.join(out, made[label]))
    made["page"] = os.path.relpath(write_run_report(run_dir, os.path.join(out, "run_report")), out)
    return made


def load_samples(sample_dir: str) -> np.ndarray:
    with np.load(os.path.join(sample_dir, "samples.npz"), allow_pickle=False) as f:
        return f["arr_0"]


def null_caption_samples(run_dir: str, val_dir: str, n: int, steps: int) -> np.ndarray:
    """Samples of the same model with every caption replaced by the empty one (the unconditional baseline)."""
    model, meta = load_eval_model(run_dir)
    null = load_null_context(val_dir, read_manifest(val_dir))
    return sample_images(model, meta, null[None].expand(n, -1, -1), null, "ode", steps, cfg=1.0, seed=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=1500, help="training steps (global batch 32)")
    p.add_argument("--samples", type=int, default=128, help="val captions sampled per sampler")
    p.add_argument("--sde-steps", type=int, default=250, help="SDE NFE (the paper: 250)")
    p.add_argument("--cfg", type=float, default=3.0)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data, run_dir = os.path.join(out, "data"), os.path.join(out, "run")
    log: list = []
    t_start = time.perf_counter()

    # 1-2: the generated COCO-format set through data_prep.coco (train and val), as the tiny config makes it
    d = load_config(T2IConfig, os.path.join(REPO, CONFIG)).data
    if not os.path.isfile(os.path.join(data, "val", "manifest.json")):
        t0 = time.perf_counter()
        print(f"\n== data: {args.train_images} generated images -> data_prep.coco -> {data}/{{train,val}}", flush=True)
        make_synthetic_t2i(data, args.train_images, d.synthetic_resolution, d.synthetic_text_encoder,
                           d.synthetic_autoencoder, text_tokens=d.synthetic_text_tokens)
        log.append({"command": f"data_prep.coco on the generated shapes set ({args.train_images} train images)",
                    "seconds": round(time.perf_counter() - t0, 1)})
    val = os.path.join(data, "val")

    # 3: training, two CPU ranks under the deepspeed launcher
    run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "t2i/train.py",
         "--config", CONFIG, f"run.dir={run_dir}", "data.kind=shards", f"data.path={os.path.join(data, 'train')}",
         f"train.max_steps={args.steps}", "train.log_every=50", *monitor_overrides(args.steps, args.samples)],
        log)

    # 4-5: sampling with both samplers, proxy FID, colour match
    _, record = load_eval_model(run_dir)
    captions = CaptionConditioner(record, {"cond_file": val}).captions(range(args.samples))
    metrics = {"training": {"steps": args.steps, "global_batch": 32, "ranks": 2},
               "text_tokens": d.synthetic_text_tokens,
               "note": "proxy_fid uses random-init features: it tracks this demo only and is not an FID"}
    for sampler, steps in (("ode", 50), ("sde", args.sde_steps)):
        sample_dir = os.path.join(out, f"samples_{sampler}")
        # two processes, as `accelerate launch` spreads generation over GPUs (the same images as one process)
        run([sys.executable, "-m", "eval.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
             str(free_port()), "-m", "eval.generate", "--run", run_dir, "--cond-file", val, "--sampler", sampler,
             "--steps", str(steps), "--cfg", str(args.cfg), "--num-samples", str(args.samples), "--batch-size", "64",
             "--out", sample_dir], log)
        run([sys.executable, "-m", "eval.fid", sample_dir, "--ref", val, "--features", "proxy", "--no-is"], log)
        with open(os.path.join(sample_dir, "metrics.json")) as f:
            fid = json.load(f)
        images = load_samples(sample_dir)
        metrics[sampler] = {"nfe": steps, "cfg": args.cfg, "num_samples": len(images),
                            "proxy_fid": fid.get("proxy_fid"), "colour_match": colour_match(images, captions)}
        caption_grid(images[:24], captions[:24], columns=6).save(os.path.join(out, f"samples_{sampler}.png"))
    null = null_caption_samples(run_dir, val, min(args.samples, 128), 50)
    metrics["null_caption_ode"] = {"colour_match": colour_match(null, captions[: len(null)])}
    metrics["pictures"] = in_training_pictures(run_dir, out)
    metrics["in_training"] = [r for r in read_eval_records(run_dir) if r.get("kind") == "eval"]
    metrics["commands"] = log
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    write_report(out, metrics, args)
    print(f"\n== done in {metrics['total_seconds']:.0f} s: {out}/report.md", flush=True)
    return 0


def while_training(m: dict) -> list[str]:
    """The report's lines on what the run showed of itself while it trained (eval/monitor.py)."""
    pics = m["pictures"]
    lines = ["## While it trained", "",
             "The training run sampled fixed training captions with fixed seeds (ODE, NFE 25, CFG 4) at set steps, "
             "measured its EMA model's denoising loss at fixed times on fixed noise, and scored its EMA samples at "
             "the end (`monitor.*` keys; all PROXY numbers: random-init features and a random-init tiny CLIP). "
             f"The run's own page: [{pics['page']}]({pics['page']}) (`python -m eval.report RUN`).", "",
             "![loss curves](loss.png)", ""]
    if "validation" in pics:
        lines += [f"![validation losses]({pics['validation']})", ""]
    for label in ("first_grid", "last_grid"):
        if label in pics:
            lines += [f"![{label.replace('_', ' ')}]({pics[label]})", ""]
    for r in m["in_training"]:
        scores = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k.startswith("proxy_"))
        lines += [f"- step {r['step']}: {scores} ({r['num_samples']} samples)"]
    return lines + [""]


def write_report(out: str, m: dict, args) -> None:
    def row(name, cm):
        return f"| {name} | {cm['top']:.2f} | {cm['bottom']:.2f} | {cm['both']:.2f} |"

    chance = m["ode"]["colour_match"]["chance_both"]
    lines = [
        "# REPA text-to-image demo (CPU)", "",
        "The real pipeline at toy scale: generated shapes with COCO-format captions -> `data_prep.coco` -> tiny "
        "MMDiT + REPA trained with the `deepspeed` launcher on two CPU ranks -> ODE/SDE sampling with CFG -> metrics.",
        "The caption encoder (CLIP text) and the REPA target (DINOv2) are **random-init tiny models** (no weights "
        "can be downloaded offline), and the autoencoder is the exact pixel space-to-depth one. Captions keep "
        f"their first {m['text_tokens']} CLIP tokens (they fit in 12; COCO runs keep all 77).", "",
        "## Caption faithfulness", "",
        "Fraction of samples whose top and bottom shapes have the colours their caption names "
        f"({m['ode']['num_samples']} val captions; chance: 0.25 per half, {chance:.3f} for both).", "",
        "| samples | top | bottom | both |", "|---|---|---|---|",
        row(f"ODE, NFE {m['ode']['nfe']}, CFG {m['ode']['cfg']}", m["ode"]["colour_match"]),
        row(f"SDE, NFE {m['sde']['nfe']}, CFG {m['sde']['cfg']}", m["sde"]["colour_match"]),
        row("same model, empty captions (ODE, NFE 50)", m["null_caption_ode"]["colour_match"]), "",
        "## Proxy FID", "",
        "Against the val split's statistics under **random-init features**: a PROXY FID that only compares these "
        "samplers and runs with each other; it is not comparable to any published FID.", "",
        "| sampler | proxy FID |", "|---|---|",
        f"| ODE NFE {m['ode']['nfe']} | {m['ode']['proxy_fid']:.2f} |",
        f"| SDE NFE {m['sde']['nfe']} | {m['sde']['proxy_fid']:.2f} |", "",
        "## Pictures", "", "![ODE samples](samples_ode.png)", "", "![SDE samples](samples_sde.png)", "",
        *while_training(m), 
        f"## What ran ({m['total_seconds']:.0f} s in all, 2 CPU cores)", "",
        *[f"- `{c['command']}` ({c['seconds']} s)" for c in m["commands"]], "",
        "## Going further", "",
        "- Real COCO: `accelerate launch -m data_prep.coco --images /data/coco/train2014 --captions "
        "/data/coco/annotations/captions_train2014.json --out /data/coco256/train --resolution 256`, the same for "
        "val2014 with `--split val`, then `deepspeed --num_gpus 8 t2i/train.py --config "
        "configs/t2i/coco256_mmdit_repa.yaml` (paper App. K: FID 4.73 ODE / 4.14 SDE).",
        "- ImageNet: `accelerate launch -m data_prep.imagenet --src /data/imagenet/train --out /data/in256 "
        "--resolution 256`, then `deepspeed --num_gpus 8 class_cond/train.py --config "
        "configs/class_cond/sit_xl2_repa_in256.yaml`.",
        "- FID: `accelerate launch -m eval.evaluate --run runs/in256 --sampler ode --steps 50 --cfg 1.8 "
        "--guidance-interval 0 0.7 --num-samples 50000 --ref VIRTUAL_imagenet256_labeled.npz`.", "",
    ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
