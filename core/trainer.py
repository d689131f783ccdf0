"""The one training loop: DeepSpeed engine, REPA, EMA, checkpoints, signals, logging.

A task (class-conditional, text-to-image) is a small object that prepares its dataset, builds its model and turns
a batch into the model's condition; everything else lives here once. The loop:

    x0    = latents drawn from the stored VAE moments            (core.latents)
    cond  = task.condition(batch, drop)  with CFG dropout         (null class / empty caption)
    loss  = objective(model, x0, cond) + repa.coeff * REPA(zs, encoder tokens of the clean image)

All randomness of a step comes from a generator seeded by (run.seed, step, rank, micro-batch), and the data order is
a function of (run.seed, step), so a resumed run replays exactly what an uninterrupted one would have done.
"""
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import yaml
from tqdm import tqdm

from core import checkpoint as ckpt
from core.config import ConfigError, config_changes, config_hash, save_config
from core.data import StepSampler, make_loader
from core.dist import DistContext, any_rank, barrier, mean_over_ranks, setup_distributed, sum_over_ranks
from core.ema import EMA
from core.encoders import encoder_dim, encoder_names, load_encoders, parse_encoder_spec
from core.engine import batch_layout, build_ds_config, create_engine
from core.latents import sample_latents
from core.logging import MetricsLogger
from core.repa import repa_loss
from core.shards import feature_key, has_images, stored_features
from core.transport import build_objective

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; rerun (or requeue) to continue


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class DataInfo:
    """What the trainer needs to know of a prepared dataset (from its manifest)."""

    root: str
    manifest: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent"]["shape"])

    @property
    def scale(self) -> float:
        return float(self.manifest["latent"]["scale_factor"])

    @property
    def shift(self) -> float:
        return float(self.manifest["latent"].get("shift", 0.0))

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def identity(self) -> dict:
        """What eval needs to know of the training data: kind, resolution, text encoder (t2i), classes."""
        keys = ("kind", "resolution", "num_classes", "text_encoder", "text_embedding")
        return {"path": os.path.abspath(self.root), **{k: self.manifest[k] for k in keys if k in self.manifest}}

    def square_latent(self) -> tuple[int, int]:
        """(channels, side) of the dataset's latents; a ConfigError if they are not square."""
        c, h, w = self.latent_shape
        if h != w:
            raise ConfigError(f"latents of {self.root} are {h}x{w}; the models need square latents")
        return c, h



class Task(Protocol):
    """What a task supplies to the trainer."""

    def prepare_data(self, ctx: DistContext) -> DataInfo:
        """Locate (or generate, on rank 0) the dataset and read its manifest; raise a clear error if unusable."""

    def dataset(self, info: DataInfo, need_image: bool, feature_names: list[str]):
        """A map-style dataset of dicts with "moments", the condition's fields, and "image" or "feats"."""

    name: str  # recorded in checkpoints: which task's model builder reads `model.kwargs`

    def model_kwargs(self, info: DataInfo, encoder_dims: list[int]) -> dict:
        """JSON-serialisable constructor arguments of the model (recorded in every checkpoint)."""

    def build_model(self, kwargs: dict) -> torch.nn.Module:
        """The model; forward(x, t, **condition) -> (output, [projected tokens per encoder])."""

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        """Model keyword arguments for `batch`, with the null condition where `drop` (B,) is True."""


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator for all random draws of one micro-batch: a pure function of its coordinates."""
    s = int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(s)


class SignalFlag:
    """Set by SIGUSR1/SIGTERM (Slurm preemption, time limit); the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def apply_optimizer_settings(engine, train_cfg) -> None:
    """Set lr, betas and weight decay of every param group from the config."""
    for group in engine.optimizer.param_groups:
        group.update(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)


@dataclass
class TrainingSetup:
    """What a training step needs, built once by `build_setup`: the engine (model + optimiser), EMA, frozen REPA
    encoders (none when the dataset stores their features), the objective and the batch layout."""
    cfg: Any
    task: Task
    ctx: DistContext
    info: DataInfo
    model_kwargs: dict
    engine: Any
    ema: EMA
    encoders: list
    objective: Any
    micro: int  # samples per micro-batch on this rank
    accum: int  # micro-batches per optimiser step
    need_image: bool  # batches carry the clean image (REPA encoders run in the step)
    feature_names: list  # stored encoder features the batches carry instead


@dataclass
class StepResult:
    skipped: bool  # non-finite loss with train.skip_nonfinite: no update was made
    losses: list  # one (total, denoising, REPA) triple of detached 0-d tensors per micro-batch run
    corrupt: int  # corrupt samples the loader passed over in this step's batches


