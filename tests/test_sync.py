"""Synced statistics (UAN, MN, BatchNorm made synced by ``sync_norms``): 2 processes (gloo) × their
batches give what one process gives on all of them."""

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adamatch_uan.norm import UAN, BatchNorm, MixtureNorm, sync_norms
from adamatch_uan.norm import backends as kernel
from adamatch_uan.norm.sync import AllReduceSum, reshift

pytestmark = pytest.mark.xdist_group("sync")  # one worker runs the module's process pairs, once per backend

N, C, SPATIAL = 8, 3, (3, 4)
# name -> (layer factory, context?) ; sampling covers every position (max_samples), so runs are deterministic.
# UAN runs the momentum fit: it is the task-gradient fit (the default) plus writes of μ, σ², λ from the synced sums.
LAYERS = {
    "uan": (lambda k: UAN(C, num_components=k, max_samples=10**6, mixture_fit="momentum"), False),
    "uan_ctx": (lambda k: UAN(C, num_components=k, num_contexts=2, max_samples=10**6, mixture_fit="momentum"), True),
    "mn": (lambda k: MixtureNorm(C, num_components=k, max_samples=10**6), False),
    # torch's BatchNorm, which sync_norms makes a SyncedBatchNorm (on the CPU, the K = 1 mixture transform)
    "bn": (lambda k: BatchNorm(C), False),
}
SPLITS = {"uneven": (3, 5), "empty": (0, 8)}
BACKENDS = ["kernel", "torch"]


def cases():
    for name in LAYERS:
        for k in ((1,) if name == "bn" else (1, 3)):
            for split in SPLITS:
                for backend in BACKENDS:
                    yield name, k, split, backend


def problem(name, k):
    torch.manual_seed(0)
    layer = LAYERS[name][0](k).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(N, C, *SPATIAL, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn_like(x)
    context = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]) if LAYERS[name][1] else None
    return layer, x, upstream, context


def run_layer(layer, x, upstream, context, steps=2):
    """Two training steps (the second sees the first's running statistics and writes); y, dx, grads, buffers."""
    out = {}
    for step in range(steps):
        layer.zero_grad()
        xs = x.clone().requires_grad_(True)
        y = layer(xs, context) if context is not None else layer(xs)
        (y * upstream).sum().backward()
        out[step] = {"y": y.detach().clone(), "dx": xs.grad.clone(),
                     "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
                     "state": {n: t.clone() for n, t in layer.state_dict().items()}}
    return out


def use_backend(backend):
    if backend == "torch":
        kernel._uses_kernel = lambda x, mu: False


def _worker(rank, port, folder, backend):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    use_backend(backend)
    results = {}
    for name, k, split, case_backend in cases():
        if case_backend != backend:
            continue
        layer, x, upstream, context = problem(name, k)
        sync_norms(layer)
        a, b = SPLITS[split]
        part = slice(0, a) if rank == 0 else slice(a, a + b)
        results[(name, k, split)] = run_layer(layer, x[part], upstream[part], None if context is None else context[part])
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=BACKENDS)
def synced(request, tmp_path_factory):
    """Every case, run by two gloo processes that split the batch (one process group, a time limit)."""
    if request.param == "kernel" and not kernel.kernel_available():
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    folder = tmp_path_factory.mktemp(f"sync-{request.param}")
    context = mp.start_processes(_worker, args=(free_port(), str(folder), request.param), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("synced processes did not finish within 300 s (a collective mismatch hangs)")
    return request.param, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", [c[:3] for c in cases() if c[3] == "kernel"], ids=lambda c: "-".join(map(str, c)))
def test_two_processes_equal_one_process_on_the_whole_batch(synced, case, monkeypatch):
    backend, ranks = synced
    name, k, split = case
    if backend == "torch":
        monkeypatch.setattr(kernel, "_uses_kernel", lambda x, mu: False)
    layer, x, upstream, context = problem(name, k)
    single = run_layer(layer, x, upstream, context)
    # float64 throughout, except MN's EM, which runs in float32 (and, synced, takes σ² as E[x²] − μ²)
    close = dict(rtol=1e-4, atol=1e-5) if name == "mn" else {}
    for step, reference in single.items():
        parts = [ranks[r][case][step] for r in range(2)]
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]), reference["y"], **close)
        torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), reference["dx"], **close)
        for pname, grad in reference["grads"].items():  # the loss is a sum over samples: DDP's sum of parts
            torch.testing.assert_close(parts[0]["grads"][pname] + parts[1]["grads"][pname], grad, msg=pname, **close)
        for bname, buf in reference["state"].items():  # buffers and written parameters: the same everywhere
            for p in parts:
                torch.testing.assert_close(p["state"][bname], buf, msg=bname, **close)


def test_reshift_moves_sums_to_another_shift():
    x = torch.randn(50, dtype=torch.float64) * 3 + 2
    tau = torch.rand(2, 1, 50, dtype=torch.float64)
    about = lambda s: torch.stack([tau.sum(-1), (tau * (x - s)).sum(-1), (tau * (x - s) ** 2).sum(-1)])  # noqa: E731
    torch.testing.assert_close(reshift(about(1.5), torch.tensor([1.5], dtype=torch.float64),
                                       torch.tensor([-0.25], dtype=torch.float64)), about(-0.25))


def test_all_reduce_sum_is_the_identity_without_other_processes(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, requires_grad=True)
        y = AllReduceSum.apply(x, None)
        y.sum().backward()
        torch.testing.assert_close(y, x.detach())
        torch.testing.assert_close(x.grad, torch.ones(3))
    finally:
        dist.destroy_process_group()
