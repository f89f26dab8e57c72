"""`train` (AdamW on a mixture Bradley-Terry objective plus regularizers), `evaluate`,
and checkpoints (`save` / `load`: one safetensors file, config as JSON in its header)."""

import copy
import json
import logging
import os
import tempfile
import time
from typing import Optional

import torch
import safetensors.torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from smoe_ops.reward.data import PreferenceData
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

    Returns: one dict per epoch: epoch, loss (mean objective + regularizers over the
    batches), train_accuracy (over the epoch's batches, as trained), val_accuracy (None
    without val_data), seconds.
    """
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
    if user_level and user_init == "em" and model.config.get("expert_hidden") is None:
        fit = init_user_mixture(model, data, seed=seed)
        logger.info("EM start: log-likelihood %.3f (restart %d)", fit.log_likelihood,
                    fit.restart)
    accuracy_rule = "mixture" if user_level else objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history, best_accuracy, best_state, stale = [], -1.0, None, 0
    bar = tqdm(range(epochs), desc="train", disable=not progress, unit="epoch")
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        if user_level:
            batches = _user_batches(data, batch_size, generator)
        else:
            order = torch.randperm(len(data), generator=generator)
            batches = [order[start:start + batch_size]
                       for start in range(0, len(data), batch_size)]
        total_loss, correct = 0.0, 0
        for index in batches:
            batch = data[index]
            routing, logits, weights, margins, loss = _margins(model, batch, objective)
            penalty, _terms = regularization(logits, routing, model.head_weights(),
                                             regularizers)
            loss = loss + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += pair_accuracy(weights.detach(), margins.detach(),
                                     accuracy_rule).sum().item()
        model.eval()
        record = dict(
            epoch=epoch,
            loss=total_loss / len(data),
            train_accuracy=correct / len(data),
            val_accuracy=None if val_data is None else evaluate(model, val_data, objective),
            seconds=time.perf_counter() - started,
        )
        history.append(record)
        shown = {"loss": f"{record['loss']:.4f}", "acc": f"{record['train_accuracy']:.3f}"}
        if val_data is not None:
            shown["val"] = f"{record['val_accuracy']:.3f}"
        bar.set_postfix(shown)
        logger.info("epoch %d: %s", epoch, shown)
        if val_data is None:
            continue
        if record["val_accuracy"] > best_accuracy:
            best_accuracy, stale = record["val_accuracy"], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if patience is not None and stale >= patience:
                logger.info("early stop at epoch %d (best val accuracy %.4f)", epoch,
                            best_accuracy)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


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
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
