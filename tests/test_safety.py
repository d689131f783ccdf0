"""Safety of inputs (issue 10): no code runs from a checkpoint, config, statistics file or shard, bad inputs give
clear errors, and a write that fails half-way leaves the previous file intact.

Each test fails if its guard is removed. Payloads are pickles whose unpickling calls os.mkdir(marker): a loader
that ran them would leave the marker directory behind.
"""
import argparse
import errno
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import core.checkpoint as ckpt
from core.config import ConfigError, load_config
from core.data import decode_training_sample
from core.engine import batch_layout
from core.fileio import WriteError, append_line
from core.shards import ShardFormatError, ShardReader, decode_value, shard_name, write_manifest, write_shard

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=6, num_classes=5,
             repa_depth=1, encoder_dims=[16], projector_dim=32)


class Payload:
    """Unpickling this calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "a loader executed code from a pickle"


# ------------------------------------------------------------------------------------ no pickle, no code from files


def test_official_checkpoint_loader_refuses_arbitrary_objects(tmp_path, marker):
    from class_cond.import_repa import read_repa_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(2)}, "args": Payload(marker), "steps": 1}, path)
    with pytest.raises((pickle.UnpicklingError, ValueError), match=r"(?i)weights.only"):  # torch's, or ours wrapped
        read_repa_checkpoint(str(path))
    # the official layout (argparse.Namespace args) is let through
    torch.save({"ema": {"w": torch.zeros(2)}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 3}, path)
    state, args, steps = read_repa_checkpoint(str(path))
    assert args == {"model": "SiT-XL/2"} and steps == 3 and list(state) == ["w"]


def test_npz_with_object_array_is_refused(tmp_path, marker):
    from eval.fid import iter_images, load_stats

    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.array([Payload(marker)], dtype=object), sigma=np.eye(1), arr_0=np.array([Payload(marker)]))
    with pytest.raises(ValueError, match=r"ref.npz'?: mu holds pickled Python objects, which are never loaded"):
        load_stats(str(path))
    with pytest.raises(ValueError, match=r"ref.npz'?: arr_0 holds pickled Python objects"):
        next(iter_images(str(path)))


def _pickled_npy(obj) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([obj], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_shard_members_are_never_unpickled(tmp_path, marker):
    # a shard carrying a pickled .npy and a .pyd (webdataset's pickle extension), read as the trainer reads it
    with tarfile.open(tmp_path / shard_name(0), "w") as tar:
        for name, data in (("a.latent.npy", _pickled_npy(Payload(marker))), ("a.cls", b"1"),
                           ("a.meta.pyd", pickle.dumps(Payload(marker)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_manifest(str(tmp_path), {"shards": [{"name": shard_name(0), "num_samples": 1}], "latent": {}})
    raw = ShardReader(str(tmp_path))[0]
    with pytest.raises(ValueError, match="allow_pickle=False"):
        decode_training_sample(raw, ("cls",), need_image=False, feature_keys=())
    with pytest.raises(ShardFormatError, match="member extension 'meta.pyd' is not part of the shard format"):
        decode_value("meta.pyd", raw["meta.pyd"])


def test_manifest_cannot_point_outside_its_dataset(tmp_path):
    write_shard(str(tmp_path / shard_name(0)), [{"__key__": "a", "cls": 1}])
    manifest = {"format_version": 1, "shards": [{"name": "../elsewhere/shard.tar", "num_samples": 1}],
                "num_samples": 1, "latent": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shards\[\].name '../elsewhere/shard.tar' is not a file name"):
        ShardReader(str(tmp_path))


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_python_tags_are_refused(tmp_path, marker, where):
    from class_cond.task import ClassCondConfig

    evil = f"!!python/object/apply:os.mkdir ['{marker}']"
    if where == "file":
        path = tmp_path / "evil.yaml"
        path.write_text(f"train:\n  lr: {evil}\n")
        with pytest.raises(ConfigError, match=r"evil.yaml: not a plain YAML config: .*python/object/apply:os.mkdir"):
            load_config(ClassCondConfig, str(path))
    else:  # a dot-list override is parsed as YAML too; the tag is left as a string, which is not a number
        with pytest.raises(ConfigError, match="train.lr: expected a number, got .!!python/object"):
            load_config(ClassCondConfig, None, [f"train.lr={evil}"])


# ------------------------------------------------------------------------------------------- bad inputs, clear errors


def _export(tmp_path, weights_kwargs: dict, record_kwargs: dict) -> str:
    """An exported model (.safetensors + .json) whose weights come from `weights_kwargs`, record from the other."""
    from class_cond.models import build_sit

    path = str(tmp_path / "ema.safetensors")
    save_file({k: v.contiguous() for k, v in build_sit(weights_kwargs).state_dict().items()}, path)
    record = {"step": 1, "model": {"task": "class_cond", "kwargs": record_kwargs},
              "latent": {"autoencoder": "pixel", "scale_factor": 1.0, "shift": 0.0, "shape": [4, 8, 8]}}
    with open(path[:-len(".safetensors")] + ".json", "w") as f:
        json.dump(record, f)
    return path


def test_wrong_architecture_names_the_first_mismatched_key_and_both_shapes(tmp_path):
    from eval.loading import load_eval_model

    path = _export(tmp_path, {**SMALL, "num_classes": 7}, SMALL)
    with pytest.raises(ValueError, match=r"key 'y_embedder.embedding_table.weight' has shape \(8, 48\) in the file "
                                         r"but \(6, 48\) in the model built from its record"):
        load_eval_model(path)
    path = _export(tmp_path, SMALL, {**SMALL, "depth": 3})
    with pytest.raises(ValueError, match=r"lacks key 'blocks.2.attn.qkv.weight' \(model shape \(144, 48\)\)"):
        load_eval_model(path)
    model, meta = load_eval_model(_export(tmp_path, SMALL, SMALL))  # matching: loads
    assert meta["step"] == 1 and not model.training


def test_truncated_safetensors_is_a_clear_error_naming_the_file(tmp_path):
    from eval.loading import load_eval_model

    path = _export(tmp_path, SMALL, SMALL)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ema.safetensors' is not a readable safetensors file \(truncated"):
        load_eval_model(path)
    with pytest.raises(ValueError, match="ema.safetensors' is not a readable safetensors file"):
        ckpt.load_weights(path)  # the loader of checkpoint EMA weights (resume, export) too


def test_shard_sample_missing_a_member_is_named(tmp_path):
    write_shard(str(tmp_path / shard_name(0)), [{"__key__": "k7", "cls": 3}])  # no latent.npy
    write_manifest(str(tmp_path), {"shards": [{"name": shard_name(0), "num_samples": 1}], "latent": {}})
    with pytest.raises(ShardFormatError, match="sample 'k7' has no 'latent.npy' member"):
        decode_training_sample(ShardReader(str(tmp_path))[0], ("cls",), need_image=False, feature_keys=())


@pytest.mark.parametrize("override,message", [
    ("train.global_batch=-8", "train.global_batch must be > 0, got -8"),
    ("train.micro_batch=-2", "train.micro_batch must be >= 0"),
])
def test_negative_batch_sizes_are_config_errors(override, message):
    from class_cond.task import ClassCondConfig
    from conftest import TINY

    with pytest.raises(ConfigError, match=message):
        load_config(ClassCondConfig, TINY, [override])


def test_batch_not_divisible_by_world_size_times_micro_batch():
    with pytest.raises(ConfigError, match=r"train.global_batch=24 is not divisible by world size 2 x "
                                          r"train.micro_batch=8"):
        batch_layout(24, 8, 2)
    with pytest.raises(ConfigError, match="train.global_batch=25 is not divisible by the world size 2"):
        batch_layout(25, 0, 2)
    assert batch_layout(32, 8, 2) == (8, 2)


def test_adm_reference_without_mu_sigma(tmp_path):
    from eval.fid import load_stats

    np.savez(tmp_path / "VIRTUAL_imagenet256.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks mu and sigma \(keys present: arr_0\)"):
        load_stats(str(tmp_path / "VIRTUAL_imagenet256.npz"))
    np.savez(tmp_path / "half.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks sigma \(keys present: mu\)"):
        load_stats(str(tmp_path / "half.npz"))


def test_empty_prompt_file(tmp_path, capsys):
    from t2i.sample import main

    (tmp_path / "prompts.txt").write_text("\n  \n")
    assert main(["--run", str(tmp_path / "no_run"), "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "grid.png")]) == 2
    assert "error: no prompts" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


# ------------------------------------------------------------------------------ faults while writing lose nothing


def _die_half_way(f):
    """Write part of the output to the open file `f`, then fail as a full disk does."""
    f.write(b"\0" * 10 if "b" in f.mode else '{"torn": ')
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


@dataclass
class _Cfg:
    lr: float = 1e-4


class _FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: writes one 'model states' file per tag."""

    def __init__(self, die_mid_file: bool = False):
        self.module, self.die_mid_file = torch.nn.Linear(2, 2), die_mid_file

    def save_checkpoint(self, save_dir, tag, save_latest):
        os.makedirs(os.path.join(save_dir, tag))
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"model " * 100)
            if self.die_mid_file:
                raise KeyboardInterrupt  # stands for a kill: nothing of ours runs after it


