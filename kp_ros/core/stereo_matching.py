"""The models' part of a stereo pair: SuperPoint on both images in one batched forward,
and EfficientLoFTR left <-> right reusing the left image's backbone features from the
temporal (left <-> previous left) step, so a stereo pair costs one extra backbone and one
transformer / fine pass over the mono path. Results go through the rectified-stereo
checks of kp_ros/core/stereo.py. Numpy out, as every core result.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from kp_ros.core.params import spec
from kp_ros.core.stereo import (StereoMatchSet, StereoParams, StereoRig, check_matches,
                                empty_match_set)


def detect_pair(detector, left: np.ndarray, right: np.ndarray,
                batched: bool = True) -> tuple[dict, dict]:
    """SuperPoint's ``detect`` on both images; one forward over a batch of two when they
    have the same size (else, or with ``batched=False``, two). Same keys as ``detect``."""
    if not batched or left.shape[:2] != right.shape[:2]:
        return detector.detect(left), detector.detect(right)
    params = detector.params  # one read for both images
    with torch.no_grad():
        pixels = torch.cat([detector.preprocess(left, params.resize),
                            detector.preprocess(right, params.resize)])
        maps = detector.forward(pixels)
        return tuple(detector.postprocess({name: value[i:i + 1] for name, value in maps.items()},
                                          tuple(left.shape[:2]), params) for i in range(2))


class StereoMatcher:
    """Left-right matches of a rectified pair through an EfficientLoFTRStreamMatcher's
    stages (its settings: threshold, max_matches, resize), then the stereo checks.
    Geometric verification is not applied here: the row check is the epipolar check of a
    rectified pair. Not thread-safe, like the matcher it uses."""

    def __init__(self, matcher, params: StereoParams | None = None,
                 link_radius: float = spec("track_node", "association_radius").default):
        self.matcher = matcher
        self.params = (params or StereoParams()).validated()
        self.link_radius = float(link_radius)  # px: left keypoint -> right keypoint links

    def set_params(self, **changes) -> None:
        """Change StereoParams fields; all checked before any applies (ValueError: none)."""
        self.params = replace(self.params, **changes).validated()

    @torch.inference_mode()
    def match(self, left: np.ndarray, right: np.ndarray, rig: StereoRig,
              left_features=None) -> StereoMatchSet:
        """Checked left-right matches. ``left_features``: the matcher's FrameFeatures of
        ``left`` when the temporal step already ran its backbone (else it runs here)."""
        matcher, params = self.matcher, self.matcher.params
        if left_features is None or left_features.source_size != tuple(left.shape[:2]):
            left_features = matcher.extract(matcher.preprocess(left, params.resize))
        right_features = matcher.extract(matcher.preprocess(right, params.resize))
        if right_features.model_size != left_features.model_size:
            return empty_match_set(f"left {left.shape[1]}x{left.shape[0]} and right "
                                   f"{right.shape[1]}x{right.shape[0]} images differ in size: "
                                   f"not one rectified pair; no stereo matches")
        found = matcher.match_features(left_features, right_features,
                                       replace(params, geometric_verification="none"))
        return check_matches(found["keypoints0"], found["keypoints1"], found["scores"], rig,
                             self.params)
