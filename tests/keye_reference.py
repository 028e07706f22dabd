"""``keye-vl-utils`` 1.5.2 (Keye-VL 1.5's released preprocessing) imported without torchvision.

The package imports ``torchvision`` (``io``, ``transforms.InterpolationMode``) at load time but the
functions the tests compare (``smart_resize``, ``fetch_image``, ``smart_nframes``,
``extract_slow_fast_frames``, ``fetch_video`` on a file) never call it. torchvision has no build
for our CPU torch and must never enter the CPU path, so a stub stands in for it ONLY while the
package is imported; it is taken out of ``sys.modules`` again right after (transformers probes
``torchvision`` with ``find_spec``, which a spec-less module in ``sys.modules`` would break).
Any use of the stub beyond the names the import needs raises.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

_STUBBED = ("torchvision", "torchvision.io", "torchvision.transforms")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"stub {self.__name__}.{name} used: the keye-vl-utils function under "
                           "test called torchvision, which the comparison assumes it does not")


def _stub_torchvision() -> dict[str, types.ModuleType]:
    root = _StubModule("torchvision")
    io = _StubModule("torchvision.io")
    transforms = _StubModule("torchvision.transforms")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    transforms.__dict__["InterpolationMode"] = InterpolationMode
    root.__dict__.update(io=io, transforms=transforms)
    return {"torchvision": root, "torchvision.io": io, "torchvision.transforms": transforms}


def import_keye_vl_utils() -> types.ModuleType:
    """``keye_vl_utils.vision_process``, imported with the stub torchvision."""
    name = "keye_vl_utils.vision_process"
    if name in sys.modules:
        return sys.modules[name]
    saved = {key: sys.modules.get(key) for key in _STUBBED}
    sys.modules.update(_stub_torchvision())
    try:
        return importlib.import_module(name)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