class _FakeEMA:
    def state_dict(self, module):
        return {"weight": torch.arange(4.0).reshape(2, 2)}


def _save(run_dir, step, engine=None):
    return ckpt.save_checkpoint(str(run_dir), engine or _FakeEngine(), _FakeEMA(), {"step": step}, _Cfg(), 0, 2)


def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = _save(run, 1)
    before = _snapshot(run)

    def save_file_dies(tensors, path, metadata=None):
        with open(path, "wb") as f:
            _die_half_way(f)

    monkeypatch.setattr(ckpt, "save_file", save_file_dies)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"checkpoint step_00000002 of .* could not be written "
                       r"\(WriteError: .*ema.safetensors \(No space left on device\).*\); the newest complete "
                       r"checkpoint, .*step_00000001, is intact"):
        _save(run, 2)
    assert _snapshot(run) == before  # byte-identical, and no partial checkpoint or temporary left
    assert ckpt.latest_checkpoint(str(run)) == first


def test_killed_checkpoint_save_keeps_the_previous_one_and_the_next_save_cleans_up(tmp_path):
    run = tmp_path / "run"
    first = _save(run, 1)
    before = _snapshot(run)
    with pytest.raises(KeyboardInterrupt):
        _save(run, 2, _FakeEngine(die_mid_file=True))
    assert ckpt.latest_checkpoint(str(run)) == first and ckpt.list_checkpoints(str(run)) == [(1, first)]
    assert {k: v for k, v in _snapshot(run).items() if not k.startswith("checkpoints/.staging")} == before
    _save(run, 2)
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000001", "step_00000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    _save(run, 3)  # keep_last=2: step 1 goes, and nothing else is left behind
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000003"]
    _save(run, 3)  # the same step saved again replaces its copy
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000003"]
    assert ckpt.load_weights(str(run / "checkpoints" / "step_00000003" / "ema.safetensors"))["weight"].sum() == 6