def check_resume_config(cfg, checkpoint: str) -> None:
    """ConfigError unless `cfg` may resume `checkpoint`: the same trajectory settings (bookkeeping keys and options
    added since, at their defaults, aside), or run.allow_config_change=true."""
    if ckpt.read_state(checkpoint).get("config_hash") == config_hash(cfg) or cfg.run.allow_config_change:
        return
    try:
        with open(os.path.join(checkpoint, "config.yaml")) as f:
            changes = config_changes(cfg, yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        changes = [f"(its config.yaml is unreadable; config hash {config_hash(cfg)} differs)"]
    if changes:
        raise ConfigError(
            f"{cfg.run.dir} holds a checkpoint of a run with a different config ({'; '.join(changes[:6])}"
            f"{'; ...' if len(changes) > 6 else ''}; see {checkpoint}/config.yaml). Use another run.dir, or set "
            "run.allow_config_change=true to resume anyway"
        )


def check_resume_world_size(checkpoint: str, world_size: int) -> None:
    """ConfigError unless `checkpoint` was written by `world_size` ranks: DeepSpeed's ZeRO checkpoints hold one
    optimiser partition per rank and load on the same data-parallel size only (found before any setup)."""
    saved = ckpt.read_state(checkpoint).get("world_size")
    if saved is not None and saved != world_size:
        raise ConfigError(
            f"{checkpoint} was written by {saved} ranks and this run has {world_size}: DeepSpeed's ZeRO checkpoints "
            f"resume on the same number of ranks (GPUs) only. Resume with {saved} ranks, or start a new run.dir"
        )


def batch_plan(cfg, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, micro-batches per step); ConfigError for a layout this run cannot use."""
    micro, accum = batch_layout(cfg.train.global_batch, cfg.train.micro_batch, world_size)
    if cfg.train.skip_nonfinite and accum > 1:  # a skip mid-accumulation would leave DeepSpeed's step half done
        raise ConfigError("train.skip_nonfinite needs one micro-batch per step (train.micro_batch = global_batch / "
                          f"world size); this run accumulates {accum} micro-batches")
    return micro, accum


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (regional compilation: the identical blocks share one graph,
    so it compiles once, and the state dict keeps its names)."""
    for block in model.blocks:
        block.compile(dynamic=False)


def data_needs(cfg, info: DataInfo, grid: int) -> tuple[bool, list[str]]:
    """(batches carry the clean image, names of the stored encoder features they carry instead), for a model of
    grid x grid tokens. REPA reads stored features when the dataset has, for every encoder, features of the same
    spec (NAME@SOURCE) and grid**2 tokens (FORMATS.md); else its encoders run on the stored images. ConfigError
    when the dataset has neither."""
    specs = list(cfg.repa.encoders) if cfg.repa.coeff > 0 else []
    if not specs:
        return False, []
    stored = stored_features(info.root, info.manifest)
    unusable = []  # why the stored features of an encoder cannot serve this run
    for spec, name in zip(specs, encoder_names(specs)):
        have = stored.get(name)
        if have is None:
            unusable.append(f"no {feature_key(name)}")
            continue
        if have["spec"] is None:
            have = {**have, "spec": name}  # a bare name, from before specs were recorded: assume default weights
            log.warning("%s lists stored %s features without their source; assuming %r (default weights)",
                        info.root, name, name)
        if ((parse_encoder_spec(have["spec"]), have["tokens"], have["dim"])
                != (parse_encoder_spec(spec), grid * grid, encoder_dim(spec))):
            unusable.append(f"{feature_key(name)} of {have['spec']!r} with {have['tokens']} tokens, this run needs "
                            f"{spec!r} with {grid * grid} ({grid}x{grid}, the model's token grid)")
    if not unusable:
        return False, encoder_names(specs)
    if has_images(info.root, info.manifest):
        if stored:
            log.warning("not using the stored features of %s (%s): running the REPA encoders on its images",
                        info.root, "; ".join(unusable))
        return True, []
    raise ConfigError(
        f"REPA (repa.coeff={cfg.repa.coeff}) needs the images or matching stored features, and dataset {info.root} "
        f"has no images and {'; '.join(unusable)}. Prepare it with --store-images, or with --features "
        f"{' '.join(specs)} --feature-grid {grid} (data_prep), or train with repa.coeff=0"
    )


def training_batches(cfg, task: Task, info: DataInfo, ctx: DistContext, micro: int, step: int) -> Iterator[dict]:
    """This rank's stream of micro-batches from the prepared dataset `info`, starting at optimiser step `step`."""
    kwargs = task.model_kwargs(info, [])  # only its token grid is read
    need_image, feature_names = data_needs(cfg, info, kwargs["input_size"] // kwargs["patch_size"])
    dataset = task.dataset(info, need_image=need_image, feature_names=feature_names)
    sampler = StepSampler(len(dataset), cfg.train.global_batch, ctx.world_size, ctx.rank, cfg.run.seed, step)
    return iter(make_loader(dataset, sampler, micro, cfg.train.num_workers, pin_memory=ctx.device.type == "cuda"))


def build_setup(cfg, task: Task, ctx: DistContext, info: DataInfo) -> TrainingSetup:
    """Build the model (seeded by run.seed, identical on every rank), its DeepSpeed engine, EMA and encoders."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every allocation: 40x slower on CPU
    enc_dims = [encoder_dim(s) for s in cfg.repa.encoders] if cfg.repa.coeff > 0 else []
    micro, accum = batch_plan(cfg, ctx.world_size)
    model_kwargs = task.model_kwargs(info, enc_dims)
    grid = model_kwargs["input_size"] // model_kwargs["patch_size"]
    need_image, feature_names = data_needs(cfg, info, grid)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = task.build_model(model_kwargs)
    if cfg.train.compile:
        compile_blocks(model)
    encoders = []
    if need_image:  # one encoder patch per model token, whatever the encoder's patch size
        encoders = load_encoders(cfg.repa.encoders, info.resolution, device=ctx.device, grid=grid)
    engine = create_engine(model, cfg.train, build_ds_config(cfg.train, ctx.world_size), ctx.device)
    return TrainingSetup(cfg, task, ctx, info, model_kwargs, engine, EMA(engine.module, cfg.train.ema_decay),
                         encoders, build_objective(cfg.objective), micro, accum, need_image, feature_names)


def train_step(s: TrainingSetup, batches: Iterator[dict], step: int) -> StepResult:
    """One optimiser step over `s.accum` micro-batches drawn from `batches`, then the EMA update.

    A non-finite loss on any rank raises NonFiniteLossError, or with train.skip_nonfinite skips the step. Losses
    stay on the device (no host sync for them); the one sync per micro-batch is the all-rank finiteness check.
    """
    cfg, engine = s.cfg, s.engine
    engine.train()
    losses, corrupt = [], 0
    for m in range(s.accum):
        batch = next(batches)
        corrupt += batch.get("skipped", 0)
        g = step_generator(cfg.run.seed, step, s.ctx.rank, m, s.ctx.device)
        loss, denoise, repa = _micro_loss(cfg, s.task, engine, s.objective, s.encoders, s.info, batch, g,
                                          s.ctx.device)
        if any_rank(not torch.isfinite(loss).item(), s.ctx.device):
            if not cfg.train.skip_nonfinite:
                last = ckpt.latest_checkpoint(cfg.run.dir)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (micro-batch {m}); stopping. The newest checkpoint "
                    f"{last or '(none yet)'} is intact. Set train.skip_nonfinite=true to skip such steps."
                )
            return StepResult(True, losses, corrupt)
        engine.backward(loss)
        engine.step()
        losses.append((loss.detach(), denoise, repa))
    s.ema.update(engine.module)
    return StepResult(False, losses, corrupt)


def train(cfg, task: Task) -> int:
    """Run (or resume) training as configured; returns the process exit code (0 done, 75 preempted)."""
    signals = SignalFlag()  # first: a preemption signal during start-up must not kill the job un-requeued
    ctx = setup_distributed()
    run_dir = cfg.run.dir
    # Configuration errors come before anything expensive: batch layout, resume compatibility, the dataset.
    build_ds_config(cfg.train, ctx.world_size)  # raises on a bad JSON or batch layout
    micro, _ = batch_plan(cfg, ctx.world_size)
    resume_from = ckpt.latest_checkpoint(run_dir)
    if resume_from is not None:
        check_resume_config(cfg, resume_from)
        check_resume_world_size(resume_from, ctx.world_size)
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()
    info = task.prepare_data(ctx)

    setup = build_setup(cfg, task, ctx, info)
    engine, ema, model_kwargs = setup.engine, setup.ema, setup.model_kwargs
    torch.manual_seed(cfg.run.seed * 7919 + ctx.rank)

    state = {"step": 0, "skipped_steps": 0, "corrupt_samples": 0, "config_hash": config_hash(cfg),
             "world_size": ctx.world_size, "model": {"task": task.name, "kwargs": model_kwargs},
             "latent": info.manifest["latent"], "data": info.identity()}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, engine, ema, ctx.rank, ctx.world_size,
                                          model={"task": task.name, "kwargs": model_kwargs}))
        state.update(config_hash=config_hash(cfg), world_size=ctx.world_size,
                     model={"task": task.name, "kwargs": model_kwargs}, latent=info.manifest["latent"],
                     data=info.identity())
        apply_optimizer_settings(engine, cfg.train)  # the optimizer state restores the saved lr/betas otherwise
        if ctx.is_main:
            tqdm.write(f"resumed from {resume_from} at step {state['step']}")

    loader = training_batches(cfg, task, info, ctx, micro, state["step"])

    logger = MetricsLogger(run_dir, ctx.is_main, cfg.train.tensorboard)
    window = {"loss": [], "denoise_loss": [], "repa_loss": []}
    t_window, window_steps = time.perf_counter(), 0
    bar = tqdm(total=cfg.train.max_steps, initial=state["step"], disable=not ctx.is_main, desc="train",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    corrupt_local = 0  # corrupt samples this rank passed over since the counters were last summed

    def sum_counters() -> None:
        nonlocal corrupt_local
        state["corrupt_samples"] += sum_over_ranks(corrupt_local, ctx.device)
        corrupt_local = 0

    def save() -> str:
        sum_counters()
        return ckpt.save_checkpoint(run_dir, engine, ema, dict(state), cfg, ctx.rank, cfg.run.keep_last)

    exit_code = 0
    try:
        while state["step"] < cfg.train.max_steps:
            step = state["step"]
            result = train_step(setup, loader, step)
            corrupt_local += result.corrupt
            for name, values in zip(window, zip(*result.losses)):
                window[name].extend(values)
            if result.skipped:
                state["skipped_steps"] += 1
                if ctx.is_main:
                    tqdm.write(f"step {step}: non-finite loss, step skipped ({state['skipped_steps']} so far)")
            state["step"] = step + 1
            window_steps += 1
            bar.update(1)
            done = state["step"] >= cfg.train.max_steps
            if state["step"] % cfg.train.log_every == 0 or done:
                sum_counters()
                _log(logger, engine, window, state, cfg, ctx, window_steps, time.perf_counter() - t_window, bar)
                window = {k: [] for k in window}
                t_window, window_steps = time.perf_counter(), 0
            preempted = any_rank(signals.received is not None, ctx.device)
            if state["step"] % cfg.train.ckpt_every == 0 or done or preempted:
                t0 = time.perf_counter()
                path = save()
                if ctx.is_main:
                    tqdm.write(f"checkpoint {path} written in {time.perf_counter() - t0:.2f} s")
                t_window += time.perf_counter() - t0  # saving time is not training throughput
            if preempted and not done:
                if ctx.is_main:
                    tqdm.write(f"signal received: checkpoint at step {state['step']} written, exiting to be resumed")
                exit_code = EXIT_PREEMPTED
                break
    finally:
        bar.close()
        logger.close()
    if exit_code == 0 and ctx.is_main:
        out = ckpt.export_ema(run_dir, os.path.join(run_dir, "export", "ema.safetensors"))
        tqdm.write(f"training done at step {state['step']}; EMA weights exported to {out}")
    barrier()
    return exit_code


def _micro_loss(cfg, task, engine, objective, encoders, info, batch, g, device):
    """(total, denoising, REPA) losses of one micro-batch; REPA is 0 when repa.coeff = 0."""
    moments = batch["moments"].to(device, non_blocking=True)
    x0 = sample_latents(moments, g, info.scale, info.shift)
    drop = torch.rand(x0.shape[0], generator=g, device=device) < cfg.train.cond_dropout
    cond = task.condition(batch, drop, device)
    denoise, zs = objective.loss(engine, x0, cond, g)
    denoise = denoise.mean()
    if cfg.repa.coeff > 0:
        if encoders:
            images = batch["image"].to(device, non_blocking=True)
            targets = [enc(images) for enc in encoders]
        else:
            targets = [f.to(device, non_blocking=True) for f in batch["feats"]]
        repa = repa_loss(zs, targets, cfg.repa.loss, cfg.repa.ntxent_temperature)
    else:
        repa = torch.zeros((), device=device)
    return denoise + cfg.repa.coeff * repa, denoise.detach(), repa.detach()


def _log(logger, engine, window, state, cfg, ctx, steps, seconds, bar):
    means = mean_over_ranks([torch.stack(v).float().mean().item() if v else float("nan") for v in window.values()],
                            ctx.device)
    grad_norm = engine.get_global_grad_norm()
    record = {"step": state["step"], **dict(zip(window, means)),
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
              "lr": float(engine.get_lr()[0]),
              "img_per_s": steps * cfg.train.global_batch / ctx.world_size / max(seconds, 1e-9),
              "skipped_steps": state["skipped_steps"], "corrupt_samples": state["corrupt_samples"]}
    logger.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", repa=f"{record['repa_loss']:.3f}")
