"""The datastore's view of volume formats: the shared check in `services.common.formats`.

Inference and the volume reader run the same check, so it lives in services/common; this
module keeps the datastore's imports (`formats.check_volume`, `formats.image_ext_from_name`).
"""

from __future__ import annotations

from services.common.formats import (
    DEFAULT_LIMITS,
    IMAGE_EXTS,
    LABEL_EXTS,
    VolumeHeader,
    VolumeLimits,
    check_volume,
    image_ext_from_name,
    label_ext_from_name,
)

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "VolumeHeader",
    "VolumeLimits",
    "check_volume",
    "image_ext_from_name",
    "label_ext_from_name",
]
