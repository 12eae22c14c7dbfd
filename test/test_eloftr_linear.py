"""Coarse matching in linear memory (``eloftr_ops.mutual_nearest``) against the reference's
whole-matrix dual softmax: the same mutual-NN pairs, confidences within 1e-5 relative,
for any block size, with ties, thresholds, border masks and underflowing confidences.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kp_ros.core import eloftr_ops
from kp_ros.core.eloftr_ops import chunk_rows, mutual_nearest, whole_matrix_fits
from test_eloftr_correctness import MOTIONS, THRESHOLD, HandMadeFeatureMatcher, moved_pair

from conftest import synthetic_frame

REL_TOLERANCE = 1e-5
# Similarities up to ~40 (2 S_ij - r_i - c_j is the log confidence): one float32 rounding
# of S, which a different matmul blocking may give, moves a confidence by ~1e-6 relative.
SCALE = 1.5


def reference_mutual(features0, features1, temperature, skip_softmax=False, threshold=0.0,
                     valid0=None, valid1=None):
    """The whole-matrix computation (``match_coarse`` with ``coarse_chunk_bytes=0``)."""
    similarity = features0 @ features1.T / temperature
    confidence = similarity if skip_softmax else F.softmax(similarity, 0) * F.softmax(similarity, 1)
    best0, j_of_i = confidence.max(1)
    _, i_of_j = confidence.max(0)
    i_ids = torch.arange(len(features0))
    keep = (i_of_j[j_of_i] == i_ids) & (best0 > threshold)
    if valid0 is not None:
        keep &= valid0 & valid1[j_of_i]
    i_ids = i_ids[keep]
    return i_ids, j_of_i[i_ids], best0[i_ids]


def assert_same(got, expected, tolerance=REL_TOLERANCE):
    (i_got, j_got, s_got), (i_exp, j_exp, s_exp) = got, expected
    assert torch.equal(i_got, i_exp) and torch.equal(j_got, j_exp), \
        f"pairs differ: {len(i_got)} vs {len(i_exp)}"
    if len(s_exp):
        assert ((s_got - s_exp).abs() <= tolerance * s_exp.abs()).all(), (s_got, s_exp)


def features(rows, columns, channels=32, seed=0, scale=1.0, overlap=0.6):
    """Two feature sets, part of the second a noisy copy of the first (so there are
    mutual pairs), scaled like the matcher's (divided by sqrt(C))."""
    generator = torch.Generator().manual_seed(seed)
    f0 = torch.randn(rows, channels, generator=generator)
    f1 = torch.randn(columns, channels, generator=generator)
    shared = int(overlap * min(rows, columns))
    f1[:shared] = f0[torch.randperm(rows, generator=generator)[:shared]] + \
        0.3 * torch.randn(shared, channels, generator=generator)
    return scale * f0 / channels ** 0.5, scale * f1 / channels ** 0.5


BLOCKS = [None, 4 * 1, 4 * 37 * 97, 4 * 200 * 97]  # bytes: default, 1 row, 37 rows, all rows


@pytest.fixture(autouse=True, params=["convolution", "mm"])
def block_product(request, monkeypatch):
    """Every case with both block products: the CPU's 1x1 convolution (where oneDNN is
    there) and torch.mm into reused buffers (CUDA's, and the CPU's without oneDNN)."""
    if request.param == "mm":
        monkeypatch.setattr(eloftr_ops, "conv_products", lambda device: False)
    elif not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the convolution product is not used")
    return request.param


@pytest.mark.parametrize("chunk_bytes", BLOCKS)
@pytest.mark.parametrize("threshold", [0.0, 0.05])
@pytest.mark.parametrize("skip_softmax", [False, True])
def test_same_pairs_and_scores_as_the_whole_matrix(chunk_bytes, threshold, skip_softmax):
    f0, f1 = features(150, 97, seed=1, scale=SCALE)
    temperature = 0.1
    if skip_softmax:
        threshold *= 100  # similarities, not probabilities
    expected = reference_mutual(f0, f1, temperature, skip_softmax, threshold)
    assert len(expected[0]) > 10
    assert_same(mutual_nearest(f0, f1, temperature, skip_softmax, threshold, chunk_bytes=chunk_bytes),
                expected)


