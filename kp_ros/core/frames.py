"""FrameBundle: what one input step hands the pipeline, whatever the input kind.

A mono input gives one image; a stereo input a synchronized (left, right) pair. The node
base decodes every image of a bundle in its worker thread and passes the arrays on, so a
new input kind needs no change in the worker or the node shell. The messages are opaque
here (ROS or rosbags messages alike): the core never reads them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FrameBundle:
    msgs: tuple              # image messages: (image,) or (left, right)
    stamp_ns: int            # header stamp of the first (left) image, checked
    infos: tuple = ()        # the CameraInfo message beside each image, or None per image
    arrival: object = None   # what the node judged on arrival (e.g. stream continuity)

    @property
    def header(self):
        """The first (left) image's header: the token results are published under."""
        return self.msgs[0].header
