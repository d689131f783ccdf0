"""Typed dataclass configs loaded from YAML with dot-list overrides (`train.lr=2e-4`).

Every task (class-conditional, text-to-image) declares one top-level dataclass whose fields are section
dataclasses. `load_config(cls, path, overrides)` reads the YAML, applies the overrides, checks names and types,
and returns an instance; any problem is a `ConfigError` naming the key and listing the valid ones, raised before
any model is built. `save_config` writes the fully resolved config back as YAML.
"""
import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.diffusion import beta_schedule
from core.ema import MAX_SIGMA_REL
from core.encoders import encoder_attention, encoder_has_class_token, parse_encoder_spec
from core.fileio import atomic_write
from core.latents import LATENT_NORMS
from core.repa import LOSS_KINDS, PROJECTORS, TARGET_NORMS
from core.shards import read_manifest


class ConfigError(ValueError):
    """A config key, value or path that cannot be used; the message names the key."""


# ----------------------------------------------------------------------------------------------------------------
# Sections shared by every task. Paper values (REPA, ICLR 2025) are the defaults; the section is cited once here.


@dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints, logs and the resolved config go here; rerunning resumes from it
    seed: int = 0
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted after a newer one is complete)
    allow_config_change: bool = False  # resume even if the config differs from the checkpoint's (hash check)


@dataclass
class TrainConfig:
    max_steps: int = 400_000  # Sec. 4.1: SiT-XL/2 + REPA at 400K iterations
    global_batch: int = 256  # App. D, Table 7: batch 256
    micro_batch: int = 0  # per-rank micro-batch; 0 = global_batch / world_size (no gradient accumulation)
    lr: float = 1e-4  # App. D: AdamW, constant lr 1e-4, betas (0.9, 0.999), no weight decay
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # App. D: gradient clipping; the reference's train.py --max-grad-norm 1.0
    ema_decay: float = 0.9999  # the reference's train.py: update_ema(decay=0.9999) every step
    cond_dropout: float = 0.1  # the reference's train.py --cfg-prob 0.1: label (caption) dropout for CFG
    ds_config: str = "ds_configs/zero2.json"  # ZeRO stage, precision, offload; batch/clip/lr fields filled by code
    ckpt_every: int = 10_000
    log_every: int = 100
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/Inf instead of stopping the run (one host sync a step)
    # Steps between the ranks' agreement on a preemption signal (an all-reduce the host waits for); one rank checks
    # its own flag every step, for free. The stop comes at most this many steps after the signal.
    signal_every: int = 10
    deterministic: bool = False  # torch deterministic algorithms (used by the bit-exact resume test)
    num_workers: int = 4  # data-loader worker processes per rank
    tensorboard: bool = True
    compile: bool = False  # torch.compile each transformer block (one graph reused by all); a one-time compile cost
    # Post-hoc EMA (Karras et al. 2024, arXiv 2312.02696, Sec. 3): sigma_rel of the power-function EMAs whose
    # snapshots go to run.dir/phema, for `python -m core.posthoc_ema`; [] = off, edm2 keeps [0.05, 0.1]
    phema_stds: list[float] = field(default_factory=list)
    phema_every: int = 0  # steps between snapshots; 0 = edm2's every 8 Mi images, round(8 * 2**20 / global_batch)


@dataclass
class RepaConfig:
    coeff: float = 0.5  # Sec. 4.1: lambda = 0.5; 0 trains the plain model (no projector, no encoder)
    depth: int = 8  # Sec. 4.1 / Table 2: align after block 8 (1-indexed)
    encoders: list[str] = field(default_factory=lambda: ["dinov2-b"])  # Sec. 4.1: DINOv2-B; NAME or NAME@path
    projector_dim: int = 2048  # App. D: 3-layer SiLU MLP; width 2048 in the reference's models/sit.py
    loss: str = "cosine"  # cosine (paper) or ntxent (Table 2 ablation)
    ntxent_temperature: float = 0.1
    # The REPA family (docs/VARIANTS.md); each default leaves the paper's REPA unchanged.
    projector: str = "mlp"  # mlp (the paper's); conv: iREPA's one Conv2d over the token grid
    projector_kernel: int = 3  # conv: odd kernel size; 3 as iREPA's README and SiT (its LDM trainer's flag says 1)
    target_norm: str = "none"  # none; spatial_zscore: iREPA's (x - alpha mean) / (std + 1e-6) over the tokens
    target_norm_alpha: float = 0.6  # iREPA's SiT trainer default (--zscore-alpha)
    attn_coeff: float = 0.0  # HASTE: weight of the attention distillation (0.5 in its paper); 0 = off
    attn_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])  # HASTE: model blocks (1-indexed)
    attn_encoder_blocks: list[int] = field(default_factory=lambda: [9, 10, 11, 12])  # their teachers: DINOv2-B's last 4
    stop_step: int = 0  # HASTE: REPA and attention distillation stop at this step (0 = never); 250K in its paper


