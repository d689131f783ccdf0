"""ds_configs/: every JSON sizes its communication buckets (DeepSpeed's 5e8-element defaults hold GBs of buffers
and start the first gradient reduce only late in the backward) and overlaps communication with compute."""
import glob
import json
import os

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))


def test_every_config_is_listed():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {f"zero{s}{p}.json" for s in (1, 2, 3) for p in ("", "_dsbf16", "_fp32")} | {"zero3_offload.json"} == names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_buckets_are_sized_and_communication_overlaps(path):
    zero = json.load(open(path))["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 5e7
    if zero["stage"] < 3:
        assert zero["allgather_bucket_size"] == 2e8
    else:
        assert zero["stage3_prefetch_bucket_size"] == 5e7
