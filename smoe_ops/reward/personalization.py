"""Test-time personalization: fit a new user's expert weights from a few of their labelled
pairs, with the experts (and the router) frozen.

A profile is a vector of K logits. Scoring with it routes each example on
    logits = population_logits(x) + profile.logits    (relative profiles: hedge, map)
    logits = profile.logits                           (absolute profiles: softmax)
through the same top-k `route` as the population model, so a personalized pair still costs
k experts. The population logits are the router's (context-routed models) or, for a model
trained with user ids, the log of the mean routing of its training users: the prior over
user types that a new user starts from.

Methods, with m_ie = r_e(chosen_i) - r_e(rejected_i) the margin of expert e on pair i and
loss_ie = -log sigmoid(m_ie):
- "hedge": multiplicative weights from the population routing, w_e <- w_e exp(-eta loss_ie)
  per pair; as logits, b_e = -eta sum_i loss_ie (the order of the pairs does not matter).
  With eta = 1 it is the Bayes posterior over "which single expert is this user" under the
  population prior. `update(profile, pair)` applies one more pair (streams of labels).
- "map": b = argmin_b -sum_i log sum_e softmax(a_i + b)_e sigmoid(m_ie) + prior/2 |b|^2,
  a_i the population logits of pair i, by damped Newton steps (Gaussian prior on the shift,
  `prior_strength` its precision). The mixture here is over all K experts, dense; scoring
  then routes to the top k of a_i + b. The objective is not convex, so each step is a
  damped Newton step (eigenvalues kept above half the prior strength, each logit moving at
  most _MAX_STEP), and a step that would raise a user's objective is halved (up to 4 times)
  or skipped, user by user.
- "softmax": ensemble reweighting, w_e proportional to exp(-sum_i loss_ie / tau), the same
  for every context (the router is ignored).

Many users at once: `personalize` on data whose pairs carry user ids fits every user in one
batch of [U, K] tensors (no Python loop over users) and returns {user_id: UserProfile}.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

import smoe_ops
from smoe_ops._io import write_atomically
from smoe_ops.reward.data import PreferenceData

__all__ = [
    "METHODS", "ProfileBatch", "ShiftReport", "UserProfile", "all_expert_margins",
    "personalize", "personalize_batch", "personalized_probability", "population_logits",
    "shift_report", "update",
]  # fmt: skip

logger = logging.getLogger("smoe_ops")

METHODS = ("hedge", "map", "softmax")
_FORMAT = "smoe_ops.UserProfile/1"
# Padded pairs per chunk of the batched MAP fit: bounds its [users, pairs, K] temporaries.
_CHUNK = 1 << 18
# Trust region of one MAP Newton step, in logits: e^4 = 55x in expert weight per step.
_MAX_STEP = 4.0


@dataclass
class UserProfile:
    """One user's expert weights, as K routing logits (a handful of floats).

    logits: [K] float32. relative: True adds them to the population logits (hedge, map),
        False uses them alone (softmax). method: how they were fitted. num_pairs: labelled
        pairs behind them. user_id: the user's id in the data (-1: unknown).
    """

    logits: torch.Tensor
    relative: bool = True
    method: str = "population"
    num_pairs: int = 0
    user_id: int = -1
    extra: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[0]

    def routing_logits(self, population: torch.Tensor) -> torch.Tensor:
        """[B, K] logits to route on, from [B, K] population logits."""
        if self.logits.shape[0] != population.shape[1]:
            raise ValueError(
                f"UserProfile: has {self.logits.shape[0]} expert logits, the model has "
                f"{population.shape[1]} experts")
        logits = self.logits.to(population.dtype)
        return population + logits if self.relative else logits.expand_as(population)

    def save(self, path) -> None:
        """Write the profile to `path` atomically (safetensors; fields in the metadata)."""
        metadata = {"format": _FORMAT, "fields": json.dumps(dict(
            relative=self.relative, method=self.method, num_pairs=self.num_pairs,
            user_id=self.user_id, extra=self.extra))}
        payload = safetensors.torch.save({"logits": self.logits.float().contiguous()},
                                         metadata=metadata)
        write_atomically(path, payload)

    @classmethod
    def load(cls, path) -> "UserProfile":
        """Read a profile written by `save`; ValueError naming the file otherwise."""
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                logits = file.get_tensor("logits")
            fields = json.loads(metadata["fields"])
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            raise ValueError(f"UserProfile.load: {path} is not a readable profile: "
                             f"{error!r}") from None
        if metadata.get("format") != _FORMAT or logits.dim() != 1:
            raise ValueError(f"UserProfile.load: {path} has format "
                             f"{metadata.get('format')!r} and logits of shape "
                             f"{tuple(logits.shape)}; expected {_FORMAT!r} and [K]")
        return cls(logits, **fields)


@dataclass
class ProfileBatch:
    """Profiles of U users as tensors: user_ids [U] int64 (sorted), logits [U, K] float32,
    num_pairs [U] int64, and the common method / relative flag."""

    user_ids: torch.Tensor
    logits: torch.Tensor
    num_pairs: torch.Tensor
    method: str
    relative: bool

    def profiles(self) -> Dict[int, UserProfile]:
        """{user_id: UserProfile}, each holding its own copy of its row."""
        return {int(user): UserProfile(self.logits[row].clone(), self.relative, self.method,
                                       int(self.num_pairs[row]), int(user))
                for row, user in enumerate(self.user_ids.tolist())}


@torch.no_grad()
def population_logits(model, context: torch.Tensor) -> torch.Tensor:
    """[B, K] float32 logits the population model routes [B, Dc] contexts on
    (`SparseMoERewardModel.population_logits`: the router's, or for a model trained with
    user ids, the log of its users' mean routing)."""
    return model.population_logits(context).float()


@torch.no_grad()
def all_expert_margins(model, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[P, K] float32 margin r_e(chosen) - r_e(rejected) of every expert on every pair."""
    return model.all_expert_rewards(chosen) - model.all_expert_rewards(rejected)


def _check(model, data: PreferenceData, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"personalize: method must be one of {METHODS}, got {method!r}")
    if (data.context_dim, data.response_dim) != (model.config["context_dim"],
                                                 model.config["response_dim"]):
        raise ValueError(
            f"personalize: user data has context_dim={data.context_dim}, response_dim="
            f"{data.response_dim}; the model expects {model.config['context_dim']} and "
            f"{model.config['response_dim']}")


def _map_objective(base, log_agree, mask, shift, prior_strength):
    """[U] MAP objective per user on padded [U, n, K] pairs (mask [U, n] marks real ones):
    -sum_i log sum_e softmax(a_i + b_u)_e sigmoid(m_ie) + prior/2 |b_u|^2."""
    log_mix = torch.logsumexp(F.log_softmax(base + shift[:, None], 2) + log_agree, 2)
    return -(log_mix * mask).sum(1) + 0.5 * prior_strength * shift.square().sum(1)


def _newton_step(base, log_agree, mask, shift, prior_strength):
    """[U, K] damped Newton step of the MAP objective for every user at once.

    Gradient sum_i (p_i - r_i) + prior b and Hessian sum_i [diag(p_i - r_i) - p_i p_i^T
    + r_i r_i^T] + prior I, with p_i the routing and r_i the posterior over experts of pair
    i. The per-user sums of outer products are batched [K, n] x [n, K] products: no
    [pairs, K, K] temporaries. The mixture likelihood is not concave, so the Hessian can be
    indefinite or nearly singular, and a plain Newton step can then be huge and useless.
    Each user's Hessian therefore gets damping d I, the smallest d in {0, prior, 2 prior,
    4 prior, ...} that leaves every eigenvalue above prior / 2 (tested by a Cholesky
    factorization of H + (d - prior / 2) I), and the step is then clipped to _MAX_STEP per
    logit: a trust region the line search refines.
    """
    num_experts = base.shape[2]
    log_prob = F.log_softmax(base + shift[:, None], 2)
    weight = mask[:, :, None]
    prob = log_prob.exp() * weight
    posterior = torch.softmax(log_prob + log_agree, 2) * weight
    excess = (prob - posterior).sum(1)
    gradient = excess + prior_strength * shift
    eye = torch.eye(num_experts, dtype=base.dtype)
    hessian = (torch.diag_embed(excess) - prob.transpose(1, 2) @ prob
               + posterior.transpose(1, 2) @ posterior + prior_strength * eye)
    damping = torch.zeros(len(shift), dtype=base.dtype)
    for _attempt in range(40):
        _, info = torch.linalg.cholesky_ex(
            hessian + (damping - 0.5 * prior_strength)[:, None, None] * eye)
        failed = info != 0
        if not bool(failed.any()):
            break
        damping = torch.where(failed, (2 * damping).clamp_min(prior_strength), damping)
    factor, _ = torch.linalg.cholesky_ex(hessian + damping[:, None, None] * eye)
    step = -torch.cholesky_solve(gradient[:, :, None], factor).squeeze(2)
    largest = step.abs().amax(1, keepdim=True).clamp_min(_MAX_STEP)
    return step * (_MAX_STEP / largest)


def _fit_map_padded(base, log_agree, mask, prior_strength, steps):
    """[U, K] MAP shifts for users padded to a common pair count."""
    shift = torch.zeros(base.shape[0], base.shape[2], dtype=base.dtype)
    objective = _map_objective(base, log_agree, mask, shift, prior_strength)
    # Near the optimum a Newton step changes the objective by less than its rounding error
    # (float32: about 1e-7 of the sum over a user's pairs); a step within that noise is
    # accepted, else the line search would stop the fit short of the stationary point.
    noise = 8 * torch.finfo(base.dtype).eps * (mask.sum(1) + 1)
    for _ in range(steps):
        direction = _newton_step(base, log_agree, mask, shift, prior_strength)
        accepted = torch.zeros(len(shift), dtype=torch.bool)
        scale = 1.0
        for _halving in range(5):
            trial = shift + scale * direction
            value = _map_objective(base, log_agree, mask, trial, prior_strength)
            better = (value <= objective + noise * (1 + objective.abs())) & ~accepted
            shift = torch.where(better[:, None], trial, shift)
            objective = torch.where(better, value, objective)
            accepted |= better
            if bool(accepted.all()):
                break
            scale *= 0.5
        if not bool(accepted.any()):
            break
    return shift


def _fit_map(base, margins, rows, counts, prior_strength, steps):
    """[U, K] MAP shifts for pairs whose user is row `rows` [P] of the U users, `counts`
    [U] pairs each. Users are independent, so they are fitted in buckets of users whose
    pair counts round up to the same power of two, each padded to that count (at most 2x
    padding), in chunks of at most _CHUNK padded pairs (bounding memory)."""
    num_users = len(counts)
    by_user = torch.argsort(rows, stable=True)  # pair indices grouped by user
    starts = torch.cumsum(counts, 0) - counts
    log_agree = F.logsigmoid(margins)
    bucket = torch.ceil(torch.log2(counts.double().clamp_min(1))).long()
    shift = torch.zeros(num_users, base.shape[1], dtype=base.dtype)
    for level in torch.unique(bucket).tolist():
        width = 1 << level
        users = torch.nonzero(bucket == level).flatten()
        per_chunk = max(1, _CHUNK // width)
        for first in range(0, len(users), per_chunk):
            chunk = users[first:first + per_chunk]
            slot = torch.arange(width)
            mask = slot[None, :] < counts[chunk][:, None]
            position = (starts[chunk][:, None] + slot[None, :]).clamp_max(len(rows) - 1)
            pairs = by_user[position]
            shift[chunk] = _fit_map_padded(base[pairs], log_agree[pairs],
                                           mask.to(base.dtype), prior_strength, steps)
    return shift


@torch.no_grad()
def personalize_batch(model, data: PreferenceData, method: str = "map", *,
                      prior_strength: float = 0.5, steps: int = 8, eta: float = 1.0,
                      tau: float = 1.0) -> ProfileBatch:
    """Fit one profile per user id of `data` (pairs with user id -1 form one unknown user,
    id -1) in one batch. Arguments as for `personalize`."""
    _check(model, data, method)
    for name, value in (("prior_strength", prior_strength), ("eta", eta), ("tau", tau)):
        if not value > 0:
            raise ValueError(f"personalize: {name} must be > 0, got {value}")
    users, rows, counts = torch.unique(data.user_ids, return_inverse=True,
                                       return_counts=True)
    margins = all_expert_margins(model, data.chosen, data.rejected)
    if method == "map":
        # float32: the fit is a few memory-bound passes over [pairs, K] per step, which
        # float64 makes several times slower; the per-user sums stay short (the pairs of
        # one user), and the line search allows for float32 rounding (_fit_map_padded).
        base = population_logits(model, data.context)
        shift = _fit_map(base, margins, rows, counts, prior_strength, steps).double()
    else:
        losses = torch.zeros(len(users), model.num_experts, dtype=torch.float64).index_add(
            0, rows, -F.logsigmoid(margins.double()))
        shift = -eta * losses if method == "hedge" else -losses / tau
    # Only differences between logits matter; centring keeps them small and comparable.
    shift = shift - shift.mean(1, keepdim=True)
    return ProfileBatch(users, shift.float(), counts, method, method != "softmax")


def personalize(model, user_data: PreferenceData, method: str = "map", *,
                prior_strength: float = 0.5, steps: int = 8, eta: float = 1.0,
                tau: float = 1.0, process_group=None
                ) -> Union[UserProfile, Dict[int, UserProfile]]:
    """Personalize the frozen `model` to the labelled pairs of a user (or of many).

    Args:
        model: a trained SparseMoERewardModel; nothing in it changes.
        user_data: the user's pairs. If any pair has a user id (>= 0), every distinct id
            is fitted separately, all in one batch, and the result is {user_id: profile}.
            Otherwise all the pairs belong to one user and the result is one profile.
        method: "hedge", "map" or "softmax" (see the module docstring).
        prior_strength: map: precision of the Gaussian prior on the logit shift (larger
            stays closer to the population).
        steps: map: Newton steps.
        eta: hedge: learning rate (1: the Bayes posterior under the population prior).
        tau: softmax: temperature.
        process_group: many users only: a torch.distributed group whose ranks all call
            personalize with the same model and data; the users are shared out across
            the ranks (contiguous runs of the sorted ids), each rank fits its own, and
            all_gather_object hands every rank all the profiles. Users are fitted
            independently, so the profiles are those of one process up to float rounding.
    A user without pairs gets the population profile and a warning.
    """
    _check(model, user_data, method)
    if len(user_data) == 0:
        logger.warning("personalize: the user has no labelled pairs; using the population "
                       "profile")
        return UserProfile(torch.zeros(model.num_experts), True, "population", 0, -1)
    options = dict(prior_strength=prior_strength, steps=steps, eta=eta, tau=tau)
    if not bool((user_data.user_ids >= 0).any()):
        return personalize_batch(model, user_data, method, **options).profiles()[-1]
    if process_group is None:
        return personalize_batch(model, user_data, method, **options).profiles()
    return _personalize_sharded(model, user_data, method, options, process_group)


def _personalize_sharded(model, user_data, method, options, group) -> Dict[int, UserProfile]:
    """personalize's many-user path with the users shared out over the ranks of `group`."""
    import torch.distributed as dist

    users = torch.unique(user_data.user_ids)
    mine = users.tensor_split(dist.get_world_size(group))[dist.get_rank(group)]
    profiles = {}
    if len(mine):
        pairs = torch.isin(user_data.user_ids, mine).nonzero().squeeze(1)
        profiles = personalize_batch(model, user_data[pairs], method, **options).profiles()
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, profiles, group=group)
    merged = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))


