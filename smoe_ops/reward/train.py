"""`train` (AdamW on a mixture Bradley-Terry objective plus regularizers), `evaluate`,
and checkpoints (`save` / `load`: one safetensors file, config as JSON in its header)."""

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import safetensors.torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from smoe_ops._io import write_atomically, write_with
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.distributed import DataParallelGroup, global_regularization, local_share
from smoe_ops.reward.em import init_user_mixture
from smoe_ops.reward.losses import (
    OBJECTIVES,
    Regularizers,
    mixture_bt_loss,
    pair_accuracy,
    regularization,
    reward_mixture_bt_loss,
    user_mixture_bt_loss,
)
from smoe_ops.reward.model import SparseMoERewardModel

__all__ = ["evaluate", "fit_router_prior", "load", "save", "train"]

logger = logging.getLogger("smoe_ops")

_LOSSES = {"mixture": mixture_bt_loss, "reward_mixture": reward_mixture_bt_loss}
TRAIN_OBJECTIVES = OBJECTIVES + ("user_mixture",)
_CONFIG_KEY = "smoe_ops.config"
_FORMAT_KEY = "smoe_ops.format"
_FORMAT = "SparseMoERewardModel/1"
_TRAIN_FORMAT = "smoe_ops.TrainState/1"
_STATE_KEYS = ("epoch", "step", "global_step", "history", "best_accuracy", "best_state",
               "stale", "stopped", "partial", "epoch_generator")


def _margins(model, batch, objective):
    """(RouteResult, router logits, routing weights of each pair [P, k], margins [P, k],
    the objective's loss on the batch)."""
    if objective == "user_mixture":
        routing, logits, margins, rows = model.user_expert_margins(
            batch.user_ids, batch.chosen, batch.rejected)
        loss = user_mixture_bt_loss(routing.weights, margins, rows)
        return routing, logits, routing.weights[rows], margins, loss
    routing, logits, margins = model.expert_margins(batch.context, batch.chosen,
                                                    batch.rejected)
    return routing, logits, routing.weights, margins, _LOSSES[objective](routing.weights,
                                                                         margins)


@torch.no_grad()
def evaluate(model: SparseMoERewardModel, data: PreferenceData, objective: str = "mixture",
             batch_size: int = 8192) -> float:
    """Fraction of the pairs of `data` on which the model prefers the chosen response
    (with "user_mixture", each pair routed by its user's routing)."""
    if len(data) == 0:
        return float("nan")
    correct = 0
    accuracy_rule = "mixture" if objective == "user_mixture" else objective
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        _routing, _logits, weights, margins, _loss = _margins(model, batch, objective)
        correct += pair_accuracy(weights, margins, accuracy_rule).sum().item()
    return correct / len(data)


def _user_batches(data: PreferenceData, batch_size: int, generator) -> list:
    """Index tensors of batches made of whole users (users in a seeded random order,
    about batch_size pairs per batch): a user's pairs must share one routing."""
    users, inverse = torch.unique(data.user_ids, return_inverse=True)
    shuffled = torch.randperm(len(users), generator=generator)
    rank = torch.empty_like(shuffled)
    rank[shuffled] = torch.arange(len(users))
    order = torch.argsort(rank[inverse], stable=True)
    ends = torch.cumsum(torch.bincount(inverse, minlength=len(users))[shuffled], 0).tolist()
    batches, start, cut = [], 0, batch_size
    for end in ends:
        if end >= cut or end == ends[-1]:
            batches.append(order[start:end])
            start, cut = end, end + batch_size
    return batches