@dataclass
class DispConfig:
    """Dispersive loss (Wang & He, arXiv 2506.09027), with or without REPA. The defaults other than coeff are the
    paper's (its JAX runs: lambda 0.5, tau 0.5, a quarter of the blocks deep; its PyTorch code: 0.25, 1, the last)."""

    coeff: float = 0.0  # lambda; 0 = off
    tau: float = 0.5  # temperature on the squared distance divided by the feature size
    depth: int = 0  # the block (1-indexed) whose output tokens are dispersed; 0 = a quarter of the model's blocks


@dataclass
class RegConfig:
    """REG (Wu et al., arXiv 2507.01467): the first REPA encoder's class token, noised with the latents, is token
    0 of the class-conditional SiT, which predicts its velocity too; REPA aligns that position as well. Sampling
    integrates the token with the latents from Gaussian noise (eval.generate --cls-cfg)."""

    coeff: float = 0.0  # weight of the class token's velocity MSE (REG's --cls 0.03); 0 = off (no token)


@dataclass
class ObjectiveConfig:
    # transport: SiT's stochastic interpolant (Sec. 2); ddpm: DiT's improved DDPM (Sec. 3, Table 3: DiT-L/2 and
    # DiT-XL/2 with REPA), eps-prediction with learned variance and the hybrid loss (core/diffusion.py)
    kind: str = "transport"
    path: str = "linear"  # transport: Sec. 2, linear x_t = (1-t) x0 + t eps; or cosine
    time_sampling: str = "uniform"  # transport: uniform t, or lognormal (sigma = exp(N(0,1)), t = sigma / (1 + sigma))
    diffusion_steps: int = 1000  # ddpm: T = 1000 as DiT (Peebles & Xie 2023, Sec. 3)
    beta_schedule: str = "linear"  # ddpm: DiT's linear betas 1e-4 .. 0.02 (scaled by 1000/T); or cosine (iDDPM)
    # transport: weight of LightningDiT's velocity-direction loss, mean over positions of 1 - cos(v_pred, v) across
    # channels, added to the MSE (1.0 there, its transport.use_cosine_loss); 0 = off
    direction_loss: float = 0.0


@dataclass
class MonitorConfig:
    """What a run shows of itself while it trains (eval/monitor.py). None of it changes the training trajectory
    (its randomness is its own), so a resume may change any of these keys. An *_every of 0 is off."""

    sample_every: int = 0  # steps between grids of EMA samples (run.dir/samples/step_N.png, TensorBoard, W&B)
    sample_count: int = 16  # the grid's fixed conditions (classes 0, 1, ...; T2I: the first training captions)
    sample_steps: int = 25  # ODE Euler steps of a grid
    sample_cfg: float = 4.0  # the grid's guidance scale (the paper's sample figures use w = 4, Figs. 6 and 37)
    eval_every: int = 0  # steps between FID / FD-DINOv2 (/ CLIP score) of the EMA model (run.dir/eval.jsonl)
    eval_samples: int = 1000  # samples generated per evaluation, spread over the ranks
    eval_steps: int = 50  # ODE Euler steps (NFE 50, the paper's ODE setting)
    eval_cfg: float = 1.0  # guidance scale of the evaluation samples
    eval_ref: str = ""  # reference: a prepared dataset with images (T2I: a val split, which gives the captions too)
    #                     or an ADM .npz; "" = the training data (T2I: its val split beside it)
    eval_features: str = "inception"  # FID features: inception (clean-fid legacy_tensorflow) or proxy (labelled)
    inception_weights: str = ""  # a local inception-2015-12-05.pt (offline machines)
    fd_encoder: str = ""  # FD-DINOv2's encoder spec; "" = the run's first REPA encoder when it is a DINOv2; none = off
    clip_score: str = ""  # T2I: an open_clip ARCH@TAG for the CLIP score, or tiny (random-init, labelled); "" = off
    max_share: float = 0.25  # an evaluation is skipped while evaluations took more than this share of the wall time
    val_every: int = 0  # steps between validation losses of the EMA model at fixed times and noise (eval.jsonl)
    val_samples: int = 64  # samples of the validation subset
    val_times: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # t (1 = noise)
    val_path: str = ""  # a prepared dataset held out from training; "" = the first val_samples training samples
    wandb: bool = False  # log to Weights & Biases as well (one W&B run per run.dir, kept across resumes)
    wandb_project: str = "repa"
    wandb_mode: str = "online"  # online, or offline (files under run.dir/wandb, `wandb sync` later)


