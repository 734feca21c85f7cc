"""epalm.recipes."""