class _StepLoss(nn.Module):
    """The loss of one optimizer step on this rank's share of a global batch: one forward
    that touches every parameter the loss uses, as DistributedDataParallel must see it.

    forward -> (loss to back-propagate; this rank's share, detached, of the global batch's
    objective times its pair count (the shares add up over the ranks); correct pairs).
    Single process: the loss is the objective + regularizers on the whole batch.
    """

    def __init__(self, model, objective, regularizers, parallel):
        super().__init__()
        self.model, self.objective = model, objective
        self.regularizers, self.parallel = regularizers, parallel

    def forward(self, batch, global_pairs: int, global_rows: int):
        routing, logits, weights, margins, loss = _margins(self.model, batch, self.objective)
        accuracy_rule = "mixture" if self.objective == "user_mixture" else self.objective
        correct = pair_accuracy(weights.detach(), margins.detach(), accuracy_rule).sum()
        heads = self.model.head_weights()
        if self.parallel is None:
            penalty, _terms = regularization(logits, routing, heads, self.regularizers)
            loss = loss + penalty
            return loss, loss.detach() * len(batch), correct
        # Per-pair objective: the rank's sum over the global count, times G for DDP's mean.
        # An empty share (a global batch of fewer pairs than ranks) adds nothing; its
        # mean would be NaN.
        pair_sum = loss * len(batch) if len(batch) else margins.sum() * 0.0
        penalty, penalty_share = global_regularization(
            logits, routing, heads, self.regularizers, global_rows, self.parallel)
        world = self.parallel.world_size
        step_loss = pair_sum * (world / global_pairs) + penalty
        return step_loss, pair_sum.detach() + penalty_share * global_pairs, correct


def _epoch_batches(data, batch_size, generator, user_level):
    """The global batches of one epoch (index tensors), drawn from `generator`."""
    if user_level:
        return _user_batches(data, batch_size, generator)
    order = torch.randperm(len(data), generator=generator)
    return [order[start:start + batch_size] for start in range(0, len(data), batch_size)]


