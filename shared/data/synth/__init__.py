"""Procedural synthetic fundus photographs with controllable DR, myopic maculopathy and neuro signs.

`render_fundus(FundusSpec(...), CAMERA_STYLES[name], height)` returns the image and exact lesion masks.
"""

from shared.data.synth.render import (
    CAMERA_STYLES,
    MASK_KEYS,
    CameraStyle,
    FundusSpec,
    Rendered,
    render_fundus,
)

__all__ = ["CAMERA_STYLES", "MASK_KEYS", "CameraStyle", "FundusSpec", "Rendered", "render_fundus"]