@pytest.mark.parametrize("chunk_bytes", BLOCKS)
def test_border_masks_apply_after_the_arg_max(chunk_bytes):
    """A border cell can still be a cell's best match (and so block it): the reference
    masks after the arg-max, so does the blocked version."""
    f0, f1 = features(150, 97, seed=2, scale=SCALE)
    generator = torch.Generator().manual_seed(3)
    valid0 = torch.rand(150, generator=generator) > 0.3
    valid1 = torch.rand(97, generator=generator) > 0.3
    expected = reference_mutual(f0, f1, 0.1, False, 0.0, valid0, valid1)
    assert len(expected[0]) > 5
    assert_same(mutual_nearest(f0, f1, 0.1, False, 0.0, valid0, valid1, chunk_bytes), expected)


@pytest.mark.parametrize("chunk_bytes", BLOCKS)
def test_ties_go_to_the_lowest_index(chunk_bytes):
    """Duplicated rows and columns make exact ties: both versions pick the first cell,
    across blocks too; all-equal features give the single pair (0, 0)."""
    f0, f1 = features(150, 97, seed=4, scale=SCALE)
    f0[100:140] = f0[0:40]  # rows 100.. duplicate rows 0.. (other blocks for small chunks)
    f1[60:90] = f1[0:30]
    expected = reference_mutual(f0, f1, 0.1)
    assert len(expected[0]) > 5
    assert_same(mutual_nearest(f0, f1, 0.1, chunk_bytes=chunk_bytes), expected)
    flat0, flat1 = torch.ones(150, 8), torch.ones(97, 8)
    expected = reference_mutual(flat0, flat1, 0.1)
    assert expected[0].tolist() == [0] and expected[1].tolist() == [0]
    assert_same(mutual_nearest(flat0, flat1, 0.1, chunk_bytes=chunk_bytes), expected)


@pytest.mark.parametrize("chunk_bytes", BLOCKS)
def test_underflowing_confidences_at_threshold_zero(chunk_bytes):
    """Sharp features: most confidences are exactly 0 in float32; at threshold 0 a pair
    needs a confidence > 0, in both versions."""
    f0, f1 = features(150, 97, seed=5, scale=10.0)
    expected = reference_mutual(f0, f1, 0.1, False, 0.0)
    similarity = f0 @ f1.T / 0.1
    confidence = F.softmax(similarity, 0) * F.softmax(similarity, 1)
    assert (confidence == 0).float().mean() > 0.5 and len(expected[0]) > 5
    # Similarities of ~1000 here: the confidences agree to a few roundings of 2 S.
    tolerance = 8 * torch.finfo(torch.float32).eps * float(2 * similarity.abs().max())
    assert_same(mutual_nearest(f0, f1, 0.1, False, 0.0, chunk_bytes=chunk_bytes), expected, tolerance)