def _resolve_group(process_group):
    """DataParallelGroup to train over, or None for a single process: `process_group`, or
    the default group when torch.distributed is initialized (torchrun)."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    return DataParallelGroup.create(process_group)


@torch.no_grad()
def _distributed_evaluate(model, data, objective, parallel) -> float:
    """`evaluate` with the pairs split across the ranks and the correct counts summed."""
    if len(data) == 0:
        return float("nan")
    share = torch.arange(len(data)).tensor_split(parallel.world_size)[parallel.rank]
    part = data[share]
    correct = evaluate(model, part, objective) * len(part) if len(part) else 0.0
    total = torch.tensor([round(correct)], dtype=torch.float64)
    dist.all_reduce(total, group=parallel.stats_group)
    return float(total) / len(data)


def train(
    model: SparseMoERewardModel,
    data: PreferenceData,
    val_data: Optional[PreferenceData] = None,
    epochs: int = 20,
    batch_size: int = 512,
    lr: float = 5e-3,
    weight_decay: float = 1e-2,
    objective: str = "mixture",
    regularizers: Regularizers = Regularizers(),
    seed: int = 0,
    patience: Optional[int] = 5,
    progress: bool = True,
    user_init: Optional[str] = "em",
    process_group=None,
    checkpoint=None,
    checkpoint_every: Optional[int] = None,
    resume=False,
) -> list:
    """Fit `model` to the pairs of `data` in place; returns the history.

    Each epoch visits the pairs in an order drawn from a torch.Generator seeded with
    `seed`, so the same seed, model initialization and data give the same weights. With
    `val_data`, training stops after `patience` epochs without a better validation
    accuracy (None: never) and the weights of the best epoch are restored.

    objective: "mixture" (mixture BT, the default), "reward_mixture", or "user_mixture"
    (every pair needs a user id; the model needs num_users; batches hold whole users).
    user_init: with "user_mixture" and linear experts, "em" first fits the experts and
    each user's routing by EM (`smoe_ops.reward.em`; gradient steps alone tend to leave
    two user types merged in one expert), then trains from there; None skips it.

    Data parallel: under torchrun (torch.distributed initialized), or with
    `process_group`, every rank calls train with the same data and arguments; the model
    is wrapped in DistributedDataParallel, `batch_size` is the global batch, split across
    the ranks, and the loss, its regularizers, the validation accuracy and early stopping
    are those of the global batch (`smoe_ops.reward.distributed`), so 1, 2 or 4 ranks
    train the same model up to float rounding. Rank 0 alone logs, shows the progress
    bar and writes checkpoints. Every rank returns the history and holds the model.

    checkpoint: a file path. The trainer state (model, optimizer, epoch, step, the
    shuffling generator, the history and early-stopping state) is written there
    atomically (temporary file, fsync, rename: a reader sees the old checkpoint or the
    new one, never a partial one) every `checkpoint_every` optimizer steps and at the end
    of every epoch (checkpoint_every=None: at the ends of epochs only).
    resume: False starts afresh; True continues from `checkpoint` if that file exists
    (the same command line serves the first start and every restart); a path continues
    from that checkpoint, which must exist. A resumed run redraws the interrupted epoch's
    order and skips the steps already taken, so it ends with the model the uninterrupted
    run would have had, losing at most the steps since the last checkpoint.

    Returns: one dict per epoch: epoch, loss (mean objective + regularizers over the
    batches), train_accuracy (over the epoch's batches, as trained), val_accuracy (None
    without val_data), seconds.
    """
    _check_train_arguments(model, data, objective, user_init, checkpoint, checkpoint_every,
                           resume)
    user_level = objective == "user_mixture"
    parallel = _resolve_group(process_group)
    is_main = parallel is None or parallel.is_main
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    options = dict(batch_size=batch_size, seed=seed, objective=objective, lr=lr,
                   weight_decay=weight_decay, num_pairs=len(data))
    state = dict(epoch=0, step=0, global_step=0, history=[], best_accuracy=-1.0,
                 best_state=None, stale=0, stopped=False, partial=[0.0, 0.0],
                 epoch_generator=generator.get_state())
    resume_path = checkpoint if resume is True else (resume or None)
    if resume_path is not None and (resume is not True or os.path.exists(resume_path)):
        state = _load_train_state(resume_path, model, optimizer, options)
        if is_main:
            logger.info("resumed from %s at epoch %d, step %d", resume_path, state["epoch"],
                        state["step"])
    elif user_level and user_init == "em" and model.config.get("expert_hidden") is None:
        # Every rank fits the same EM start from the same data and seed.
        fit = init_user_mixture(model, data, seed=seed)
        if is_main:
            logger.info("EM start: log-likelihood %.3f (restart %d)", fit.log_likelihood,
                        fit.restart)
    step_loss = _StepLoss(model, objective, regularizers, parallel)
    if parallel is not None:
        # find_unused_parameters: some parameters take no part in an objective (the user
        # logits under "mixture", the router under "user_mixture", output biases, which
        # cancel in margins); they keep grad None, as in a single process, so AdamW's
        # weight decay skips them there too. The buffers (fixed prior heads) never change:
        # synced once at construction, not before every forward.
        step_loss = DistributedDataParallel(step_loss, process_group=parallel.group,
                                            find_unused_parameters=True,
                                            forward_sync_buffers=False)
    run = _Run(model, data, val_data, objective, step_loss, optimizer, parallel, options,
               state, checkpoint, checkpoint_every)
    bar = tqdm(range(state["epoch"], epochs), desc="train", disable=not (progress and is_main),
               unit="epoch", initial=state["epoch"], total=epochs)
    with _peer_failures(parallel, state, checkpoint):
        for epoch in bar:
            if state["stopped"]:
                break
            started = time.perf_counter()
            # The generator as it was before this epoch's draws (a fresh seed, the end of
            # the last epoch, or a checkpoint's), so a resumed epoch redraws its batches.
            generator.set_state(state["epoch_generator"])
            batches = _epoch_batches(data, batch_size, generator, user_level)
            totals = run.steps(epoch, batches)
            record = run.end_epoch(epoch, totals, started)
            bar.set_postfix(_shown(record))
            state.update(epoch=epoch + 1, step=0, partial=[0.0, 0.0],
                         epoch_generator=generator.get_state())
            if val_data is not None:
                _early_stopping(state, record, model, patience, is_main)
            if checkpoint:
                _save_train_state(checkpoint, model, optimizer, options, state, is_main)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return state["history"]


@dataclass
class _Run:
    """What the epochs of one `train` call share."""

    model: SparseMoERewardModel
    data: PreferenceData
    val_data: Optional[PreferenceData]
    objective: str
    step_loss: nn.Module
    optimizer: torch.optim.Optimizer
    parallel: Optional[DataParallelGroup]
    options: dict
    state: dict
    checkpoint: Optional[str]
    checkpoint_every: Optional[int]

    @property
    def is_main(self) -> bool:
        return self.parallel is None or self.parallel.is_main

    def steps(self, epoch: int, batches: list) -> torch.Tensor:
        """The optimizer steps of one epoch from state["step"] on; returns this rank's
        [loss x pairs, correct pairs] over them (rank 0 adds a resumed epoch's earlier
        steps, which the checkpoint holds summed over all ranks)."""
        state, parallel = self.state, self.parallel
        user_ids = self.data.user_ids if self.objective == "user_mixture" else None
        totals = torch.tensor(state["partial"] if self.is_main else [0.0, 0.0],
                              dtype=torch.float64)
        self.model.train()
        for step in range(state["step"], len(batches)):
            index = batches[step]
            # Rows of the router's logits: pairs, or the users of a user-level batch.
            global_rows = len(index) if user_ids is None else len(user_ids[index].unique())
            if parallel is not None:
                index = local_share(index, parallel.rank, parallel.world_size, user_ids)
            loss, weighted_loss, correct = self.step_loss(self.data[index],
                                                          len(batches[step]), global_rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            totals += torch.stack([weighted_loss.double(), correct.double()])
            state["global_step"] += 1
            due = self.checkpoint_every and state["global_step"] % self.checkpoint_every == 0
            if self.checkpoint and due and step + 1 < len(batches):
                state.update(epoch=epoch, step=step + 1)
                state["partial"] = _global_totals(totals, parallel).tolist()
                _save_train_state(self.checkpoint, self.model, self.optimizer, self.options,
                                  state, self.is_main)
        return totals

    def end_epoch(self, epoch: int, totals: torch.Tensor, started: float) -> dict:
        """The epoch's history record (appended to state["history"]), over all ranks."""
        self.model.eval()
        totals = _global_totals(totals, self.parallel)
        if self.val_data is None:
            val_accuracy = None
        elif self.parallel is None:
            val_accuracy = evaluate(self.model, self.val_data, self.objective)
        else:
            val_accuracy = _distributed_evaluate(self.model, self.val_data, self.objective,
                                                 self.parallel)
        record = dict(
            epoch=epoch,
            loss=float(totals[0]) / len(self.data),
            train_accuracy=float(totals[1]) / len(self.data),
            val_accuracy=val_accuracy,
            seconds=time.perf_counter() - started,
        )
        self.state["history"].append(record)
        if self.is_main:
            logger.info("epoch %d: %s", epoch, _shown(record))
        return record


