"""Command-line tools: images_to_bag, process_bag (offline, rosbags only) and replay_bag
(publishes over ROS with rclpy). Each module has ``main(argv=None) -> int``."""
