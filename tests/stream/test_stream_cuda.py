"""CUDA paths of the hot tier (skipped without CUDA): staged copies and a GPU-resident lake."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stream_helpers import check_loader_resume, make_source

from m2m.stream.loader import make_loader

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N, D = 3000, 16
COLS = ("embedding", "id", "label", "weight", "kappa")


@pytest.mark.parametrize("hot_mode", ["staged", "resident"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_batches_equal_the_cpu_ones(hot_mode, dtype, num_workers):
    source = make_source(N, D, dtype=dtype, shard_rows=1000)
    kw = dict(batch_size=128, columns=COLS, warm_bytes=1 << 20, seed=5, chunk_batches=2)
    cpu = list(make_loader(source, hot_bytes=0, **kw))
    gpu_loader = make_loader(source, device="cuda", hot_bytes=1 << 30, hot_mode=hot_mode,
                             num_workers=num_workers, **kw)
    assert gpu_loader.stats()["hot_mode"] == hot_mode
    gpu = list(gpu_loader)
    assert len(gpu) == len(cpu)
    for a, b in zip(cpu, gpu):
        for k in COLS:
            assert b[k].device.type == "cuda" and b[k].dtype == a[k].dtype
            assert torch.equal(a[k], b[k].cpu()), k


def test_cuda_auto_mode_is_resident_when_the_lake_fits():
    source = make_source(N, D)
    assert make_loader(source, batch_size=64, device="cuda", warm_bytes=1 << 20,
                       hot_bytes=1 << 30).stats()["hot_mode"] == "resident"
    assert make_loader(source, batch_size=64, device="cuda", warm_bytes=1 << 20,
                       hot_bytes=1000).stats()["hot_mode"] == "staged"


class DeviceNoise:
    def __call__(self, x, rows, gather, generator):
        assert x.is_cuda and rows.is_cuda
        nb = gather((rows + 1) % N)
        assert nb.is_cuda and nb.dtype == torch.float32
        return x + nb + torch.randn(x.shape, generator=generator, device=x.device)


@pytest.mark.parametrize("hot_mode", ["staged", "resident"])
def test_cuda_augment_resumes_exactly(hot_mode):
    source = make_source(N, D, dtype=np.float16)

    def make():
        return make_loader(source, batch_size=100, columns=("embedding", "id"), device="cuda", warm_bytes=1 << 20,
                           hot_bytes=1 << 30, hot_mode=hot_mode, augment=DeviceNoise(), seed=2)

    check_loader_resume(make, epochs=2)
