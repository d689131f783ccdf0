"""The one training loop: DeepSpeed engine, REPA, EMA, checkpoints, signals, logging.

A task (core/task.py: class-conditional, text-to-image) turns a batch into the model's condition; everything
else lives here once. A run is three steps:

    plan  = preflight(cfg, ctx)     every config, resume and data check, before anything expensive
    run   = build_run(plan)         model, DeepSpeed engine, EMA, REPA encoders, objective
    train's loop                    train_step, then the Checkpointer decides whether to save or stop

and one step is, per micro-batch:

    x0    = latents drawn from the stored VAE moments            (core.latents)
    cond  = task.condition(batch, drop)  with CFG dropout         (null class / empty caption)
    loss  = objective(model, x0, cond) + repa.coeff * REPA(zs, encoder tokens of the clean image)
            + the REPA family's other terms on (core.repa.RepresentationTerms: attention distillation,
              dispersive loss; repa.stop_step ends the terms that use the encoder)

All randomness of a step is drawn for the whole global batch from a generator seeded by (run.seed, step), each
micro-batch taking its rows (core.draws), and the data order is a function of (run.seed, step): a resumed run replays
exactly what an uninterrupted one would have done, and on another number of ranks what one would have done there
(float reduction order aside).
"""
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from tqdm import tqdm

from core import checkpoint as ckpt
from core.checkpoint import EXIT_PREEMPTED, Checkpointer, PreemptionSignals, RunState
from core.config import ConfigError, config_hash, save_config, to_dict
from core.data import StepSampler, make_loader
from core.dist import DistContext, any_rank, barrier, mean_over_ranks, min_over_ranks, setup_distributed
from core.draws import RowDraws, as_draws, step_generator
from core.ema import EMA, PowerEMA, update_averages
from core.encoders import encoder_attention, encoder_dim, encoder_names, load_encoders, parse_encoder_spec
from core.engine import apply_optimizer_settings, batch_layout, build_ds_config, create_engine
from core.latents import LatentNorm, run_latent_record, sample_latents
from core.logging import MetricsLogger
from core.repa import EncoderTargets, RepresentationTerms
from core.shards import feature_key, has_images, stored_features
from core.task import DataInfo, Task, get_task, plugin
from core.transport import build_objective

log = logging.getLogger(__name__)
MONITOR_GROUP = "repa_train.monitors"  # entry points of what shows a run while it trains (pyproject.toml)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteWatch:
    """The first optimiser step whose loss was NaN/Inf on this rank, kept on the device (NONE: none yet), so that an
    ordinary step reads nothing back to the host. `check` (at each log record and before anything is saved) reads
    it on every rank and raises: the run stops a few steps after the bad one, with no checkpoint written since."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first == self.NONE), step, self.first)

    def check(self, run_dir: str) -> None:
        """NonFiniteLossError if any rank saw a non-finite loss (a collective: every rank calls it)."""
        first = min_over_ranks(self.first)
        if first != self.NONE:
            last = ckpt.latest_checkpoint(run_dir)
            raise NonFiniteLossError(
                f"non-finite loss at step {first}; stopping. The newest checkpoint {last or '(none yet)'} is intact "
                "(none is written after a non-finite step). Set train.skip_nonfinite=true to skip such steps."
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
    for key, value, what in (("repa.attn_coeff", cfg.repa.attn_coeff, "attention distillation"),
                             ("reg.coeff", cfg.reg.coeff, "REG's class token")):
        if value > 0:  # neither the encoder's attention maps nor its class token is stored
            if has_images(info.root, info.manifest):
                return True, []
            raise ConfigError(f"{key} > 0 ({what}) runs the encoder {specs[0]!r} on the images, and dataset "
                              f"{info.root} has none: prepare it with --store-images, or train with {key}=0")
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


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    """What a run is, decided before anything expensive is built: the task (with its data), the model's recorded
    constructor arguments, the batch layout and what the batches carry."""

    cfg: Any
    ctx: DistContext
    task: Task
    model_kwargs: dict
    micro: int  # samples per micro-batch on this rank
    accum: int  # micro-batches per optimiser step
    need_image: bool  # batches carry the clean image (REPA encoders run in the step)
    feature_names: list  # stored encoder features the batches carry instead
    terms: RepresentationTerms  # the REPA-family terms beside the denoising loss
    load_universal: bool = False  # resuming a checkpoint of another number of ranks (core.checkpoint.reshards)
    latent: dict = None  # the run's latent entry: the dataset's, with the normalisation it trains with

    @functools.cached_property
    def norm(self) -> LatentNorm:
        """From the autoencoder's latents to the model's (data.latent_norm)."""
        return LatentNorm.from_record(self.latent)

    @property
    def data(self) -> DataInfo:
        return self.task.data

    @property
    def grid(self) -> int:
        """The model's tokens per side."""
        return self.model_kwargs["input_size"] // self.model_kwargs["patch_size"]

    def model_record(self) -> dict:
        return {"task": self.task.name, "kwargs": self.model_kwargs}

    def new_state(self) -> RunState:
        return RunState(config_hash(self.cfg), self.ctx.world_size, self.model_record(),
                        self.latent, self.data.identity())


