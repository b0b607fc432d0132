"""pme.DistributedDataParallel: sparse=True pme tables trained data-parallel in spawned processes
(gloo, 2 ranks) equal one process trained on the mean of the ranks' losses.

The model mixes a pme bag table and a pme non-pooled table (both sparse=True), an
nn.EmbeddingBag(sparse=True) and a dense pme table, so torch's own decisions and pme's share one
reducer. Each rank draws its own batches (duplicates, empty bags, the largest index, int32 and
int64 indices); three steps of torch.optim.SparseAdam / Adam run on every rank and in the
reference. torch's own DistributedDataParallel fails on this model in backward (a sparse gradient
in a dense bucket), which is what the class mends.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.elastic.utils.distributed import get_free_port

import pme

V, D, STEPS, WORLD = 23, 8, 3, 2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(0, D + 1, (V,), generator=g)
        self.bag = pme.MultiSizeEmbeddingBag(V, D, mode="sum", sizes=sizes, sparse=True)
        self.emb = pme.MultiSizeEmbedding(V, D, sizes=sizes.flip(0), sparse=True)
        self.nn_bag = nn.EmbeddingBag(V, D, mode="mean", sparse=True)
        self.dense = pme.MultiSizeEmbeddingBag(V, D, mode="mean", sizes=sizes)
        self.head = nn.Linear(4 * D, 1)

    def forward(self, idx, off, tok):
        e = self.emb(tok).sum(1)
        parts = [self.bag(idx, off), e, self.nn_bag(idx.long(), off.long()), self.dense(idx, off)]
        return self.head(torch.cat(parts, 1)).squeeze(1)


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    dtype = torch.int32 if (rank + step) % 2 else torch.int64
    n = int(torch.randint(4, 30, (), generator=g))
    idx = torch.randint(0, V, (n,), generator=g)
    idx[0] = idx[-1] = V - 1  # the largest index, twice (duplicates)
    cuts = torch.sort(torch.randint(0, n + 1, (5,), generator=g)).values
    off = torch.cat([torch.zeros(1, dtype=torch.long), cuts])  # repeated cuts: empty bags
    tok = torch.randint(0, V, (off.numel(), 3), generator=g)
    y = torch.rand(off.numel(), generator=g)
    return idx.to(dtype), off.to(dtype), tok.to(dtype), y


def optimizers(model):
    sparse = [model.bag.weight, model.emb.weight, model.nn_bag.weight]
    dense = [p for p in model.parameters() if all(p is not s for s in sparse)]
    return [torch.optim.SparseAdam(sparse, lr=0.05), torch.optim.Adam(dense, lr=0.05)]


def train(model, forward_losses):
    """STEPS steps; ``forward_losses(step)`` -> the loss to back-propagate."""
    opts = optimizers(model)
    grads = []
    for step in range(STEPS):
        for o in opts:
            o.zero_grad()
        forward_losses(step).backward()
        grads.append({n: p.grad.to_dense().clone() for n, p in model.named_parameters()})
        for o in opts:
            o.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def loss_of(model, rank, step):
    idx, off, tok, y = batch(rank, step)
    return nn.functional.mse_loss(model(idx, off, tok), y)


def _worker(rank, port, outdir, kind, world):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = Model()
    try:
        if kind == "pme":
            ddp = pme.DistributedDataParallel(model)
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
        result = train(model, lambda step: loss_of(ddp, rank, step))
    except Exception as e:  # noqa: BLE001 (reported to the test)
        result = repr(e)
    torch.save(result, os.path.join(outdir, f"{kind}_rank{rank}.pt"))
    dist.destroy_process_group()


def run(kind, tmp_path, world=WORLD):
    mp.spawn(_worker, args=(get_free_port(), str(tmp_path), kind, world), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=False) for r in range(world)]


def test_sparse_pme_tables_train_data_parallel(tmp_path):
    ranks = run("pme", tmp_path)
    assert all(not isinstance(r, str) for r in ranks), ranks
    torch.manual_seed(0)
    ref = Model()
    ref_grads, ref_params = train(ref, lambda step: sum(loss_of(ref, r, step) for r in range(WORLD)) / WORLD)
    for grads, params in ranks:
        for step in range(STEPS):
            for name, g in ref_grads[step].items():
                torch.testing.assert_close(grads[step][name], g, atol=1e-6, rtol=1e-5, msg=f"{name} step {step}")
        for name, p in ref_params.items():
            torch.testing.assert_close(params[name], p, atol=1e-5, rtol=1e-5, msg=name)
    assert any(ref_grads[0]["bag.weight"] != 0) and any(ref_grads[0]["emb.weight"] != 0)


def test_torch_ddp_alone_fails_on_sparse_pme_tables(tmp_path):
    """Why the class exists (if torch learns to take pme tables' sparse gradients, this says so).
    One process: with two, the rank that fails first leaves the other inside a collective, and
    tearing that down can abort the process."""
    ranks = run("torch", tmp_path, world=1)
    assert all(isinstance(r, str) for r in ranks), "torch's DDP now trains sparse pme tables: pme's class may go"
