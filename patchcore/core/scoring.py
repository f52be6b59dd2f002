"""From nearest-neighbour distances to patch and image scores, in named scoring modes.

Each mode is one :class:`ScoringRule` in ``scoring_modes.SCORING_RULES`` (the one place to add a mode):

``paper``: exactly the paper: patch score = L2 distance to the nearest bank element; image score = the
largest patch score s*, reweighted by eq. 7:
s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*.
``official``: exactly the official implementation: squared L2, patch score = mean over the k nearest
(k = 1 in its headline runs), image score = the largest patch score, no reweighting.
``mean-top-k`` (the default): the paper's L2 patch scores, image score = the mean of the ``top_k``
largest patch scores (20 by default: about 1% of the patches at 384 px) times eq. 7's factor of the most
anomalous patch. The top-k mean also sees defects spread over the image (measured on textile, README).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .scoring_modes import DEFAULT_SCORING, SCORING_MODES, SCORING_RULES, ScoringRule, scoring_rule


class Index(Protocol):
    """What scoring needs of a search index (``search.ExactIndex``, ``search.FaissIndex``, ...)."""

    bank: torch.Tensor

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...


def patch_scores(patches: torch.Tensor, index: Index, mode: str, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) patches -> ((P,) scores, (P,) index of each patch's nearest bank element).

    >>> from patchcore.search import ExactIndex
    >>> index = ExactIndex(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> patch_scores(torch.tensor([[0.0, 2.0], [3.0, 4.0]]), index, "paper")
    (tensor([2., 0.]), tensor([0, 1]))
    >>> patch_scores(torch.tensor([[0.0, 2.0]]), index, "official")[0]
    tensor([4.])
    """
    if scoring_rule(mode).squared:
        dists, idx = index.search(patches, min(k, index.bank.shape[0]))
        return dists.mean(dim=1), idx[:, 0]
    dists, idx = index.search(patches, 1)
    return dists[:, 0].sqrt(), idx[:, 0]


def reweighting_factors(
    test_patches: torch.Tensor, nearest: torch.Tensor, index: Index, num_neighbors: int
) -> torch.Tensor:
    """Eq. 7's factor for B most anomalous patches (B, D) whose nearest bank rows are ``nearest`` (B,) -> (B,).

    N_b(m*) are the b nearest bank rows of m* (m* itself first); the factor is
    1 - softmax(|m_test* - m| over N_b)[m*], which lies in [1 - 1/b, 1]. The B supports are found in one
    search, not one search per image.
    """
    bank = index.bank
    b = min(num_neighbors, bank.shape[0])
    _, found = index.search(bank[nearest], b)
    # m* is its own nearest neighbour, but ties with duplicate rows may order it elsewhere: put it first.
    support = torch.stack(
        [torch.cat([row.new_tensor([m]), row[row != m]])[:b] for row, m in zip(found, nearest.tolist())]
    )
    distances = torch.linalg.vector_norm(bank[support] - test_patches[:, None], dim=2)
    return 1.0 - torch.softmax(distances, dim=1)[:, 0]


def reweighting_factor(test_patch: torch.Tensor, nearest: int, index: Index, num_neighbors: int) -> torch.Tensor:
    """Eq. 7's factor for one most anomalous patch (D,): :func:`reweighting_factors` of one image."""
    return reweighting_factors(test_patch[None], torch.tensor([nearest]), index, num_neighbors)[0]


def image_scores(
    scores: torch.Tensor,
    nearest: torch.Tensor,
    patches: torch.Tensor,
    index: Index,
    mode: str,
    num_neighbors: int = 9,
    top_k: int | None = None,
) -> torch.Tensor:
    """B images' (B, P) patch scores, (B, P) nearest bank rows and (B, P, D) patches -> (B,) image scores.

    The mean of the ``top_k`` largest patch scores (None: the mode's default; 1 is the max), multiplied by
    eq. 7's factor of the most anomalous patch in the modes that reweight.
    """
    if scores.ndim != 2 or nearest.shape != scores.shape or patches.shape[:2] != scores.shape:
        raise ValueError(
            f"image_scores needs (B, P) scores and nearest and (B, P, D) patches; got {tuple(scores.shape)}, "
            f"{tuple(nearest.shape)} and {tuple(patches.shape)}"
        )
    rule = scoring_rule(mode)
    top_k = rule.default_top_k if top_k is None else top_k
    top = torch.argmax(scores, dim=1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    if top_k == 1:
        aggregate = scores[rows, top]
    else:
        aggregate = scores.topk(min(top_k, scores.shape[1]), dim=1).values.mean(dim=1)
    if not rule.reweight:
        return aggregate
    return aggregate * reweighting_factors(patches[rows, top], nearest[rows, top], index, num_neighbors)


def image_score(
    scores: torch.Tensor,
    nearest: torch.Tensor,
    patches: torch.Tensor,
    index: Index,
    mode: str,
    num_neighbors: int = 9,
    top_k: int | None = None,
) -> torch.Tensor:
    """One image's (P,) patch scores -> scalar image score: :func:`image_scores` of a batch of one."""
    return image_scores(scores[None], nearest[None], patches[None], index, mode, num_neighbors, top_k)[0]


__all__ = [
    "DEFAULT_SCORING",
    "SCORING_MODES",
    "SCORING_RULES",
    "Index",
    "ScoringRule",
    "image_score",
    "image_scores",
    "patch_scores",
    "reweighting_factor",
    "reweighting_factors",
    "scoring_rule",
]
