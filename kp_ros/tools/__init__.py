"""Command-line tools: images_to_bag (folder -> bag), replay_bag (a bag published live over
ROS with rclpy) and kp_demo. Each module has ``main(argv=None) -> int``."""
