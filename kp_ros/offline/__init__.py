"""Offline processing: ``process_bag`` (one bag, every frame, deterministic) and
``process_bags`` (many bags in parallel with Ray), through the same pipeline as the nodes."""
