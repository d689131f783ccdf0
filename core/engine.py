"""The DeepSpeed engine: a JSON from ds_configs/ (ZeRO stage, precision, offload) with the batch, clipping and
optimiser fields filled from the training config, which is their one source of truth."""
import json

import torch

from core.config import ConfigError

FILLED_BY_CODE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "optimizer", "scheduler")


def batch_layout(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient-accumulation steps) for a global batch over `world_size` ranks."""
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by world size {world_size} x train.micro_batch="
            f"{micro}; per rank {per_rank} samples must be a multiple of the micro-batch"
        )
    return micro, per_rank // micro


def build_ds_config(train_cfg, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict: train.ds_config's JSON plus the fields derived from `train_cfg`.
    `load_universal`: the engine loads a universal checkpoint (a resume on another number of ranks)."""
    with open(train_cfg.ds_config) as f:
        ds = json.load(f)
    clash = [k for k in FILLED_BY_CODE if k in ds]
    if clash:
        raise ConfigError(
            f"{train_cfg.ds_config} sets {clash[0]!r}, which is filled from the training config "
            f"(train.global_batch, train.micro_batch, train.grad_clip, train.lr); remove it from the JSON"
        )
    micro, accum = batch_layout(train_cfg.global_batch, train_cfg.micro_batch, world_size)
    ds.update(train_batch_size=train_cfg.global_batch, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=accum, gradient_clipping=train_cfg.grad_clip)
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def make_optimizer(params, train_cfg, ds: dict, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the paper's settings: torch's (fused on CUDA), or DeepSpeed's CPU Adam under optimizer offload."""
    kw = dict(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # heavy, and JIT-builds its op: only under CPU offload

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)


def create_engine(model: torch.nn.Module, train_cfg, ds: dict, device: torch.device):
    """deepspeed.initialize with our optimiser; returns the engine (callable like the model)."""
    import deepspeed  # its import probes the accelerator and logs it: only where an engine is built

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train_cfg, ds, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=ds)
    return engine


def apply_optimizer_settings(engine, train_cfg) -> None:
    """Set lr, betas and weight decay of every param group from the config (after a restore, which brings back
    the saved ones)."""
    for group in engine.optimizer.param_groups:
        group.update(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)
