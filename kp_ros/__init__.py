"""kp_ros: learned visual features (SuperPoint, EfficientLoFTR) for ROS 2.

Installed, this package also holds the rosidl-generated ``kp_ros.msg``. Run from a
source checkout, ``extend_path`` lets ``kp_ros.msg`` resolve from the installed copy
while the modules come from the checkout.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
