"""BEN2 (Background Erase Network 2) background removal, written for EditKit.

The network (:class:`BEN2Base`) reproduces the published BEN2 Base architecture and state
dict, so the MIT-licensed checkpoint from the PramaLLC/BEN2 model page loads strictly; no
code from that project is used or executed. Modules:

* :mod:`.config` sizes, :mod:`.swin` backbone, :mod:`.decoder` multi-view blocks, :mod:`.model` the network;
* :mod:`.checkpoint` file reading/validation/writing;
* :mod:`.inference` resizing, normalisation and chunked prediction;
* :mod:`.postprocess` mask shaping, foreground colour estimation, compositing;
* :mod:`.pipeline` the end-to-end removal used by the nodes.
"""

from .checkpoint import load_ben2, read_state_dict, save_ben2_checkpoint, validate_state_dict
from .config import SIZE_MULTIPLE, BEN2Config
from .inference import predict_masks, processing_size
from .model import BEN2Base
from .pipeline import RemovalSettings, apply_matte, remove_background
from .postprocess import (
    composite,
    estimate_foreground,
    feather_mask,
    grow_mask,
    invert_mask,
    parse_hex_color,
    refine_mask,
    threshold_mask,
)

__all__ = [
    "SIZE_MULTIPLE",
    "BEN2Base",
    "BEN2Config",
    "RemovalSettings",
    "apply_matte",
    "composite",
    "estimate_foreground",
    "feather_mask",
    "grow_mask",
    "invert_mask",
    "load_ben2",
    "parse_hex_color",
    "predict_masks",
    "processing_size",
    "read_state_dict",
    "refine_mask",
    "remove_background",
    "save_ben2_checkpoint",
    "threshold_mask",
    "validate_state_dict",
]
