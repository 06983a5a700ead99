"""Collectives with two real gloo ranks: a batch split over ranks must give the whole-batch targets."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ssl import reference as ref
from vitreg.ssl.targets import Centering, sinkhorn_knopp
from vitreg.utils.distributed import all_reduce_, is_initialized, rank_and_world

N, K, TEMP = 8, 12, 0.1
UNEVEN = (3, 5)  # rows per rank for the iBOT-like case


def whole_batch() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        res: dict[str, object] = {"is_initialized": is_initialized(), "rank_and_world": rank_and_world()}
        res["sum"] = all_reduce_(torch.tensor([1.0, 10.0]) * (rank + 1), "sum")
        res["mean"] = all_reduce_(torch.tensor([1.0, 10.0]) * (rank + 1), "mean")

        x = whole_batch()
        even = x.chunk(2)[rank]
        res["sk_even"] = sinkhorn_knopp(even, TEMP)
        start = 0 if rank == 0 else UNEVEN[0]
        uneven = x[start : start + UNEVEN[rank]]
        # DINOv2's iBOT: B is the all-reduced count of masked tokens
        count = all_reduce_(torch.tensor([float(len(uneven))]), "sum")
        res["sk_uneven_count"] = sinkhorn_knopp(uneven, TEMP, total_count=count)
        res["sk_uneven_default"] = sinkhorn_knopp(uneven, TEMP)  # n * world differs per rank: wrong on purpose

        c_even, c_uneven = Centering(K), Centering(K)
        c_even.update(even)
        c_uneven.update(uneven)
        res["center_even"], res["center_uneven"] = c_even.center, c_uneven.center
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~3.5 s: two spawned interpreters import torch
def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    x = whole_batch()
    x_np = x.double().numpy()

    for r in (r0, r1):
        assert r["is_initialized"] and r["rank_and_world"][1] == 2
        torch.testing.assert_close(r["sum"], torch.tensor([3.0, 30.0]))
        torch.testing.assert_close(r["mean"], torch.tensor([1.5, 15.0]))
    assert not is_initialized() and rank_and_world() == (0, 1)  # nothing leaked into the parent

    whole = ref.sinkhorn_knopp(x_np, TEMP)
    np.testing.assert_allclose(torch.cat([r0["sk_even"], r1["sk_even"]]).numpy(), whole, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.cat([r0["sk_even"], r1["sk_even"]]), sinkhorn_knopp(x, TEMP))
    uneven = torch.cat([r0["sk_uneven_count"], r1["sk_uneven_count"]]).numpy()
    np.testing.assert_allclose(uneven, whole, rtol=1e-4, atol=1e-7)
    # the per-rank default B (n_local * 2 = 6 and 10) weights the ranks unequally and gives other targets
    wrong = torch.cat([r0["sk_uneven_default"], r1["sk_uneven_default"]]).numpy()
    assert np.abs(wrong - whole).max() > 1e-3

    # equal halves: the all-reduced center is the whole-batch mean (DINOv2's sum / (n * world))
    for r in (r0, r1):
        np.testing.assert_allclose(r["center_even"].numpy()[0], 0.1 * x_np.mean(0), rtol=1e-5, atol=1e-7)
        # unequal halves: the mean of the two per-rank means, as DINOv2's iBOT center
        per_rank = (x_np[: UNEVEN[0]].mean(0) + x_np[UNEVEN[0] :].mean(0)) / 2
        np.testing.assert_allclose(r["center_uneven"].numpy()[0], 0.1 * per_rank, rtol=1e-5, atol=1e-7)
