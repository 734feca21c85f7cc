"""epalm.interface."""
