"""SuperGlue sparse matcher (kp_ros/core/superglue.py): parity with transformers' reference
pipeline on random-init weights, where the reference's padding changes its results, the
Sinkhorn setting, the stream rules, process_bag --matcher superglue and superglue_node."""
import numpy as np
import pytest
import torch

from kp_ros.core.superglue import SuperGlueStreamMatcher

SIZE = (480, 640)  # the reference processor's size: source == model pixels, no rescaling
KEYPOINTS = 300    # per image, so the reference pads nothing (see test_reference_padding...)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_superglue_dir(tmp_path_factory):
    from kp_ros.core.random_init import save_random_superglue
    return save_random_superglue(tmp_path_factory.mktemp("superglue_tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def pair():
    """Two 480x640 views of one texture, the second moved by (8, 4) px."""
    import cv2
    rng = np.random.default_rng(0)
    base = cv2.resize((rng.random((60, 80)) * 255).astype(np.uint8), (680, 520),
                      interpolation=cv2.INTER_CUBIC)
    return [np.repeat(base[y:y + 480, x:x + 640, None], 3, 2) for x, y in ((10, 10), (18, 14))]


def reference_model(model_dir, iterations=None):
    from transformers import SuperGlueForKeypointMatching
    model = SuperGlueForKeypointMatching.from_pretrained(model_dir).eval()
    model.keypoint_detector.keypoint_decoder.max_keypoints = KEYPOINTS
    if iterations is not None:
        model.config.sinkhorn_iterations = iterations
    return model


@pytest.fixture(scope="module")
def reference(tiny_superglue_dir, pair):
    """transformers: processor -> SuperGlueForKeypointMatching -> post_process (threshold 0),
    and the keypoints, scores and descriptors its inner SuperPoint found (what kp_ros is fed)."""
    return reference_run(tiny_superglue_dir, pair)


def reference_run(model_dir, images, iterations=None):
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = reference_model(model_dir, iterations)
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


def test_matches_equal_the_reference_pipeline(tiny_superglue_dir, reference):
    pairs, frames = reference
    assert [len(f["keypoints"]) for f in frames] == [KEYPOINTS, KEYPOINTS]  # no padding
    matcher = SuperGlueStreamMatcher(str(tiny_superglue_dir), device="cpu", filter_threshold=0.0)
    found = matcher.match_pair(frames[0], frames[1], SIZE)
    mine = as_pairs(found)
    assert len(pairs) > 20, "random weights with threshold 0 still give matches"
    assert set(mine) == set(pairs)
    assert max(abs(mine[k] - pairs[k]) for k in mine) <= 1e-5
    np.testing.assert_array_equal(found["keypoints0"], frames[0]["keypoints"][found["index0"]])
    np.testing.assert_array_equal(found["keypoints1"], frames[1]["keypoints"][found["index1"]])
    assert found["index0"].dtype == np.int32 and np.all(np.diff(found["scores"]) <= 0)


def test_sinkhorn_iterations_as_the_reference_config(tiny_superglue_dir, pair):
    pairs, frames = reference_run(tiny_superglue_dir, pair, iterations=5)
    matcher = SuperGlueStreamMatcher(str(tiny_superglue_dir), device="cpu", filter_threshold=0.0,
                                     sinkhorn_iterations=5)
    mine = as_pairs(matcher.match_pair(frames[0], frames[1], SIZE))
    assert set(mine) == set(pairs) and max(abs(mine[k] - pairs[k]) for k in mine) <= 1e-5
    matcher.set_params(sinkhorn_iterations=100)
    assert as_pairs(matcher.match_pair(frames[0], frames[1], SIZE)) != mine


def reference_padded(model, frame0, frame1, length):
    """The reference's matching step (``_match_image_pair``) on one pair padded to
    ``length`` keypoints with its mask, as its forward pads a pair of unequal counts."""
    def padded(name):
        rows = []
        for frame in (frame0, frame1):
            values = torch.from_numpy(np.asarray(frame[name]))
            rows.append(torch.cat([values, values.new_zeros((length - len(values),) + values.shape[1:])]))
        return torch.stack(rows)[None]
    mask = torch.zeros(1, 2, length, dtype=torch.int)
    mask[0, 0, :len(frame0["keypoints"])] = mask[0, 1, :len(frame1["keypoints"])] = 1
    with torch.inference_mode():
        matches, scores, _, _ = model._match_image_pair(
            padded("keypoints"), padded("descriptors"), padded("scores"), *SIZE, mask=mask)
    n0, n1 = len(frame0["keypoints"]), len(frame1["keypoints"])
    matches0, scores0 = matches[0, 0, :n0], scores[0, 0, :n0]
    rows = torch.nonzero((matches0 > -1) & (matches0 < n1) & (scores0 > 0))[:, 0]
    return {(int(i), int(matches0[i])): float(scores0[i]) for i in rows}


def test_reference_padding_changes_its_matches_kp_ros_pads_nothing(tiny_superglue_dir, reference):
    """Keypoint counts 300 and 280: the reference pads the pair; its optimal transport
    counts the padding, so the same pair padded to 300 or to 340 gives different scores
    and matches. kp_ros runs each image at its own count (docs/lightglue.md)."""
    _, frames = reference
    model = reference_model(tiny_superglue_dir)
    shorter = {name: values[:280] for name, values in frames[1].items()}
    as_300 = reference_padded(model, frames[0], shorter, 300)
    as_340 = reference_padded(model, frames[0], shorter, 340)
    assert as_300 != as_340
    common = set(as_300) & set(as_340)
    assert max(abs(as_300[k] - as_340[k]) for k in common) > 1e-3
    # with nothing to pad, the reference's step is kp_ros's
    unpadded = reference_padded(model, frames[0], frames[1], KEYPOINTS)
    matcher = SuperGlueStreamMatcher(str(tiny_superglue_dir), device="cpu", filter_threshold=0.0)
    found = matcher.match_pair(frames[0], frames[1], SIZE)
    mine = {(int(i), int(j)): s for i, j, s in zip(found["index0"], found["index1"], found["scores"])}
    assert set(mine) == set(unpadded) and max(abs(mine[k] - unpadded[k]) for k in mine) <= 1e-5
    found = matcher.match_pair(frames[0], shorter, SIZE)
    assert len(found["index0"]) > 20 and found["index1"].max() < 280


def test_stream_rules_and_settings(tiny_superglue_dir, reference):
    _, frames = reference
    matcher = SuperGlueStreamMatcher(str(tiny_superglue_dir), device="cpu", filter_threshold=0.0,
                                     max_matches=3)

    def push(f, size=SIZE):
        return matcher.push(f["keypoints"], f["scores"], f["descriptors"], size)

    assert push(frames[0]) is None
    found = push(frames[1])
    assert 0 < len(found["scores"]) <= 3 and len(found["inliers"]) == 0
    assert push(frames[0], (240, 320)) is None  # size change restarts the stream
    empty = {"keypoints": np.zeros((0, 2)), "scores": np.zeros(0), "descriptors": np.zeros(0)}
    assert len(push(empty, (240, 320))["index0"]) == 0
    matcher.reset()
    with pytest.raises(ValueError, match="scores must be"):
        push({**frames[1], "scores": frames[1]["scores"][:5]})
    with pytest.raises(ValueError, match="unknown SuperGlue"):
        matcher.set_params(depth_confidence=0.5)  # LightGlue's, not SuperGlue's
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        matcher.set_params(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="geometric_verification"):
        matcher.set_params(geometric_verification="affine")
    matcher.set_params(geometric_verification="fundamental", max_matches=-1)
    push(frames[0])
    found = push(frames[1])
    assert len(found["inliers"]) == len(found["scores"]) > 20


def test_registry_entry_and_node():
    from kp_ros.core import models
    from kp_ros.nodes.superglue_node import SuperGlueNode
    entry = models.model("superglue")
    assert entry.consumes == "keypoints" and entry.model_class is SuperGlueStreamMatcher
    assert SuperGlueNode.NODE_NAME == "superglue_node"
    assert set(entry.runtime_keywords) == {"filter_threshold", "sinkhorn_iterations", "max_matches",
                                           "geometric_verification", "ransac_reproj_threshold"}


def test_process_bag_matcher_superglue(tmp_path, tiny_superpoint_dir, tiny_superglue_dir):
    """Sparse matches of the detector's own keypoints, written with their indices."""
    from test_process_bag import frames, image_bag, read_outputs
    from kp_ros.offline import process_bag_cli as pb
    image_bag(tmp_path / "in", frames(3))
    argv = ["--params-file", "none", "--device", "cpu", "--superpoint-model", str(tiny_superpoint_dir),
            "--resize", "native", "--max-keypoints", "64", "--matcher", "superglue",
            "--superglue-model", str(tiny_superglue_dir), "--filter-threshold", "0.0",
            "--sinkhorn-iterations", "20", "--threads", "1", "--no-progress",
            str(tmp_path / "in"), str(tmp_path / "out")]
    assert pb.main(argv) == 0
    out = read_outputs(tmp_path / "out")
    keypoints = [m for _, m, _ in out["/cam/keypoints"]]
    matches = [m for _, m, _ in out["/cam/matches"]]
    assert len(keypoints) == 3 and len(matches) == 2
    for older, newer, m in zip(keypoints, keypoints[1:], matches):
        assert len(m.index0) == len(m.x0) > 0 and m.matcher == str(tiny_superglue_dir)
        np.testing.assert_array_equal(m.x0, np.asarray(older.x)[m.index0])
        np.testing.assert_array_equal(m.y1, np.asarray(newer.y)[m.index1])
    assert pb.main(["--matcher", "superglue", "--no-detector", str(tmp_path / "in"),
                    str(tmp_path / "out2")]) != 0


def test_superglue_node_matches_keypoints(tiny_superglue_dir, tmp_path):
    """superglue_node as a process (lightglue_node's shell): a frame matched with itself,
    then with a shuffled copy of itself, gives the same matches through the permutation
    (SuperGlue is permutation-equivariant; random weights match few keypoints to
    themselves), with indices consistent with the positions; its own runtime setting is
    checked."""
    from kp_ros.ros.conversions import matches_from_msg
    from test_lightglue_node import keypoints_msg, lightglue_node, scene, send
    log = tmp_path / "node.log"
    with lightglue_node(tiny_superglue_dir, log, "/sg_test", "superglue_node") as (harness, process):
        xy, scores, descriptors = scene()
        order = np.random.default_rng(1).permutation(len(xy))
        send(harness, keypoints_msg(100.0, xy, scores, descriptors), expect_matches=False)
        same = matches_from_msg(send(harness, keypoints_msg(100.1, xy, scores, descriptors),
                                     expect_matches=True))
        shuffled = matches_from_msg(send(harness, keypoints_msg(
            100.2, xy[order], scores[order], descriptors[order]), expect_matches=True))
        np.testing.assert_array_equal(shuffled["keypoints0"], xy[shuffled["index0"]])
        np.testing.assert_array_equal(shuffled["keypoints1"], xy[order][shuffled["index1"]])
        assert len(same["index0"]) >= 10
        assert dict(zip(zip(same["index0"].tolist(), same["index1"].tolist()), same["scores"])) \
            == pytest.approx(dict(zip(zip(shuffled["index0"].tolist(), order[shuffled["index1"]].tolist()),
                                      shuffled["scores"])), abs=1e-3)  # summation order
        assert harness.set_params(harness.fqn, {"sinkhorn_iterations": 10})[0].successful
        result = harness.set_params(harness.fqn, {"sinkhorn_iterations": 0})[0]
        assert not result.successful
    assert "SuperGlue" in log.read_text() and "Traceback" not in log.read_text()
