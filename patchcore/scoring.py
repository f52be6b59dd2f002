"""From nearest-neighbour distances to patch and image scores, in the two named modes.

``paper``: patch score = L2 distance to the nearest bank element; image score = the largest patch score
s*, reweighted by eq. 7: s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*.
``official``: the official implementation's behaviour: squared L2, patch score = mean over the k
nearest, image score = max (no reweighting).

Both modes can aggregate the mean of the ``top_k`` largest patch scores instead of the max (``top_k=1``);
in ``paper`` mode the eq. 7 factor of the most anomalous patch then multiplies that mean.
"""

from __future__ import annotations

import torch

from typing import Protocol


class Index(Protocol):
    """What scoring needs of a search index (``search.ExactIndex``, ``search_faiss.FaissIndex``)."""

    bank: torch.Tensor

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...


def patch_scores(patches: torch.Tensor, index: Index, mode: str, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) patches -> ((P,) scores, (P,) index of each patch's nearest bank element)."""
    if mode == "official":
        dists, idx = index.search(patches, min(k, index.bank.shape[0]))
        return dists.mean(dim=1), idx[:, 0]
    dists, idx = index.search(patches, 1)
    return dists[:, 0].sqrt(), idx[:, 0]


def reweighting_factor(test_patch: torch.Tensor, nearest: int, index: Index, num_neighbors: int) -> torch.Tensor:
    """Eq. 7's factor for the most anomalous patch (D,) whose nearest bank row is ``nearest``.

    N_b(m*) are the b nearest bank rows of m* (m* itself first); the factor is
    1 - softmax(|m_test* - m| over N_b)[m*], which lies in [1 - 1/b, 1].
    """
    bank = index.bank
    b = min(num_neighbors, bank.shape[0])
    _, support = index.search(bank[nearest][None], b)
    # m* is its own nearest neighbour, but ties with duplicate rows may order it elsewhere: put it first.
    support = support[0]
    support = torch.cat([support.new_tensor([nearest]), support[support != nearest]])[:b]
    distances = torch.linalg.vector_norm(bank[support] - test_patch[None], dim=1)
    return 1.0 - torch.softmax(distances, dim=0)[0]


def image_score(
    scores: torch.Tensor,
    nearest: torch.Tensor,
    patches: torch.Tensor,
    index: Index,
    mode: str,
    num_neighbors: int = 9,
    top_k: int = 1,
) -> torch.Tensor:
    """One image's (P,) patch scores -> scalar image score.

    The mean of the ``top_k`` largest patch scores (the max for 1), reweighted by eq. 7 in ``paper`` mode.
    """
    top = int(torch.argmax(scores))
    aggregate = scores[top] if top_k == 1 else scores.topk(min(top_k, scores.numel())).values.mean()
    if mode == "official":
        return aggregate
    return aggregate * reweighting_factor(patches[top], int(nearest[top]), index, num_neighbors)