def plan_run(cfg, task: Task, ctx: DistContext, layout: tuple[int, int] | None = None) -> RunPlan:
    """The plan of `cfg` for a task built on its data; ConfigError for a batch layout or data it cannot use.
    `layout`: (micro-batch, accumulation) when already computed (batch_plan)."""
    micro, accum = layout or batch_plan(cfg, ctx.world_size)
    enc_dims = [encoder_dim(s) for s in cfg.repa.encoders] if cfg.repa.coeff > 0 else []
    kwargs = task.model_kwargs(enc_dims)
    need_image, feature_names = data_needs(cfg, task.data, kwargs["input_size"] // kwargs["patch_size"])
    terms = RepresentationTerms(cfg.repa, cfg.disp, kwargs["depth"], cfg.reg)
    return RunPlan(cfg, ctx, task, kwargs, micro, accum, need_image, feature_names, terms,
                   latent=latent_record(cfg, task.data))


def latent_record(cfg, data: DataInfo) -> dict:
    """The run's latent entry for the dataset's latents normalised as data.latent_norm says; ConfigError naming
    the dataset when it has no statistics for it."""
    norm = getattr(cfg.data, "latent_norm", "scalar")
    latent = data.manifest["latent"]
    if data.random and norm == "channel" and "channel_stats" not in latent:  # random batches: any statistics do
        channels = latent["shape"][0]
        latent = {**latent, "channel_stats": {"mean": [0.0] * channels, "std": [1.0] * channels, "count": 0}}
    try:
        return run_latent_record(latent, norm, getattr(cfg.data, "latent_multiplier", 1.0))
    except ValueError as err:
        raise ConfigError(f"data.latent_norm={norm}: dataset {data.root} cannot be normalised so: {err}") from None


def preflight(cfg, ctx: DistContext, checkpointer: Checkpointer) -> tuple[RunPlan, str | None]:
    """Every check of the config, the run directory (no other training in it), the resume and the data, in that
    order and before any model is built; writes run.dir/config.yaml. Returns the plan and the checkpoint to resume
    from (None for a new run)."""
    build_ds_config(cfg.train, ctx.world_size)  # raises on a bad JSON or batch layout
    layout = batch_plan(cfg, ctx.world_size)
    resume_from = checkpointer.claim()
    if ctx.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    barrier()
    say(ctx, f"{cfg.run.dir}: resuming from {resume_from}" if resume_from else f"{cfg.run.dir}: a new run")
    task_cls = get_task(cfg.task)
    data = task_cls.prepare_data(cfg, ctx)
    say(ctx, f"data: {data.root}, {data.manifest['num_samples']} samples, latents {list(data.latent_shape)}")
    plan = plan_run(cfg, task_cls(cfg, data), ctx, layout)
    if resume_from is not None:
        ckpt.check_same_model(resume_from, ckpt.read_state(resume_from).get("model"), plan.model_record())
        plan.load_universal = ckpt.reshards(resume_from, ctx.world_size)
    return plan, resume_from


def say(ctx: DistContext, message: str) -> None:
    """A line on rank 0 about what start-up is doing (it takes tens of seconds before the first step)."""
    if ctx.is_main:
        tqdm.write(message)


def training_batches(plan: RunPlan, step: int) -> Iterator[dict]:
    """This rank's stream of micro-batches from the plan's dataset, starting at optimiser step `step`."""
    cfg, ctx = plan.cfg, plan.ctx
    dataset = plan.task.dataset(need_image=plan.need_image, feature_names=plan.feature_names)
    sampler = StepSampler(len(dataset), cfg.train.global_batch, ctx.world_size, ctx.rank, cfg.run.seed, step)
    return iter(make_loader(dataset, sampler, plan.micro, cfg.train.num_workers, pin_memory=ctx.device.type == "cuda"))


# ----------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """A built run: its plan, the DeepSpeed engine (model + optimiser), the EMA, the frozen REPA encoders (none
    when the batches carry their stored features), the objective, the post-hoc EMA's profiles (None: off) and the
    watch for non-finite losses (None: made by the first step, for runs built by hand)."""

    plan: RunPlan
    engine: Any
    ema: EMA
    encoders: list
    objective: Any
    phema: PowerEMA | None = None
    nonfinite: NonFiniteWatch | None = None


def build_run(plan: RunPlan) -> Run:
    """Build the model (seeded by run.seed, identical on every rank), its DeepSpeed engine, EMA and encoders."""
    cfg, ctx = plan.cfg, plan.ctx
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every allocation: 40x slower on CPU
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = plan.task.build_model(plan.model_kwargs, grad_checkpointing=cfg.model.grad_checkpointing)
    say(ctx, f"model: {plan.task.name} {cfg.model.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             "parameters" + (", blocks compiled on the first step" if cfg.train.compile else ""))
    if cfg.train.compile:
        compile_blocks(model)
    encoders = []
    if plan.need_image:  # one encoder patch per model token, whatever the encoder's patch size
        say(ctx, f"REPA encoders: loading {', '.join(cfg.repa.encoders)}")
        encoders = load_encoders(cfg.repa.encoders, plan.data.resolution, device=ctx.device, grid=plan.grid)
    elif plan.feature_names:
        say(ctx, f"REPA targets: the dataset's stored {', '.join(plan.feature_names)} features")
    say(ctx, f"DeepSpeed: {cfg.train.ds_config}, {ctx.world_size} rank(s), batch {plan.micro} x {plan.accum} per rank")
    engine = create_engine(model, cfg.train, build_ds_config(cfg.train, ctx.world_size, plan.load_universal),
                           ctx.device)
    ema = EMA(engine.module, cfg.train.ema_decay)
    phema = PowerEMA(ema, cfg.train.phema_stds) if cfg.train.phema_stds else None
    return Run(plan, engine, ema, encoders, build_objective(cfg.objective), phema, NonFiniteWatch(ctx.device))


@dataclass
class StepResult:
    skipped: bool  # non-finite loss with train.skip_nonfinite: no update was made
    losses: list  # one {name: detached 0-d tensor} per micro-batch run (StepLog's names)
    corrupt: int  # corrupt samples the loader passed over in this step's batches


def encoder_targets(run: Run, batch: dict) -> EncoderTargets:
    """The REPA targets of a micro-batch: the encoders on its images (the first one with the attention logits
    the terms ask for), or the stored features it carries."""
    device = run.plan.ctx.device
    if not run.encoders:
        return EncoderTargets([f.to(device, non_blocking=True).float() for f in batch["feats"]], [])
    images = batch["image"].to(device, non_blocking=True)
    terms = run.plan.terms
    tokens, attn, cls = run.encoders[0].targets(images, terms.encoder_attn_blocks, with_cls=terms.reg)
    return EncoderTargets([tokens] + [enc(images) for enc in run.encoders[1:]], attn, cls)


def step_taps(plan: RunPlan, step: int):
    """What the model returns at optimiser step `step` besides (out, zs) (core.repa.Taps), None for nothing."""
    terms = plan.terms
    return terms.taps(step, encoder_attention(plan.cfg.repa.encoders[0])[1] if terms.attn else 0)


def micro_loss(run: Run, batch: dict, g: RowDraws | torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
    """(total loss, {"denoise_loss": .., and each of plan.terms.names: ..} detached) of one micro-batch of
    optimiser step `step`, its random draws from `g` (its rows of the step's draws); a term that is off is 0."""
    plan, cfg, device = run.plan, run.plan.cfg, run.plan.ctx.device
    terms = plan.terms
    moments = batch["moments"].to(device, non_blocking=True)
    x0 = sample_latents(moments, g, plan.norm)
    drop = as_draws(g).rand((x0.shape[0],), device) < cfg.train.cond_dropout
    cond = plan.task.condition(batch, drop, device)
    targets = encoder_targets(run, batch) if terms.uses_encoder(step) else None
    reg = {"cls": targets.cls} if terms.reg else {}  # REG: the clean class token, noised by the objective
    denoise, zs, *tapped = run.objective.loss(run.engine, x0, cond, g, step_taps(plan, step), **reg)
    denoise = denoise.mean()
    tapped = tapped[0] if tapped else {}
    extra, values = terms.losses(step, zs, tapped, targets, device)
    for name, weight in run.objective.weights.items():  # the objective's own terms (LightningDiT's direction loss)
        values[name] = tapped[name].mean()
        extra = extra + weight * values[name]
    return denoise + extra, {"denoise_loss": denoise.detach(), **{k: v.detach() for k, v in values.items()}}


def micro_draws(plan: RunPlan, step: int, micro: int) -> RowDraws:
    """The draws of micro-batch `micro` of this rank at optimiser step `step`: its rows of the global batch, in
    the order of core.data.StepSampler's stream."""
    cfg, ctx = plan.cfg, plan.ctx
    start = ctx.rank * plan.micro * plan.accum + micro * plan.micro
    return RowDraws(step_generator(cfg.run.seed, step, ctx.device), start, cfg.train.global_batch)


def train_step(run: Run, batches: Iterator[dict], step: int) -> StepResult:
    """One optimiser step over the plan's `accum` micro-batches drawn from `batches`, then the EMA update (and the
    post-hoc EMA's, at its step count `step` + 1).

    A non-finite loss is noted on the device (run.nonfinite, checked by the loop at its log records and before a
    save), so the step reads nothing back to the host; with train.skip_nonfinite the step is skipped instead, which
    needs the all-rank answer before the update: one host sync per micro-batch.
    """
    cfg, ctx, engine = run.plan.cfg, run.plan.ctx, run.engine
    engine.train()
    losses, corrupt = [], 0
    for m in range(run.plan.accum):
        batch = next(batches)
        corrupt += batch.get("skipped", 0)
        loss, parts = micro_loss(run, batch, micro_draws(run.plan, step, m), step)
        if cfg.train.skip_nonfinite:
            if any_rank(not torch.isfinite(loss).item(), ctx.device):
                return StepResult(True, losses, corrupt)
        else:
            if run.nonfinite is None:
                run.nonfinite = NonFiniteWatch(ctx.device)
            run.nonfinite.observe(loss, step)
        engine.backward(loss)
        engine.step()
        losses.append({"loss": loss.detach(), **parts})
    update_averages(engine.module, run.ema, run.phema, step + 1)
    return StepResult(False, losses, corrupt)


class StepLog:
    """The losses and wall time of the steps since the last record; one record per train.log_every steps (rank 0
    writes it). Checkpoint time is excluded from the throughput."""

    def __init__(self, plan: RunPlan, resume_step: int | None = None):
        """`resume_step`: the step a resumed run continues from (None: a new run)."""
        cfg = plan.cfg
        self.names = ("loss", "denoise_loss") + plan.terms.names + tuple(build_objective(plan.cfg.objective).weights)
        wandb = ({"project": cfg.monitor.wandb_project, "mode": cfg.monitor.wandb_mode, "config": to_dict(cfg)}
                 if cfg.monitor.wandb else None)
        self.plan = plan
        self.logger = MetricsLogger(cfg.run.dir, plan.ctx.is_main, cfg.train.tensorboard, resume_step, wandb)
        self._reset()

    def _reset(self) -> None:
        self.window, self.steps, self.t0 = {k: [] for k in self.names}, 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        for losses in result.losses:
            for name in self.names:
                self.window[name].append(losses[name])
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def write(self, state: RunState, engine, bar) -> None:
        cfg, ctx = self.plan.cfg, self.plan.ctx
        means = mean_over_ranks([torch.stack(v).float().mean().item() if v else float("nan")
                                 for v in self.window.values()], ctx.device)
        grad_norm = engine.get_global_grad_norm()
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        record = {"step": state.step, **dict(zip(self.names, means)),
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "lr": float(engine.get_lr()[0]),
                  "img_per_s": self.steps * cfg.train.global_batch / ctx.world_size / seconds,
                  "skipped_steps": state.skipped_steps, "corrupt_samples": state.corrupt_samples}
        self.logger.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", repa=f"{record['repa_loss']:.3f}")
        self._reset()

    def close(self) -> None:
        self.logger.close()


class Monitor(Protocol):
    """What the loop calls after each optimiser step, on every rank, to show the run while it trains (the config's
    monitor section): eval.monitor.TrainingMonitor, found by name like the tasks (core imports no eval)."""

    def step_done(self, run: Run, state: RunState, logger: MetricsLogger) -> float:
        """Sample, score or validate when due; returns the seconds it took (left out of the throughput)."""


def make_monitor(plan: RunPlan) -> Monitor | None:
    """The monitor of the plan's config, None when the monitor section asks for nothing."""
    m = plan.cfg.monitor
    if not (m.sample_every or m.eval_every or m.val_every):
        return None
    return plugin(MONITOR_GROUP, "default", "monitor")(plan)


def train(cfg) -> int:
    """Run (or resume) training as configured; returns the process exit code (0 done, 75 preempted)."""
    signals = PreemptionSignals()  # first: a preemption signal during start-up must not kill the job un-requeued
    ctx = setup_distributed()
    checkpointer = Checkpointer(cfg, ctx, signals)
    try:
        return _train(cfg, ctx, checkpointer)
    finally:
        checkpointer.release()


def _train(cfg, ctx: DistContext, checkpointer: Checkpointer) -> int:
    plan, resume_from = preflight(cfg, ctx, checkpointer)
    monitor = make_monitor(plan)  # before the model: a monitor setting that cannot work fails here
    run = build_run(plan)
    torch.manual_seed(cfg.run.seed * 7919 + ctx.rank)
    state = plan.new_state()
    if resume_from is not None:
        state = checkpointer.restore(resume_from, run.engine, run.ema, state, run.phema)
        apply_optimizer_settings(run.engine, cfg.train)  # the optimizer state restores the saved lr/betas otherwise
    batches = training_batches(plan, state.step)
    steplog = StepLog(plan, resume_step=state.step if resume_from is not None else None)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not ctx.is_main, desc="train",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    stopped = False
    try:
        while state.step < cfg.train.max_steps and not stopped:
            result = train_step(run, batches, state.step)
            state.pending_corrupt += result.corrupt
            if result.skipped:
                state.skipped_steps += 1
                if ctx.is_main:
                    tqdm.write(f"step {state.step}: non-finite loss, step skipped ({state.skipped_steps} so far)")
            state.step += 1
            steplog.add(result)
            bar.update(1)
            done = state.step >= cfg.train.max_steps
            check = lambda: run.nonfinite.check(cfg.run.dir)  # noqa: E731  (raises NonFiniteLossError)
            if state.step % cfg.train.log_every == 0 or done:
                check()
                state.sum_counters(ctx.device)
                steplog.write(state, run.engine, bar)
            if monitor is not None:
                steplog.exclude(monitor.step_done(run, state, steplog.logger))
            saving_s, stopped = checkpointer.step_done(run.engine, run.ema, state, done, run.phema, before_save=check)
            steplog.exclude(saving_s)
    finally:
        bar.close()
        steplog.close()
    if not stopped:
        checkpointer.export(state)
    barrier()
    return EXIT_PREEMPTED if stopped else 0
