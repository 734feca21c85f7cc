"""epalm.training."""
