"""Pure core of kp_ros: preprocessing, models, post-processing, visualization.

Nothing in this package imports rclpy; arrays and tensors in, arrays and tensors out.
"""
