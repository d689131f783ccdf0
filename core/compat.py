"""Environment fixes that must run before third-party imports. Each is a no-op where it is not needed."""
import torch


def fix_torchvision_ops() -> None:
    """Let `import torchvision` succeed beside a CPU torch when the installed torchvision is a CUDA build.

    The registry's torchvision 0.28.0 wheel is built for CUDA; its compiled ops cannot load beside the CPU torch
    used on CPU machines, and `import torchvision` (hence open_clip, timm, clean-fid) then fails with
    "operator torchvision::nms does not exist". Declaring the two op schemas first is enough for the import.
    On a matching install the ops exist and nothing is done.
    """
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup raises if the op is missing
        return
    except (AttributeError, RuntimeError):
        pass
    global _TV_LIB
    _TV_LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as the object
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_TV_LIB = None
