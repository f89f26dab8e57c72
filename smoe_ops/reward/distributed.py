"""Data-parallel reward training on torch.distributed: process groups, the split of each
global batch across ranks, and the regularizers that need the whole global batch.

Under `torchrun`, every rank runs the same `train` call on the same data. Each rank draws
the same seeded order of the pairs, cuts it into the same global batches of `batch_size`
pairs, and takes its own contiguous share of every global batch (`local_share`);
DistributedDataParallel then averages the gradients. For the update to equal the
single-process one on the whole global batch, every term of the loss must be the global
batch's, not the rank's:

- per-pair terms (the Bradley-Terry objectives, the per-pair routing entropy) are sums
  over the rank's pairs divided by the global batch size, times G to undo DDP's average;
- batch-level terms (the balance regularizer's batch-mean routing, Switch's expert
  fractions) are computed from the all-reduced sums over the global batch, with an
  autograd all-reduce (`all_reduce_sum`) whose backward sums the ranks' gradients: every
  rank adds the same value, and backward hands each rank G times its share, which DDP's
  average brings back to one;
- parameter-only terms (diversity) are the same on every rank and added once per rank.

torch.utils.data.DistributedSampler is not used: it deals out a whole epoch and pads it
with repeated pairs to a multiple of G, so its batches would neither be the
single-process batches nor weigh every pair once.
"""

import datetime
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import smoe_ops
from smoe_ops.reference.routing import RouteResult
from smoe_ops.reward.losses import Regularizers, diversity_loss

__all__ = ["DataParallelGroup", "all_reduce_sum", "global_regularization", "init_from_env",
           "local_share"]

logger = logging.getLogger("smoe_ops")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def init_from_env(backend: Optional[str] = None,
                  timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group that `torchrun` describes (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT in the environment); returns False, doing nothing, outside torchrun.

    backend: None picks "nccl" when CUDA is available, else "gloo".
    timeout: how long a rank waits for the others, at the start and in every collective;
        a rank that never arrives or dies makes the others fail with TimeoutError (naming
        the world size and the timeout) instead of hanging.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    world_size = int(os.environ["WORLD_SIZE"])
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (dist.DistStoreError, TimeoutError, RuntimeError) as error:
        if not _is_timeout(error):
            raise
        raise TimeoutError(
            f"smoe_ops: rank {os.environ['RANK']} of {world_size} waited "
            f"{timeout.total_seconds():g} s for the other ranks at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} and not all "
            f"arrived; start all {world_size} ranks, or raise the timeout ({error})"
        ) from error
    logger.info("joined a %s group: rank %d of %d", backend, dist.get_rank(), world_size)
    return True


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (TimeoutError, dist.DistStoreError)) or "timed out" in text \
        or "timeout" in text


def _group_timeout(group) -> Optional[datetime.timedelta]:
    """The timeout `group` was created with, or None (torch's default) where it cannot be
    read: torch has no public getter, so this reads the CPU backend's options."""
    try:
        backend = (group or dist.group.WORLD)._get_backend(torch.device("cpu"))
        return backend.options._timeout
    except (AttributeError, RuntimeError):
        return None


@dataclass
class DataParallelGroup:
    """The ranks that train one model together.

    group: the process group DDP reduces gradients over (None: the default group).
    stats_group: a second group over the same ranks for the batch statistics that the
        loss all-reduces inside forward and backward, so that they never interleave with
        DDP's own gradient all-reduces, which run asynchronously during backward.
    """

    group: Optional[dist.ProcessGroup]
    stats_group: dist.ProcessGroup
    rank: int
    world_size: int

    @classmethod
    def create(cls, group: Optional[dist.ProcessGroup] = None) -> "DataParallelGroup":
        """A collective: every rank of `group` must call it, in the same order."""
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        # gloo: the statistics, like the reward model's training, live on the CPU. The
        # main group's timeout: new_group's default is 30 minutes, whatever the main
        # group's is, and a stuck peer must fail the job as soon as it does there.
        stats_group = dist.new_group(ranks, backend="gloo", timeout=_group_timeout(group))
        return cls(group, stats_group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_share(index: torch.Tensor, rank: int, world_size: int,
                user_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's contiguous share of one global batch of pair indices.

    Pairs: G near-equal slices (a rank may get none when the batch has fewer than G
    pairs). With `user_ids` (the user-level objective, whose batches list each user's
    pairs together): the batch's users are split into G near-equal runs, whole users per
    rank, since a user's pairs share one routing.
    """
    if user_ids is None:
        return index.tensor_split(world_size)[rank]
    _users, runs = torch.unique_consecutive(user_ids[index], return_counts=True)
    ends = torch.cumsum(runs, 0)
    user_slices = torch.arange(len(runs)).tensor_split(world_size)
    mine = user_slices[rank]
    if len(mine) == 0:
        return index[:0]
    start = 0 if mine[0] == 0 else int(ends[mine[0] - 1])
    return index[start:int(ends[mine[-1]])]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; backward sums the ranks' gradients (each rank's input affects
    the sum that every rank uses)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Differentiable sum of `tensor` over the ranks of `group` (a collective)."""
    return _AllReduceSum.apply(tensor, group)


def global_regularization(logits: torch.Tensor, routing: RouteResult, heads: torch.Tensor,
                          weights: Regularizers, global_rows: int,
                          parallel: DataParallelGroup):
    """`smoe_ops.reward.losses.regularization` over the global batch, from this rank's
    [n, K] router logits of its share of the `global_rows` rows of the global batch.

    Returns (this rank's loss to back-propagate: after DDP's average over the G ranks its
    gradient is that of the global regularizer; this rank's share of the global value,
    detached: the shares of the G ranks add up to it).
    """
    world = parallel.world_size
    num_experts = logits.shape[1]
    local, shared = logits.new_zeros(()), logits.new_zeros(())
    if weights.sparsity or weights.balance:
        # Mean per-row entropy: a per-row term, so this rank's sum over the global count.
        sparsity = smoe_ops.router_losses(logits, routing).entropy * (
            logits.shape[0] / global_rows)
        local = local + weights.sparsity * sparsity
        probs = torch.softmax(logits.float(), dim=1).sum(0)
        mean_probs = all_reduce_sum(probs, parallel.stats_group) / global_rows
        if weights.balance_kind == "kl":
            entropy = -(mean_probs * mean_probs.clamp_min(1e-30).log()).sum()
            balance = math.log(num_experts) - entropy
        else:
            counts = routing.counts.to(torch.float32)
            dist.all_reduce(counts, group=parallel.stats_group)
            fraction = counts / (global_rows * routing.ids.shape[1])
            balance = num_experts * (fraction * mean_probs).sum()
        shared = shared + weights.balance * balance
    if weights.diversity:
        shared = shared + weights.diversity * diversity_loss(heads)
    return world * local + shared, (local + shared / world).detach()
