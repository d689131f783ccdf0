"""Watching a run while it trains: sample grids, FID / FD-DINOv2 / CLIP score and validation losses of the EMA
model at fixed steps (the config's monitor section; README "Watching a run").

core.trainer finds TrainingMonitor by name (pyproject.toml's repa_train.monitors) and calls step_done after every
optimiser step on every rank. What it writes: run.dir/samples/step_NNNNNNNN.png (a grid of fixed conditions and
seeds), run.dir/eval.jsonl (one record per evaluation: kind "eval" or "val"), the same to TensorBoard and W&B.

Nothing here touches the training's random streams: every draw comes from generators seeded by (run.seed, index),
inside torch.random.fork_rng, so a resumed run trains the same bits and draws the same grid at step N as a run
that never stopped. Numbers from random-init feature networks (--features proxy, the -tiny encoders, a tiny CLIP)
are keyed proxy_* and are comparable only with each other.
"""
import os
import time

import numpy as np
import torch
from torch.utils.data import default_collate

from core.checkpoint import RunState
from core.config import ConfigError, to_dict
from core.diffusion import GaussianDiffusion, t_to_step
from core.dist import any_rank
from core.encoders import load_encoder, parse_encoder_spec, random_weights_spec
from core.fileio import atomic_path
from core.latents import build_autoencoder
from core.logging import MetricsLogger
from core.shards import has_images, read_manifest
from core.task import DataInfo
from core.trainer import Run, RunPlan
from core.transport import build_objective
from eval.clipscore import ClipScorer
from eval.fid import (build_extractor, fid_from_stats, iter_images, list_images, load_reference, read_stats_file,
                      stats_from_features)
from eval.generate import Generator, caption_grid, shard

REFERENCE_LIMIT = 50_000  # reference images read at most (ImageNet's FID-50K size)
BATCH = 32  # samples per generation batch of an evaluation


