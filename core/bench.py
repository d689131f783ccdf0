"""Training-step benchmark: images/s per device, ms per step, peak memory and model FLOP utilisation.

    python -m core.bench --config configs/class_cond/sit_xl2_repa_in256.yaml --steps 30 --random-encoders  # GPU
    python -m core.bench --config configs/debug/class_cond_tiny.yaml --steps 20                             # anywhere

The run is built exactly as training builds it (core.trainer.plan_run and build_run: model, DeepSpeed engine from
the config's ds_config, EMA, REPA encoders) and each timed step is core.trainer.train_step, so what is measured is
the training loop's own step, not a copy. The config's `task:` names the task (core.task). Overrides (`train.global_batch=64 train.ds_config=ds_configs/zero1.json`)
choose the lever measured.

Data: `--data random` (default) feeds random batches of the dataset's shapes, made once and kept in (pinned) host
memory, so the step includes the host-to-device copy but no loading; shapes come from the generated set for
data.kind=synthetic, else ImageNet/COCO at `--resolution` px in SD-VAE latents (no data needed). `--data loader`
reads the config's prepared dataset through the training loader; `--loader-only` times that loader alone.

FLOP convention (printed with every result): FLOPs are counted by torch.utils.flop_counter on a meta-device copy
of the model (matmuls, convolutions and attention; a multiply-add counts as 2 FLOPs; element-wise ops not
counted), forward + backward of the training step without activation recompute; the frozen encoder's forward is
counted separately. MFU = model FLOPs per image x images/s / the device's dense peak for the precision used;
`mfu_with_encoder` adds the encoder forward. Each run appends one JSON line to --out.
"""
import argparse
import datetime
import importlib.util
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import ConfigError
from core.dist import barrier, setup_distributed
from core.encoders import encoder_dim, encoder_names, load_encoders, random_weights_spec
from core.engine import build_ds_config
from core.fileio import append_line
from core.host_syncs import HostSyncCounter
from core.memory_plan import measure_activations, plan_table, precision_of
from core.shards import ShardReader, feature_record
from core.task import load_task_config
from core.trainer import RunPlan, build_run, plan_run, step_taps, train_step, training_batches

