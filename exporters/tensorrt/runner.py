"""The TensorRT runner: :class:`TensorRTEngine` runs a serialized engine on torch CUDA tensors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from exporters.base import Engine, check_input_type, check_max_batch, resolve_convention
from exporters.tensorrt.environment import check_environment, read_sidecar, require_cuda
from kit.convention import InputConvention
from kit.errors import UserError
from kit.io import require_file

__all__ = ["TensorRTEngine"]


def _dims(d: Any) -> list[int]:
    return [int(d[i]) for i in range(len(d))]


class TensorRTEngine(Engine):
    """A serialized TensorRT engine, run with one execution context on torch CUDA tensors.

    Inputs and outputs are torch CUDA tensors whose addresses TensorRT reads and writes (``set_tensor_address``);
    ``execute_async_v3`` runs on the current torch CUDA stream, so nothing is copied through the host and work stays
    ordered with the caller's.

    Parameters
    ----------
    path : str or Path
        The ``.engine`` file; its ``.engine.json`` sidecar must be beside it.
    device : str or torch.device
        CUDA device.
    max_batch : int, optional
        Largest batch per call; at most the profile's maximum (the default).
    input_convention : InputConvention, optional
        What the engine takes when it is not the kit's [0, 1] NCHW float pixels (``--engine-input``); default: the
        sidecar's ``input_convention``, else the kit's own. One contradicting the sidecar is refused.

    Raises
    ------
    UserError
        A missing sidecar, an engine that does not match it, an engine built for another GPU or TensorRT version, no
        GPU or no TensorRT here.
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda", max_batch: int | None = None,
                 input_convention: InputConvention | None = None) -> None:
        file: Path = require_file(path, "TensorRT engine")
        side = read_sidecar(file)
        data = file.read_bytes()
        sha = "sha256:" + hashlib.sha256(data).hexdigest()
        if side["engine_sha256"] != sha:
            raise UserError(f"{file.name} does not match its sidecar's sha256 (modified, or another engine's sidecar)")
        check_environment(side, device, file.name)
        self._setup(data, side, file.name, require_cuda(device), max_batch,
                    resolve_convention(side, input_convention, file.name))

    @classmethod
    def from_serialized(cls, data: bytes, sidecar: dict[str, Any], name: str, device: str | torch.device = "cuda",
                        max_batch: int | None = None) -> TensorRTEngine:
        """An engine just built in this process (no file yet), e.g. for the parity check before writing."""
        self = cls.__new__(cls)
        self._setup(data, {**sidecar, "engine_sha256": "sha256:" + hashlib.sha256(data).hexdigest()}, name,
                    require_cuda(device), max_batch, resolve_convention(sidecar, None, name))
        return self

    def _setup(self, data: bytes, side: dict[str, Any], name: str, device: torch.device,
               max_batch: int | None, convention: InputConvention) -> None:
        import tensorrt as trt

        self.device = device
        self.sidecar = side
        self.sha256 = str(side["engine_sha256"])
        self.precision = str(side["precision"])
        twin = side.get("twin")
        weights = twin.get("weights_sha256") if isinstance(twin, dict) else None
        self.recorded_weights = weights if isinstance(weights, str) else ""
        self.name = f"{name} [tensorrt {side.get('tensorrt_version')}]"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise UserError(f"TensorRT could not deserialize {name} (see its log above)")
            self._engine = engine
            self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")
        self._in, self._out = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.UINT8: torch.uint8}
        in_type, out_type = engine.get_tensor_dtype(self._in), engine.get_tensor_dtype(self._out)
        if in_type not in dtypes or out_type not in dtypes or dtypes[out_type] is torch.uint8:
            raise UserError(f"{name}: input must be float32, float16 or uint8 and output float32 or float16, got "
                            f"{in_type} and {out_type}")
        check_input_type(str(dtypes[in_type]).removeprefix("torch."), convention, name)
        self._in_dtype, self._out_dtype = dtypes[in_type], dtypes[out_type]
        in_shape, out_shape = _dims(engine.get_tensor_shape(self._in)), _dims(engine.get_tensor_shape(self._out))
        if len(in_shape) != 4 or len(out_shape) != 2:
            raise UserError(f"{name}: input {in_shape} / output {out_shape}; expected (N, C, H, W) -> (N, K)")
        self._native = tuple(int(v) for v in in_shape[1:])  # what the engine takes per example (e.g. H, W, C)
        c, h, w = (in_shape[3], in_shape[1], in_shape[2]) if convention.layout == "nhwc" else in_shape[1:]
        self.input_shape = (int(c), int(h), int(w))
        self.num_classes = int(out_shape[1]) if out_shape[1] > 0 else int(side["num_classes"])
        profile_max = _dims(engine.get_tensor_profile_shape(self._in, 0)[2])[0]
        self.profile_max = int(profile_max)
        chosen = check_max_batch(max_batch if max_batch is not None else self.profile_max)
        if chosen > self.profile_max:
            raise UserError(f"{name} was built for batches of at most {self.profile_max}; max batch {chosen} is larger")
        self.max_batch = chosen
        self.use_convention(convention)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.detach().to(self.device, self._in_dtype).contiguous()
        shape = (int(xin.shape[0]), *self._native)
        ctx = self._context
        if not ctx.set_input_shape(self._in, shape):
            raise RuntimeError(f"{self.name}: TensorRT refused input shape {shape}")
        out = torch.empty((shape[0], self.num_classes), dtype=self._out_dtype, device=self.device)
        ctx.set_tensor_address(self._in, xin.data_ptr())
        ctx.set_tensor_address(self._out, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return out

    def describe(self) -> dict[str, Any]:
        """What the engine is, with its sidecar."""
        return {**super().describe(), "sidecar": self.sidecar}
