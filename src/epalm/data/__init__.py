"""Data for eP-ALM: readers of the official benchmark formats, media decoding, text and datasets.

* :mod:`.readers` -- VQA v2 (standard and Karpathy), GQA, COCO Karpathy captions, MSRVTT-QA,
  MSVD-QA, MSR-VTT captions, AudioCaps -> lists of :class:`QASample` / :class:`CaptionSample`
  (its module docstring documents the expected directory layouts);
* :mod:`.image`, :mod:`.video`, :mod:`.audio` -- media loaders returning encoder-ready tensors
  (PyAV and soundfile are imported only when a video/audio file is read);
* :mod:`.text` -- templates, tokenization with answer-only or full labels, collation;
* :mod:`.datasets` -- :class:`VQADataset`, :class:`CaptionDataset`.
"""

# The package re-exports each submodule's public names (its ``__all__``): one list per module.
from epalm.data import audio, datasets, image, readers, records, text, video
from epalm.data.audio import *  # noqa: F401,F403
from epalm.data.datasets import *  # noqa: F401,F403
from epalm.errors import AnnotationError, MediaError  # the data errors (they live with the others)
from epalm.data.image import *  # noqa: F401,F403
from epalm.data.readers import *  # noqa: F401,F403
from epalm.data.records import *  # noqa: F401,F403
from epalm.data.text import *  # noqa: F401,F403
from epalm.data.video import *  # noqa: F401,F403

__all__ = ["AnnotationError", "MediaError"] + [name for module in (records, readers, image, video, audio, text, datasets)
                                               for name in module.__all__]