def ema_model(run: Run) -> torch.nn.Module:
    """The model with the run's EMA weights, in eval mode on this rank's device. Every rank calls it: under ZeRO-3
    the EMA's state dict gathers the partitioned buffers."""
    state = run.ema.state_dict(run.engine.module)
    with torch.device("meta"):  # no initialisation: every tensor comes from the EMA state
        model = run.plan.task.build_model(run.plan.model_kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(run.plan.ctx.device).eval().requires_grad_(False)


def dataset_manifest(path: str) -> dict | None:
    """The manifest of a prepared dataset at `path`, None for another kind of path (an image folder, an .npz)."""
    return read_manifest(path) if os.path.isfile(os.path.join(path, "manifest.json")) else None


def is_random_init(spec: str) -> bool:
    """Whether an encoder spec names random weights (the -tiny encoders, NAME@random): proxy features."""
    name, source = parse_encoder_spec(spec)
    return name.endswith("-tiny") or spec == random_weights_spec(spec) and source is not None


class TrainingMonitor:
    """core.trainer.Monitor: the grids, evaluations and validation losses the monitor section asks for. Settings
    that cannot work (a reference that is not there, an unknown encoder) are a ConfigError when it is built,
    before the model; the feature networks and reference statistics are built at the first evaluation."""

    def __init__(self, plan: RunPlan):
        self.plan, self.cfg, self.m, self.ctx = plan, plan.cfg, plan.cfg.monitor, plan.ctx
        self.record = {"model": plan.model_record(), "latent": plan.latent,
                       "objective": to_dict(self.cfg.objective), "data": plan.data.identity(),
                       "source": os.path.abspath(self.cfg.run.dir), "step": 0}
        self.autoencoder = build_autoencoder(self.record["latent"]["autoencoder"], self.ctx.device)
        self.started, self.eval_seconds = time.perf_counter(), 0.0
        self._preview = self._networks = self._reference = self._val = None
        self.fd_spec = self._fd_spec()
        if self.m.eval_every:
            self.eval_ref = self._eval_ref()
            self.conditioner = self._eval_conditioner()
            if self.m.clip_score and not hasattr(self.conditioner, "captions"):
                raise ConfigError("monitor.clip_score scores images against captions; this task's evaluation "
                                  "conditions have none (a class-conditional run): leave it empty")
        if self.m.val_every and self.m.val_path:
            read_manifest(self.m.val_path)  # a ConfigError-worthy path is found now (ShardFormatError names it)

    # ------------------------------------------------------------------------------------------------- config

    def _fd_spec(self) -> str | None:
        """FD-DINOv2's encoder: monitor.fd_encoder, or the run's first REPA encoder when it is a DINOv2."""
        spec = self.m.fd_encoder
        if spec == "none" or not self.m.eval_every:
            return None
        if not spec:
            first = self.cfg.repa.encoders[0] if self.cfg.repa.encoders else ""
            return first if first.startswith("dinov2") else None
        try:
            parse_encoder_spec(spec)
        except ValueError as err:
            raise ConfigError(f"monitor.fd_encoder: {err} (or none)") from None
        return spec

    def _eval_ref(self) -> str:
        """The reference of the evaluations: monitor.eval_ref, else the training data (a text-to-image run: the
        val split beside it, whose captions are the evaluation's conditions)."""
        ref = self.m.eval_ref
        if not ref:
            beside = os.path.join(os.path.dirname(os.path.abspath(self.plan.data.root)), "val")
            ref = beside if os.path.isfile(os.path.join(beside, "manifest.json")) else self.plan.data.root
        if not os.path.exists(ref):
            raise ConfigError(f"monitor.eval_ref: {ref!r} does not exist")
        manifest = dataset_manifest(ref)
        if manifest is not None:
            images = has_images(ref, manifest)
            if not images and not manifest.get("fid_stats"):
                raise ConfigError(f"monitor.eval_ref: dataset {ref!r} stores no images (data_prep --store-images) "
                                  "and no FID statistics to compare with")
        elif os.path.isdir(ref):
            try:
                images = bool(list_images(ref))
            except FileNotFoundError:
                raise ConfigError(f"monitor.eval_ref: {ref!r} holds no images") from None
        else:
            try:
                images = "arr_0" in read_stats_file(ref)
            except ValueError as err:
                raise ConfigError(f"monitor.eval_ref: {err}") from None
        if self.fd_spec and not images:
            raise ConfigError(f"monitor.eval_ref: FD-DINOv2 needs reference images and {ref!r} has none; set "
                              "monitor.fd_encoder=none or name a reference with images")
        return ref

    def _eval_conditioner(self):
        """The task's evaluation conditions; a val split of captions comes from the reference when it is one."""
        captions = "fid_captions" in (dataset_manifest(self.eval_ref) or {})
        try:
            return self.plan.task.conditioner(self.record, {"cond_file": self.eval_ref} if captions else {})
        except ValueError as err:
            raise ConfigError(f"monitor.eval_ref: {err}") from None

    def _meta(self, step: int) -> dict:
        return {**self.record, "step": step}

    # ----------------------------------------------------------------------------------------------- the hook

    def step_done(self, run: Run, state: RunState, logger: MetricsLogger) -> float:
        """Run what is due at state.step (on every rank); returns the seconds it took."""
        step, m = state.step, self.m
        due = [job for job, every in (("grid", m.sample_every), ("val", m.val_every), ("eval", m.eval_every))
               if every and step % every == 0]
        if not due:
            return 0.0
        t0 = time.perf_counter()
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training's streams stay exactly as they were
            model = ema_model(run)
            if "grid" in due:
                self.grid(model, step, logger)
            if "val" in due:
                self.validate(model, step, logger)
            if "eval" in due:
                self.evaluate(model, step, logger)
        return time.perf_counter() - t0

    # --------------------------------------------------------------------------------------------------- grids

    def grid(self, model: torch.nn.Module, step: int, logger: MetricsLogger) -> None:
        """run.dir/samples/step_N.png: the preview conditions, fixed seeds, a short ODE with guidance (rank 0)."""
        if not self.ctx.is_main:
            return
        if self._preview is None:
            self._preview = self.plan.task.preview(self.m.sample_count)
        conditioner, captions = self._preview
        gen = Generator(model, self._meta(step), "ode", self.m.sample_steps, cfg=self.m.sample_cfg,
                        seed=self.cfg.run.seed, conditioner=conditioner, autoencoder=self.autoencoder)
        images = gen.images(range(len(captions))).permute(0, 2, 3, 1).cpu().numpy()
        path = os.path.join(self.cfg.run.dir, "samples", f"step_{step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            caption_grid(images, captions, columns=8).save(tmp, format="PNG")
        logger.log_image("samples", path, step)

    # ----------------------------------------------------------------------------------------------- validation

    def _val_batches(self) -> list[tuple[torch.Tensor, dict, list[int]]]:
        """This rank's share of the validation subset: (x0 (B, C, H, W) posterior means, condition, indices)."""
        task, cfg = self.plan.task, self.cfg
        if self.m.val_path:
            task = type(task)(cfg, DataInfo(self.m.val_path, read_manifest(self.m.val_path)))
        dataset = task.dataset(need_image=False, feature_names=[])
        n = min(self.m.val_samples, len(dataset))
        mine = list(shard(n, self.ctx.rank, self.ctx.world_size))
        batches, device = [], self.ctx.device
        for b in range(0, len(mine), BATCH):
            idx = mine[b:b + BATCH]
            batch = default_collate([dataset[(i, i)] for i in idx])  # position = index: a fixed caption choice
            mean = batch["moments"].float().chunk(2, dim=1)[0]
            x0 = self.plan.norm.normalize(mean).to(device)  # the run's normalisation, also of a held-out set
            cond = task.condition(batch, torch.zeros(len(idx), dtype=torch.bool), device)
            batches.append((x0, cond, idx))
        return batches

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, step: int, logger: MetricsLogger) -> None:
        """The denoising loss of the EMA model at each of monitor.val_times, with noise fixed per (sample, time):
        eval.jsonl's "val" record (the mean over times and one value per time)."""
        if self._val is None:
            self._val = self._val_batches()
        objective, times, device = build_objective(self.cfg.objective), self.m.val_times, self.ctx.device
        sums = torch.zeros(len(times) + 1, dtype=torch.float64, device=device)  # per time, then the count
        for x0, cond, idx in self._val:
            for k, t in enumerate(times):
                gens = [torch.Generator(device).manual_seed(self.cfg.run.seed * 1_000_003 + 7919 * i + k)
                        for i in idx]
                eps = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in gens])
                sums[k] += denoising_loss(objective, model, x0, eps, t, cond).double().sum()
            sums[-1] += len(idx)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        losses = (sums[:-1] / sums[-1]).tolist()
        logger.log_eval({"step": step, "kind": "val", "val_loss": float(np.mean(losses)),
                         **{f"val_loss@{t:g}": v for t, v in zip(times, losses)}, "num_samples": int(sums[-1]),
                         "held_out": bool(self.m.val_path)})

    # ----------------------------------------------------------------------------------------------- evaluation

    def _build_networks(self):
        """(FID extractor, FD encoder or None, CLIP scorer or None), built once."""
        if self._networks is None:
            m, device = self.m, self.ctx.device
            fid = build_extractor(m.eval_features, weights=m.inception_weights or None, device=device)
            fd = load_encoder(self.fd_spec, self.plan.data.resolution, device) if self.fd_spec else None
            clip = ClipScorer(m.clip_score, device) if m.clip_score else None
            self._networks = fid, fd, clip
        return self._networks

    def _reference_stats(self, fid, fd) -> dict:
        """{"fid": (mu, sigma), "fd": (mu, sigma) or None} of the reference, computed once (rank 0): a val split's
        stored statistics when their extractor is this one, else from the reference's images."""
        if self._reference is None:
            ref = self.eval_ref
            stored = (dataset_manifest(ref) or {}).get("fid_stats")
            if stored and stored.get("extractor") == fid.name:
                s = read_stats_file(os.path.join(ref, stored["file"]))
                fid_stats = (s["mu"].astype(np.float64), s["sigma"].astype(np.float64))
            else:
                s = load_reference(ref, fid, BATCH, need_feats=False)
                fid_stats = (s["mu"], s["sigma"])
            fd_stats = None
            if fd is not None:
                feats = [fd.embed(b.to(self.ctx.device)).cpu().numpy() for b in iter_images(ref, BATCH, REFERENCE_LIMIT)]
                fd_stats = stats_from_features(np.concatenate(feats).astype(np.float64))
            self._reference = {"fid": fid_stats, "fd": fd_stats}
        return self._reference

    def evaluate(self, model: torch.nn.Module, step: int, logger: MetricsLogger) -> None:
        """FID (and FD-DINOv2, CLIP score) of monitor.eval_samples EMA samples spread over the ranks: eval.jsonl's
        "eval" record. Skipped, and said so, while evaluations took more than monitor.max_share of the wall time."""
        spent, wall = self.eval_seconds, time.perf_counter() - self.started
        if any_rank(self.ctx.is_main and spent > self.m.max_share * wall, self.ctx.device):
            if self.ctx.is_main:
                print(f"monitor: evaluation at step {step} skipped: evaluations took {spent:.0f} s of {wall:.0f} s, "
                      f"more than monitor.max_share={self.m.max_share}", flush=True)
            return
        t0 = time.perf_counter()
        fid, fd, clip = self._build_networks()
        gen = Generator(model, self._meta(step), "ode", self.m.eval_steps, cfg=self.m.eval_cfg,
                        seed=self.cfg.run.seed, conditioner=self.conditioner, autoencoder=self.autoencoder)
        mine = list(shard(self.m.eval_samples, self.ctx.rank, self.ctx.world_size))
        parts = {"fid": [], "fd": [], "clip": []}
        for b in range(0, len(mine), BATCH):
            idx = mine[b:b + BATCH]
            images = gen.images(idx)
            parts["fid"].append(fid(images))
            if fd is not None:
                parts["fd"].append(fd.embed(images).cpu().numpy().astype(np.float64))
            if clip is not None:
                parts["clip"].append(clip.score(images, self.conditioner.captions(idx)).cpu().numpy())
        parts = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        gathered = [parts]
        if torch.distributed.is_initialized() and self.ctx.world_size > 1:
            gathered = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(gathered, parts)
        if self.ctx.is_main:
            every = {k: np.concatenate([g[k] for g in gathered]) if parts[k] is not None else None for k in parts}
            record = self._scores(every, fid, fd, clip)
            self.eval_seconds += time.perf_counter() - t0
            logger.log_eval({"step": step, "kind": "eval", **record, "num_samples": self.m.eval_samples,
                             "seconds": round(time.perf_counter() - t0, 2)})
        else:
            self.eval_seconds += time.perf_counter() - t0

    def _scores(self, feats: dict, fid, fd, clip) -> dict:
        ref = self._reference_stats(fid, fd)
        fd_proxy = fd is not None and is_random_init(self.fd_spec)
        out = {("proxy_fid" if fid.is_proxy else "fid"): fid_from_stats(*stats_from_features(feats["fid"]),
                                                                          *ref["fid"])}
        if fd is not None:
            key = "proxy_fd_dinov2" if fd_proxy else "fd_dinov2"
            out[key] = fid_from_stats(*stats_from_features(feats["fd"]), *ref["fd"])
        if clip is not None:
            out["proxy_clip_score" if clip.is_proxy else "clip_score"] = float(feats["clip"].mean())
        out["is_proxy"] = bool(fid.is_proxy or fd_proxy or (clip is not None and clip.is_proxy))
        out["features"] = fid.name + (f", {self.fd_spec}" if fd is not None else "") + (
            f", clip {clip.name}" if clip is not None else "")
        return out


def denoising_loss(objective, model, x0: torch.Tensor, eps: torch.Tensor, t: float, cond: dict) -> torch.Tensor:
    """(B,) the objective's denoising error at time t (1 = noise) with noise `eps`: the velocity MSE of the
    transport, or the eps MSE of DiT's diffusion at the step round(t T) (capped at T - 1)."""
    b = x0.shape[0]
    if isinstance(objective, GaussianDiffusion):
        s = min(int(t_to_step(torch.tensor(t), objective.num_timesteps)), objective.num_timesteps - 1)
        index = torch.full((b,), s, dtype=torch.long, device=x0.device)
        out = model(objective.q_sample(x0, index, eps), index, **cond)[0]
        return (out[:, : x0.shape[1]].float() - eps.float()).pow(2).flatten(1).mean(1)
    times = torch.full((b,), t, dtype=x0.dtype, device=x0.device)
    x_t, target = objective.interpolate(x0, eps, times)
    pred = model(x_t, times, **cond)[0]
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
