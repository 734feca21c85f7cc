"""epalm: give a frozen causal language model perception (eP-ALM, Shukor et al., ICCV 2023)."""

__version__ = "0.1.0"
