"""kp_ros.core.tracks: association, the track book, the stamp pairing, and track quality
on sequences with known motion.

Known motion without trained weights: a real TUM frame moved by a known step per frame
(12 frames, 224x320 centre crops); keypoints from random-init SuperPoint, which is
shift-equivariant on its 8 px grid (cell-aligned shifts move the keypoints exactly,
up to the ties of its local maxima), matches from kp_ros's EfficientLoFTR with the
hand-made features of test_eloftr_correctness.py (true correspondences). Definitions:
  - a link (i in t-1, j in t) is correct when j is the keypoint of t nearest to the true
    position of i, within 3 px (the keypoints' own jitter, below the NMS radius 4);
  - an id swap is a link to a keypoint more than 4 px (the NMS radius: another point)
    from where the linked point truly moved;
  - the matches are verified with a homography (the exact model of these warps), and
    only inliers link (the default ``inliers_only``);
  - a ground-truth track is a keypoint of frame 0 whose true positions have a keypoint
    within 1.5 px in each of frames 1..10; it is kept when one id follows it throughout.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kp_ros.core.track_sync import TrackSynchronizer
from kp_ros.core.tracks import FrameTracks, MatchSet, TrackBook, TrackParams, associate, nearest_within

HEIGHT, WIDTH = 224, 320
FRAMES = 12


# --- pure functions ----------------------------------------------------------------

@pytest.mark.parametrize("radius", [0.5, 2.0, 3.0, 7.5])
def test_nearest_within_equals_brute_force(radius):
    rng = np.random.default_rng(1)
    points = (rng.random((700, 2)) * [640, 480]).astype(np.float32)
    points[::50] = points[1::50] + 0.3  # near-duplicates: several points per grid cell
    queries = (rng.random((1500, 2)) * [680, 520] - 20).astype(np.float32)
    queries[:300] = points[:300] + rng.normal(0, radius / 2, (300, 2))
    queries[7] = np.nan
    distance = np.linalg.norm(queries[:, None] - points[None], axis=2)
    expected = np.nan_to_num(distance, nan=np.inf).argmin(1)
    expected[~(distance.min(1) <= radius)] = -1
    got = nearest_within(queries, points, radius)
    assert (got == expected).all()
    assert (expected >= 0).sum() > 200  # the test exercises hits, not just misses


def test_nearest_within_degenerate_inputs():
    assert nearest_within(np.zeros((0, 2)), np.ones((3, 2)), 2.0).shape == (0,)
    assert (nearest_within(np.ones((3, 2)), np.zeros((0, 2)), 2.0) == -1).all()
    assert (nearest_within(np.ones((3, 2)), np.full((2, 2), np.nan), 2.0) == -1).all()


@pytest.mark.parametrize("mode", ["points", "flow"])
def test_associate_links_through_matches(mode):
    keypoints0 = np.array([[10, 10], [50, 50], [90, 20]], np.float32)
    keypoints1 = keypoints0 + [5, 0]
    points0 = keypoints0 + 0.7
    points1 = points0 + [5, 0]
    idx0, idx1 = associate(keypoints0, keypoints1, points0, points1, [0.9, 0.8, 0.7], 2.0, mode=mode)
    assert sorted(zip(idx0.tolist(), idx1.tolist())) == [(0, 0), (1, 1), (2, 2)]


def test_associate_is_one_to_one_higher_score_wins():
    keypoints0 = np.array([[10, 10], [20, 10]], np.float32)
    keypoints1 = np.array([[10, 10], [20, 10]], np.float32)
    # Both matches start near keypoint 0 of frame 0 and end on different keypoints of
    # frame 1; the second also starts near nothing else: only the better one may link.
    points0 = np.array([[10.5, 10], [9.5, 10], [20, 10]], np.float32)
    points1 = np.array([[20, 10], [10, 10], [10.2, 10]], np.float32)
    idx0, idx1 = associate(keypoints0, keypoints1, points0, points1, [0.5, 0.9, 0.7], 2.0, mode="points")
    links = dict(zip(idx0.tolist(), idx1.tolist()))
    # 0.9: 0->0; 0.7: 1->0 blocked (0 taken in frame 1); 0.5: 0->1 blocked (0 taken in frame 0).
    assert links == {0: 0}


def test_associate_matches_greedy_reference():
    rng = np.random.default_rng(5)
    keypoints0 = (rng.random((60, 2)) * 40).astype(np.float32)
    keypoints1 = (rng.random((60, 2)) * 40).astype(np.float32)
    points0 = (rng.random((400, 2)) * 40).astype(np.float32)
    points1 = (rng.random((400, 2)) * 40).astype(np.float32)
    scores = rng.random(400).astype(np.float32)
    idx0, idx1 = associate(keypoints0, keypoints1, points0, points1, scores, 3.0, mode="points")
    # Reference: plain greedy over candidates by descending score.
    c0 = nearest_within(points0, keypoints0, 3.0)
    c1 = nearest_within(points1, keypoints1, 3.0)
    used0, used1, expected = set(), set(), set()
    for k in np.argsort(-scores, kind="stable"):
        if c0[k] >= 0 and c1[k] >= 0 and c0[k] not in used0 and c1[k] not in used1:
            used0.add(c0[k]), used1.add(c1[k]), expected.add((c0[k], c1[k]))
    assert set(zip(idx0.tolist(), idx1.tolist())) == expected
    assert len(set(idx0.tolist())) == len(idx0) and len(set(idx1.tolist())) == len(idx1)


def test_associate_respects_radius_inliers_and_score():
    keypoints = np.array([[10, 10], [40, 40]], np.float32)
    points = keypoints + [2.5, 0]
    assert len(associate(keypoints, keypoints, points, points, [1, 1], 2.0)[0]) == 0
    assert len(associate(keypoints, keypoints, points, points, [1, 1], 3.0)[0]) == 2
    idx0, _ = associate(keypoints, keypoints, points, points, [1, 1], 3.0, inliers=[0, 1])
    assert idx0.tolist() == [1]
    idx0, _ = associate(keypoints, keypoints, points, points, [0.1, 0.9], 3.0, min_score=0.5)
    assert idx0.tolist() == [1]
    with pytest.raises(ValueError, match="inliers"):
        associate(keypoints, keypoints, points, points, [1, 1], 3.0, inliers=[1])
    with pytest.raises(ValueError, match="points1"):
        associate(keypoints, keypoints, points, points[:1], [1, 1], 3.0)


@pytest.mark.parametrize("bad", [dict(association_radius=0), dict(association_radius=float("nan")),
                                 dict(association_radius=True), dict(association="nearest"),
                                 dict(inliers_only="yes"), dict(min_match_score=1.5)])
def test_params_are_validated(bad):
    with pytest.raises(ValueError):
        TrackParams(**bad).validated()


# --- the book ----------------------------------------------------------------------

def _matches(stamp, stamp0, points0, points1, inliers=None):
    points0 = np.asarray(points0, np.float32)
    return MatchSet(stamp, stamp0, points0, np.asarray(points1, np.float32),
                    np.ones(len(points0), np.float32), inliers)


def test_book_ids_lengths_previous_index():
    book = TrackBook()
    k0 = np.array([[10, 10], [50, 50], [90, 20]], np.float32)
    first = book.add(100, k0)
    assert first.ids.tolist() == [0, 1, 2] and first.lengths.tolist() == [1, 1, 1]
    assert first.previous_index.tolist() == [-1, -1, -1] and first.why_new
    k1 = np.array([[52, 50], [300, 300], [12, 10]], np.float32)  # reordered, one new
    second = book.add(200, k1, _matches(200, 100, k0[:2], k0[:2] + [2, 0]))
    assert second.ids.tolist() == [1, 3, 0]
    assert second.lengths.tolist() == [2, 1, 2]
    assert second.previous_index.tolist() == [1, -1, 0]
    assert second.linked_from_ns == 100 and second.why_new is None
    assert second.ids.dtype == np.uint64 and second.lengths.dtype == np.uint32
    assert second.previous_index.dtype == np.int32


def test_book_inliers_only():
    k0 = np.array([[10, 10], [50, 50]], np.float32)
    for inliers_only, expected in ((True, [-1, 1]), (False, [0, 1])):
        book = TrackBook(TrackParams(inliers_only=inliers_only))
        book.add(1, k0)
        out = book.add(2, k0, _matches(2, 1, k0, k0, inliers=np.array([0, 1], np.uint8)))
        assert out.previous_index.tolist() == expected


def test_book_ids_never_reused_across_resets():
    book = TrackBook()
    seen = set()
    k = np.array([[10, 10], [20, 20]], np.float32)
    for stamp in (5, 6, 1, 2, 2):  # backwards and repeated stamps restart the tracks
        out = book.add(stamp, k)
        assert not seen & set(out.ids.tolist())
        seen |= set(out.ids.tolist())
    restarted = book.add(1, k, _matches(1, 2, k, k))
    assert (restarted.previous_index == -1).all() and "backwards" in restarted.why_new


def test_book_unknown_older_frame_starts_new_tracks():
    book = TrackBook()
    k = np.array([[10, 10]], np.float32)
    book.add(1, k)
    out = book.add(3, k, _matches(3, 2, k, k))
    assert out.previous_index.tolist() == [-1] and "older frame" in out.why_new
    with pytest.raises(ValueError):
        book.add(4, k, _matches(5, 3, k, k))


def test_book_empty_frames():
    book = TrackBook()
    empty = np.zeros((0, 2), np.float32)
    assert len(book.add(1, empty).ids) == 0
    out = book.add(2, empty, _matches(2, 1, empty, empty))
    assert len(out.ids) == 0 and out.linked_from_ns == 1


# --- the synchronizer --------------------------------------------------------------

K = np.array([[10, 10], [40, 40]], np.float32)


def _sync(timeout=1.0, max_pending=32):
    return TrackSynchronizer(TrackBook(), timeout=timeout, max_pending=max_pending)


def _stamps(out: list[FrameTracks]) -> list[int]:
    return [f.stamp_ns for f in out]


def test_sync_pairs_in_either_order():
    sync = _sync()
    assert _stamps(sync.add_keypoints(1, K, now=0.0)) == []  # waits for its matches
    assert _stamps(sync.add_matches(_matches(2, 1, K, K), now=0.1)) == [1]  # matcher moved past 1
    out = sync.add_keypoints(2, K, now=0.2)  # matches first, keypoints second
    assert _stamps(out) == [2] and out[0].previous_index.tolist() == [0, 1]
    assert _stamps(sync.add_keypoints(3, K, now=0.3)) == []
    out = sync.add_matches(_matches(3, 2, K, K), now=0.4)  # keypoints first, matches second
    assert _stamps(out) == [3] and out[0].lengths.tolist() == [3, 3]


def test_sync_timeout_and_order():
    sync = _sync(timeout=0.5)
    sync.add_keypoints(1, K, now=0.0)
    sync.add_keypoints(2, K, now=0.1)
    assert _stamps(sync.poll(0.4)) == []
    out = sync.poll(0.55)
    assert _stamps(out) == [1] and "no matches" in out[0].why_new  # 2 still within its timeout
    assert _stamps(sync.poll(0.7)) == [2]
    assert sync.counters["timed out"] == 2


def test_sync_stream_reset_frame_gets_new_tracks_without_waiting():
    # eloftr_node publishes no Matches for a frame that restarts its stream; the next
    # Matches (newer frame) shows it moved past: that frame goes out at once, all new.
    sync = _sync(timeout=100.0)
    sync.add_keypoints(1, K, now=0)
    sync.add_matches(_matches(1, 0, K, K), now=0)
    sync.add_keypoints(2, K, now=0)  # a reset frame: no matches will come
    sync.add_keypoints(3, K, now=0)
    out = sync.add_matches(_matches(3, 2, K, K), now=0)
    assert _stamps(out) == [2, 3]
    assert (out[0].previous_index == -1).all() and "skipped" in out[0].why_new
    assert out[1].previous_index.tolist() == [0, 1]


def test_sync_frames_the_matcher_skipped_go_out_without_waiting():
    # A slow matcher drops frames: it matches 1 with 4; 2 and 3 never get Matches.
    sync = _sync(timeout=100.0)
    out = []
    for stamp in (1, 2, 3, 4):
        out += sync.add_keypoints(stamp, K, now=0)
    assert out == []
    out = sync.add_matches(_matches(4, 1, K, K), now=0)
    assert _stamps(out) == [1, 2, 3, 4]
    assert all((f.previous_index == -1).all() for f in out[:3])
    assert out[3].linked_from_ns == 1 and out[3].ids.tolist() == out[0].ids.tolist()


def test_sync_buffers_are_bounded():
    sync = _sync(timeout=100.0, max_pending=4)
    out = []
    for stamp in range(10):
        out += sync.add_keypoints(stamp, K, now=0)
    assert _stamps(out) == list(range(6)) and sync.pending == 4
    assert sync.counters["forced out"] == 6
    for stamp in range(100, 110):  # matches whose keypoints never come
        sync.add_matches(_matches(stamp, stamp - 1, K, K), now=0)
    assert len(sync._matches) <= 4


def test_sync_late_matches_and_stamp_restart():
    sync = _sync(timeout=0.1)
    sync.add_keypoints(5, K, now=0)
    assert _stamps(sync.poll(1.0)) == [5]
    assert sync.add_matches(_matches(5, 4, K, K), now=1.0) == []
    assert sync.counters["late matches"] == 1
    out = sync.add_keypoints(2, K, now=1.0)  # a bag loop: older stamp than what went out
    assert sync.counters["stream restarts"] == 1
    out += sync.add_matches(_matches(3, 2, K, K), now=1.0)
    assert _stamps(out) == [2]
    later = sync.add_keypoints(3, K, now=1.0)
    assert later[0].previous_index.tolist() == [0, 1]


# --- known motion ------------------------------------------------------------------

def affine(dx=0.0, dy=0.0, degrees=0.0, scale=1.0) -> np.ndarray:
    a = cv2.getRotationMatrix2D(((WIDTH - 1) / 2, (HEIGHT - 1) / 2), degrees, scale)
    a[:, 2] += [dx, dy]
    return np.vstack([a, [0, 0, 1]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:2, :2].T + m[:2, 2]


def moving_sequence(image: np.ndarray, step: np.ndarray, frames: int = FRAMES):
    """Centre crops of ``image`` moved by step^k (crop pixels), and those k motions."""
    top, left = (image.shape[0] - HEIGHT) // 2, (image.shape[1] - WIDTH) // 2
    to_image = np.array([[1.0, 0, left], [0, 1.0, top], [0, 0, 1.0]])
    motion, out, motions = np.eye(3), [], []
    for _ in range(frames):
        full = to_image @ motion @ np.linalg.inv(to_image)
        moved = cv2.warpAffine(image, full[:2], (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR)
        out.append(np.ascontiguousarray(moved[top:top + HEIGHT, left:left + WIDTH]))
        motions.append(motion.copy())
        motion = step @ motion
    return out, motions


def detect_and_match(frames, detector, matcher):
    """Per frame: keypoints (N, 2) and the MatchSet with the previous frame (None first).

    The matcher verifies with a homography: the frames are 2-D warps of one image, so that
    is their exact model (an epipolar check keeps wrong matches that slide along the
    motion, which for a pure translation is every epipolar line)."""
    matcher.set_params(geometric_verification="homography", ransac_reproj_threshold=1.0)
    matcher.reset()
    keypoints, matches = [], []
    for k, frame in enumerate(frames):
        keypoints.append(detector.detect(frame)["keypoints"])
        result = matcher.push(frame)
        matches.append(None if result is None else MatchSet(
            k, k - 1, result["keypoints0"], result["keypoints1"],
            result["scores"], result["inliers"] if len(result["inliers"]) else None))
    return keypoints, matches


def track_quality(keypoints, matches, step, motions, params: TrackParams) -> dict:
    book = TrackBook(params)
    out = [book.add(k, kp, m) for k, (kp, m) in enumerate(zip(keypoints, matches))]
    links = correct = swaps = 0
    for k in range(1, len(out)):
        prev, cur = out[k - 1], out[k]
        j = np.flatnonzero(cur.previous_index >= 0)
        if not len(j):
            continue
        truth = apply(step, prev.keypoints[cur.previous_index[j]])
        distance = np.linalg.norm(cur.keypoints[None] - truth[:, None], axis=2)
        correct += int(((distance.argmin(1) == j) & (distance.min(1) <= 3.0)).sum())
        swaps += int((np.linalg.norm(cur.keypoints[j] - truth, axis=1) > 4.0).sum())
        links += len(j)
    first = out[0].keypoints
    alive, kept_id = np.ones(len(first), bool), out[0].ids.copy()
    for k in range(1, 11):
        distance = np.linalg.norm(out[k].keypoints[None] - apply(motions[k], first)[:, None], axis=2)
        alive &= distance.min(1) <= 1.5
        kept_id = np.where(out[k].ids[distance.argmin(1)] == kept_id, kept_id, np.uint64(2**63))
    kept = alive & (kept_id == out[0].ids)
    ids = np.concatenate([f.ids for f in out])
    return dict(links=links, correct=correct / max(links, 1), swaps=swaps,
                ground_truth_tracks=int(alive.sum()), kept=kept.sum() / max(alive.sum(), 1),
                unique_ids=len(np.unique(ids)), keypoints=len(ids), out=out)


SEQUENCES = {"shift_8_8": affine(8, 8), "shift_16_-8": affine(16, -8)}


@pytest.fixture(scope="module")
def known_motion(tum_frames, tiny_superpoint_dir, tiny_eloftr_dir):
    from kp_ros.core.superpoint import SuperPointDetector
    from test_eloftr_correctness import THRESHOLD, HandMadeFeatureMatcher
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native")
    matcher = HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", match_threshold=THRESHOLD,
                                     resize="native")
    data = {}
    for name, step in SEQUENCES.items():
        frames, motions = moving_sequence(tum_frames[0], step)
        data[name] = (*detect_and_match(frames, detector, matcher), step, motions)
    return data


@pytest.mark.parametrize("sequence", list(SEQUENCES))
@pytest.mark.parametrize("association", ["flow", "points"])
def test_known_motion_links_are_correct(known_motion, sequence, association):
    keypoints, matches, step, motions = known_motion[sequence]
    radius = 3.0 if association == "flow" else 2.0
    quality = track_quality(keypoints, matches, step, motions,
                            TrackParams(association=association, association_radius=radius))
    assert quality["links"] >= (200 if association == "flow" else 60) * (FRAMES - 1), quality
    assert quality["correct"] >= 0.99, quality
    assert quality["swaps"] == 0, quality
    assert quality["ground_truth_tracks"] >= 200
    assert quality["kept"] >= (0.2 if association == "flow" else 0.05), quality
    assert quality["unique_ids"] == quality["keypoints"] - sum(
        int((f.previous_index >= 0).sum()) for f in quality["out"])  # ids: one per new track


def test_known_motion_flow_keeps_more_tracks(known_motion):
    keypoints, matches, step, motions = known_motion["shift_8_8"]
    flow = track_quality(keypoints, matches, step, motions, TrackParams(association="flow"))
    points = track_quality(keypoints, matches, step, motions,
                           TrackParams(association="points", association_radius=2.0))
    assert flow["links"] > 2 * points["links"]
    assert flow["kept"] > 2 * points["kept"]


def test_known_motion_wrong_matches_are_not_linked_when_flagged(known_motion):
    # Flag every match as an outlier: inliers_only must then link nothing.
    keypoints, matches, step, motions = known_motion["shift_8_8"]
    flagged = [None if m is None else MatchSet(m.stamp_ns, m.stamp0_ns, m.points0, m.points1, m.scores,
                                               np.zeros(len(m.scores), np.uint8)) for m in matches]
    quality = track_quality(keypoints, flagged, step, motions, TrackParams())
    assert quality["links"] == 0


def test_sync_refuses_matches_of_another_image_size():
    """Matches found on 320x240 images do not link 640x480 Keypoints: new tracks, counted."""
    sync = _sync()
    sync.add_keypoints(1, K, now=0.0, size=(640, 480))
    sync.add_matches(_matches(2, 1, K, K), now=0.1, size=(320, 240))
    out = sync.add_keypoints(2, K, now=0.2, size=(640, 480))
    assert _stamps(out) == [2] and out[0].previous_index.tolist() == [-1, -1]
    assert "320x240" in out[0].why_new and "640x480" in out[0].why_new
    assert sync.counters["size mismatch"] == 1
    sync.add_matches(_matches(3, 2, K, K), now=0.3, size=(640, 480))  # same size: linked
    out = sync.add_keypoints(3, K, now=0.4, size=(640, 480))
    assert out[0].previous_index.tolist() == [0, 1] and sync.counters["size mismatch"] == 1
