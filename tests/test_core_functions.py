"""The pure core: patch features, search, scoring and maps against plain reference computations."""

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore.core.features import local_average, patch_features, pool_channels
from patchcore.core.knn import knn
from patchcore.core.maps import anomaly_maps, gaussian_blur
from patchcore.core.scoring import image_score, image_scores, patch_scores, reweighting_factor
from patchcore.search import ExactIndex


def test_local_average_is_the_zero_padded_neighbourhood_mean():
    x = torch.randn(2, 3, 5, 6)
    out = local_average(x, 3)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    expected = torch.zeros_like(x)
    for i in range(5):
        for j in range(6):
            expected[..., i, j] = padded[..., i : i + 3, j : j + 3].mean(dim=(-1, -2))
    torch.testing.assert_close(out, expected)


def test_patch_features_upsamples_the_deeper_level_and_concatenates():
    fine, coarse = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    out = patch_features([fine, coarse], patch_size=1)
    assert out.shape == (2, 8, 8, 10)
    torch.testing.assert_close(out[..., :4], fine.permute(0, 2, 3, 1))
    up = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 4:], up.permute(0, 2, 3, 1))


def test_patch_features_target_dim_pools_like_the_official_code():
    fine, coarse = torch.randn(1, 4, 2, 2), torch.randn(1, 8, 2, 2)
    out = patch_features([fine, coarse], patch_size=1, target_dim=4)
    assert out.shape == (1, 2, 2, 4)
    f = fine.permute(0, 2, 3, 1).reshape(-1, 4)
    c = coarse.permute(0, 2, 3, 1).reshape(-1, 8)
    c4 = c.reshape(-1, 4, 2).mean(-1)  # 8 -> 4 averages pairs
    stacked = torch.cat([f, c4], dim=1).reshape(-1, 4, 2).mean(-1)
    torch.testing.assert_close(out.reshape(-1, 4), stacked)
    assert pool_channels(torch.ones(3, 7), 5).shape == (3, 5)


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 30), m=st.integers(1, 40), d=st.integers(1, 9), k=st.integers(1, 5), chunk=st.integers(1, 7))
def test_knn_matches_brute_force(q, m, d, k, chunk):
    k = min(k, m)
    g = torch.Generator().manual_seed(q * 1000 + m)
    queries, bank = torch.randn(q, d, generator=g), torch.randn(m, d, generator=g)
    dists, idx = knn(queries, bank, k, chunk_size=chunk)
    full = torch.cdist(queries.double(), bank.double()) ** 2
    expected, _ = full.topk(k, dim=1, largest=False)
    torch.testing.assert_close(dists.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full.gather(1, idx), expected, atol=1e-4, rtol=1e-4)


def test_knn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="D"):
        knn(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="k="):
        knn(torch.zeros(2, 3), torch.zeros(4, 3), k=5)


def _bank():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 4, generator=g)
    return bank, ExactIndex(bank, chunk_size=7), torch.randn(30, 4, generator=g) * 2


def test_paper_mode_uses_l2_and_official_mode_squared_l2_mean_over_k():
    bank, index, patches = _bank()
    full = torch.cdist(patches, bank)
    paper, nearest = patch_scores(patches, index, "paper")
    torch.testing.assert_close(paper, full.min(1).values, atol=1e-4, rtol=1e-4)
    assert torch.equal(nearest, full.argmin(1))
    official, _ = patch_scores(patches, index, "official", k=3)
    torch.testing.assert_close(official, (full**2).topk(3, largest=False).values.mean(1), atol=1e-4, rtol=1e-4)


def test_eq7_reweighting_matches_the_formula_and_its_bounds():
    bank, index, patches = _bank()
    scores, nearest = patch_scores(patches, index, "paper")
    top = int(scores.argmax())
    m_star = int(nearest[top])
    b = 9
    support = torch.cdist(bank[m_star][None], bank)[0].argsort()[:b]
    dist = torch.linalg.vector_norm(bank[support] - patches[top], dim=1)
    expected = (1 - torch.exp(dist[0]) / torch.exp(dist).sum()) * scores[top]
    got = image_score(scores, nearest, patches, index, "paper", num_neighbors=b)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    factor = reweighting_factor(patches[top], m_star, index, b)
    assert 1 - 1 / b - 1e-6 <= float(factor) <= 1.0
    assert float(image_score(scores, nearest, patches, index, "official")) == float(scores.max())


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(0).random((2, 40, 37)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    theirs = np.stack([scipy.ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in x])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    unchanged = torch.from_numpy(x)
    assert gaussian_blur(unchanged, 0) is unchanged  # sigma 0 disables smoothing


def test_anomaly_maps_upsample_to_input_size_and_keep_the_hot_spot():
    grid = torch.zeros(1, 7, 7)
    grid[0, 1, 5] = 10.0
    maps = anomaly_maps(grid, 56, sigma=4.0)
    assert maps.shape == (1, 56, 56)
    r, c = np.unravel_index(int(maps[0].argmax()), (56, 56))
    assert r // 8 == 1 and c // 8 == 5


def test_image_top_k_averages_the_largest_patch_scores():
    bank, index, patches = _bank()
    scores, nearest = patch_scores(patches, index, "official")
    top3 = scores.sort(descending=True).values[:3].mean()
    got = image_score(scores, nearest, patches, index, "official", top_k=3)
    torch.testing.assert_close(got, top3)
    paper_scores, paper_nearest = patch_scores(patches, index, "paper")
    one = image_score(paper_scores, paper_nearest, patches, index, "paper", top_k=1)
    three = image_score(paper_scores, paper_nearest, patches, index, "paper", top_k=3)
    ratio = paper_scores.sort(descending=True).values[:3].mean() / paper_scores.max()
    torch.testing.assert_close(three, one * ratio)


@settings(max_examples=25, deadline=None)
@given(
    n_images=st.integers(1, 5),
    mode=st.sampled_from(["paper", "official", "mean-top-k"]),
    top_k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_batched_image_scores_equal_one_image_at_a_time(n_images, mode, top_k, seed):
    rng = np.random.default_rng(seed)
    bank = torch.from_numpy(rng.standard_normal((40, 6)).astype(np.float32))
    index = ExactIndex(bank)
    patches = torch.from_numpy(rng.standard_normal((n_images, 12, 6)).astype(np.float32))
    scores, nearest = patch_scores(patches.reshape(-1, 6), index, mode)
    scores, nearest = scores.view(n_images, 12), nearest.view(n_images, 12)
    batched = image_scores(scores, nearest, patches, index, mode, 9, top_k)
    one_by_one = [float(image_score(scores[i], nearest[i], patches[i], index, mode, 9, top_k)) for i in range(n_images)]
    assert batched.tolist() == pytest.approx(one_by_one, rel=1e-6)


def test_smoothing_operator_is_upsampling_then_blurring():
    grid = torch.from_numpy(np.random.default_rng(3).random((2, 6, 9)).astype(np.float32))
    for size, sigma in (((40, 57), 4.0), ((24, 24), 0.0), ((13, 90), 1.5)):
        reference = gaussian_blur(
            torch.nn.functional.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0],
            sigma,
        )
        torch.testing.assert_close(anomaly_maps(grid, size, sigma), reference, atol=1e-5, rtol=1e-5)
