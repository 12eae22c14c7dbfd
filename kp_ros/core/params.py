"""Every parameter of superpoint_node, eloftr_node, lightglue_node, superglue_node and
track_node, written once (frontend_node's are theirs, merged).

ROS-free (no rclpy), like LightGlue's ``default_conf``: name, default, range or choices,
whether it may change while running, and its description. The nodes declare their ROS
parameters from it (kp_ros/ros/feature_node.py builds the descriptors), process_bag builds
its flags from it, the core classes take their defaults from it, and test/test_config.py
checks config/matcher.yaml against it.

``core_default`` is the ROS-free API's default where it differs from the node's: the core
keeps every keypoint / match unless told otherwise, the nodes publish a bounded top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

_SAME = object()  # core_default not given: the core uses the node's default

RESIZE_CHOICES = ("model", "native")
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "auto")
VERIFICATION_CHOICES = ("none", "fundamental", "homography", "essential")
ASSOCIATION_CHOICES = ("flow", "points")
RELIABILITY_CHOICES = ("auto", "reliable", "best_effort")
VINS_LAYOUT_CHOICES = ("none", "fusion", "mono")


def normalize_reliability(value) -> str:
    """'auto' | 'reliable' | 'best_effort'; the old boolean ``reliable_input`` still works
    (true = reliable, false = best_effort). ValueError for anything else."""
    if isinstance(value, bool):
        return "reliable" if value else "best_effort"
    text = str(value).strip().lower().replace("-", "_")
    aliases = {"true": "reliable", "false": "best_effort", "besteffort": "best_effort"}
    text = aliases.get(text, text)
    if text not in RELIABILITY_CHOICES:
        raise ValueError(f"reliable_input must be one of {', '.join(RELIABILITY_CHOICES)}, got {value!r}")
    return text


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default, description, optional range, and whether it can change
    while running (those that cannot are rejected with a reason)."""
    name: str
    default: object
    description: str
    low: float | None = None
    high: float | None = None
    runtime: bool = True
    choices: tuple[str, ...] = ()
    # Maps accepted aliases (e.g. an old boolean form) to the canonical value; raises
    # ValueError with the reason. Such a parameter is declared dynamically typed.
    normalize: Callable[[object], object] | None = None
    core_default: object = _SAME
    # A setting of the node (subscription, diagnostics, stream rules), not a keyword of
    # the core model: kp_ros/core/models.py passes the others to the model's constructor.
    node_only: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def core_value(self):
        """The default of the ROS-free core API (the node's unless ``core_default`` is set)."""
        return self.default if self.core_default is _SAME else self.core_default

    def checked(self, value):
        """The canonical value, or ValueError with the reason (aliases, choices)."""
        if self.normalize is not None:
            value = self.normalize(value)
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


COMMON = (
    ParamSpec("device", "auto", "Torch device for inference: auto (cuda when available), cpu, cuda "
              "or cuda:N.", runtime=False),
    ParamSpec("precision", "fp32", "Model precision: fp32; bf16 (CPU with AVX512-BF16/AMX, or CUDA; "
              "emulated and slower on other CPUs and below CUDA sm 8.0); fp16 (CUDA only, fp32 on "
              "CPU); auto = fp16 on a CUDA GPU with tensor cores (sm >= 7.0), else fp32.", runtime=False, choices=PRECISION_CHOICES),
    ParamSpec("fp16", False, "Deprecated alias of precision: fp16.", runtime=False),
    ParamSpec("resize", "model", "Model input size: 'model' = 480x640 as the reference pipeline; "
              "'native' = the camera size rounded to what the model needs (at most 1920x1088 "
              "pixels, aspect kept).", choices=RESIZE_CHOICES),
    ParamSpec("use_compressed", False, "Subscribe to sensor_msgs/CompressedImage on image/compressed "
              "instead of sensor_msgs/Image on image.", runtime=False, node_only=True),
    ParamSpec("reliable_input", "auto", "Image subscription reliability: auto follows the "
              "publishers (reliable when all are, else best effort); reliable or best_effort fix it. "
              "true/false are accepted as reliable/best_effort.", runtime=False,
              choices=RELIABILITY_CHOICES, normalize=normalize_reliability, node_only=True),
    ParamSpec("debug_image", False, "Always publish ~/debug_image (it is also published whenever "
              "someone subscribes to it).", node_only=True),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", 0.1, 60.0,
              runtime=False, node_only=True),
)

SUPERPOINT = (
    ParamSpec("model", "magic-leap-community/superpoint", "Hugging Face hub id or local directory "
              "of a SuperPointForKeypointDetection checkpoint.", runtime=False),
    ParamSpec("keypoint_threshold", 0.005, "Minimum detection score of a keypoint.", 0.0, 1.0),
    ParamSpec("nms_radius", 4, "Non-maximum suppression radius in model pixels.", 0, 64),
    ParamSpec("max_keypoints", 1024, "Keep the top-k keypoints by score; <= 0 keeps all.", -1, 100000,
              core_default=-1),
)