@torch.no_grad()
def update(model, profile: UserProfile, pair: PreferenceData, eta: float = 1.0) -> UserProfile:
    """One more labelled pair (or a few) for a hedge profile: returns the updated profile,
    b_e <- b_e - eta * sum_i loss_ie (the input profile is left as it was)."""
    if not profile.relative:
        raise ValueError("update: hedge updates a relative profile (hedge, map or the "
                         f"population); got an absolute {profile.method!r} profile")
    _check(model, pair, "hedge")
    margins = all_expert_margins(model, pair.chosen, pair.rejected).double()
    logits = profile.logits.double() + eta * F.logsigmoid(margins).sum(0)
    logits = logits - logits.mean()
    return UserProfile(logits.float(), True, "hedge", profile.num_pairs + len(pair),
                       profile.user_id, dict(profile.extra))


@dataclass
class ShiftReport:
    """How far a profile moved from the population.

    kl: KL(user routing || population routing), averaged over the contexts given.
    population_weights, user_weights: [K] mean full-softmax routing weights.
    gained, lost: expert ids by how much their mean weight rose (fell), largest first,
        only those that moved by more than 0.01.
    """

    kl: float
    population_weights: torch.Tensor
    user_weights: torch.Tensor
    gained: list
    lost: list


@torch.no_grad()
def shift_report(model, profile: UserProfile, context: Optional[torch.Tensor] = None
                 ) -> ShiftReport:
    """Compare the profile's routing with the population's over [B, Dc] contexts (None: a
    single all-zero context, which for a user-level model is exact)."""
    if context is None:
        context = torch.zeros(1, model.config["context_dim"])
    population = population_logits(model, context).double()
    user = profile.routing_logits(population)
    log_p, log_q = F.log_softmax(user, 1), F.log_softmax(population, 1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    user_weights, population_weights = log_p.exp().mean(0), log_q.exp().mean(0)
    change = user_weights - population_weights
    order = torch.argsort(change, descending=True).tolist()
    gained = [e for e in order if change[e] > 0.01]
    lost = [e for e in reversed(order) if change[e] < -0.01]
    if not math.isfinite(kl):
        logger.warning("shift_report: the KL is not finite (an expert has zero weight)")
    return ShiftReport(kl, population_weights.float(), user_weights.float(), gained, lost)


@torch.no_grad()
def personalized_probability(model, data: PreferenceData,
                             profiles: Optional[ProfileBatch] = None,
                             default: str = "population") -> torch.Tensor:
    """[P] float64 probability that chosen beats rejected under each pair's user profile
    (the mixture over the k experts routed on the profile's logits); `profiles` None
    scores every pair on the population routing (over `model.population_k` experts: the
    whole prior mixture for a user-level model without a router prior).

    Pairs whose user id has no row in `profiles` use the population routing when
    `default` is "population", or raise ValueError when it is "error".
    """
    if default not in ("population", "error"):
        raise ValueError(f"personalized_probability: default must be 'population' or "
                         f"'error', got {default!r}")
    logits = population_logits(model, data.context)
    known_users = profiles.user_ids if profiles is not None else torch.zeros(0, dtype=torch.long)
    if len(known_users):
        position = torch.searchsorted(known_users, data.user_ids).clamp_max(len(known_users) - 1)
        known = known_users[position] == data.user_ids
    else:
        known = torch.zeros(len(data), dtype=torch.bool)
    if default == "error" and not bool(known.all()):
        missing = torch.unique(data.user_ids[~known]).tolist()[:5]
        raise ValueError(f"personalized_probability: no profile for users {missing}")
    if bool(known.any()):
        shift = profiles.logits[position]
        if profiles.relative:
            shift = logits + shift
        logits = torch.where(known[:, None], shift, logits)
    if model.population_k == model.k or bool(known.all()):
        return _mixture_probability(model, data.chosen, data.rejected, logits, model.k)
    probability = torch.empty(len(data), dtype=torch.float64)
    for rows, k in ((known, model.k), (~known, model.population_k)):
        if bool(rows.any()):
            probability[rows] = _mixture_probability(model, data.chosen[rows],
                                                     data.rejected[rows], logits[rows], k)
    return probability


def _mixture_probability(model, chosen, rejected, logits, k: int) -> torch.Tensor:
    """[P] float64 sum_j g_j sigmoid(r_j(chosen) - r_j(rejected)) over the k experts routed on
    `logits`: only those experts are evaluated, and their biases cancel in the margin."""
    routing = smoe_ops.route(logits.contiguous(), k, score=model.config["score"])
    margins = model.expert_rewards(chosen, routing) - model.expert_rewards(rejected, routing)
    return (routing.weights.double() * torch.sigmoid(margins.double())).sum(1)
