"""EM for the user-level mixture of linear Bradley-Terry experts: a starting point that
gradient training alone does not find.

Model: user u has a latent type z_u in [0, K); every pair i of u (chosen minus rejected
features d_i) is labelled with P = sigmoid(w_{z_u} . d_i). The marginal likelihood
sum_u log sum_e pi_e prod_{i of u} sigmoid(w_e . d_i) is what `user_mixture_bt_loss`
optimizes, but from near-equal heads its gradient barely breaks the symmetry between
experts: on 6 synthetic types, AdamW from the default initialization reaches an NMI of 0.5
to 0.7 against the true types while the Bayes posterior under the true vectors reaches 0.93.
EM with 8 restarts, each seeded by k-means on the top-K principal coordinates of the
users' mean feature differences, reached 0.86 to 0.94 on 4 to 6 types and seeds 0 to 2
(k-means on the raw 64-d means: 0.76 to 0.94; `benchmarks/reward_acceptance.py`).

    E-step: r_ue = softmax_e(log pi_e + sum_{i of u} log sigmoid(w_e . d_i))
    M-step: w_e = argmax sum_i r_{u(i) e} log sigmoid(w_e . d_i) - l2 / 2 |w_e|^2
            (concave: a few Newton steps, the K [D, D] systems solved as one batch)

All arithmetic is float64; D is the response dimension, so a Newton step costs
O(P K D^2 + K D^3).
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoe_ops.reward.data import PreferenceData

__all__ = ["UserMixtureFit", "fit_user_mixture", "init_user_mixture"]

logger = logging.getLogger("smoe_ops")


@dataclass
class UserMixtureFit:
    """What `fit_user_mixture` found: the best restart.

    heads: [K, Dr] float64 effective expert weight vectors.
    responsibilities: [U, K] float64 posterior of each user's type (rows sum to 1; users
        without pairs get the prior).
    log_likelihood: marginal log-likelihood of the training pairs, summed over users.
    restart: which restart won.
    """

    heads: torch.Tensor
    responsibilities: torch.Tensor
    log_likelihood: float
    restart: int


def _kmeans_assignments(points: torch.Tensor, num_clusters: int, generator,
                        iterations: int = 25) -> torch.Tensor:
    """[U] cluster of each of the [U, D] points: k-means++ seeding, then Lloyd steps."""
    first = torch.randint(len(points), (1,), generator=generator)
    centres = points[first]
    for _ in range(1, num_clusters):
        distance = torch.cdist(points, centres).min(1).values.square()
        if float(distance.sum()) == 0.0:  # fewer distinct points than clusters
            pick = torch.randint(len(points), (1,), generator=generator)
        else:
            pick = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centres = torch.cat([centres, points[pick]])
    assignments = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        one_hot = F.one_hot(assignments, num_clusters).to(points.dtype)
        sizes = one_hot.sum(0)
        # An emptied cluster keeps its old centre rather than becoming NaN.
        moved = (one_hot.T @ points) / sizes.clamp_min(1)[:, None]
        centres = torch.where(sizes[:, None] > 0, moved, centres)
        updated = torch.cdist(points, centres).argmin(1)
        if torch.equal(updated, assignments):
            break
        assignments = updated
    return assignments


def _principal_scores(points: torch.Tensor, rank: int) -> torch.Tensor:
    """[U, rank] coordinates of the centred [U, D] points on their top principal axes.
    The K type vectors span at most K directions while the noise of a user's mean spreads
    over all D, so k-means on these coordinates sees the types with D / K times less noise.
    """
    centred = points - points.mean(0)
    _left, _values, right = torch.linalg.svd(centred, full_matrices=False)
    return centred @ right[:rank].T


def _newton_heads(diff, weights, heads, l2, steps):
    """`steps` Newton steps of the K weighted logistic regressions (labels all 1: every
    row of diff is chosen minus rejected). diff [P, D], weights [P, K], heads [K, D].

    The K systems are symmetric positive definite (a weighted Gram matrix plus l2 I), so
    they are solved by Cholesky: half the work of LU, and no row interchanges. The batched
    LU of torch.linalg.solve was the cause of a rare failure ("Pivots given to lu_solve
    must all be greater or equal to 1") in a test run: some MKL builds get the row
    interchange of a multi-threaded batched LU wrong, depending on the threading state.
    """
    eye = torch.eye(diff.shape[1], dtype=diff.dtype)
    for _ in range(steps):
        prob = torch.sigmoid(diff @ heads.T)                       # [P, K]
        gradient = ((1 - prob) * weights).T @ diff - l2 * heads    # [K, D]
        curvature = prob * (1 - prob) * weights                    # [P, K]
        hessian = torch.einsum("pk,pd,pe->kde", curvature, diff, diff) + l2 * eye
        factor, info = torch.linalg.cholesky_ex(hessian)
        if bool(info.any()):  # only non-finite input can make l2 I + a Gram matrix fail
            raise FloatingPointError(
                f"user-mixture EM: the Newton system of expert {int(info.nonzero()[0, 0])} is "
                f"not positive definite (non-finite features or weights?)")
        heads = heads + torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
    return heads


def _one_restart(diff, rows, num_users, num_experts, generator, iterations, l2):
    """(heads [K, D], responsibilities [U, K], log-likelihood) of one EM run."""
    sizes = torch.bincount(rows, minlength=num_users).clamp_min(1)
    user_means = torch.zeros(num_users, diff.shape[1], dtype=diff.dtype).index_add(
        0, rows, diff) / sizes[:, None]
    assignments = _kmeans_assignments(_principal_scores(user_means, num_experts),
                                      num_experts, generator)
    responsibilities = F.one_hot(assignments, num_experts).to(diff.dtype)
    heads = torch.zeros(num_experts, diff.shape[1], dtype=diff.dtype)
    log_likelihood = -math.inf
    for _ in range(iterations):
        heads = _newton_heads(diff, responsibilities[rows], heads, l2, steps=2)
        per_user = torch.zeros(num_users, num_experts, dtype=diff.dtype).index_add(
            0, rows, F.logsigmoid(diff @ heads.T))
        log_prior = responsibilities.mean(0).clamp_min(1e-12).log()
        joint = per_user + log_prior
        responsibilities = torch.softmax(joint, 1)
        updated = float(torch.logsumexp(joint, 1).sum())
        if abs(updated - log_likelihood) <= 1e-6 * abs(updated):
            log_likelihood = updated
            break
        log_likelihood = updated
    return heads, responsibilities, log_likelihood


def fit_user_mixture(data: PreferenceData, num_users: int, num_experts: int,
                     restarts: int = 8, iterations: int = 30, l2: float = 1.0,
                     seed: int = 0) -> UserMixtureFit:
    """Fit K linear Bradley-Terry experts and each user's type posterior by EM.

    Args:
        data: pairs with user_ids in [0, num_users) on every pair.
        num_users, num_experts: U and K.
        restarts: independent EM runs (k-means++ seeds); the highest likelihood wins.
        iterations: EM iterations per run (it stops earlier once the likelihood settles).
        l2: precision of the Gaussian prior on each head (keeps separable users finite).
        seed: seeds the k-means++ draws.
    """
    if restarts < 1 or iterations < 1 or l2 <= 0:
        raise ValueError(
            f"fit_user_mixture: need restarts >= 1, iterations >= 1 and l2 > 0, got "
            f"{restarts}, {iterations}, {l2}")
    users = data.user_ids
    if len(data) == 0 or bool((users < 0).any()) or int(users.max()) >= num_users:
        raise ValueError(
            f"fit_user_mixture: every pair needs a user id in [0, {num_users}); got "
            f"{len(data)} pairs with ids in "
            f"[{int(users.min()) if len(data) else 0}, {int(users.max()) if len(data) else 0}]")
    diff = (data.chosen - data.rejected).double()
    if not bool(torch.isfinite(diff).all()):
        raise ValueError(
            f"fit_user_mixture: the pairs' features must be finite, got "
            f"{int((~torch.isfinite(diff)).sum())} non-finite entries in chosen - rejected")
    generator = torch.Generator().manual_seed(seed)
    best = None
    for restart in range(restarts):
        heads, responsibilities, log_likelihood = _one_restart(
            diff, users, num_users, num_experts, generator, iterations, l2)
        logger.info("user-mixture EM restart %d: log-likelihood %.3f", restart, log_likelihood)
        if best is None or log_likelihood > best.log_likelihood:
            best = UserMixtureFit(heads, responsibilities, log_likelihood, restart)
    return best


# Responsibilities this small are a certain "no"; the floor keeps log() finite and leaves
# training some gradient to change its mind.
_MIN_LOG_RESPONSIBILITY = -10.0


@torch.no_grad()
def init_user_mixture(model, data: PreferenceData, restarts: int = 8, iterations: int = 30,
                      l2: float = 1.0, seed: int = 0) -> UserMixtureFit:
    """Start a user-level model (built with num_users, linear experts) at the EM fit:
    the effective heads become the fitted heads (the fixed prior heads are subtracted
    from the learned part), and each user's routing logits become its log posterior
    (floored at -10). Returns the fit."""
    num_users = model.config.get("num_users")
    if num_users is None:
        raise ValueError("init_user_mixture: the model was built without num_users")
    if model.config.get("expert_hidden") is not None:
        raise ValueError("init_user_mixture: EM fits linear experts; the model has MLP "
                         f"experts (expert_hidden={model.config['expert_hidden']})")
    fit = fit_user_mixture(data, num_users, model.num_experts, restarts=restarts,
                           iterations=iterations, l2=l2, seed=seed)
    prior = model.config["prior_scale"] * model.prior_weight.double()
    model.expert_weight.copy_(fit.heads - prior)
    logits = fit.responsibilities.clamp_min(1e-300).log().clamp_min(_MIN_LOG_RESPONSIBILITY)
    model.user_logits.copy_(logits)
    return fit
