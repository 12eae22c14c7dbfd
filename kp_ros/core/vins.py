"""Feature clouds in the layout VINS-Fusion and VINS-Mono read (sensor_msgs/PointCloud).

Both estimators take a tracker's output as one PointCloud per frame: ``points`` are the
undistorted normalised coordinates (x, y, 1), the channels carry the id, the pixel and
the image-plane velocity of each point. ``VinsFeatures.frame`` builds one cloud (a
``VinsCloud``, numpy) from one frame's track ids and pixels and the camera model; the ROS
shell (kp_ros/ros/vins_cloud.py) and process_bag turn it into a message. See docs/vins.md.

- ``fusion`` (VINS-Fusion, vins_estimator/src/rosNodeTest.cpp, ``feature_callback``):
  channels feature id, camera id, u, v, velocity_x, velocity_y, then 3 zero channels (why:
  ``_FUSION_CHANNELS``). A track seen in the right camera is a second point with the same
  id and camera id 1, after its left point (feature_manager.cpp asserts that order).
- ``mono`` (VINS-Mono, vins_estimator/src/estimator_node.cpp, ``process``): channels
  id * NUM_OF_CAM + camera id, u, v, velocity_x, velocity_y.

Velocity = (normalised position - the same track's previous one in the same camera) /
(stamp difference in seconds), as VINS's own feature trackers compute it; 0 for a new
track, a track's first sight in that camera, after ``reset`` or a stamp that does not
increase. Pure numpy, no ROS.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from kp_ros.core.geometry import CameraModel, undistort_points
from kp_ros.core.params import VINS_LAYOUT_CHOICES

VINS_LAYOUTS = VINS_LAYOUT_CHOICES  # ("none", "fusion", "mono"); track_node's vins_layout

# VINS-Fusion's feature_callback reads channels 0-5 and, whenever the cloud has more than
# 5 channels (so always, as it needs 6), channels 6-8 too (a ground-truth point for
# debugging): a 6-channel cloud makes it read past the end of ``channels``. Channels 6-8
# are published as zeros so the read stays in bounds.
_FUSION_CHANNELS = ("feature_id", "camera_id", "u", "v", "velocity_x", "velocity_y",
                    "ground_truth_x", "ground_truth_y", "ground_truth_z")
# VINS-Mono's own feature_tracker_node names its channels so; the estimator reads them by index.
_MONO_CHANNELS = ("id_of_point", "u_of_point", "v_of_point", "velocity_x_of_point",
                  "velocity_y_of_point")
# Ids travel as float32 and are read back as int: exact only below 2**24. Ids wrap there
# (a wrapped id meets its namesake ~16.7 M tracks later, long after it left the
# estimator's sliding window); the mono encoding id * NUM_OF_CAM + camera must fit too.
_EXACT_FLOAT32 = 1 << 24
# Tracks remembered for velocities: those seen in the last frames, as the track book
# links a frame to one of its last 8 (kp_ros/core/tracks.py).
_REMEMBERED_FRAMES = 8


@dataclass
class VinsCloud:
    """One frame's cloud: ``points`` (M, 3) float32 [x_norm, y_norm, 1];
    ``channels`` (C, M) float32 in the order the estimator reads them, ``channel_names``
    their C names."""
    points: np.ndarray
    channel_names: tuple[str, ...]
    channels: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


class VinsFeatures:
    """Builds the frames' clouds for one layout; remembers each track's last normalised
    position per camera (and its stamp) for the velocities."""

    def __init__(self, layout: str, num_cameras: int = 1):
        if layout not in VINS_LAYOUTS or layout == "none":
            raise ValueError(f"VINS layout must be 'fusion' or 'mono', got {layout!r}")
        if isinstance(num_cameras, bool) or not isinstance(num_cameras, (int, np.integer)) \
                or not 1 <= num_cameras <= 2:
            raise ValueError(f"num_cameras must be 1 or 2, got {num_cameras!r}")
        self.layout, self.num_cameras = layout, int(num_cameras)
        self.counters = Counter()
        self.reset()

    def reset(self) -> None:
        """Forget the remembered positions: every track's next velocity is 0."""
        self._keys = np.zeros(0, np.uint64)      # sorted: id * 2 + camera
        self._xy = np.zeros((0, 2), np.float64)
        self._stamps = np.zeros(0, np.int64)
        self._frames = np.zeros(0, np.int64)     # the frame number each was seen in
        self._frame = 0
        self._last_stamp: int | None = None

    def frame(self, stamp_ns: int, ids, pixels, camera: CameraModel, pixels_right=None,
              camera_right: CameraModel | None = None) -> VinsCloud:
        """The cloud of one frame: ``ids`` (N,) track ids, ``pixels`` (N, 2) their left
        raw pixels; ``pixels_right`` (N, 2) their right pixels, NaN rows where a track has
        no right observation (needs ``camera_right``). Rows with non-finite pixels (or
        whose undistortion fails) are left out. ValueError without a camera model."""
        if camera is None:
            raise ValueError("no camera model (CameraInfo) for the left camera: the VINS cloud "
                             "needs it to undistort and normalise the points")
        ids = np.asarray(ids).reshape(-1).astype(np.uint64)
        pixels = np.asarray(pixels, np.float64).reshape(-1, 2)
        if len(ids) != len(pixels):
            raise ValueError(f"{len(ids)} ids for {len(pixels)} pixels")
        stamp_ns = int(stamp_ns)
        if self._last_stamp is not None and stamp_ns <= self._last_stamp:
            self.counters["resets (stamp not increasing)"] += 1
            self.reset()
        views = [(0, ids, pixels, camera)]
        if pixels_right is not None:
            pixels_right = np.asarray(pixels_right, np.float64).reshape(-1, 2)
            if len(pixels_right) != len(ids):
                raise ValueError(f"{len(pixels_right)} right pixels for {len(ids)} ids")
            seen = np.isfinite(pixels_right).all(1)
            if seen.any():
                if camera_right is None:
                    raise ValueError("no camera model (CameraInfo) for the right camera: its "
                                     "points need it")
                if self.num_cameras < 2:
                    # id * 1 + 1 would read back as the next id's left point.
                    self.counters["right points dropped (num_cameras 1)"] += int(seen.sum())
                else:
                    views.append((1, ids[seen], pixels_right[seen], camera_right))

        parts = [self._view(stamp_ns, *view) for view in views]
        self._remember(stamp_ns, parts)
        ids_all = np.concatenate([p[0] for p in parts])
        cams = np.concatenate([np.full(len(p[0]), p[4], np.float32) for p in parts])
        uv = np.concatenate([p[1] for p in parts])
        xy = np.concatenate([p[2] for p in parts])
        velocity = np.concatenate([p[3] for p in parts])
        points = np.ones((len(xy), 3), np.float32)
        points[:, :2] = xy
        if self.layout == "fusion":
            channels = np.zeros((len(_FUSION_CHANNELS), len(xy)), np.float32)
            channels[0] = ids_all % np.uint64(_EXACT_FLOAT32)
            channels[1] = cams
            channels[2:4] = uv.T
            channels[4:6] = velocity.T
            return VinsCloud(points, _FUSION_CHANNELS, channels)
        modulus = np.uint64(_EXACT_FLOAT32 // self.num_cameras)
        channels = np.empty((len(_MONO_CHANNELS), len(xy)), np.float32)
        channels[0] = (ids_all % modulus).astype(np.float64) * self.num_cameras + cams
        channels[1:3] = uv.T
        channels[3:5] = velocity.T
        return VinsCloud(points, _MONO_CHANNELS, channels)

    def _view(self, stamp_ns: int, camera_id: int, ids, pixels, camera: CameraModel):
        """(ids, pixels, normalised xy, velocity, camera id) of one camera's finite rows."""
        keep = np.isfinite(pixels).all(1)
        ids, pixels = ids[keep], pixels[keep]
        xy = undistort_points(pixels, camera).reshape(-1, 2)
        finite = np.isfinite(xy).all(1)
        if not finite.all():
            self.counters["points not undistorted"] += int((~finite).sum())
            ids, pixels, xy = ids[finite], pixels[finite], xy[finite]
        velocity = np.zeros((len(ids), 2), np.float64)
        keys = ids * np.uint64(2) + np.uint64(camera_id)
        if len(self._keys) and len(keys):
            at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            found = (self._keys[at] == keys) & (self._stamps[at] < stamp_ns)
            if found.any():
                dt = (stamp_ns - self._stamps[at[found]]) * 1e-9
                velocity[found] = (xy[found] - self._xy[at[found]]) / dt[:, None]
        return ids, pixels, xy, velocity, camera_id

    def _remember(self, stamp_ns: int, parts) -> None:
        """This frame's positions replace the remembered ones of the same (id, camera);
        those not seen in the last frames are forgotten (the memory stays bounded)."""
        self._frame += 1
        keys = np.concatenate([p[0] * np.uint64(2) + np.uint64(p[4]) for p in parts])
        xy = np.concatenate([p[2] for p in parts])
        old = (self._frames > self._frame - _REMEMBERED_FRAMES) & ~np.isin(self._keys, keys)
        keys = np.concatenate([self._keys[old], keys])
        xy = np.concatenate([self._xy[old], xy])
        stamps = np.concatenate([self._stamps[old], np.full(len(xy) - int(old.sum()), stamp_ns)])
        frames = np.concatenate([self._frames[old], np.full(len(stamps) - int(old.sum()), self._frame)])
        # One entry per key (a repeated id in one frame: its last row), sorted for lookups.
        unique, first = np.unique(keys[::-1], return_index=True)
        rows = len(keys) - 1 - first
        self._keys, self._xy = unique, xy[rows]
        self._stamps, self._frames = stamps[rows], frames[rows]
        self._last_stamp = stamp_ns
