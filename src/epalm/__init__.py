"""epalm: give a frozen causal language model perception (eP-ALM, Shukor et al., ICCV 2023)."""

__version__ = "0.1.0"

from epalm.core.config import EPALMConfig, VARIANTS  # noqa: E402
from epalm.core.model import EPALM, EPALMOutput  # noqa: E402
from epalm.data.processor import EPALMProcessor  # noqa: E402

__all__ = ["EPALM", "EPALMConfig", "EPALMOutput", "EPALMProcessor", "VARIANTS"]
