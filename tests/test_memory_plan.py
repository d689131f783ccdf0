"""core.memory_plan and `core.bench --memory-plan`: saved activations measured with saved-tensor hooks (per block
and per sample, weight copies left out), states counted per ZeRO stage, the table."""
import argparse
import json

import pytest
import torch

from class_cond.models import build_model
from conftest import REPO
from core.dist import DistContext
from core.memory_plan import GiB, Activations, measure_activations, plan_table, saved_bytes, state_bytes

TINY = dict(input_size=8, in_channels=12, num_classes=4, encoder_dims=(32,), projector_dim=64, repa_depth=1)


def _sit(depth):
    return build_model("tiny", depth=depth, **TINY)


def _forward(model, n):
    g = torch.Generator().manual_seed(0)
    return model(torch.randn(n, 12, 8, 8, generator=g), torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long))


def test_saved_bytes_count_each_storage_once_and_no_parameter():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)  # a leaf that needs its gradient: an input, not an activation
    h = torch.randn(4, 16) * 1.0
    assert saved_bytes(lambda: lin(h)) == 4 * 16 * 4  # the input is saved, the weight is not counted
    y = torch.randn(4, 32)
    a, b = y.chunk(2, dim=1)  # two views of one storage, both saved by the product
    assert saved_bytes(lambda: (a.requires_grad_() * 1.0) * b) >= 4 * 16 * 4
    assert saved_bytes(lambda: x.sum()) == 0


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_one_block_and_the_rest_predict_a_deeper_model_exactly(precision):
    a = measure_activations(_sit, _forward, 4, precision)
    assert a.block > 0 and a.rest > 0 and 0 < a.block_input < a.block
    four = measure_activations(lambda d: _sit(4 if d == 1 else 5), _forward, 4, precision)
    assert four.block == a.block  # the fifth block costs what the second did
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        m = _sit(4)
        one, three = saved_bytes(lambda: _forward(m, 1)), saved_bytes(lambda: _forward(m, 3))
    # per sample, whatever the batch (to 1%: a few kernels pad what they save for small batches)
    assert (three - one) / 2 == pytest.approx(a.per_sample(checkpointed=False), rel=0.01)
    assert a.per_sample(checkpointed=True) == a.rest + 4 * a.block_input + a.block < a.per_sample(False)


def test_states_divide_as_each_zero_stage_partitions_them():
    ds = {"zero_optimization": {"reduce_bucket_size": 10, "allgather_bucket_size": 20, "overlap_comm": True,
                                "stage3_prefetch_bucket_size": 30}}
    p, w = 800, 4
    s1 = state_bytes(p, 1, w, native_bf16=False, ds=ds, autocast=True)
    assert (s1.weights, s1.autocast_copies, s1.grads, s1.optimizer, s1.master, s1.ema) == (
        4 * p, 2 * p, 4 * p, 8 * p / w, 0, 4 * p)
    assert s1.buckets == (2 * 10 + 20) * 4
    s2 = state_bytes(p, 2, w, native_bf16=False, ds=ds)
    assert s2.grads == 4 * p / w and s2.weights == 4 * p and s2.autocast_copies == 0
    s3 = state_bytes(p, 3, w, native_bf16=True, ds=ds, averages=3, encoder_params=10)
    assert (s3.weights, s3.grads, s3.optimizer, s3.master, s3.ema, s3.encoder) == (
        2 * p / w, 2 * p / w, 8 * p / w, 4 * p / w, 3 * 4 * p / w, 40)
    assert s3.buckets == (2 * 10 + 30) * 2
    assert s3.total < s2.total < s1.total
    with pytest.raises(ValueError, match="ZeRO stage 4"):
        state_bytes(p, 4, w, False, ds)
    rows = plan_table({"fp32": Activations(block=GiB, rest=0, block_input=0, depth=10)}, p, 0,
                      {2: {"zero_optimization": {}}}, w, [4, 8], 1, capacity_gib=50)
    assert [(r["batch"], r["mode"], r["fits"]) for r in rows] == [(4, "eager", True), (4, "checkpointed", True),
                                                                  (8, "eager", False), (8, "checkpointed", True)]


def test_bench_memory_plan_of_the_tiny_run():
    from class_cond.task import ClassCondTask
    from core.bench import bench_memory_plan, report
    from core.task import load_task_config

    task_cls, cfg = load_task_config(f"{REPO}/configs/debug/class_cond_tiny.yaml", ["data.synthetic_samples=16"],
                                     check_data=False)
    assert task_cls is ClassCondTask
    cfg.train.ds_config = f"{REPO}/{cfg.train.ds_config}"
    args = argparse.Namespace(resolution=32, vae="sd-vae", world=8, batches=[32, 256], capacity_gib=80.0)
    r = bench_memory_plan(cfg, task_cls, DistContext(0, 1, 0, torch.device("cpu")), args)
    assert r["mode"] == "memory-plan" and r["precision"] == "fp32" and len(r["rows"]) == 2 * 2 * 3
    assert r["saved_mib_per_sample"]["depth"] == 4 and json.dumps(r)
    big = [x for x in r["rows"] if x["batch"] == 256 and x["mode"] == "eager"]
    small = [x for x in r["rows"] if x["batch"] == 32 and x["mode"] == "eager"]
    assert all(b["activations_gib"] == pytest.approx(8 * s["activations_gib"]) for b, s in zip(big, small))
    text = report({**r, "task": "class_cond", "preset": "tiny", "device": "cpu", "world_size": 1, "config": "c",
                   "overrides": [], "steps": 0, "warmup": 0})
    assert "saved activations per sample" in text and "| 256 | checkpointed | 3 |" in text