@dataclass
class LatentDataConfig:
    """The fields of every task's data section that say how the stored latents are normalised for the model
    (core.latents.LatentNorm)."""

    latent_norm: str = "scalar"  # scalar: the autoencoder's scaling (SD-VAE 0.18215); channel: the set's mean/std
    latent_multiplier: float = 1.0  # channel: z = (x - mean_c) / std_c * multiplier (LightningDiT: 1.0)


@dataclass
class TaskConfig:
    """The sections of every task's top-level config; a task's config (core/task.py) sets `task` to its name and
    adds its `model` and `data` sections."""

    task: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    disp: DispConfig = field(default_factory=DispConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ----------------------------------------------------------------------------------------------------------------
# Loading, overriding, validating. OmegaConf's structured configs do the merging and type conversion (as lingua:
# merge(structured(Config), file, command line)); the key checks before it and the mapping of its errors after it
# keep the messages in our terms: the dotted key, the nearest valid key, the valid keys, the expected type.

_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _unknown_key(dotted: str, name: str, where: str, valid) -> ConfigError:
    """The error for an unknown key: names it, lists the valid keys of its section, suggests the closest."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}; valid keys in {where}: {', '.join(sorted(valid))}")


def _checked(tree: Any, cls: type, prefix: str = "") -> dict:
    """`tree` (a nested dict from YAML and overrides) with every key checked against dataclass `cls`, and the two
    spellings OmegaConf would refuse accepted: a single string for a list (`repa.encoders=dinov2-b`) and an
    integral number written as a float (`1.0e4` steps)."""
    where = prefix.rstrip(".") or "the top level"
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {tree!r}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in tree.items():
        if key not in hints:
            raise _unknown_key(f"{prefix}{key}", key, where, hints)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = _checked(value, tp, f"{prefix}{key}.")
        elif typing.get_origin(tp) is list and isinstance(value, str):
            value = [value]
        elif tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif tp is str and isinstance(value, bool):  # OmegaConf would store 'True'
            raise ConfigError(f"{prefix}{key}: expected a string, got {value!r}")
        out[key] = value
    return out


def _field_type(cls: type, dotted: str) -> Any:
    """The annotated type of `dotted` (e.g. "train.lr", "repa.encoders[0]") in dataclass `cls`, or None."""
    tp: Any = cls
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(name)
        if index and typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
    return tp


def _value_at(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.replace("]", "").replace("[", ".").split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
    return node


def _conversion_error(err: OmegaConfBaseException, cls: type, tree: dict) -> ConfigError:
    """OmegaConf's error for a value of the wrong type, in our terms: "train.lr: expected a number, got 'fast'"."""
    key = getattr(err, "full_key", None) or ""
    expected = _EXPECTED.get(_field_type(cls, key)) if key else None
    if expected is None:
        return ConfigError(f"{key or 'config'}: {str(err).splitlines()[0]}")
    return ConfigError(f"{key}: expected {expected}, got {_value_at(tree, key)!r}")


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type) -> None:
    """Set `a.b.c = value` in the nested dict `tree`, checking each name against the dataclass `cls`."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(node_cls)
        if part not in hints:
            raise _unknown_key(dotted, part, ".".join(parts[:depth]) or "the top level", hints)
        tp = hints[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>=...")
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{'.'.join(parts[: depth + 1])}' is not a section, so '{dotted}' does not exist")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, node_cls = node[part], tp


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Split `key=value` strings; values are parsed as YAML (numbers, booleans, lists like [a,b])."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def read_yaml(path: str) -> dict:
    """The mapping in YAML file `path`; ConfigError for a missing file, a !!python tag or a non-mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f)  # plain data only: a !!python/object tag is refused, never constructed
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not a plain YAML config: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}


