"""The memory plan of a training step: predicted peak device memory per GPU for a batch size, ZeRO stage and
activation mode, from what can be measured on a CPU.

Two parts, added:

- **Saved activations**, measured: the model's forward at its real width and token count, one sample, under
  `torch.autograd.graph.saved_tensors_hooks`, counting the bytes of every distinct storage saved for backward
  (parameters excluded). The model is built with 1 and with 2 blocks: the difference is one block, the rest is
  the embeddings, final layer, projectors and loss inputs; the whole model is rest + depth x block. Precision as
  the ds_config's: fp32, bf16 autocast (measured under the CPU's autocast, whose op lists are close to CUDA's
  but not the same), or DeepSpeed-native bf16 weights. Activation checkpointing keeps each block's input and, at
  its recompute, one block's activations: depth x (tokens x hidden) + one block, computed from the measurement.
  Compiled blocks save what inductor's partitioner decides, which hooks do not see: not measured (at most eager).
- **States**, counted: weights, gradients, AdamW's two moments, the fp32 master copy (native bf16), the EMA (and
  post-hoc EMA's profiles), DeepSpeed's reduce and all-gather buckets of the ds_config, each divided over the
  ranks as its ZeRO stage partitions it, and the frozen encoder's weights.

Not counted: the allocator's fragmentation and caching, CUDA/NCCL workspaces (about 1-2 GiB), the transient
peaks of single ops (attention's workspace, the encoder's forward, the optimizer step's temporaries). So it is
a lower bound to compare with a GPU's capacity with a margin, not a measurement of one.
"""
from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass
class Activations:
    """Saved bytes per sample of one block and of the rest of the model, and the block input's bytes."""

    block: int
    rest: int
    block_input: int
    depth: int

    def per_sample(self, checkpointed: bool) -> int:
        if checkpointed:
            return self.rest + self.depth * self.block_input + self.block
        return self.rest + self.depth * self.block


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages `fn()` saves for backward, parameters left out (views of one storage count
    once, at the storage's size: a saved view keeps all of it alive)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.requires_grad and t.is_leaf:  # a parameter (or a leaf input): not an activation
            return t
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_activations(build, forward, depth: int, precision: str) -> Activations:
    """Saved activations per sample of a model of `depth` blocks. build(depth) -> model (on the CPU, real width);
    forward(model, n) -> its outputs for a batch of n. precision: fp32, autocast (bf16 under the CPU's autocast)
    or bf16 (the weights themselves). Measured at 1 and 2 blocks and at batch 1 and 2: what grows with the batch is
    an activation; what does not (autocast's bf16 copies of the weights, saved for the backward too) is not."""

    def one(d: int, n: int) -> tuple[int, int]:
        torch.manual_seed(0)
        model = build(d)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        inputs = []  # what checkpointing keeps of a block: the tensors it is called with

        def pre(module, args):
            inputs.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))

        hook = model.blocks[0].register_forward_pre_hook(pre)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            saved = saved_bytes(lambda: forward(model, n))
        hook.remove()
        return saved, inputs[0]

    (s11, i1), (s12, i2), (s21, _), (s22, _) = (one(d, n) for d in (1, 2) for n in (1, 2))
    per_sample_one, per_sample_two = s12 - s11, s22 - s21
    block = per_sample_two - per_sample_one
    return Activations(block=block, rest=per_sample_one - block, block_input=i2 - i1, depth=depth)


@dataclass
class States:
    """Bytes per rank of what a training step keeps besides activations."""

    weights: float
    autocast_copies: float  # autocast's bf16 copy of every weight, cached for the step's forward and backward
    grads: float
    optimizer: float
    master: float
    ema: float
    buckets: float
    encoder: float

    @property
    def total(self) -> float:
        return (self.weights + self.autocast_copies + self.grads + self.optimizer + self.master + self.ema
                + self.buckets + self.encoder)


def state_bytes(params: int, stage: int, world: int, native_bf16: bool, ds: dict, averages: int = 1,
                encoder_params: int = 0, autocast: bool = False) -> States:
    """The states of `params` trained under ZeRO `stage` on `world` ranks. Autocast (the default JSONs) keeps fp32
    weights and gradients; DeepSpeed's native bf16 keeps bf16 weights and gradients and an fp32 master partition.
    AdamW: two fp32 moments, partitioned from stage 1; gradients from stage 2; weights (and the EMA, which each rank
    averages over its own partition) at stage 3. `averages`: the EMA plus post-hoc EMA's profiles, fp32 each.
    Buckets: ZeRO-1/2 reduce gradients through `reduce_bucket_size` elements (two with overlap_comm) and gather
    updated weights through `allgather_bucket_size`; ZeRO-3 reduces through its reduce bucket and prefetches
    `stage3_prefetch_bucket_size` weights. `autocast`: bf16 autocast over fp32 weights, which keeps a bf16 copy of
    each weight the step uses (all of them; under ZeRO-3 of the gathered ones, counted whole: an upper bound)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} is not one of 0, 1, 2, 3")
    p, w = float(params), max(int(world), 1)
    wb = 2 if native_bf16 else 4
    part = lambda on: p / w if on else p  # noqa: E731
    z = ds.get("zero_optimization", {})
    reduce = float(z.get("reduce_bucket_size", 5e8)) * (2 if z.get("overlap_comm", False) else 1) * wb
    gather = float(z.get("stage3_prefetch_bucket_size" if stage == 3 else "allgather_bucket_size", 5e8)) * wb
    return States(weights=part(stage >= 3) * wb, autocast_copies=2 * p if autocast else 0.0,
                  grads=part(stage >= 2) * wb, optimizer=part(stage >= 1) * 8,
                  master=part(stage >= 1) * 4 if native_bf16 else 0.0, ema=part(stage >= 3) * 4 * averages,
                  buckets=(reduce + gather) if stage >= 1 else 0.0, encoder=float(encoder_params) * 4)


def precision_of(ds: dict) -> str:
    """fp32, autocast or bf16 (DeepSpeed's native bf16) from a ds_config dict."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("torch_autocast", {}).get("enabled"):
        return "autocast"
    return "fp32"


def plan_table(acts: dict, params: int, encoder_params: int, ds_by_stage: dict, world: int, batches, averages: int,
               capacity_gib: float) -> list[dict]:
    """One row per (batch per GPU, activation mode, ZeRO stage): predicted GiB and whether it fits."""
    rows = []
    for batch in batches:
        for mode in ("eager", "checkpointed"):
            for stage, ds in ds_by_stage.items():
                precision = precision_of(ds)
                st = state_bytes(params, stage, world, precision == "bf16", ds, averages, encoder_params,
                                 autocast=precision == "autocast")
                act = acts[precision].per_sample(mode == "checkpointed") * batch
                total = (st.total + act) / GiB
                rows.append({"batch": batch, "mode": mode, "stage": stage, "precision": precision,
                             "activations_gib": act / GiB, "states_gib": st.total / GiB, "total_gib": total,
                             "fits": total <= capacity_gib})
    return rows

