"""ControlNet: the control models users download (`loading`) and the image preprocessors that
make their hint images (`preprocess`). The network is `sdlab.models.controlnet.ControlNet`; the UNet
takes its residuals through `UNet.forward(..., control=...)`.

`preprocess` needs OpenCV (`pip install "sdlab[controlnet]"`), imported when a preprocessor runs.
"""

from sdlab.controlnet.loading import (
    ControlFileInfo,
    check_compatible,
    control_file_info,
    control_kind,
    controlnet_from_state_dict,
    inspect_control_file,
    load_controlnet,
)

__all__ = ["ControlFileInfo", "check_compatible", "control_file_info", "control_kind", "controlnet_from_state_dict",
           "inspect_control_file", "load_controlnet"]
