"""Topic names derived from an image topic, one rule for the launch file and the bag tools.

image_pipeline's convention: a camera's topics are siblings in one namespace
(``/camera/image_raw``, ``/camera/camera_info``); a compressed transport adds
``/compressed`` to the image topic. Relative names stay relative.
"""
from __future__ import annotations


def _image_parts(image_topic: str) -> list[str]:
    parts = image_topic.rstrip("/").split("/")
    if len(parts) > 1 and parts[-1] == "compressed":
        parts = parts[:-1]
    return parts


def camera_info_topic(image_topic: str) -> str:
    """/cam/image_raw[/compressed] -> /cam/camera_info; /image -> /camera_info; image -> camera_info."""
    return "/".join(_image_parts(image_topic)[:-1] + ["camera_info"])


def default_prefix(image_topic: str) -> str:
    """The namespace of an image topic, absolute: /camera/image_raw[/compressed] -> /camera;
    /image -> ''."""
    parts = [p for p in _image_parts(image_topic) if p]
    return "/" + "/".join(parts[:-1]) if len(parts) > 1 else ""