def load_config(cls: type, path: str | None = None, overrides: list[str] | tuple = (), check_data: bool = True) -> Any:
    """Read YAML `path` (optional), apply dot-list `overrides`, return a validated `cls` instance.

    Raises ConfigError for a missing file, unknown key, wrong type, or a failed `validate()` of the config;
    check_data=False skips the check that data.path is a prepared dataset (a benchmark on random batches).
    """
    tree = read_yaml(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value, cls)
    own_task = getattr(cls, "task", None)  # a task's config: another task's keys would be refused one by one
    if own_task and tree.get("task", own_task) != own_task:
        raise ConfigError(f"task: {tree['task']!r} is not this config's task ({own_task!r})")
    tree = _checked(tree, cls)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), tree))
    except OmegaConfBaseException as err:
        raise _conversion_error(err, cls, tree) from None
    if hasattr(cfg, "validate"):
        cfg.validate(check_data=check_data)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Keys that do not change a run's trajectory: a resume may change them freely.
BOOKKEEPING_KEYS = ("run.dir", "train.max_steps", "train.ckpt_every", "train.log_every", "train.num_workers",
                    "train.tensorboard", "run.keep_last", "run.allow_config_change", "train.compile",
                    "train.phema_every", "train.signal_every", "monitor.")


def _flat(tree: dict, ignore: tuple[str, ...] = BOOKKEEPING_KEYS) -> dict:
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in ignore and prefix not in ignore:  # "monitor." ignores a whole section
                flat[f"{prefix}{k}"] = v

    walk(tree, "")
    return flat