@pytest.mark.parametrize("chunk_bytes", BLOCKS)
def test_columns_far_below_the_blocks_best_row(chunk_bytes, monkeypatch):
    """Column log-sum-exps come from the row-shifted exponentials with one shared shift
    (the block's best row maximum); columns whose share underflows against it are
    recomputed with their own maxima, the few gathered, the whole block when most are."""
    f0, f1 = features(150, 97, seed=7, scale=SCALE)
    common = f0.mean(0)
    f0 = f0 + 1.5 * common / common.norm()  # every row leans one way ...
    f1[20:23] = -2.0 * 1.5 * common / common.norm() * torch.tensor([1.0, 1.2, 1.4])[:, None]
    similarity = f0 @ f1.T / 0.1  # ... three columns the other: all their similarities < -17
    assert (similarity.amax(1).max() - similarity.amax(0) > eloftr_ops._FAR_BELOW).sum() == 3
    recomputed = []
    column_lse = eloftr_ops._column_lse
    monkeypatch.setattr(eloftr_ops, "_column_lse",
                        lambda block, scratch: recomputed.append(block.shape[1]) or column_lse(block, scratch))
    expected = reference_mutual(f0, f1, 0.1)
    assert len(expected[0]) > 5
    assert_same(mutual_nearest(f0, f1, 0.1, chunk_bytes=chunk_bytes), expected)
    if chunk_bytes is None or chunk_bytes >= 4 * 150 * 97:
        assert recomputed == [3]  # one block: its three far columns, gathered
    # Similarities over far more than float32's exponent range: every column recomputed.
    sharp0, sharp1 = features(150, 97, seed=8, scale=30.0)
    recomputed.clear()
    assert_same(mutual_nearest(sharp0, sharp1, 0.1, chunk_bytes=chunk_bytes), reference_mutual(sharp0, sharp1, 0.1),
                tolerance=8 * torch.finfo(torch.float32).eps * float(2 * (sharp0 @ sharp1.T / 0.1).abs().max()))
    assert recomputed and set(recomputed) == {97}


def test_no_candidates_gives_empty_tensors():
    f0, f1 = features(20, 30, seed=6)
    i_ids, j_ids, scores = mutual_nearest(f0, f1, 0.1, threshold=1.0)
    assert i_ids.shape == j_ids.shape == scores.shape == (0,)
    assert i_ids.dtype == j_ids.dtype == torch.long


def test_block_rows_follow_the_byte_budget():
    assert chunk_rows(4800, 4800, "cpu", 4800 * 4 * 100) == 100
    assert chunk_rows(4800, 4800, "cpu", 1) == 1
    assert chunk_rows(100, 100, "cpu", 10 ** 9) == 100
    # The CPU default takes a 320x240 frame's whole matrix, blocks 640x480's and larger
    # (in blocks of a few hundred rows: two of them fit a last-level cache).
    assert whole_matrix_fits(1200, 1200, "cpu") and not whole_matrix_fits(4800, 4800, "cpu")
    assert not whole_matrix_fits(4800, 4800, "cpu", 4800 * 4 * 100)
    assert whole_matrix_fits(4800, 4800, "cpu", 4800 * 4 * 4800)
    assert 64 <= chunk_rows(32400, 32400, "cpu") < 32400 // 64


# -- through the matcher, on hand-made features with many true matches ----------------------

@pytest.fixture(scope="module")
def oracle_pair():
    return moved_pair(synthetic_frame(480, 640, seed=3), MOTIONS["rotation_8deg"][0])


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 40 * 35, 4 * 1000])
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_matcher_results_equal_the_whole_matrix_path(tiny_eloftr_dir, oracle_pair, chunk_bytes, threshold):
    options = {"device": "cpu", "match_threshold": threshold, "resize": "native"}
    blocked = HandMadeFeatureMatcher(str(tiny_eloftr_dir), coarse_chunk_bytes=chunk_bytes, **options)
    whole = HandMadeFeatureMatcher(str(tiny_eloftr_dir), coarse_chunk_bytes=0, **options)
    got, expected = blocked.match_pair(*oracle_pair), whole.match_pair(*oracle_pair)
    assert len(expected["scores"]) >= 100
    assert len(got["scores"]) == len(expected["scores"])
    # Sorted by score: the same pairs in the same order unless two scores are within rounding.
    order_got = np.lexsort(got["keypoints0"].T)
    order_expected = np.lexsort(expected["keypoints0"].T)
    for key in ("keypoints0", "keypoints1"):
        assert np.array_equal(got[key][order_got], expected[key][order_expected]), key
    np.testing.assert_allclose(got["scores"][order_got], expected["scores"][order_expected],
                               rtol=REL_TOLERANCE)
