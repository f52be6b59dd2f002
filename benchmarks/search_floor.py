"""How much of the bank an exact or near-exact search must touch, on the real textile bank.

    python benchmarks/search_floor.py [--settings default|peers] [--train 200]

Fits a model (the defaults, or the peers' settings of benchmarks/README.md), extracts the patch features
of 15 textile test images (every third patch) and computes, in float64 against the whole bank:

- cluster bounds: k-means the bank into C clusters; a query must visit every cluster whose lower bound
  max(0, |q - c| - r_c) does not exceed its true nearest-neighbour distance. Printed: the share of the bank
  an exact search pruned by these bounds would still compute (clusters visited, weighted by size).
- projection bounds: |P(q - b)|^2 + (|q_r| - |b_r|)^2 <= |q - b|^2 for the top d' principal directions P
  and the residual norms; printed: the share of bank rows whose bound does not exceed the true
  nearest-neighbour distance (rows an exact search pruned this way must still rerank), with the ideal
  threshold (the true distance itself).
- inverted lists (IVF, the approximate search): recall@1 and the share of the bank visited when each query
  probes its p nearest of C clusters.

These say what any search that does not touch every (query, bank row) pair could save here; see the
README's Performance section for what they imply for prediction time.
"""

from __future__ import annotations

import argparse

import torch

# the banks predict_profile.py profiles: the same settings, so the floors and the profile describe one search
from predict_profile import SETTINGS

from patchcore import PatchCore
from patchcore.datasets import textile


def kmeans(bank: torch.Tensor, clusters: int, seed: int = 0, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, D) -> (centroids (C, D), assignment (M,)) by Lloyd's algorithm from C random rows."""
    generator = torch.Generator().manual_seed(seed)
    centroids = bank[torch.randperm(len(bank), generator=generator)[:clusters]].clone()
    for _ in range(steps):
        assignment = torch.cdist(bank, centroids).argmin(1)
        for c in range(clusters):
            members = bank[assignment == c]
            if len(members):
                centroids[c] = members.mean(0)
    return centroids, torch.cdist(bank, centroids).argmin(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--train", type=int, default=200)
    args = parser.parse_args()
    data = textile()
    model = PatchCore(SETTINGS[args.settings]).fit(data.train[: args.train])
    paths = [sample.path for sample in data.test[::40]][:15]
    dim = model.memory_bank_.shape[1]
    queries = torch.from_numpy(model.extract_features(paths)).reshape(-1, dim)[::3].double()
    bank = model.memory_bank_.double()
    distances = torch.cdist(queries, bank)
    nearest, best = distances.argmin(1), distances.min(1).values
    print(f"settings: {args.settings}, bank {tuple(bank.shape)}, {len(queries)} queries")
    for clusters in (64, 256):
        centroids, assignment = kmeans(bank, clusters)
        sizes = torch.bincount(assignment, minlength=clusters).double()
        radius = torch.zeros(clusters, dtype=torch.float64)
        for c in range(clusters):
            members = bank[assignment == c]
            if len(members):
                radius[c] = (members - centroids[c]).norm(dim=1).max()
        to_centroid = torch.cdist(queries, centroids)
        visit = (to_centroid - radius).clamp_min(0) <= best[:, None]
        share = (visit.double() * sizes).sum(1).mean() / len(bank)
        print(f"cluster bounds, C={clusters}: exact search computes {share:.3f} of the bank")
        order = to_centroid.argsort(1)
        for probes in (4, 8, 16):
            visited = order[:, :probes]
            recall = (visited == assignment[nearest][:, None]).any(1).double().mean()
            rows = sizes[visited].sum(1).mean() / len(bank)
            print(f"  IVF C={clusters} probes={probes}: recall@1 {recall:.4f}, visits {rows:.3f} of the bank")
    mean = bank.mean(0)
    _, _, basis = torch.linalg.svd(bank - mean, full_matrices=False)
    x, y = (queries - mean) @ basis.T, (bank - mean) @ basis.T
    for kept in (16, 32, 64):
        bound = torch.cdist(x[:, :kept], y[:, :kept]) ** 2
        bound += (x[:, kept:].norm(dim=1)[:, None] - y[:, kept:].norm(dim=1)[None]) ** 2
        share = (bound <= best[:, None] ** 2).double().mean()
        print(f"projection bounds, d'={kept}: {share:.4f} of the bank left to rerank (ideal threshold)")


if __name__ == "__main__":
    main()
