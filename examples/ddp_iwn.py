"""Data-parallel training with synchronized IWN statistics.

    torchrun --nproc-per-node 2 examples/ddp_iwn.py

Each rank trains on its shard of every batch under DistributedDataParallel
(NCCL with a GPU per rank, else gloo on CPU). The shards are deliberately
skewed -- rank r sees mostly class r -- so per-shard class-balanced
statistics would differ from rank to rank. ``convert_sync_iwn`` makes them
those of the whole batch: after training, every rank's running statistics
and parameters match a single-process run on the full batches, which rank 0
trains alongside and compares with every rank's (gathered). One step of a
plain (unsynced) run is shown for contrast: there each rank's running
statistics are its own shard's. (Trained on, it diverges: a skewed shard's
classes of one or two rows have a deviation near 0.)
"""

import gc
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from surgellm_kernels import FusedInstanceWeightedNorm, convert_sync_iwn

FEATURES, CLASSES, HIDDEN, STEPS, ROWS_PER_RANK = 12, 3, 32, 20, 16


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, HIDDEN)
        self.norm = FusedInstanceWeightedNorm(HIDDEN, CLASSES, affine=True, gate=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels):
        return self.head(self.norm(torch.relu(self.encoder(x)), labels))


def batches(world, device, steps):
    """The same full batches on every rank; shard r holds mostly class r % CLASSES."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        shards = []
        for r in range(world):
            labels = torch.where(
                torch.rand(ROWS_PER_RANK, generator=g) < 0.8,
                torch.tensor(r % CLASSES),
                torch.randint(0, CLASSES, (ROWS_PER_RANK,), generator=g),
            )
            x = torch.randn(ROWS_PER_RANK, FEATURES, generator=g) + labels.unsqueeze(1)
            shards.append((x, labels))
        yield [(x.to(device), y.to(device)) for x, y in shards]


def train(model, rank, world, device, steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for shards in batches(world, device, steps):
        x, labels = shards[rank] if rank is not None else map(torch.cat, zip(*shards))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x, labels), labels).backward()
        optimizer.step()


def largest_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def every_rank(tensors, world):
    """Each rank's copy of ``tensors``, gathered: [rank][i]."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return [
        [piece.view_as(t) for piece, t in zip(g.split([t.numel() for t in tensors]), tensors)]
        for g in gathered
    ]


def main():
    # NCCL wants a GPU per rank; otherwise gloo on CPU tensors.
    cuda = torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)

    def fresh():
        torch.manual_seed(0)  # the same initial weights on every rank and run
        return Classifier().to(device)

    synced = convert_sync_iwn(fresh())
    train(DistributedDataParallel(synced), rank, world, device)
    # DDP broadcasts buffers from rank 0 before each forward: switch that off
    # for the contrast, so that each rank keeps its own shard's statistics.
    unsynced = fresh()
    with warnings.catch_warnings():  # torch 2.13 renames it; the old name still does this
        warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
        unsynced_ddp = DistributedDataParallel(unsynced, broadcast_buffers=False)
    train(unsynced_ddp, rank, world, device, steps=1)

    stats = lambda m: [m.norm.running_mean, m.norm.running_std]  # noqa: E731
    synced_stats = every_rank(stats(synced), world)
    synced_params = every_rank(list(synced.parameters()), world)
    unsynced_stats = every_rank(stats(unsynced), world)
    # Done communicating: free the DDP reducers (they hold the process group)
    # while the group is alive, then tear it down on every rank together; a
    # rank whose group outlived its reducers could abort at exit.
    backend = dist.get_backend()
    del unsynced_ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        single, single_one_step = fresh(), fresh()
        train(single, None, world, device)
        train(single_one_step, None, world, device, steps=1)
        stat_gap = max(largest_difference(s, stats(single)) for s in synced_stats)
        param_gap = max(largest_difference(p, single.parameters()) for p in synced_params)
        print(
            f"{world} ranks ({backend}), {STEPS} steps, "
            f"{ROWS_PER_RANK} rows per rank, skewed classes"
        )
        print(
            f"synced IWN:   every rank's running statistics differ from one process by at "
            f"most {stat_gap:.2e}, its parameters by {param_gap:.2e}"
        )
        print(
            "unsynced IWN, one step: running statistics differ from one process by "
            + ", ".join(
                f"{largest_difference(s, stats(single_one_step)):.2e} (rank {r})"
                for r, s in enumerate(unsynced_stats)
            )
        )
        tolerance = 1e-4
        if stat_gap < tolerance and param_gap < tolerance:
            print(
                f"synced statistics and parameters match a single-process run "
                f"(within {tolerance:g})"
            )
        else:
            raise SystemExit("synced run does NOT match the single-process run")


if __name__ == "__main__":
    main()
