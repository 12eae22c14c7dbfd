"""EfficientLoFTR's runtime settings: one frozen value, checked as a whole, swapped at once.

Defaults (and what each means) live in kp_ros/core/params.py; the matcher
(kp_ros/core/eloftr.py) holds one ``EfficientLoFTRParams`` and replaces it whole on a
change, so a frame being matched in another thread sees the old settings or the new ones,
never a mix. Same pattern as ``SuperPointParams`` (kp_ros/core/superpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from kp_ros.core import params
from kp_ros.core.params import RESIZE_CHOICES, VERIFICATION_CHOICES

_SPEC = {p.name: p for p in params.NODES["eloftr_node"]}


@dataclass(frozen=True)
class EfficientLoFTRParams:
    """Runtime settings; defaults from kp_ros/core/params.py (the core's own where it differs)."""
    match_threshold: float = _SPEC["match_threshold"].core_value  # coarse dual-softmax confidence
    max_matches: int = _SPEC["max_matches"].core_value  # <= 0: unbounded
    resize: str = _SPEC["resize"].core_value  # 'model' (480x640) | 'native'
    geometric_verification: str = _SPEC["geometric_verification"].core_value
    ransac_reproj_threshold: float = _SPEC["ransac_reproj_threshold"].core_value  # source pixels

    def validated(self) -> "EfficientLoFTRParams":
        """The same settings in canonical types, or ValueError naming the first bad one."""
        threshold = _number("match_threshold", self.match_threshold, float)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"match_threshold must be in [0, 1] (a dual-softmax "
                             f"confidence), got {self.match_threshold!r}")
        max_matches = _number("max_matches", self.max_matches, int)
        if self.resize not in RESIZE_CHOICES:
            raise ValueError(f"resize must be one of {RESIZE_CHOICES}, got {self.resize!r}")
        if self.geometric_verification not in VERIFICATION_CHOICES:
            raise ValueError(f"geometric_verification must be one of {VERIFICATION_CHOICES}, "
                             f"got {self.geometric_verification!r}")
        reproj = _number("ransac_reproj_threshold", self.ransac_reproj_threshold, float)
        if not reproj > 0:
            raise ValueError(f"ransac_reproj_threshold must be > 0 pixels, "
                             f"got {self.ransac_reproj_threshold!r}")
        return EfficientLoFTRParams(threshold, max_matches, self.resize,
                                    self.geometric_verification, reproj)



def _number(name: str, value, kind: type):
    """``value`` as an int or float, or a ValueError naming the option (bools are refused)."""
    try:
        if isinstance(value, (bool, str)) or (kind is int and int(value) != value):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer (<= 0: unbounded)" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