ELOFTR = (
    ParamSpec("model", "zju-community/efficientloftr", "Hugging Face hub id or local directory of "
              "an EfficientLoFTRForKeypointMatching checkpoint.", runtime=False),
    ParamSpec("match_threshold", 0.2, "Minimum coarse matching confidence of a match.", 0.0, 1.0),
    ParamSpec("max_matches", 2048, "Keep the top-k matches by score; <= 0 keeps all.", -1, 1000000,
              core_default=-1),
    ParamSpec("geometric_verification", "none", "Mark geometric inliers with OpenCV USAC on a "
              "fundamental matrix or a homography, or with the 5-point RANSAC on an essential "
              "matrix (needs sensor_msgs/CameraInfo on camera_info; fundamental until one arrives).",
              choices=VERIFICATION_CHOICES),
    ParamSpec("ransac_reproj_threshold", 1.0, "Inlier threshold in source pixels.", 0.01, 100.0),
    ParamSpec("max_frame_gap", 1.5, "Reset the stream (no matches for that frame) when stamps jump "
              "by more than this many seconds; 0 disables.", 0.0, 3600.0,
              node_only=True),
)

_COMMON = {p.name: p for p in COMMON}
_ELOFTR = {p.name: p for p in ELOFTR}
# Sparse matchers: LightGlue (or SuperGlue) on the keypoints + descriptors superpoint_node
# publishes. ``filter_threshold``, ``depth_confidence`` and ``width_confidence`` are the
# LightGlue config's names (depth: early stop, width: point pruning; 0 disables each).
LIGHTGLUE = (
    ParamSpec("model", "ETH-CVG/lightglue_superpoint", "Hugging Face hub id or local directory "
              "of a LightGlueForKeypointMatching (or SuperGlueForKeypointMatching) checkpoint.",
              runtime=False),
    ParamSpec("filter_threshold", 0.1, "Minimum matching score of a match (random-init weights "
              "need 0).", 0.0, 1.0),
    ParamSpec("depth_confidence", 0.95, "Early stop: finish at the first layer where more than "
              "this fraction of keypoints is confident; 0 runs every layer (LightGlue only).",
              0.0, 1.0),
    ParamSpec("width_confidence", 0.99, "Point pruning: drop keypoints whose matchability is "
              "below 1 - this after each layer; 0 keeps all (LightGlue only).", 0.0, 1.0),
    _ELOFTR["max_matches"],
    _ELOFTR["geometric_verification"],
    _ELOFTR["ransac_reproj_threshold"],
    _ELOFTR["max_frame_gap"],
)
_LIGHTGLUE = {p.name: p for p in LIGHTGLUE}
# SuperGlue on the same input: no adaptive depth / width; its optimal transport's iterations.
SUPERGLUE = (
    ParamSpec("model", "magic-leap-community/superglue_indoor", "Hugging Face hub id or local "
              "directory of a SuperGlueForKeypointMatching checkpoint (superglue_indoor or "
              "superglue_outdoor).", runtime=False),
    _LIGHTGLUE["filter_threshold"],
    ParamSpec("sinkhorn_iterations", 100, "Sinkhorn iterations of the optimal transport "
              "(SuperGlue's own default; fewer is faster and less converged).", 1, 1000),
    *(_LIGHTGLUE[name] for name in ("max_matches", "geometric_verification",
                                   "ransac_reproj_threshold", "max_frame_gap")),
)
TRACK = (
    ParamSpec("association_radius", 3.0, "Pixels: how close a match (association 'points') or a "
              "keypoint moved by a match's flow ('flow') must come to a keypoint to link it.",
              0.1, 64.0),
    ParamSpec("association", "flow", "'flow': keypoint i of the older frame is moved by the "
              "displacement of a match within the radius and linked to the nearest keypoint there; "
              "'points': a match must start near i and end near j.", choices=ASSOCIATION_CHOICES),
    ParamSpec("inliers_only", True, "Link through geometric inliers only, when the Matches carry "
              "inlier flags (eloftr_node geometric_verification)."),
    ParamSpec("min_match_score", 0.0, "Matches below this confidence link nothing.", 0.0, 1.0),
    ParamSpec("match_timeout", 1.0, "Seconds a frame's Keypoints wait for its Matches before it "
              "is published with new tracks.", 0.01, 60.0),
    ParamSpec("max_pending", 32, "Frames waiting for their Matches (and Matches waiting for their "
              "Keypoints) at most; the oldest goes out unlinked beyond.", 1, 1000, runtime=False),
    ParamSpec("trail_length", 10, "Frames of trail drawn per track on ~/debug_image.", 1, 100),
    ParamSpec("vins_layout", "none", "Also publish each Tracks as a sensor_msgs/PointCloud on "
              "~/feature for a VINS estimator (undistorted normalised points from camera_info, "
              "velocities): 'fusion' = VINS-Fusion's feature_callback (id, camera, u, v, "
              "velocity x/y, 3 zero channels; stereo tracks add camera-1 points from "
              "right/camera_info), 'mono' = VINS-Mono's estimator_node (id, u, v, velocity x/y; "
              "left camera only); 'none' = off.", choices=VINS_LAYOUT_CHOICES, runtime=False),
    _COMMON["debug_image"],
    _COMMON["diagnostics_period"],
)

