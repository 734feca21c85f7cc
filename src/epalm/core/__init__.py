"""epalm.core."""
