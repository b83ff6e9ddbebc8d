"""Make PyPI's CUDA-built torchvision importable next to the CPU build of torch.

torchvision's C extension cannot load against torch's CPU build, and its Python
side then fails on `torchvision::nms` being undefined. Defining the two op
schemas before torchvision is imported (from a .pth file, so every vLLM
subprocess gets it too) is enough for the tensor transforms vLLM's Qwen-VL
code uses. Installed only when `import torchvision` actually fails.
"""

import pathlib
import subprocess
import sys
import sysconfig

MODULE_NAME = "_vlm_servicer_torchvision_ops"
MODULE_TEXT = '''"""Op schemas torchvision's Python side needs (written by vlm-servicer's setup)."""
import torch

for _op in ("nms", "qnms"):
    try:
        torch.library.define(
            f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
    except Exception:  # already defined (a working torchvision, or a second import)
        pass
'''


def torchvision_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def main() -> int:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    module, pth = site / f"{MODULE_NAME}.py", site / f"{MODULE_NAME}.pth"
    if torchvision_imports():
        print("torchvision imports cleanly; no workaround needed")
        return 0
    module.write_text(MODULE_TEXT)
    pth.write_text(f"import {MODULE_NAME}\n")
    if not torchvision_imports():
        module.unlink()
        pth.unlink()
        print("torchvision still fails to import after the op-schema workaround", file=sys.stderr)
        return 1
    print(f"torchvision: CUDA build next to CPU torch; installed op-schema workaround {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