# Stereo mode of the front-end (kp_ros/core/stereo.py, stereo_sync.py): the node that runs
# a stereo input declares these; process_bag --stereo takes them as flags.
STEREO = (
    ParamSpec("stereo", False, "Stereo input: left/image_rect + right/image_rect (and their "
              "camera_info), paired by stamp; left-right matches with disparity and depth.",
              runtime=False),
    ParamSpec("stereo_sync_tolerance", 0.0, "Seconds left and right stamps may differ and still "
              "pair (0: exact stamps, as a hardware-synchronised driver gives).", 0.0, 1.0,
              runtime=False),
    ParamSpec("stereo_max_row_error", 1.5, "Pixels a left-right match may leave its row "
              "(|y_left - y_right|) in a rectified pair.", 0.0, 64.0),
    ParamSpec("min_disparity", 1.0, "Smallest disparity (x_left - x_right, px) a left-right match "
              "may have (points farther than fx * baseline / min_disparity are dropped).",
              0.0, 10000.0),
    ParamSpec("max_disparity", 256.0, "Largest disparity (px) a left-right match may have "
              "(points nearer than fx * baseline / max_disparity are dropped).", 0.0, 10000.0),
)


def _model_path(entry: str, model: ParamSpec) -> ParamSpec:
    """A model's ``model`` parameter under the name the front-end gives it (``<entry>_model``:
    one node, several models)."""
    return replace(model, name=f"{entry}_model")


def _merged(*groups, skip: tuple[str, ...] = ()) -> tuple[ParamSpec, ...]:
    """The parameters of ``groups`` in order, each name once (the first spec of a name; a
    name two groups share must be one spec), without ``skip``."""
    out: dict[str, ParamSpec] = {}
    for group in groups:
        for param in group:
            if param.name in skip:
                continue
            if param.name in out and out[param.name] != param:
                raise AssertionError(f"two different specs named {param.name!r}")
            out.setdefault(param.name, param)
    return tuple(out.values())


# The models of the one-process front-end, by registry name (kp_ros/core/models.py: the
# same names; test_frontend_node checks it), and its choice of temporal matcher.
FRONTEND_MODELS = (("superpoint", SUPERPOINT), ("eloftr", ELOFTR), ("lightglue", LIGHTGLUE),
                   ("superglue", SUPERGLUE))
FRONTEND_MATCHERS = ("eloftr", "lightglue", "superglue")
FRONTEND = _merged(
    tuple(_model_path(name, next(p for p in specs if p.name == "model"))
          for name, specs in FRONTEND_MODELS),
    (ParamSpec("matcher", FRONTEND_MATCHERS[0], "Temporal matcher: eloftr (EfficientLoFTR on "
               "the images, dense; tracks linked by association), lightglue or superglue (on "
               "the detected keypoints, sparse; tracks linked by keypoint index). Stereo needs "
               "eloftr (its left-right step).", runtime=False, choices=FRONTEND_MATCHERS),),
    *(specs for _, specs in FRONTEND_MODELS),
    # No Keypoints / Matches wait for each other in one process: no timeout, no pending.
    TRACK, COMMON, STEREO,
    skip=("model", "fp16", "match_timeout", "max_pending"))

# Node name -> every parameter it declares, in declaration order.
NODES = {
    "superpoint_node": SUPERPOINT + COMMON,
    "eloftr_node": ELOFTR + COMMON,
    "track_node": TRACK,
    # The sparse matcher reads Keypoints, not images: no resize / use_compressed.
    "lightglue_node": LIGHTGLUE + tuple(_COMMON[name] for name in (
        "device", "precision", "reliable_input", "debug_image", "diagnostics_period")),
    "superglue_node": SUPERGLUE + tuple(_COMMON[name] for name in (
        "device", "precision", "reliable_input", "debug_image", "diagnostics_period")),
    # Detection, matching and tracks of each frame in one process (kp_ros/core/frontend.py).
    "frontend_node": FRONTEND,
}


def spec(node: str, name: str) -> ParamSpec:
    """One node's parameter, by name (KeyError names both when unknown)."""
    for param in NODES[node]:
        if param.name == name:
            return param
    raise KeyError(f"{node} has no parameter {name!r}")


def defaults(node: str, core: bool = False) -> dict:
    """name -> default of one node's parameters (``core=True``: the core API's defaults)."""
    return {p.name: p.core_value if core else p.default for p in NODES[node]}