def test_checkpointer_saves_on_its_cadence_at_the_end_and_on_a_signal(tmp_path):
    """The Checkpointer decides when to save; the loop only reports each step. A signal (any rank) saves and
    stops, except on the last step, which saves and ends normally."""
    from types import SimpleNamespace

    from class_cond.task import ClassCondConfig
    from conftest import TINY
    from core.dist import DistContext

    cfg = load_config(ClassCondConfig, TINY, [f"run.dir={tmp_path / 'run'}", "train.ckpt_every=3", "run.keep_last=5"])
    signals = SimpleNamespace(received=None)
    checkpointer = ckpt.Checkpointer(cfg, DistContext(0, 1, 0, torch.device("cpu")), signals)
    state = ckpt.RunState("hash", 1, {"task": "t", "kwargs": {}}, {"shape": [1]}, {})
    saved = []
    for step in range(1, 9):
        state.step, state.pending_corrupt = step, 1
        if step == 5:
            signals.received = 10  # SIGUSR1
        seconds, stop = checkpointer.step_done(_FakeEngine(), _FakeEMA(), state, done=step == 8)
        if seconds > 0:
            saved.append(step)
        if stop:
            break
    assert saved == [3, 5] and step == 5  # the cadence, then the signal's save and the stop
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run.dir)] == [3, 5]
    record = ckpt.read_state(os.path.join(cfg.run.dir, "checkpoints", "step_00000005"))
    assert record == {"config_hash": "hash", "world_size": 1, "model": {"task": "t", "kwargs": {}},
                      "latent": {"shape": [1]}, "data": {}, "step": 5, "skipped_steps": 0, "corrupt_samples": 2}
    assert state.resumed({"step": 3, "corrupt_samples": 7}).corrupt_samples == 7
    signals.received = None
    state.step = 8
    assert checkpointer.step_done(_FakeEngine(), _FakeEMA(), state, done=True)[1] is False  # the end saves too
    assert ckpt.list_checkpoints(cfg.run.dir)[-1][0] == 8


