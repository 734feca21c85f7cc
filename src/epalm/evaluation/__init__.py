"""epalm.evaluation."""
