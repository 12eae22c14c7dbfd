"""numpy <-> message round trips (Keypoints, Matches, sensor_msgs/Image), incl. row padding."""
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hypothesis import given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.ros.conversions import (array_to_image_msg, image_msg_to_array, image_msg_to_model_input,
                                    keypoints_from_msg, keypoints_to_msg, matches_from_msg,
                                    matches_to_msg)

HEADER = Header(stamp=Time(sec=12, nanosec=345), frame_id="cam")


@pytest.mark.parametrize("n", [0, 1, 2000])
def test_keypoints_round_trip(n):
    rng = np.random.default_rng(n)
    kp = rng.random((n, 2), dtype=np.float32) * 100
    scores = rng.random(n, dtype=np.float32)
    desc = rng.standard_normal((n, 256), dtype=np.float32)
    msg = keypoints_to_msg(HEADER, 480, 640, "sp", kp, scores, desc)
    assert msg.header == HEADER and (msg.height, msg.width, msg.detector) == (480, 640, "sp")
    assert msg.descriptor_size == 256 and len(msg.descriptors) == n * 256
    back = keypoints_from_msg(msg)
    assert back["keypoints"].tobytes() == kp.tobytes()
    assert back["scores"].tobytes() == scores.tobytes()
    assert back["descriptors"].shape == (n, 256) and back["descriptors"].tobytes() == desc.tobytes()


def test_keypoints_without_descriptors():
    msg = keypoints_to_msg(HEADER, 4, 4, "sp", np.ones((3, 2), np.float32), np.ones(3, np.float32))
    assert msg.descriptor_size == 0 and len(msg.descriptors) == 0
    assert keypoints_from_msg(msg)["descriptors"].shape == (3, 0)


@pytest.mark.parametrize("n,with_inliers", [(0, False), (5, True), (2000, True), (7, False)])
def test_matches_round_trip(n, with_inliers):
    rng = np.random.default_rng(n)
    k0, k1 = rng.random((n, 2), dtype=np.float32), rng.random((n, 2), dtype=np.float32)
    scores = rng.random(n, dtype=np.float32)
    inliers = rng.integers(0, 2, n).astype(np.uint8) if with_inliers else None
    msg = matches_to_msg(HEADER, Time(sec=11, nanosec=1), "cam0", 480, 640, "eloftr", k0, k1, scores, inliers)
    assert (msg.stamp0.sec, msg.stamp0.nanosec, msg.frame_id0) == (11, 1, "cam0")
    back = matches_from_msg(msg)
    assert back["keypoints0"].tobytes() == k0.tobytes() and back["keypoints1"].tobytes() == k1.tobytes()
    assert back["scores"].tobytes() == scores.tobytes()
    if with_inliers and n:
        assert np.array_equal(back["inliers"], inliers)
    else:
        assert len(back["inliers"]) == 0


def padded_image_msg(image: np.ndarray, encoding: str, pad: int) -> Image:
    """An Image whose rows carry ``pad`` junk bytes (step > width*channels)."""
    rows = image.reshape(image.shape[0], -1).view(np.uint8)
    junk = np.full((rows.shape[0], pad), 0xAB, np.uint8)
    data = np.concatenate([rows, junk], axis=1)
    return Image(height=image.shape[0], width=image.shape[1], encoding=encoding,
                 step=data.shape[1], data=data.tobytes())


@pytest.mark.parametrize("encoding,channels", [("mono8", 1), ("rgb8", 3), ("bgr8", 3)])
@pytest.mark.parametrize("pad", [0, 3, 64])
def test_image_round_trip_with_padding(encoding, channels, pad):
    rng = np.random.default_rng(pad)
    shape = (7, 13) if channels == 1 else (7, 13, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    msg = padded_image_msg(image, encoding, pad)
    assert np.array_equal(image_msg_to_array(msg), image)
    rgb = image_msg_to_model_input(msg)
    assert np.array_equal(rgb, image[:, :, ::-1] if encoding == "bgr8" else image)
    packed = array_to_image_msg(image, encoding, HEADER)
    assert packed.step == 13 * channels and packed.header == HEADER
    assert np.array_equal(image_msg_to_array(packed), image)


def test_image_16bit_and_alpha_to_model_input():
    mono16 = np.array([[0, 256, 65535]], dtype=np.uint16)
    msg = array_to_image_msg(mono16, "mono16")
    assert image_msg_to_model_input(msg).tolist() == [[0, 1, 255]]
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    rgb = image_msg_to_model_input(array_to_image_msg(bgra, "bgra8"))
    assert rgb.shape == (2, 2, 3) and (rgb[..., 2] == 200).all() and (rgb[..., 0] == 0).all()


def test_compressed_image():
    import cv2
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 255  # red in RGB
    ok, png = cv2.imencode(".png", image[:, :, ::-1])
    rgb = image_msg_to_model_input(CompressedImage(format="png", data=png.tobytes()))
    assert np.array_equal(rgb, image)
    with pytest.raises(ImageDecodeError, match="undecodable"):
        image_msg_to_model_input(CompressedImage(format="jpeg", data=b"\xff\xd8garbage"))


@pytest.mark.parametrize("fields,match", [
    (dict(encoding="yuv422"), "unsupported encoding"),
    (dict(height=0), "empty image"),
    (dict(step=5), "step 5 <"),
    (dict(data=bytes(10)), "expected step"),
])
def test_malformed_images_rejected_with_reason(fields, match):
    base = dict(height=4, width=4, encoding="rgb8", step=12, data=bytes(48))
    base.update(fields)
    with pytest.raises(ImageDecodeError, match=match):
        image_msg_to_array(Image(**base))


def test_longer_data_than_step_times_height_is_tolerated():
    msg = Image(height=2, width=2, encoding="mono8", step=2, data=bytes([1, 2, 3, 4, 9, 9]))
    assert image_msg_to_array(msg).tolist() == [[1, 2], [3, 4]]


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 24), width=st.integers(1, 24), pad=st.integers(0, 9),
       encoding=st.sampled_from(["mono8", "rgb8", "bgr8", "rgba8", "bgra8", "mono16", "rgb16"]),
       seed=st.integers(0, 2**16))
def test_property_image_message_round_trip(height, width, pad, encoding, seed):
    dtype = np.uint16 if encoding.endswith("16") else np.uint8
    channels = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}[encoding.rstrip("0123456789")]
    shape = (height, width) if channels == 1 else (height, width, channels)
    image = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    msg = padded_image_msg(image, encoding, pad * np.dtype(dtype).itemsize)
    assert np.array_equal(image_msg_to_array(msg), image)
    model_input = image_msg_to_model_input(msg)
    assert model_input.dtype == np.uint8 and model_input.shape[:2] == (height, width)
    assert model_input.ndim == 2 if channels == 1 else model_input.shape[2] == 3


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), d=st.sampled_from([0, 1, 64, 256]), seed=st.integers(0, 2**16))
def test_property_keypoints_round_trip(n, d, seed):
    rng = np.random.default_rng(seed)
    kp = (rng.standard_normal((n, 2)) * 1e3).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    desc = rng.standard_normal((n, d)).astype(np.float32) if d else None
    back = keypoints_from_msg(keypoints_to_msg(HEADER, 1, 1, "x", kp, scores, desc))
    assert back["keypoints"].tobytes() == kp.tobytes() and back["scores"].tobytes() == scores.tobytes()
    if d:
        assert back["descriptors"].tobytes() == desc.tobytes()
