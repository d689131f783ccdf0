"""Host synchronisations: core.host_syncs counts reads of device values at the dispatcher, and an ordinary training
step of the project reads none (the non-finite check waits on the device for the next log record or save, the
preemption poll of one rank is its own flag, the T2I null condition is copied to the device once)."""
import os
import signal

import pytest
import torch

from class_cond.task import ClassCondConfig, ClassCondTask
from conftest import REPO
from core.checkpoint import Checkpointer, PreemptionSignals
from core.config import load_config
from core.dist import DistContext, any_rank
from core.ema import EMA
from core.host_syncs import HostSyncCounter
from core.trainer import NonFiniteLossError, NonFiniteWatch, Run, build_objective, plan_run, train_step
from t2i.task import T2IConfig, T2ITask

CPU = torch.device("cpu")
CONFIGS = os.path.join(REPO, "configs", "debug")


def test_the_counter_sees_each_read_of_a_value_and_names_its_site():
    t = torch.tensor([1.5, 2.0])
    with HostSyncCounter(CPU) as syncs:
        t.sum().item()
        bool(t[0] > 1)
        float(t[1])
        _ = t * 2 + 1  # arithmetic stays on the device
    assert syncs.counts == {"project": 3}
    assert sum(syncs.sites.values()) == 3 and all(s.startswith("tests/test_host_syncs.py:") for s in syncs.sites)


class PlainEngine:
    """What train_step asks of a DeepSpeed engine, on a plain module and SGD (DeepSpeed's and AdamW's own reads of
    their step counts are a library's; this keeps the count to the project's code)."""

    def __init__(self, module):
        self.module, self.opt = module, torch.optim.SGD(module.parameters(), lr=1e-3)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def _run(task_cls, config_cls, config, *overrides):
    cfg = load_config(config_cls, os.path.join(CONFIGS, config), ["train.global_batch=4", *overrides],
                      check_data=False)
    info = task_cls.random_data(cfg, 32)
    plan = plan_run(cfg, task_cls(cfg, info), DistContext(0, 1, 0, CPU))
    torch.manual_seed(0)
    model = task_cls.build_model(plan.model_kwargs)
    engine = PlainEngine(model)
    from core.encoders import load_encoder

    encoders = [load_encoder(s, info.resolution, grid=plan.grid) for s in cfg.repa.encoders]
    return Run(plan, engine, EMA(model, 0.99), encoders, build_objective(cfg.objective)), cfg


def _batches(run, task_cls):
    from core.bench import random_batch

    g = torch.Generator().manual_seed(1)
    while True:
        yield random_batch(run.plan, run.plan.micro, g, False)


@pytest.mark.parametrize("task_cls,config_cls,config", [(ClassCondTask, ClassCondConfig, "class_cond_tiny.yaml"),
                                                        (T2ITask, T2IConfig, "t2i_tiny.yaml")])
def test_an_ordinary_step_reads_nothing_back_to_the_host(task_cls, config_cls, config):
    run, _ = _run(task_cls, config_cls, config)
    batches = _batches(run, task_cls)
    train_step(run, batches, 0)  # the first step builds what is cached
    with HostSyncCounter(CPU) as syncs:
        result = train_step(run, batches, 1)
    assert not result.skipped and syncs.counts["project"] == 0, syncs.sites
    if task_cls is ClassCondTask:  # the CPU forward checks its labels: host tensors, which a GPU run reads on the host
        assert syncs.counts["host"] >= 1 and all(s.startswith("core/layers.py:") for s in syncs.sites), syncs.sites
    # skipping non-finite steps needs the answer before the update: one read per micro-batch, and only then
    run, _ = _run(task_cls, config_cls, config, "train.skip_nonfinite=true")
    with HostSyncCounter(CPU) as syncs:
        train_step(run, _batches(run, task_cls), 0)
    assert syncs.counts["project"] == run.plan.accum == 1, syncs.sites


def test_a_non_finite_loss_is_noted_on_the_device_and_raised_at_the_check(tmp_path):
    watch = NonFiniteWatch(CPU)
    with HostSyncCounter(CPU) as syncs:
        for step, loss in enumerate([1.0, 0.5, float("nan"), float("inf"), 0.2]):
            watch.observe(torch.tensor(loss), step)
    assert syncs.counts == {}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2; .*\(none yet\) is intact"):
        watch.check(str(tmp_path))
    fine = NonFiniteWatch(CPU)
    fine.observe(torch.tensor(1.0), 0)
    fine.check(str(tmp_path))  # nothing to raise


def test_the_preemption_poll_is_free_on_one_rank_and_every_signal_every_steps_on_more(tmp_path):
    cfg = load_config(ClassCondConfig, os.path.join(CONFIGS, "class_cond_tiny.yaml"),
                      [f"run.dir={tmp_path}", "train.signal_every=5"], check_data=False)
    signals = PreemptionSignals()
    try:
        one = Checkpointer(cfg, DistContext(0, 1, 0, CPU), signals)
        many = Checkpointer(cfg, DistContext(0, 4, 0, CPU), signals)
        with HostSyncCounter(CPU) as syncs:
            assert not one.signalled(3) and not many.signalled(5)
            signals.received = signal.SIGUSR1
            assert one.signalled(3)  # one rank: its own flag, every step
            assert not many.signalled(7) and many.signalled(10)  # the ranks agree on the poll steps only
        assert syncs.counts == {}  # no process group here: any_rank answers from the flag
    finally:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    assert any_rank(True, CPU) and not any_rank(False, CPU)


def test_the_t2i_null_condition_is_copied_to_the_device_once():
    cfg = load_config(T2IConfig, os.path.join(CONFIGS, "t2i_tiny.yaml"), ["train.global_batch=4"], check_data=False)
    task = T2ITask(cfg, T2ITask.random_data(cfg, 32))
    length, width = task.null_context.shape
    batch = {"context": torch.randn(3, length, width)}
    drop = torch.tensor([True, False, True])
    a = task.condition(batch, drop, CPU)["context"]
    cached = list(task._null_on.values())
    b = task.condition(batch, drop, CPU)["context"]
    assert len(cached) == 1 and list(task._null_on.values())[0] is cached[0] and torch.equal(a, b)
    assert torch.equal(a[0], task.null_context) and torch.equal(a[1], batch["context"][1])


def test_signal_every_must_be_positive():
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="train.signal_every"):
        load_config(ClassCondConfig, os.path.join(CONFIGS, "class_cond_tiny.yaml"), ["train.signal_every=0"],
                    check_data=False)
