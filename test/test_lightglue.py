"""LightGlue sparse matcher (kp_ros/core/lightglue.py): parity with transformers'
reference pipeline on random-init weights, the reference's broken settings, the stream
rules, index-linked tracks on a known motion, and process_bag --matcher lightglue."""
import cv2
import numpy as np
import pytest
import torch

from kp_ros.core.lightglue import LightGlueStreamMatcher
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.tracks import MatchSet, TrackBook, TrackParams

SIZE = (480, 640)  # the reference processor's size: source == model pixels, no rescaling


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lightglue_dir(tmp_path_factory):
    from kp_ros.core.random_init import save_random_lightglue
    return save_random_lightglue(tmp_path_factory.mktemp("lightglue_tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def pair():
    """Two 480x640 views of one texture, the second moved by (8, 4) px."""
    rng = np.random.default_rng(0)
    base = cv2.resize((rng.random((60, 80)) * 255).astype(np.uint8), (680, 520),
                      interpolation=cv2.INTER_CUBIC)
    return [np.repeat(base[y:y + 480, x:x + 640, None], 3, 2) for x, y in ((10, 10), (18, 14))]


def reference_run(model_dir, images, depth, width, max_keypoints=300):
    """transformers: processor -> LightGlueForKeypointMatching -> post_process, plus the
    keypoints/descriptors its inner SuperPoint found (what kp_ros is fed)."""
    from transformers import AutoImageProcessor, LightGlueForKeypointMatching
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = LightGlueForKeypointMatching.from_pretrained(model_dir).eval()
    model.filter_threshold, model.depth_confidence, model.width_confidence = 0.0, depth, width
    model.keypoint_detector.max_keypoints = max_keypoints
    inputs = processor([images], return_tensors="pt")
    with torch.inference_mode():
        output = model(**inputs)
        result = processor.post_process_keypoint_matching(output, [[SIZE, SIZE]], threshold=0.0)[0]
        detected = model.keypoint_detector(inputs["pixel_values"][0])
    frames = []
    for i in range(2):
        valid = detected.mask[i].bool()
        frames.append({"keypoints": (detected.keypoints[i][valid] * torch.tensor([640, 480])).numpy(),
                       "scores": detected.scores[i][valid].numpy(),
                       "descriptors": detected.descriptors[i][valid].numpy()})
    pairs = {(tuple(a), tuple(b)): s for a, b, s in zip(
        result["keypoints0"].tolist(), result["keypoints1"].tolist(),
        result["matching_scores"].tolist())}
    return pairs, frames


def as_pairs(found):
    return {(tuple(map(int, a)), tuple(map(int, b))): s for a, b, s in zip(
        found["keypoints0"].tolist(), found["keypoints1"].tolist(), found["scores"].tolist())}


@pytest.mark.parametrize("depth, width", [(0.95, 0.99), (1.0, 1.0), (0.5, 0.5)])
def test_matches_equal_the_reference_pipeline(tiny_lightglue_dir, pair, depth, width):
    reference, frames = reference_run(tiny_lightglue_dir, pair, depth, width)
    matcher = LightGlueStreamMatcher(str(tiny_lightglue_dir), device="cpu", filter_threshold=0.0,
                                     depth_confidence=depth, width_confidence=width)
    found = matcher.match_pair(frames[0], frames[1], SIZE)
    mine = as_pairs(found)
    assert reference, "random weights with filter_threshold 0 still give some matches"
    assert set(mine) == set(reference)
    assert max(abs(mine[k] - reference[k]) for k in mine) <= 1e-5
    # indices point at the very keypoints reported, sorted by descending score
    np.testing.assert_array_equal(found["keypoints0"], frames[0]["keypoints"][found["index0"]])
    np.testing.assert_array_equal(found["keypoints1"], frames[1]["keypoints"][found["index1"]])
    assert found["index0"].dtype == np.int32 and np.all(np.diff(found["scores"]) <= 0)


@pytest.mark.parametrize("depth, width", [(0.0, 0.99), (0.95, 0.0), (0.0, 0.0)])
def test_settings_where_the_reference_fails_work_here(tiny_lightglue_dir, pair, depth, width):
    """transformers 5.23 crashes with early stop or pruning off (docs/lightglue.md)."""
    with pytest.raises((UnboundLocalError, RuntimeError, IndexError)):
        reference_run(tiny_lightglue_dir, pair, depth, width)
    _, frames = reference_run(tiny_lightglue_dir, pair, 0.95, 0.99)
    matcher = LightGlueStreamMatcher(str(tiny_lightglue_dir), device="cpu", filter_threshold=0.0,
                                     depth_confidence=depth, width_confidence=width)
    found = matcher.match_pair(frames[0], frames[1], SIZE)
    assert len(found["index0"]) == len(set(found["index0"].tolist())) > 0  # one-to-one


def test_stream_rules_and_settings(tiny_lightglue_dir, pair):
    _, frames = reference_run(tiny_lightglue_dir, pair, 0.95, 0.99)
    matcher = LightGlueStreamMatcher(str(tiny_lightglue_dir), device="cpu", filter_threshold=0.0,
                                     max_matches=2)

    def push(f, size=SIZE):
        return matcher.push(f["keypoints"], f["scores"], f["descriptors"], size)

    assert push(frames[0]) is None  # first frame
    found = push(frames[1])
    assert 0 < len(found["scores"]) <= 2 and len(found["inliers"]) == 0
    assert push(frames[0], (240, 320)) is None  # size change restarts the stream
    empty = {"keypoints": np.zeros((0, 2)), "scores": np.zeros(0), "descriptors": np.zeros(0)}
    assert len(push(empty, (240, 320))["index0"]) == 0  # an empty frame is a valid frame
    matcher.reset()
    assert push(frames[0]) is None
    with pytest.raises(ValueError, match="descriptors must be"):
        push({**frames[1], "descriptors": frames[1]["descriptors"][:, :8]})
    with pytest.raises(ValueError, match="depth_confidence"):
        matcher.set_params(depth_confidence=1.5)
    with pytest.raises(ValueError, match="unknown"):
        matcher.set_params(match_threshold=0.1)
    matcher.set_params(geometric_verification="fundamental", max_matches=-1)
    push(frames[0])
    found = push(frames[1])
    assert len(found["inliers"]) == len(found["scores"])


class OracleSparseMatcher:
    """A sparse matcher with the LightGlue interface that matches hand-made descriptors
    exactly (mutual best dot product), for track tests needing many true matches."""
    sparse = True

    def __init__(self):
        self.previous = None

    def reset(self):
        self.previous = None

    def push(self, keypoints, scores, descriptors, image_size):
        previous, self.previous = self.previous, (keypoints, descriptors)
        if previous is None:
            return None
        similarity = previous[1] @ descriptors.T
        j = similarity.argmax(1)
        i = np.arange(len(j))
        keep = (similarity.argmax(0)[j] == i) & (similarity[i, j] > 0.99)
        i, j = i[keep].astype(np.int32), j[keep].astype(np.int32)
        return {"keypoints0": previous[0][i], "keypoints1": keypoints[j],
                "scores": similarity[i, j].astype(np.float32), "inliers": np.zeros(0, np.uint8),
                "index0": i, "index1": j}


def test_tracks_link_by_index_on_a_known_motion():
    """200 landmarks seen by a camera panning 30 px/frame (far more than any radius),
    keypoints shuffled each frame: tracks follow the landmarks exactly."""
    rng = np.random.default_rng(1)
    landmarks = rng.uniform(0, 2000, (200, 2)).astype(np.float32)
    codes = rng.normal(size=(200, 16)).astype(np.float32)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    pipeline = FeaturePipeline(matcher=OracleSparseMatcher())
    book = TrackBook(TrackParams(association_radius=1.0))
    first_id, previous = {}, None
    for frame in range(6):
        visible = np.flatnonzero(landmarks[:, 0] - 30 * frame >= 0)  # leaving on the left
        visible = rng.permutation(visible)
        points = landmarks[visible] - [30 * frame, 0]
        stamp = 1_000_000_000 + frame * 100_000_000
        step = pipeline.match_keypoints({"keypoints": points, "scores": np.ones(len(points)),
                                         "descriptors": codes[visible]}, (480, 2000), stamp,
                                        token=stamp)
        matches = None
        if step.matches is not None:
            found = step.matches
            matches = MatchSet(stamp, step.previous, found["keypoints0"], found["keypoints1"],
                               found["scores"], None, found["index0"], found["index1"])
        tracks = book.add(stamp, points, matches)
        for landmark, track_id, length in zip(visible, tracks.ids, tracks.lengths):
            if frame == 0:
                first_id[landmark] = track_id
            else:
                assert track_id == first_id[landmark] and length == frame + 1
        if previous is not None:
            linked = tracks.previous_index >= 0
            assert linked.all()
            np.testing.assert_array_equal(previous[tracks.previous_index], visible)
        previous = visible


def test_index_links_respect_scores_inliers_and_bounds():
    points = np.zeros((3, 2), np.float32)  # positions play no part
    book = TrackBook(TrackParams(min_match_score=0.5))
    book.add(1, points)
    matches = MatchSet(2, 1, points[:4], points[:4], np.array([0.9, 0.4, 0.9, 0.9], np.float32),
                       np.array([1, 1, 0, 1], np.uint8), np.array([0, 1, 2, 7], np.int32),
                       np.array([2, 1, 0, 1], np.int32))
    tracks = book.add(2, points, matches)
    np.testing.assert_array_equal(tracks.previous_index, [-1, -1, 0])


def test_matches_message_carries_the_indices():
    from kp_ros.bags import messages as bag_messages
    from kp_ros.core.messages import matches_from_msg
    store = bag_messages.kp_ros_typestore()
    header = bag_messages.header_msg(store, 5, "cam")
    kp = np.arange(6, dtype=np.float32).reshape(3, 2)
    msg = bag_messages.matches_msg(store, header, header.stamp, "cam", 4, 5, "lg", kp, kp,
                                   np.ones(3), None, [4, 5, 6], [1, 2, 3])
    data = store.serialize_cdr(msg, bag_messages.MATCHES_TYPE)
    back = matches_from_msg(store.deserialize_cdr(data, bag_messages.MATCHES_TYPE))
    np.testing.assert_array_equal(back["index0"], [4, 5, 6])
    np.testing.assert_array_equal(back["index1"], [1, 2, 3])
    dense = bag_messages.matches_msg(store, header, header.stamp, "cam", 4, 5, "lo", kp, kp, np.ones(3))
    assert len(matches_from_msg(dense)["index0"]) == 0


def test_process_bag_matcher_lightglue(tmp_path, tiny_superpoint_dir, tiny_lightglue_dir):
    """Sparse matches of the detector's own keypoints, written with their indices; tracks
    link by those indices."""
    from test_process_bag import frames, image_bag, read_outputs
    from kp_ros.offline import process_bag_cli as pb
    image_bag(tmp_path / "in", frames(3))
    params = tmp_path / "params.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n    device: cpu\n"
        f"superpoint_node:\n  ros__parameters:\n    model: {tiny_superpoint_dir}\n"
        "    resize: native\n    max_keypoints: 64\n"
        f"lightglue_node:\n  ros__parameters:\n    model: {tiny_lightglue_dir}\n"
        "    filter_threshold: 0.0\n")
    argv = ["--params-file", str(params), "--matcher", "lightglue", "--tracks", "--threads", "1",
            "--no-progress", str(tmp_path / "in"), str(tmp_path / "out")]
    assert pb.main(argv) == 0
    out = read_outputs(tmp_path / "out")
    keypoints = [m for _, m, _ in out["/cam/keypoints"]]
    matches = [m for _, m, _ in out["/cam/matches"]]
    tracks = [m for _, m, _ in out["/cam/tracks"]]
    assert len(keypoints) == 3 and len(matches) == 2 and len(tracks) == 3
    for k, (older, newer, m) in enumerate(zip(keypoints, keypoints[1:], matches)):
        assert len(m.index0) == len(m.x0) > 0
        np.testing.assert_array_equal(m.x0, np.asarray(older.x)[m.index0])
        np.testing.assert_array_equal(m.x1, np.asarray(newer.x)[m.index1])
        linked = np.asarray(tracks[k + 1].previous_index)
        assert set(zip(linked[linked >= 0].tolist(), np.flatnonzero(linked >= 0).tolist())) \
            == set(zip(np.asarray(m.index0).tolist(), np.asarray(m.index1).tolist()))
    assert pb.main(argv[:2] + ["--matcher", "lightglue", "--no-detector", str(tmp_path / "in"),
                               str(tmp_path / "out2")]) != 0


# kp_ros/msg/Matches as kp_ros first defined it, before index0 / index1.
OLD_MATCHES = """std_msgs/Header header
builtin_interfaces/Time stamp0
string frame_id0
uint32 height
uint32 width
string matcher
float32[] x0
float32[] y0
float32[] x1
float32[] y1
float32[] scores
uint8[] inliers
"""


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_bag_of_old_matches_decodes_and_links_by_radius(tmp_path, storage):
    """A bag recorded by a kp_ros from before index0 / index1 (it carries that Matches
    definition): bag_typestore decodes it, the indices read back empty, and tracks link
    those matches by position. This kp_ros's own definition cannot decode the old bytes:
    ``deserialize`` falls back to the old definition, and says what to do for bytes neither fits."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    from kp_ros.bags import messages as bag_messages
    from kp_ros.bags.reader import open_bag
    from kp_ros.bags.writer import AtomicBagWriter
    from kp_ros.core.messages import matches_from_msg
    old = get_typestore(Stores.ROS2_KILTED)
    old.register(get_types_from_msg(OLD_MATCHES, bag_messages.MATCHES_TYPE))
    k0 = np.array([[10, 10], [50, 50], [90, 20]], np.float32)
    k1 = k0[[2, 0, 1]] + np.float32([1.5, -1])
    header = bag_messages.header_msg(old, 2_000_000_000, "cam")
    msg = old.types[bag_messages.MATCHES_TYPE](
        header=header, stamp0=bag_messages.time_msg(old, 1_000_000_000), frame_id0="cam", height=120,
        width=160, matcher="old", x0=k0[:, 0].copy(), y0=k0[:, 1].copy(), x1=k1[[1, 2, 0], 0].copy(),
        y1=k1[[1, 2, 0], 1].copy(), scores=np.ones(3, np.float32), inliers=np.zeros(0, np.uint8))
    data = old.serialize_cdr(msg, bag_messages.MATCHES_TYPE)
    with AtomicBagWriter(tmp_path / "old", storage) as writer:
        connection = writer.add_connection("/cam/matches", bag_messages.MATCHES_TYPE, typestore=old)
        writer.write(connection, 2_000_000_000, data)
    reader = open_bag(tmp_path / "old")
    try:
        store = bag_messages.bag_typestore(reader)
        (connection, _, raw), = list(reader.messages())
    finally:
        reader.close()
    back = matches_from_msg(store.deserialize_cdr(raw, connection.msgtype))
    assert len(back["index0"]) == len(back["index1"]) == 0
    np.testing.assert_array_equal(back["keypoints0"], k0)
    new = bag_messages.kp_ros_typestore()
    with pytest.raises(Exception):
        new.deserialize_cdr(raw, bag_messages.MATCHES_TYPE)  # the new definition reads past the end
    fallback = matches_from_msg(bag_messages.deserialize(new, raw, bag_messages.MATCHES_TYPE))
    np.testing.assert_array_equal(fallback["keypoints1"], back["keypoints1"])
    with pytest.raises(ValueError, match="bag_typestore"):
        bag_messages.deserialize(new, bytes(raw[:40]), bag_messages.MATCHES_TYPE)
    # as track_node builds it from a message without indices: linked by radius
    book = TrackBook(TrackParams())
    book.add(1_000_000_000, k0)
    matches = MatchSet(2_000_000_000, 1_000_000_000, back["keypoints0"], back["keypoints1"],
                       back["scores"])
    tracks = book.add(2_000_000_000, k1, matches)
    np.testing.assert_array_equal(tracks.previous_index, [2, 0, 1])