def test_failed_shard_write_keeps_the_previous_shard(tmp_path, monkeypatch):
    path = str(tmp_path / shard_name(0))
    write_shard(path, [{"__key__": "a", "latent.npy": np.ones((2, 2), np.float16)}])
    before = _snapshot(tmp_path)
    real_addfile = tarfile.TarFile.addfile

    def addfile_dies_on_second(self, info, fileobj=None):
        if info.name.startswith("b."):
            _die_half_way(self.fileobj)
        return real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_dies_on_second)
    with pytest.raises(WriteError, match=r"could not write .*shard-000000.tar \(No space left on device\); the "
                                         "previous version, if any, is intact"):
        write_shard(path, [{"__key__": k, "latent.npy": np.zeros((2, 2), np.float16)} for k in "ab"])
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("writer", ["metrics", "stats"])
def test_failed_eval_output_write_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    import eval.fid as fid

    if writer == "metrics":  # eval's metrics.json
        path = str(tmp_path / "metrics.json")
        write = lambda: fid.write_metrics(path, {"fid": 1.0})  # noqa: E731
        monkeypatch_target = (json, "dump", lambda obj, f, **kw: _die_half_way(f))
    else:  # FID reference statistics
        path = str(tmp_path / "stats.npz")
        write = lambda: fid.save_stats(path, np.zeros(2), np.eye(2), extractor="x", is_proxy=True)  # noqa: E731
        monkeypatch_target = (np, "savez", lambda f, **arrays: _die_half_way(f))
    write()
    before = _snapshot(tmp_path)
    monkeypatch.setattr(*monkeypatch_target)
    with pytest.raises(WriteError, match=rf"could not write .*{os.path.basename(path)} \(No space left on device\)"):
        write()
    assert _snapshot(tmp_path) == before


def test_failed_metrics_log_append_keeps_earlier_lines(tmp_path, monkeypatch):
    import core.fileio as fileio

    path = str(tmp_path / "metrics.jsonl")
    append_line(path, json.dumps({"step": 1}))
    before = open(path, "rb").read()

    class DiesMidLine(io.StringIO):
        def __init__(self, real):
            super().__init__()
            self.real = real

        def write(self, text):
            self.real.write(text[:5])
            self.real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.real.close()
            super().close()

    monkeypatch.setattr(fileio, "open", lambda p, mode="r": DiesMidLine(open(p, mode)), raising=False)
    with pytest.raises(WriteError, match=r"could not write .*metrics.jsonl \(No space left on device\)"):
        append_line(path, json.dumps({"step": 2}))
    monkeypatch.undo()
    assert open(path, "rb").read() == before  # no torn last line: every line still parses


_TWO_RANK_SAVE = r'''
import os, sys, torch, torch.distributed as dist
from dataclasses import dataclass
from core import checkpoint as ckpt

@dataclass
class Cfg:
    lr: float = 1e-4

class Engine:
    module = torch.nn.Linear(2, 2)
    def save_checkpoint(self, save_dir, tag, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)

class EMA:
    def state_dict(self, module):
        return {"weight": torch.zeros(2)}

def main(rank, run, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:  # rank 0's EMA file meets a full disk
        def full(tensors, path, metadata=None):
            raise OSError(28, "No space left on device")
        ckpt.save_file = full
    try:
        ckpt.save_checkpoint(run, Engine(), EMA(), {"step": 1}, Cfg(), rank, 2)
        print(f"rank {rank}: saved", flush=True)
    except ckpt.CheckpointSaveError as err:
        print(f"rank {rank}: {err}", flush=True)

if __name__ == "__main__":
    torch.multiprocessing.start_processes(main, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
'''


def test_a_save_failing_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Rank 0 cannot write the EMA; rank 1 must not wait at the barrier for it (until the process group's
    10-minute timeout on a real cluster): both raise CheckpointSaveError at once."""
    from conftest import REPO, cpu_env, free_port

    script = tmp_path / "save.py"
    script.write_text(_TWO_RANK_SAVE)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(free_port())], cwd=REPO,
                          env=cpu_env(PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0: checkpoint step_00000001" in proc.stdout and "No space left on device" in proc.stdout
    assert "rank 1: checkpoint step_00000001" in proc.stdout and "another rank could not write its part" in proc.stdout
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == []
