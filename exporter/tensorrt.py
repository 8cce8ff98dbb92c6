"""TensorRT: a serialized fp16 engine built from the ONNX graph, where the package and a GPU exist.

Building engines is not implemented yet; ``require_tensorrt`` gives the one clear error about
what is missing, so pipelines fail early and plainly.
"""

from __future__ import annotations

from clipship.errors import ClipshipError


def require_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ClipshipError(
            "--tensorrt needs the tensorrt package and an NVIDIA GPU (pip install tensorrt)"
            " (or serve the ONNX file with onnxruntime-gpu: clipship predict --provider tensorrt)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise ClipshipError("--tensorrt needs an NVIDIA GPU; none is visible here")
    raise ClipshipError(
        "building TensorRT engines is not implemented yet; use the ONNX file with "
        "onnxruntime-gpu's TensorRT provider (clipship predict --provider tensorrt)"
    )