def _shown(record: dict) -> dict:
    shown = {"loss": f"{record['loss']:.4f}", "acc": f"{record['train_accuracy']:.3f}"}
    if record["val_accuracy"] is not None:
        shown["val"] = f"{record['val_accuracy']:.3f}"
    return shown


@contextlib.contextmanager
def _peer_failures(parallel, state, checkpoint):
    """Names the step and the way back when a collective fails: gloo raises once a peer's
    connection drops (a dead rank) or after the group's timeout (a stuck one)."""
    try:
        yield
    except RuntimeError as error:
        if parallel is None:
            raise
        way_back = (f"restart with resume=True to continue from {checkpoint}" if checkpoint
                    else "no checkpoint was set, so a restart starts afresh")
        raise RuntimeError(
            f"train: rank {parallel.rank} of {parallel.world_size} failed after optimizer "
            f"step {state['global_step']}: a peer died or stopped answering ({error}); "
            f"{way_back}") from error


def _check_train_arguments(model, data, objective, user_init, checkpoint, checkpoint_every,
                           resume) -> None:
    if objective not in TRAIN_OBJECTIVES:
        raise ValueError(
            f"train: objective must be one of {TRAIN_OBJECTIVES}, got {objective!r}")
    if len(data) == 0:
        raise ValueError("train: data has no pairs")
    if data.context_dim != model.config["context_dim"] or (
        data.response_dim != model.config["response_dim"]
    ):
        raise ValueError(
            f"train: data has context_dim={data.context_dim}, response_dim="
            f"{data.response_dim}; the model expects {model.config['context_dim']} and "
            f"{model.config['response_dim']}"
        )
    user_level = objective == "user_mixture"
    if user_level and (data.user_ids < 0).any():
        raise ValueError("train: objective 'user_mixture' needs the user id of every pair; "
                         "data.user_ids has -1 (unknown)")
    if user_level and model.config.get("num_users") is None:
        raise ValueError("train: objective 'user_mixture' needs a model built with "
                         "num_users; this one was built without num_users")
    if user_level and int(data.user_ids.max()) >= model.config["num_users"]:
        raise ValueError(
            f"train: user ids must be in [0, {model.config['num_users']}), got "
            f"[{int(data.user_ids.min())}, {int(data.user_ids.max())}]")
    if user_init not in ("em", None):
        raise ValueError(f"train: user_init must be 'em' or None, got {user_init!r}")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(
            f"train: checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every is not None and not checkpoint:
        raise ValueError("train: checkpoint_every needs a checkpoint path, got checkpoint="
                         f"{checkpoint!r}")
    if resume is True and not checkpoint:
        raise ValueError("train: resume=True continues from `checkpoint`, which is "
                         f"{checkpoint!r}; pass a checkpoint path")
    if resume not in (True, False, None) and not os.path.exists(resume):
        raise FileNotFoundError(f"train: resume={resume!r}: no such checkpoint file")


def _global_totals(totals: torch.Tensor, parallel) -> torch.Tensor:
    """The epoch's [loss x pairs, correct pairs] so far, summed over the ranks."""
    if parallel is None:
        return totals
    totals = totals.clone()
    dist.all_reduce(totals, group=parallel.stats_group)
    return totals


def _early_stopping(state, record, model, patience, is_main) -> None:
    if record["val_accuracy"] > state["best_accuracy"]:
        state.update(best_accuracy=record["val_accuracy"], stale=0,
                     best_state=copy.deepcopy(model.state_dict()))
        return
    state["stale"] += 1
    if patience is not None and state["stale"] >= patience:
        state["stopped"] = True
        if is_main:
            logger.info("early stop at epoch %d (best val accuracy %.4f)", record["epoch"],
                        state["best_accuracy"])


def _save_train_state(path, model, optimizer, options, state, is_main) -> None:
    """Rank 0 writes the trainer state atomically; the other ranks hold the same state."""
    if not is_main:
        return
    payload = dict(format=_TRAIN_FORMAT, config=json.dumps(model.config), options=options,
                   model=model.state_dict(), optimizer=optimizer.state_dict(), **state)
    write_with(path, lambda file: torch.save(payload, file))


def _load_train_state(path, model, optimizer, options) -> dict:
    """Restore model and optimizer from a `_save_train_state` file; returns the rest."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ValueError(f"train: {path} is not a readable training checkpoint: {error}") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != _TRAIN_FORMAT:
        raise ValueError(f"train: {path} is not a training checkpoint of format "
                         f"{_TRAIN_FORMAT!r}")
    if json.loads(payload["config"]) != json.loads(json.dumps(model.config)):
        raise ValueError(f"train: {path} holds a model with config {payload['config']}, "
                         f"not this model's {model.config}")
    for name, value in options.items():
        if name in ("lr", "weight_decay"):
            continue
        if payload["options"].get(name) != value:
            raise ValueError(
                f"train: {path} was written with {name}={payload['options'].get(name)!r}, "
                f"this run has {name}={value!r}; resume needs the same data and batches")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return {name: payload[name] for name in _STATE_KEYS}


def fit_router_prior(model: SparseMoERewardModel, data: PreferenceData, l2: float = 0.01,
                     steps: int = 200) -> float:
    """Fit the router of a user-level model (built with num_users and router_prior=True) to
    predict each training user's routing from its context: the prior a new user starts
    from becomes a function of who it is (a latent-class model with covariates, fitted in
    two stages: the types by `train`, then this).

    Minimizes, over the router's parameters only (experts and user logits stay as they
    are), the mean over the users of `data` of the cross-entropy between the user's full
    routing softmax(user_logits[u]) and softmax(router(x_u)), plus l2 / 2 times the
    squared norm of the router's weight matrices (biases are free). x_u is the mean
    context of the user's pairs (pairs of one user normally share it: rater covariates).
    L-BFGS, `steps` iterations at most; deterministic.

    Returns: the final objective.
    """
    if model.config.get("num_users") is None or not model.config.get("router_prior"):
        raise ValueError(
            "fit_router_prior: the model needs num_users and router_prior=True, got "
            f"num_users={model.config.get('num_users')}, "
            f"router_prior={model.config.get('router_prior')}")
    if not l2 >= 0 or steps < 1:
        raise ValueError(f"fit_router_prior: need l2 >= 0 and steps >= 1, got {l2}, {steps}")
    if len(data) == 0 or bool((data.user_ids < 0).any()):
        raise ValueError("fit_router_prior: data needs pairs, each with its user id (>= 0)")
    if data.context_dim != model.config["context_dim"]:
        raise ValueError(f"fit_router_prior: data has context_dim={data.context_dim}, the "
                         f"model expects {model.config['context_dim']}")
    if int(data.user_ids.max()) >= model.config["num_users"]:
        raise ValueError(f"fit_router_prior: user ids must be in [0, "
                         f"{model.config['num_users']}), got max {int(data.user_ids.max())}")
    users, rows = torch.unique(data.user_ids, return_inverse=True)
    counts = torch.bincount(rows, minlength=len(users)).to(data.context.dtype)
    contexts = torch.zeros(len(users), data.context_dim).index_add(0, rows, data.context)
    contexts = contexts / counts[:, None]
    with torch.no_grad():
        targets = torch.softmax(model.user_logits[users].float(), 1)
    weights = [parameter for name, parameter in model.router.named_parameters()
               if name.endswith("weight")]
    optimizer = torch.optim.LBFGS(model.router.parameters(), max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def objective():
        log_prior = torch.log_softmax(model.router(contexts), 1)
        loss = -(targets * log_prior).sum(1).mean()
        return loss + 0.5 * l2 * sum(weight.square().sum() for weight in weights)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        final = float(objective())
    logger.info("fit_router_prior: %d users, objective %.4f", len(users), final)
    return final


def save(model: SparseMoERewardModel, path) -> None:
    """Write the model to `path` atomically: one safetensors file (weights and buffers)
    whose header metadata holds the JSON config. A reader sees the old file or the new
    one, never a partial write: temporary file in the same folder, fsync, os.replace."""
    tensors = {name: tensor.detach().contiguous() for name, tensor in
               model.state_dict().items()}
    payload = safetensors.torch.save(tensors, metadata={_FORMAT_KEY: _FORMAT,
                                      _CONFIG_KEY: json.dumps(model.config)})
    write_atomically(path, payload)


def load(path) -> SparseMoERewardModel:
    """Read a model written by `save`. Raises ValueError naming the file when it is not a
    readable safetensors file, lacks or has a bad config, or its tensors do not match the
    config's model."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = safetensors.torch.load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"load: {path} is not a readable safetensors file: {error}") from None
    if metadata.get(_FORMAT_KEY) != _FORMAT:
        raise ValueError(
            f"load: {path} has format {metadata.get(_FORMAT_KEY)!r}, expected {_FORMAT!r} "
            "(not a smoe_ops reward model checkpoint)"
        )
    try:
        config = json.loads(metadata[_CONFIG_KEY])
        model = SparseMoERewardModel(**config)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"load: {path} has a bad config: {error}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"load: {path} does not match its config {config}: {error}"
        ) from None
    model.eval()
    return model
