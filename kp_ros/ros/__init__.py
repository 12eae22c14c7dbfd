"""The thin ROS 2 shell of kp_ros: message conversion, QoS, the frame worker, nodes' base."""