def config_hash(cfg: Any, ignore: tuple[str, ...] = BOOKKEEPING_KEYS) -> str:
    """Hash of the settings that change the training trajectory (bookkeeping keys such as run.dir ignored)."""
    return hashlib.sha256(json.dumps(_flat(to_dict(cfg), ignore), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(cfg: Any, saved: dict) -> list[str]:
    """The trajectory settings in which `cfg` differs from a saved resolved config (a dict as save_config wrote
    it), as "key: saved -> now". A key the saved config lacks (an option added since) counts only if `cfg` sets
    it away from its default, so adding options does not orphan older runs."""
    now, before = _flat(to_dict(cfg)), _flat(saved)
    defaults = _flat(to_dict(type(cfg)()))
    changes = []
    for key, value in now.items():
        old = before[key] if key in before else defaults.get(key)
        if _canonical(old) != _canonical(value):
            changes.append(f"{key}: {old!r} -> {value!r}")
    return changes


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML, atomically (a crash leaves the old file or the new one)."""
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def check_positive(**values: float) -> None:
    """Raise ConfigError for the first `key=value` that is not > 0 (keys given with dots as '__')."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key.replace('__', '.')} must be > 0, got {value}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(choices)}")


def check_prepared_dataset(key: str, path: str, kind: str, producer: str) -> None:
    """ConfigError unless `path` (config key `key`) is a prepared dataset of manifest kind `kind`."""
    if not path:
        raise ConfigError(f"{key} is empty: name the prepared dataset directory ({producer} output)")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: directory {path!r} does not exist")
    try:
        manifest = read_manifest(path)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    if manifest.get("kind", kind) != kind:
        raise ConfigError(f"{key}: {path!r} is a {manifest.get('kind')!r} dataset, not {kind!r}")


def check_block(key: str, depth: int, preset: str, blocks: int) -> None:
    """ConfigError unless the 1-indexed block `depth` exists in a model of `blocks` blocks."""
    if not 1 <= depth <= blocks:
        raise ConfigError(f"{key}={depth} is outside the {preset} model's blocks 1..{blocks}")


def validate_task_config(cfg: Any, task: str, presets: dict, producer: str, check_data: bool) -> None:
    """The checks of every task's config: its `task` name, the shared sections (validate_common), model.preset
    among `presets` (each with its "depth"), data.kind, with data.kind=shards a dataset of kind `task` at data.path
    (made by `producer`, unless not check_data), and repa.depth within the model's blocks."""
    if cfg.task != task:
        raise ConfigError(f"task: {cfg.task!r} is not this config's task ({task!r})")
    validate_common(cfg)
    check_choice("model.preset", cfg.model.preset, tuple(presets))
    check_choice("data.kind", cfg.data.kind, ("shards", "synthetic"))
    if cfg.data.kind == "synthetic" and cfg.data.path:  # it would generate a toy set at a path meant for data
        raise ConfigError(f"data.path={cfg.data.path!r} is for a prepared dataset, and data.kind=synthetic generates "
                          "its own under run.dir/data: set data.kind=shards to train on the dataset at data.path")
    if cfg.data.kind == "shards" and check_data:
        check_prepared_dataset("data.path", cfg.data.path, task, producer)
    preset = presets[cfg.model.preset]
    if cfg.repa.coeff > 0:
        check_block("repa.depth", cfg.repa.depth, cfg.model.preset, preset["depth"])
    if cfg.repa.coeff > 0 and cfg.repa.attn_coeff > 0:
        for i, block in enumerate(cfg.repa.attn_blocks):
            check_block(f"repa.attn_blocks[{i}]", block, cfg.model.preset, preset["depth"])
        _, heads = encoder_attention(cfg.repa.encoders[0])
        if preset["num_heads"] < heads:
            raise ConfigError(f"repa.attn_coeff > 0: the {cfg.model.preset} model has {preset['num_heads']} heads, "
                              f"fewer than the {heads} of encoder {cfg.repa.encoders[0]!r} whose attention it learns")
    if cfg.disp.coeff > 0 and cfg.disp.depth:
        check_block("disp.depth", cfg.disp.depth, cfg.model.preset, preset["depth"])


def validate_monitor(m: MonitorConfig) -> None:
    """Ranges and choices of the monitor section."""
    for key in ("sample_every", "eval_every", "val_every"):
        if getattr(m, key) < 0:
            raise ConfigError(f"monitor.{key} must be >= 0 (0 = off), got {getattr(m, key)}")
    check_positive(monitor__sample_count=m.sample_count, monitor__sample_steps=m.sample_steps,
                   monitor__eval_samples=m.eval_samples, monitor__eval_steps=m.eval_steps,
                   monitor__val_samples=m.val_samples, monitor__max_share=m.max_share)
    for key in ("sample_cfg", "eval_cfg"):
        if not getattr(m, key) >= 0:
            raise ConfigError(f"monitor.{key} must be >= 0 (1 = no guidance), got {getattr(m, key)}")
    if m.eval_samples < 2:
        raise ConfigError(f"monitor.eval_samples must be >= 2 (a covariance), got {m.eval_samples}")
    if not m.val_times or not all(0 < t <= 1 for t in m.val_times):
        raise ConfigError(f"monitor.val_times must be times in (0, 1] (1 = noise), got {m.val_times}")
    check_choice("monitor.eval_features", m.eval_features, ("inception", "proxy"))
    check_choice("monitor.wandb_mode", m.wandb_mode, ("online", "offline"))


def validate_variants(cfg: Any) -> None:
    """Ranges and combinations of the REPA-family keys (repa.projector .. repa.stop_step, the disp section)."""
    r, d = cfg.repa, cfg.disp
    check_choice("repa.projector", r.projector, PROJECTORS)
    if r.projector == "conv" and (r.projector_kernel < 1 or r.projector_kernel % 2 == 0):
        raise ConfigError(f"repa.projector_kernel must be odd and >= 1 (padding k // 2 keeps the token grid), "
                          f"got {r.projector_kernel}")
    check_choice("repa.target_norm", r.target_norm, TARGET_NORMS)
    if not 0 <= r.target_norm_alpha <= 1:
        raise ConfigError(f"repa.target_norm_alpha must be in [0, 1] (the share of the token mean taken off), "
                          f"got {r.target_norm_alpha}")
    if r.stop_step < 0:
        raise ConfigError(f"repa.stop_step must be >= 0 (0 = never stop), got {r.stop_step}")
    if r.attn_coeff < 0:
        raise ConfigError(f"repa.attn_coeff must be >= 0, got {r.attn_coeff}")
    if r.attn_coeff > 0:
        if r.coeff <= 0:
            raise ConfigError("repa.attn_coeff > 0 needs repa.coeff > 0: the attention distillation runs with REPA's "
                              "encoder and block")
        if not r.attn_blocks or len(r.attn_blocks) != len(r.attn_encoder_blocks):
            raise ConfigError(f"repa.attn_blocks {list(r.attn_blocks)} and repa.attn_encoder_blocks "
                              f"{list(r.attn_encoder_blocks)} must pair model blocks with encoder blocks one to one")
        if list(r.attn_blocks) != sorted(set(r.attn_blocks)):
            raise ConfigError(f"repa.attn_blocks must be increasing block numbers, got {list(r.attn_blocks)}")
        try:
            layers, _ = encoder_attention(r.encoders[0])
        except ValueError as err:
            raise ConfigError(f"repa.attn_coeff > 0: repa.encoders[0]: {err}") from None
        for i, block in enumerate(r.attn_encoder_blocks):
            if not 1 <= block <= layers:
                raise ConfigError(f"repa.attn_encoder_blocks[{i}]={block} is outside encoder "
                                  f"{r.encoders[0]!r}'s blocks 1..{layers}")
    if d.coeff < 0:
        raise ConfigError(f"disp.coeff must be >= 0, got {d.coeff}")
    if d.tau <= 0:
        raise ConfigError(f"disp.tau must be > 0, got {d.tau}")
    if d.depth < 0:
        raise ConfigError(f"disp.depth must be >= 0 (0 = a quarter of the model's blocks), got {d.depth}")
    validate_reg(cfg)


def validate_reg(cfg: Any) -> None:
    """REG's combinations: what it needs (REPA with one encoder that has a class token, the transport objective)
    and the options it cannot share the token with, each refused naming the key."""
    r, g = cfg.repa, cfg.reg
    if g.coeff < 0:
        raise ConfigError(f"reg.coeff must be >= 0, got {g.coeff}")
    if g.coeff == 0:
        return
    if r.coeff <= 0:
        raise ConfigError("reg.coeff > 0 needs repa.coeff > 0: REG takes its class token from REPA's encoder and "
                          "aligns it with REPA")
    if len(r.encoders) != 1 or not encoder_has_class_token(r.encoders[0]):
        raise ConfigError(f"reg.coeff > 0 takes one encoder with a class token (DINOv2 as REG, DINOv3, MAE, MoCo v3), "
                          f"got repa.encoders={list(r.encoders)}")
    if cfg.objective.kind != "transport":
        raise ConfigError(f"reg.coeff > 0 needs objective.kind=transport (REG noises its token on the SiT path), "
                          f"got {cfg.objective.kind!r}")
    for key, value, default, why in (
        ("repa.projector", r.projector, "mlp", "the class token is not on the token grid"),
        ("repa.target_norm", r.target_norm, "none", "the class token is not a patch token"),
        ("repa.stop_step", r.stop_step, 0, "the model takes the encoder's class token at every step"),
        ("monitor.val_every", cfg.monitor.val_every, 0, "the validation loss does not feed the class token"),
    ):
        if value != default:
            raise ConfigError(f"reg.coeff > 0 with {key}={value!r} is not supported ({why}); set {key}={default!r}")


def validate_phema(t: TrainConfig) -> None:
    """The post-hoc EMA keys: each sigma_rel a power-function width, distinct in the snapshots' names."""
    for i, std in enumerate(t.phema_stds):
        if not 0 < std < MAX_SIGMA_REL:
            raise ConfigError(f"train.phema_stds[{i}]={std} is not a relative EMA width in (0, {MAX_SIGMA_REL:.4f}) "
                              "(edm2 keeps 0.05 and 0.1)")
    names = [f"{std:.3f}" for std in t.phema_stds]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.phema_stds={list(t.phema_stds)} must differ at 3 decimals (the snapshots' names)")
    if t.phema_every < 0:
        raise ConfigError(f"train.phema_every must be >= 0 (0 = edm2's 8 Mi images in steps), got {t.phema_every}")


def validate_common(cfg: Any) -> None:
    """Checks shared by every task's config: ranges and choices of the run/train/repa/objective/monitor
    sections."""
    validate_monitor(cfg.monitor)
    t, r = cfg.train, cfg.repa
    if isinstance(getattr(cfg, "data", None), LatentDataConfig):
        check_choice("data.latent_norm", cfg.data.latent_norm, LATENT_NORMS)
        check_positive(data__latent_multiplier=cfg.data.latent_multiplier)
    check_positive(train__max_steps=t.max_steps, train__global_batch=t.global_batch, train__lr=t.lr,
                   train__ckpt_every=t.ckpt_every, train__log_every=t.log_every, run__keep_last=cfg.run.keep_last,
                   train__signal_every=t.signal_every)
    if t.micro_batch < 0:
        raise ConfigError(f"train.micro_batch must be >= 0 (0 = global_batch / world size), got {t.micro_batch}")
    if not 0.0 <= t.cond_dropout < 1.0:
        raise ConfigError(f"train.cond_dropout must be in [0, 1), got {t.cond_dropout}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.num_workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0, got {t.num_workers}")
    validate_phema(t)
    if cfg.run.seed < 0:  # the per-step generators are seeded from numpy SeedSequence, which takes no negatives
        raise ConfigError(f"run.seed must be >= 0, got {cfg.run.seed}")
    for key, beta in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {beta}")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.grad_clip < 0:  # DeepSpeed clips only for a value > 0: a negative one would switch clipping off silently
        raise ConfigError(f"train.grad_clip must be >= 0 (0 = no clipping), got {t.grad_clip}")
    if not os.path.isfile(t.ds_config):
        raise ConfigError(f"train.ds_config: file {t.ds_config!r} does not exist")
    if r.coeff < 0:
        raise ConfigError(f"repa.coeff must be >= 0, got {r.coeff}")
    if r.coeff > 0:
        if not r.encoders:
            raise ConfigError("repa.encoders is empty but repa.coeff > 0; name at least one encoder")
        if r.depth < 1:
            raise ConfigError(f"repa.depth must be >= 1 (1-indexed block), got {r.depth}")
        for i, spec in enumerate(r.encoders):
            try:
                parse_encoder_spec(spec)
            except ValueError as err:
                raise ConfigError(f"repa.encoders[{i}]: {err}") from None
    check_choice("repa.loss", r.loss, LOSS_KINDS)
    if r.loss == "ntxent" and r.ntxent_temperature <= 0:
        raise ConfigError(f"repa.ntxent_temperature must be > 0, got {r.ntxent_temperature}")
    validate_variants(cfg)
    o = cfg.objective
    check_choice("objective.kind", o.kind, ("transport", "ddpm"))
    check_choice("objective.path", o.path, ("linear", "cosine"))
    check_choice("objective.time_sampling", o.time_sampling, ("uniform", "lognormal"))
    check_choice("objective.beta_schedule", o.beta_schedule, ("linear", "cosine"))
    if not o.direction_loss >= 0:
        raise ConfigError(f"objective.direction_loss must be >= 0 (0 = off), got {o.direction_loss}")
    if o.kind == "transport":
        for key, value, default in (("diffusion_steps", o.diffusion_steps, 1000), ("beta_schedule", o.beta_schedule,
                                                                                   "linear")):
            if value != default:  # the transport objective has no discrete schedule to apply them to
                raise ConfigError(f"objective.{key}={value} applies to objective.kind=ddpm only; "
                                  f"objective.kind=transport uses objective.path and objective.time_sampling")
    if o.kind == "ddpm":
        for key, value, default in (("path", o.path, "linear"), ("time_sampling", o.time_sampling, "uniform"),
                                    ("direction_loss", o.direction_loss, 0.0)):
            if value != default:  # DDPM has its own noise schedule: the setting would be silently ignored
                raise ConfigError(f"objective.{key}={value} applies to objective.kind=transport only; "
                                  f"objective.kind=ddpm uses objective.beta_schedule")
        try:
            beta_schedule(o.beta_schedule, o.diffusion_steps)
        except ValueError as err:
            raise ConfigError(f"objective.diffusion_steps={o.diffusion_steps}: {err}") from None
