"""What two stages or more share: artifacts, datasets, networks, CAM, metrics, training."""
