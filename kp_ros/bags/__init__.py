"""rosbag2 bags without a ROS install (through ``rosbags``): reading frames, writing
outputs atomically, building kp_ros messages, finding bags in folders."""