# Dense (no sparsity) peak TFLOP/s by precision, from NVIDIA's datasheets; the first name found in the device name
# wins, so the PCIe/NVL variants come before the plain "H100" (the SXM part).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
FLOP_CONVENTION = ("torch.utils.flop_counter on a meta copy of the model: matmul/conv/attention FLOPs, "
                   "multiply-add = 2 FLOPs, forward + backward, no activation recompute; encoder forward separate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.split("\n\n")[0],
                                epilog="Overrides: section.key=value, e.g. train.global_batch=64")
    p.add_argument("--config", required=True, help="training YAML, e.g. configs/class_cond/sit_xl2_repa_in256.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--data", choices=("random", "loader"), default="random",
                   help="random: in-memory batches of the data's shapes; loader: the prepared dataset")
    p.add_argument("--resolution", type=int, default=256, help="image px of random data for shards configs")
    p.add_argument("--vae", default="sd-vae",
                   help="the autoencoder whose latents random data of shards configs has: sd-vae, an AutoencoderKL "
                        "path or hub id (its config.json), or C:F, channels and downsampling (VA-VAE: 32:16)")
    p.add_argument("--features", action="store_true",
                   help="REPA targets as stored encoder features (random ones) instead of running the encoders")
    p.add_argument("--random-encoders", action="store_true",
                   help="REPA encoders with random weights (NAME@random: same architecture and FLOPs, no download; "
                        "the -tiny ones are random-init already)")
    p.add_argument("--loader-only", action="store_true", help="time the training data loader alone (--data loader)")
    p.add_argument("--flops-only", action="store_true",
                   help="count the training FLOPs per image only (meta-device model, no engine, nothing timed): "
                        "any size on any machine")
    p.add_argument("--memory-plan", action="store_true",
                   help="predict peak device memory per GPU (core.memory_plan): saved activations measured on this "
                        "machine at the real width, states counted per ZeRO stage; nothing timed")
    p.add_argument("--world", type=int, default=8, help="--memory-plan: ranks the ZeRO states are divided over")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[32, 64, 128, 256],
                   help="--memory-plan: batch sizes per GPU, comma-separated")
    p.add_argument("--capacity-gib", type=float, default=80.0, help="--memory-plan: the GPU's memory (H100: 80)")
    p.add_argument("--at-step", type=int, default=0,
                   help="--flops-only: the optimiser step counted (after repa.stop_step the encoder is not run)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: table)")
    p.add_argument("--label", default="", help="free text stored in the JSON line, e.g. the lever measured")
    p.add_argument("--out", default="outputs/bench.jsonl", help="JSON lines file appended to (default %(default)s)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def _require(modules: list[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"core.bench: missing Python package(s) {', '.join(missing)}; install them first (a GPU box "
                         "without internet: `pip wheel --no-deps deepspeed==<version>` here, then install the wheel)")


def _scratch_dir(ctx) -> str:
    """A temporary directory made by rank 0 and shared with every rank (a generated dataset must be one)."""
    path = [tempfile.mkdtemp(prefix="bench-") if ctx.is_main else None]
    if ctx.world_size > 1:
        torch.distributed.broadcast_object_list(path, src=0)
    return path[0]


def _packages_for(cfg) -> list[str]:
    mods = ["deepspeed"]
    names = encoder_names(cfg.repa.encoders) if cfg.repa.coeff > 0 else []
    mods += ["transformers"] if any(n.startswith("dinov2") for n in names) else []
    mods += ["open_clip", "timm"] if any(n.startswith(("clip", "siglip")) for n in names) else []
    return mods


def precision(ds_config: dict) -> str:
    """"bf16"/"fp16" when the DeepSpeed config trains in it (torch autocast or DeepSpeed's own), else "fp32"."""
    autocast = ds_config.get("torch_autocast", {})
    if autocast.get("enabled"):
        return {"bfloat16": "bf16", "float16": "fp16"}.get(str(autocast.get("dtype", "bfloat16")), "bf16")
    for key in ("bf16", "fp16"):
        if ds_config.get(key, {}).get("enabled"):
            return key
    return "fp32"


def peak_tflops(device: torch.device, prec: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) of `device` for precision `prec`; (None, why) when unknown."""
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if prec in ("bf16", "fp16") else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[kind], f"{key} {kind} dense peak (datasheet)"
    return None, f"no peak known for {name!r}; pass --peak-tflops"


def random_batch(plan: RunPlan, n: int, generator: torch.Generator, pin: bool) -> dict:
    """A batch like the training loader's for `n` samples, with random values of the dataset's shapes."""
    c, h, w = plan.data.latent_shape
    batch = {"moments": torch.cat([torch.randn(n, c, h, w, generator=generator),
                                   0.1 * torch.rand(n, c, h, w, generator=generator)], dim=1),
             **plan.task.random_condition(n, generator)}
    if plan.need_image:
        r = plan.data.resolution
        batch["image"] = torch.randint(0, 256, (n, 3, r, r), generator=generator, dtype=torch.uint8)
    if plan.feature_names:
        batch["feats"] = tuple(torch.randn(n, plan.grid**2, encoder_dim(s), generator=generator)
                               for s in plan.cfg.repa.encoders)
    if pin:
        batch = {k: tuple(t.pin_memory() for t in v) if isinstance(v, tuple) else v.pin_memory()
                 for k, v in batch.items()}
    return batch


def count_flops(plan: RunPlan, encoders: list, step: int = 0) -> dict:
    """Training FLOPs per image at optimiser step `step`: model forward + backward (meta-device copy, no recompute)
    with what the REPA-family terms tap of it (attention logits, block outputs), and the forward of the REPA
    `encoders` (those the step runs; none after repa.stop_step), the first with the attention logits it gives.
    A REG model also takes and predicts its class token (its embedding and head are counted).
    The losses themselves (cosine, softmax, pairwise distances) are not matmuls and are not counted."""
    n = 2
    with torch.device("meta"):
        model = plan.task.build_model(plan.model_kwargs, grad_checkpointing=plan.cfg.model.grad_checkpointing)
    if hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = False  # model FLOPs: recompute is overhead, not useful work
    host = random_batch(plan, n, torch.Generator().manual_seed(0), pin=False)
    meta = torch.device("meta")
    cond = plan.task.condition(host, torch.zeros(n, dtype=torch.bool, device=meta), meta)
    c, h, w = plan.data.latent_shape
    taps = step_taps(plan, step)
    x, t = torch.randn(n, c, h, w, device=meta), torch.rand(n, device=meta)
    reg_dim = plan.model_kwargs.get("reg_dim", 0)
    kwargs = dict(cond, **({} if taps is None else {"taps": taps}),
                  **({"cls": torch.randn(n, reg_dim, device=meta)} if reg_dim else {}))
    with FlopCounterMode(display=False) as fwd:
        out, zs, *tapped = model(x, t, **kwargs)
    tapped = tapped[0] if tapped else {}
    ends = [out, *zs, *tapped.get("attn", [])] + [tapped[k] for k in ("hidden", "cls") if tapped.get(k) is not None]
    with FlopCounterMode(display=False) as bwd:
        sum(e.float().sum() for e in ends).backward()
    enc = 0
    if encoders and plan.terms.uses_encoder(step):
        image = host["image"][:1].to(plan.ctx.device)
        with FlopCounterMode(display=False) as counter:
            for i, e in enumerate(encoders):
                e.targets(image, plan.terms.encoder_attn_blocks if i == 0 else (),
                          with_cls=plan.terms.reg and i == 0)
        enc = counter.get_total_flops()
    return {"model_fwd": fwd.get_total_flops() / n, "model_bwd": bwd.get_total_flops() / n, "encoder_fwd": enc}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "device (torch.cuda.max_memory_allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS of the process (no device memory)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        return ""


def _timed(fn, n: int, device: torch.device) -> list[float]:
    times = []
    for i in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_loader(cfg, task_cls, ctx, args) -> dict:
    """Samples/s of the training loader alone over --steps micro-batches after --warmup."""
    plan = plan_run(cfg, task_cls(cfg, task_cls.prepare_data(cfg, ctx)), ctx)
    t0 = time.perf_counter()  # what each rank pays at start-up to know where every sample is
    reader = ShardReader(plan.data.root)
    open_s = time.perf_counter() - t0
    loader = training_batches(plan, 0)
    for _ in range(args.warmup):
        next(loader)
    times = _timed(lambda i: next(loader), args.steps, torch.device("cpu"))
    return {"mode": "loader-only", "micro_batch": plan.micro, "num_workers": cfg.train.num_workers,
            "samples_per_s": plan.micro * len(times) / sum(times),
            "ms_per_batch_median": 1e3 * float(np.median(times)),
            "reader_open_s": open_s, "reader_mapped": reader.mapped, "samples": len(reader)}


def bench_flops(cfg, task_cls, ctx, args) -> dict:
    """The FLOP count of a training step at --at-step, on random data of the config's shapes; the encoders are
    loaded (on the CPU: one image each) only when the step runs them."""
    plan = plan_run(cfg, task_cls(cfg, task_cls.random_data(cfg, args.resolution, args.vae)), ctx)
    encoders = (load_encoders(cfg.repa.encoders, plan.data.resolution, grid=plan.grid)
                if plan.need_image and plan.terms.uses_encoder(args.at_step) else [])
    flops = count_flops(plan, encoders, step=args.at_step)
    with torch.device("meta"):
        params = sum(p.numel() for p in plan.task.build_model(plan.model_kwargs).parameters())
    return {"mode": "flops", "at_step": args.at_step, "encoders": list(cfg.repa.encoders) if encoders else [],
            "latent_shape": list(plan.data.latent_shape), "resolution": plan.data.resolution, "params_m": params / 1e6,
            "gflop_per_img_model_fwd": flops["model_fwd"] / 1e9, "gflop_per_img_model_bwd": flops["model_bwd"] / 1e9,
            "gflop_per_img_encoder_fwd": flops["encoder_fwd"] / 1e9, "flop_convention": FLOP_CONVENTION}


def _stage_configs(ds_config: str) -> dict:
    """{stage: ds_config dict} of the config's JSON family (zero1/2/3 with the same suffix: autocast, _fp32 or
    _dsbf16), from the same folder."""
    folder, name = os.path.split(ds_config)
    suffix = next((s for s in ("_dsbf16", "_fp32") if name.endswith(f"{s}.json")), "")
    out = {}
    for stage in (1, 2, 3):
        with open(os.path.join(folder, f"zero{stage}{suffix}.json")) as f:
            out[stage] = json.load(f)
    return out


def bench_memory_plan(cfg, task_cls, ctx, args) -> dict:
    """The memory plan (core.memory_plan) of the config at --world ranks: saved activations measured on the CPU at
    the real width and token count (one sample, 1 and 2 blocks), states counted per ZeRO stage, a row per
    --batches size, eager and checkpointed."""
    plan = plan_run(cfg, task_cls(cfg, task_cls.random_data(cfg, args.resolution, args.vae)), ctx)
    cpu = torch.device("cpu")
    host = random_batch(plan, 1, torch.Generator().manual_seed(0), pin=False)
    cond = plan.task.condition(host, torch.zeros(1, dtype=torch.bool), cpu)
    c, h, w = plan.data.latent_shape
    reg_dim = plan.model_kwargs.get("reg_dim", 0)

    def build(depth: int):
        kwargs = {**plan.model_kwargs, "depth": depth, "repa_depth": 1}
        return plan.task.build_model(kwargs)

    def forward(model, n: int):
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(n, c, h, w, generator=g), torch.rand(n, generator=g)
        extra = {"cls": torch.randn(n, reg_dim, generator=g)} if reg_dim else {}
        return model(x, t, **{k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}, **extra)

    stages = _stage_configs(cfg.train.ds_config)
    precision = precision_of(stages[1])
    acts = {precision: measure_activations(build, forward, plan.model_kwargs["depth"], precision)}
    with torch.device("meta"):
        params = sum(p.numel() for p in plan.task.build_model(plan.model_kwargs).parameters())
    encoder_params = 0
    if plan.need_image and cfg.repa.coeff > 0:
        encoder_params = sum(p.numel() for e in load_encoders([random_weights_spec(s) for s in cfg.repa.encoders],
                                                              plan.data.resolution, grid=plan.grid)
                             for p in e.parameters())
    averages = 1 + len(cfg.train.phema_stds)
    rows = plan_table(acts, params, encoder_params, stages, args.world, args.batches, averages, args.capacity_gib)
    a = acts[precision]
    return {"mode": "memory-plan", "world": args.world, "precision": precision, "params_m": params / 1e6,
            "encoder_params_m": encoder_params / 1e6, "latent_shape": list(plan.data.latent_shape),
            "resolution": plan.data.resolution, "capacity_gib": args.capacity_gib,
            "saved_mib_per_sample": {"block": a.block / 2**20, "rest": a.rest / 2**20,
                                     "block_input": a.block_input / 2**20, "depth": a.depth},
            "rows": rows, "not_counted": "allocator fragmentation and caching, CUDA/NCCL workspaces, single ops' "
                                         "transient peaks; compiled blocks (at most eager) not measured"}


def bench_step(cfg, task_cls, ctx, args) -> dict:
    """Time core.trainer.train_step: --warmup untimed steps, then --steps timed ones."""
    if args.data == "loader":
        task = task_cls(cfg, task_cls.prepare_data(cfg, ctx))
    else:
        task = task_cls(cfg, task_cls.random_data(cfg, args.resolution, args.vae))
        if args.features and cfg.repa.coeff > 0:  # stored features of each spec at the model's token grid
            kwargs = task.model_kwargs([])
            tokens = (kwargs["input_size"] // kwargs["patch_size"]) ** 2
            task.data.manifest["features"] = [feature_record(s, tokens, encoder_dim(s)) for s in cfg.repa.encoders]
    plan = plan_run(cfg, task, ctx)
    run = build_run(plan)
    if args.data == "loader":
        batches = training_batches(plan, 0)
    else:
        g = torch.Generator().manual_seed(cfg.run.seed)
        pin = ctx.device.type == "cuda"
        batches = itertools.cycle([random_batch(plan, plan.micro, g, pin) for _ in range(2)])
    flops = count_flops(plan, run.encoders, step=args.warmup)  # the first timed step's terms

    for i in range(args.warmup):
        train_step(run, batches, i)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = _timed(lambda i: train_step(run, batches, args.warmup + i), args.steps, ctx.device)
    memory, memory_kind = _peak_memory(ctx.device)
    with HostSyncCounter(ctx.device) as syncs:  # one more step, untimed: the counter slows every op
        train_step(run, batches, args.warmup + args.steps)

    per_device = plan.micro * plan.accum
    step_s = float(np.median(times))
    img_s = per_device / step_s
    prec = precision(build_ds_config(cfg.train, ctx.world_size))
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(ctx.device, prec)
    model_flops = flops["model_fwd"] + flops["model_bwd"]
    mfu = model_flops * img_s / (peak * 1e12) if peak else None
    mfu_enc = (model_flops + flops["encoder_fwd"]) * img_s / (peak * 1e12) if peak else None
    return {"mode": "step", "data": args.data + (" + stored features" if plan.feature_names else ""),
            "encoders": list(cfg.repa.encoders) if run.encoders else [], "precision": prec,
            "zero_stage": run.engine.zero_optimization_stage(), "batch_per_device": per_device,
            "micro_batch": plan.micro, "accum": plan.accum, "latent_shape": list(plan.data.latent_shape),
            "resolution": plan.data.resolution,
            "params_m": sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters()) / 1e6,
            "img_per_s_per_device": img_s, "ms_per_step_median": 1e3 * step_s,
            "ms_per_step_min": 1e3 * min(times), "ms_per_step_max": 1e3 * max(times),
            "peak_memory_gib": memory, "peak_memory_kind": memory_kind,
            "gflop_per_img_model_fwd": flops["model_fwd"] / 1e9, "gflop_per_img_model_bwd": flops["model_bwd"] / 1e9,
            "gflop_per_img_encoder_fwd": flops["encoder_fwd"] / 1e9, "flop_convention": FLOP_CONVENTION,
            "peak_tflops": peak, "peak_source": peak_source, "mfu": mfu, "mfu_with_encoder": mfu_enc,
            "host_syncs_per_step": {k: syncs.counts[k] for k in ("project", "host", "library")}}


def report(r: dict) -> str:
    """The human-readable lines of one result."""
    head = (f"{r['task']} {r['preset']} | {r['device']} | world {r['world_size']} | {r['config']}"
            + (f" {' '.join(r['overrides'])}" if r["overrides"] else ""))
    timing = f"median of {r['steps']} after {r['warmup']} warm-up"
    if r["mode"] == "flops":
        return "\n".join([head, f"  step {r['at_step']}, {r['resolution']} px -> latents {r['latent_shape']}, "
                                f"{r['params_m']:.1f}M params" + (f", encoders {', '.join(r['encoders'])}"
                                                                  if r["encoders"] else ", no encoder run"),
                           f"  GFLOP per image       model {r['gflop_per_img_model_fwd']:.4g} fwd + "
                           f"{r['gflop_per_img_model_bwd']:.4g} bwd, encoder {r['gflop_per_img_encoder_fwd']:.4g} fwd "
                           f"({r['flop_convention']})"])
    if r["mode"] == "memory-plan":
        s = r["saved_mib_per_sample"]
        lines = [head, f"  memory plan at {r['world']} ranks, {r['precision']}, {r['params_m']:.1f}M params"
                 f" (+ encoder {r['encoder_params_m']:.1f}M), {r['resolution']} px -> latents {r['latent_shape']}",
                 f"  saved activations per sample: {s['block']:.2f} MiB per block x {s['depth']} + {s['rest']:.2f} "
                 f"MiB rest; checkpointed: {s['block_input']:.2f} MiB per block kept (measured on this machine)",
                 "  | batch/GPU | activations | ZeRO | states GiB | activations GiB | total GiB | fits "
                 f"{r['capacity_gib']:g} GiB |", "  |---|---|---|---|---|---|---|"]
        lines += [f"  | {w['batch']} | {w['mode']} | {w['stage']} | {w['states_gib']:.1f} | {w['activations_gib']:.1f} "
                  f"| {w['total_gib']:.1f} | {'yes' if w['fits'] else 'no'} |" for w in r["rows"]]
        return "\n".join(lines + [f"  not counted: {r['not_counted']}"])
    if r["mode"] == "loader-only":
        return "\n".join([head, f"  loader only: {r['samples_per_s']:.1f} samples/s per rank "
                                f"({r['num_workers']} workers, micro-batch {r['micro_batch']}; "
                                f"{r['ms_per_batch_median']:.1f} ms/batch, {timing})",
                          f"  opening the reader: {r['reader_open_s']:.3f} s for {r['samples']} samples "
                          f"({'its index mapped' if r['reader_mapped'] else 'tar headers read: no index'})"])
    if r["peak_tflops"]:
        mfu = (f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s ({r['peak_source']}); "
               f"{100 * r['mfu_with_encoder']:.1f}% counting the encoder forward")
    else:
        mfu = f"n/a ({r['peak_source']})"
    return "\n".join([
        head,
        f"  data {r['data']}, {r['precision']}, ZeRO-{r['zero_stage']}, batch {r['batch_per_device']} per device "
        f"(micro {r['micro_batch']} x {r['accum']}), {r['resolution']} px -> latents {r['latent_shape']}, "
        f"{r['params_m']:.1f}M params" + (f", encoders {', '.join(r['encoders'])}" if r["encoders"] else ""),
        f"  images/s per device   {r['img_per_s_per_device']:.1f}",
        f"  ms per step           {r['ms_per_step_median']:.1f} ({timing}; min {r['ms_per_step_min']:.1f}, "
        f"max {r['ms_per_step_max']:.1f})",
        f"  peak memory           {r['peak_memory_gib']:.2f} GiB, {r['peak_memory_kind']}",
        f"  GFLOP per image       model {r['gflop_per_img_model_fwd']:.3g} fwd + {r['gflop_per_img_model_bwd']:.3g} "
        f"bwd, encoder {r['gflop_per_img_encoder_fwd']:.3g} fwd ({r['flop_convention']})",
        f"  MFU                   {mfu}",
        "  host syncs per step   " + ", ".join(f"{v} {k}" for k, v in r["host_syncs_per_step"].items())
        + " (reads of device values; host: the loader's and CPU-only checks' host tensors)",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("core.bench: --steps must be >= 1 and --warmup >= 0")
    if args.loader_only and args.data != "loader":
        raise SystemExit("core.bench: --loader-only times the prepared dataset's loader: add --data loader")
    if args.features and args.data == "loader":
        raise SystemExit("core.bench: --features makes random features; with --data loader the dataset's stored "
                         "features are used when it has them (data_prep --features)")
    try:
        task_cls, cfg = load_task_config(args.config, args.overrides, check_data=args.data == "loader")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.random_encoders:
        cfg.repa.encoders = [random_weights_spec(s) for s in cfg.repa.encoders]
    _require(_packages_for(cfg))
    ctx = setup_distributed()
    cfg.run.dir = _scratch_dir(ctx)  # the benchmark writes no checkpoint; a generated set goes there
    try:
        mode = (bench_loader if args.loader_only else bench_flops if args.flops_only
                else bench_memory_plan if args.memory_plan else bench_step)
        result = mode(cfg, task_cls, ctx, args)
        barrier()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        if ctx.is_main:
            shutil.rmtree(cfg.run.dir, ignore_errors=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": _device_name(ctx.device),
              "world_size": ctx.world_size, "task": task_cls.name, "preset": cfg.model.preset, "config": args.config,
              "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup, "label": args.label,
              "command": "python -m core.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "commit": _git_commit(), **result}
    if ctx.is_main:
        print(report(result), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            append_line(args.out, json.dumps(result))
            print(f"  JSON line appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
