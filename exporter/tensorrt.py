"""TensorRT: a serialized fp16 engine built from the validated ONNX graph (``--tensorrt``).

The engine is built from the fp16 ONNX variant (float32 inputs and outputs) as a strongly typed
network: the graph's own types decide the precision. That is the only mode TensorRT 11 has
(``BuilderFlag.FP16`` is gone there) and an opt-in flag in 10.x, so one code path serves both.
One optimisation profile covers batch sizes 1 … ``max_batch`` (tuned for 32). It is
validated like the ONNX variants, through :class:`EngineSession`, which runs it on CUDA tensors
owned by torch (no pycuda). Engines are specific to the GPU model and TensorRT version, which
``export.json`` records. Without the ``tensorrt`` package or a GPU, :func:`require_tensorrt`
says which is missing before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipship.errors import ClipshipError

ENGINE_FILE = "model_fp16.engine"


def require_tensorrt() -> None:
    """One clear error when the tensorrt package or an NVIDIA GPU is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ClipshipError(
            "`tensorrt` needs the tensorrt package and an NVIDIA GPU "
            "(clipship's `tensorrt` extra; in a checkout: pip install -e '.[tensorrt]'); or serve "
            "the ONNX file with onnxruntime-gpu's TensorRT provider "
            "(`clipship predict --provider tensorrt`)",
            option="tensorrt",
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise ClipshipError(
            "`tensorrt` needs an NVIDIA GPU; none is visible here", option="tensorrt"
        )


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.ERROR)


def build_engine(
    fp16_onnx: Path, target: Path, input_shape: tuple[int, int, int], max_batch: int = 64
) -> dict[str, Any]:
    """Build and write the serialized engine from the fp16 ONNX graph; returns what
    ``export.json`` records."""
    import tensorrt as trt
    import torch

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(fp16_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ClipshipError(f"TensorRT cannot parse {fp16_onnx.name}: {errors}")
    config = builder.create_builder_config()
    opt = min(32, max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        "pixel_values", (1, *input_shape), (opt, *input_shape), (max_batch, *input_shape)
    )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ClipshipError("TensorRT could not build an engine for this graph (see its log)")
    target.write_bytes(bytes(serialized))
    return {
        "file": target.name,
        "precision": "fp16",
        "batch_profile": {"min": 1, "opt": opt, "max": max_batch},
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }


class EngineSession:
    """``run(names, {"pixel_values": array})`` like an onnxruntime session, on the GPU."""

    def __init__(self, path: Path):
        import tensorrt as trt
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ClipshipError(f"{path}: not a TensorRT engine for this GPU and version")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()  # not the legacy default stream: no implicit syncs
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        trt = self.trt
        wanted_dtype = trt.nptype(self.engine.get_tensor_dtype("pixel_values"))
        pixels = np.ascontiguousarray(feeds["pixel_values"], dtype=wanted_dtype)
        pixels = torch.from_numpy(pixels).cuda(non_blocking=False)
        if not self.context.set_input_shape("pixel_values", tuple(pixels.shape)):
            raise ClipshipError(
                f"batch {pixels.shape[0]} is outside the engine's profile (see export.json)"
            )
        self.context.set_tensor_address("pixel_values", pixels.data_ptr())
        outputs = {}
        for name in self.names:
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name))))
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=dtype.dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the input copy is done
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ClipshipError("TensorRT engine execution failed")
        self.stream.synchronize()
        wanted = names or [n for n in self.names if n in outputs]
        return [outputs[n].float().cpu().numpy() for n in wanted]
