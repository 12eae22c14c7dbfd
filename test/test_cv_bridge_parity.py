"""kp_ros decodes sensor_msgs/Image itself (core/image_codec.py). Where ROS 2's cv_bridge
is installed (a full ROS install), this checks that the arrays equal what
``CvBridge().imgmsg_to_cv2(msg)`` returns, for every encoding the nodes promise, with
row padding. The `cv-bridge` port on PyPI (1.13.0.post0) cannot decode rgb8 at all
("buffer is too small"), which is why kp_ros does not call cv_bridge at run time."""
import numpy as np
import pytest

from kp_ros.ros.conversions import array_to_image_msg, image_msg_to_array


ENCODINGS = {"mono8": (np.uint8, 1), "mono16": (np.uint16, 1), "rgb8": (np.uint8, 3),
             "bgr8": (np.uint8, 3), "rgba8": (np.uint8, 4), "bgra8": (np.uint8, 4)}


@pytest.fixture(scope="module")
def bridge():
    # Skipped here, not at module level: launch_testing's pytest plugin imports every test
    # module at collection, and a module-level skip there would skip the whole suite.
    cv_bridge = pytest.importorskip(
        "cv_bridge", reason="cv_bridge not installed (a full ROS 2 install has it; the no-ROS venv does not)")
    bridge = cv_bridge.CvBridge()
    probe = array_to_image_msg(np.zeros((2, 3, 3), np.uint8), "rgb8")
    try:
        assert bridge.imgmsg_to_cv2(probe).shape == (2, 3, 3)
    except (TypeError, ValueError, AssertionError) as exc:
        pytest.skip(f"the installed cv_bridge cannot decode a plain rgb8 image ({exc!r}): "
                    "the broken PyPI port, not ROS 2's")
    return bridge


def padded(msg, extra: int):
    """The same image with ``extra`` bytes of padding after every row."""
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    msg.data = np.pad(rows, ((0, 0), (0, extra)), constant_values=7).tobytes()
    msg.step += extra
    return msg


@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_decoding_equals_cv_bridge(bridge, encoding, padding):
    dtype, channels = ENCODINGS[encoding]
    shape = (7, 13) if channels == 1 else (7, 13, channels)
    image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    msg = padded(array_to_image_msg(image, encoding), padding)
    ours = image_msg_to_array(msg)
    theirs = bridge.imgmsg_to_cv2(msg)
    assert ours.dtype == theirs.dtype
    assert np.array_equal(ours.reshape(theirs.shape), theirs)
