"""The ONNX Runtime runner: :class:`OnnxRuntimeEngine` runs an ONNX file on the CPU, CUDA or TensorRT provider.

It imports no ``onnx`` package: the file is read with :func:`exporters.graph.read_graph` and checked by ONNX Runtime.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from exporters.base import Engine, check_input_type, check_max_batch, resolve_convention
from exporters.formats import DEFAULT_MAX_BATCH, ORT_PROVIDERS
from exporters.graph import (
    Interface,
    external_data_files,
    first_line,
    graph_interface,
    infer_precision,
    read_graph,
    read_metadata,
    uses_external_data,
)
from exporters.onnx.model import combined_sha256
from exporters.onnxproto import TensorType
from kit.convention import InputConvention
from kit.errors import UserError
from kit.runtime import run_fixed_batch

__all__ = ["PROVIDERS", "OnnxRuntimeEngine"]

log = logging.getLogger(__name__)

PROVIDERS = ORT_PROVIDERS


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(c for c in (getattr(state, n, None) for n in names) if isinstance(c, type)) + (RuntimeError,)


#: ONNX element types of the float tensors the runner binds (what ``IOBinding`` takes for ``element_type``).
_ONNX_ELEMENT = {np.float32: int(TensorType.FLOAT), np.float16: int(TensorType.FLOAT16),
                 np.uint8: int(TensorType.UINT8)}
_TORCH_TYPES = {np.float32: torch.float32, np.float16: torch.float16, np.uint8: torch.uint8}


class _CpuBinding(NamedTuple):
    """ONNX Runtime's C-level IO binding for the CPU (what ``InferenceSession.run_with_iobinding`` itself calls), with
    everything a call needs resolved once.

    ``InferenceSession.run`` spends several microseconds per call in Python (graph-capture and input-name checks,
    numpy wrapping of the input and the output), as does the public ``IOBinding`` wrapper (an ``OrtDevice`` built per
    bind). At batch 1 on a small model that is 10-20 % of the inference, so the runner binds the caller's torch input
    and a fresh output buffer by address on the C-level objects directly. A tuple, so a call unpacks it in one step.
    """

    new: Callable[[], Any]  # a fresh C-level SessionIOBinding on the session
    run: Callable[[Any, Any], Any]  # the C-level session's run_with_iobinding(binding, run_options)
    device: Any  # the C-level OrtDevice of the CPU
    input_name: str
    input_element: int  # ONNX element type of the input (float or float16)
    output_name: str
    output_element: int
    output_dtype: Any  # numpy dtype of the output buffer
    num_classes: int


def _cpu_binding(session: Any, io: Interface) -> _CpuBinding | None:
    """The C-level IO binding of ``session``, or None when this ONNX Runtime does not expose it as expected.

    Uses ``InferenceSession._sess`` and ``onnxruntime.capi._pybind_state.SessionIOBinding``, the objects the public
    wrappers delegate to (checked with ONNX Runtime 1.31; not a public API, so they are probed here once): when they
    are missing the runner uses ``InferenceSession.run``, which gives the same logits, a few microseconds slower.
    """
    import onnxruntime as ort

    try:
        from onnxruntime.capi import _pybind_state as capi

        sess = session._sess
        run = sess.run_with_iobinding
        device = ort.OrtDevice.make("cpu", 0)._get_c_device()
        capi.SessionIOBinding(sess)
    except (ImportError, AttributeError, TypeError, RuntimeError) as e:
        log.info("ONNX Runtime %s exposes no C-level IO binding (%s); the runner uses InferenceSession.run",
                 ort.__version__, first_line(e))
        return None
    return _CpuBinding(new=functools.partial(capi.SessionIOBinding, sess), run=run, device=device,
                       input_name=io.input_name, input_element=_ONNX_ELEMENT[io.input_dtype],
                       output_name=io.output_name, output_element=_ONNX_ELEMENT[io.output_dtype],
                       output_dtype=io.output_dtype, num_classes=io.num_classes)


class OnnxRuntimeEngine(Engine):
    """An ONNX file run by ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    The session is created with exactly the providers asked for; each must be available and active after creation
    (no silent fallback to the CPU), and the session's run-time fallback is disabled. On CUDA, inputs and outputs are
    bound to torch CUDA tensors (IO binding), so batches stay on the GPU; the CUDA provider runs with TF32 off for FP32
    parity (the TensorRT provider cannot turn it off: :attr:`parity_runtime`).

    On the CPU the runner adds only a few microseconds to the session's own run (``bench/engines.py``; figures in
    docs/BENCHMARKS.md): names, element types and the expected shape are resolved once here; a call checks the
    shape, dtype and device on the tensor's metadata (no pass over the pixels), binds the caller's contiguous CPU
    tensor and a fresh output tensor by address through ONNX Runtime's IO binding (one binding per thread, so
    concurrent callers do not share one), and returns that output: no numpy round trip, no copy of either side.

    Parameters
    ----------
    source : str, Path or bytes
        The ONNX file (or its bytes).
    device : str or torch.device
        Where the session computes; CUDA providers need a CUDA device.
    providers : sequence of str, optional
        Short names from :data:`PROVIDERS`; default ``["cpu"]`` on a CPU device, ``["cuda"]`` on a CUDA device.
        ``"tensorrt"`` runs with CUDA behind it for the nodes TensorRT does not take.
    max_batch : int, optional
        Largest batch per session run; default: the file's ``otkit.max_batch``, else 256.
    name : str, optional
        Label (default: the file name).
    input_convention : InputConvention, optional
        What the graph takes when it is not the kit's [0, 1] NCHW float pixels (``--engine-input``): normalised,
        0-255, NHWC or uint8 input, mapped outside the graph. Default: what the file's ``otkit.input_convention``
        records, else the kit's own. A convention that contradicts the file's record is refused.

    Raises
    ------
    UserError
        Corrupt or truncated file, a graph that is not (N, C, H, W) -> (N, K), an unknown or unavailable provider, an
        input convention that contradicts the file or its input type.
    """

    backend = "onnxruntime"

    def __init__(self, source: str | Path | bytes, device: str | torch.device = "cpu",
                 providers: Sequence[str] | None = None, max_batch: int | None = None,
                 name: str | None = None, input_convention: InputConvention | None = None,
                 convention_flag: str = "--engine-input") -> None:
        import onnxruntime as ort

        proto, data, label = read_graph(source)  # no onnx import: ONNX Runtime checks the graph below
        external = [] if isinstance(source, (bytes, bytearray)) or not uses_external_data(proto) else \
            external_data_files(proto, source)
        self.metadata = read_metadata(proto)
        convention = resolve_convention(self.metadata, input_convention, label, convention_flag)
        self._io = graph_interface(proto, label, self.metadata, layout=convention.layout)
        check_input_type(np.dtype(self._io.input_dtype).name, convention, label)
        self.device = torch.device(device)
        short = [p.strip().lower() for p in (providers or (["cpu"] if self.device.type == "cpu" else ["cuda"]))]
        unknown = [p for p in short if p not in PROVIDERS]
        if unknown:
            raise UserError(f"unknown ONNX Runtime provider(s) {', '.join(unknown)}; use {', '.join(PROVIDERS)}")
        gpu = [p for p in short if p != "cpu"]
        if gpu and self.device.type != "cuda":
            raise UserError(f"provider(s) {', '.join(gpu)} run on a CUDA device, not {self.device} (use --device cuda)")
        if not gpu and self.device.type != "cpu":
            raise UserError(f"provider cpu runs on the CPU, not {self.device}")
        if "tensorrt" in short and "cuda" not in short:
            short.append("cuda")  # TensorRT hands the nodes it does not take to CUDA, never silently to the CPU
        wanted = [PROVIDERS[p] for p in short]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UserError(f"ONNX Runtime {ort.__version__} has no {', '.join(missing)} here (available: "
                            f"{', '.join(available)}); on a CUDA machine keep onnxruntime-gpu alone: pip uninstall -y "
                            "onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu")
        index = self.device.index if self.device.index is not None else (
            torch.cuda.current_device() if self.device.type == "cuda" else 0)
        options = {
            # HEURISTIC: the default EXHAUSTIVE search benchmarks every convolution again for each new batch size, and
            # attacks call the engine on ever smaller subsets of the batch
            "CUDAExecutionProvider": {"device_id": str(index), "use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"},
            "TensorrtExecutionProvider": {"device_id": str(index), "trt_fp16_enable": "False"},
            "CPUExecutionProvider": {},
        }
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.device.type == "cpu":  # the process's thread count (OMP_NUM_THREADS, torch.set_num_threads) holds for
            so.intra_op_num_threads = torch.get_num_threads()  # both: torchrun's workers must not oversubscribe
        try:
            # a model with external data is opened from its path: ONNX Runtime finds the data from the model's folder
            self._session = ort.InferenceSession(str(source) if external else data, sess_options=so, providers=wanted,
                                                 provider_options=[options[p] for p in wanted])
        except _ort_errors() as e:
            raise UserError(f"ONNX Runtime cannot open {label}: {first_line(e)}") from e
        active = self._session.get_providers()
        inactive = [p for p in wanted if p not in active]
        if inactive:
            raise UserError(f"ONNX Runtime did not activate {', '.join(inactive)} for {label} (active: "
                            f"{', '.join(active)}); check the CUDA / TensorRT libraries")
        self._session.disable_fallback()
        self.providers = active
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        self._index = index
        self.input_shape = self._io.input_shape
        self.num_classes = self._io.num_classes
        self.precision = str(self.metadata.get("precision") or infer_precision(proto))
        self.exporter = str(self.metadata.get("exporter") or f"{proto.producer_name} {proto.producer_version}".strip())
        self.sha256 = combined_sha256(data, external)  # engine_sha256: external data files included
        weights = self.metadata.get("weights_sha256")  # the kit's exports record their twin's weights
        self.recorded_weights = weights if isinstance(weights, str) else ""
        recorded = self.metadata.get("max_batch")
        default = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else DEFAULT_MAX_BATCH
        self.max_batch = check_max_batch(max_batch if max_batch is not None else default)
        # a graph with a fixed batch size (torch.onnx.export without dynamic_axes writes 1) runs that many inputs per
        # call whatever was asked; a smaller last chunk is padded (_run)
        self._static_batch = self._io.static_batch
        if self._static_batch is not None:
            if max_batch is not None and max_batch != self._static_batch:
                log.warning("note: %s fixes its batch size at %d: it runs %d input(s) per call, not %d", label,
                            self._static_batch, self._static_batch, max_batch)
            self.max_batch = self._static_batch
        base = name or (Path(label).name if not isinstance(source, (bytes, bytearray)) else "model.onnx")
        self.name = f"{base} [onnxruntime {'+'.join(short)}]"
        # Everything a call needs, resolved once: the per-call path reads plain attributes only.
        self._torch_in = _TORCH_TYPES[self._io.input_dtype]
        self._torch_out = _TORCH_TYPES[self._io.output_dtype]
        self._outputs = [self._io.output_name]
        self._cuda = self.device.type == "cuda"
        self._fast = None if self._cuda else _cpu_binding(self._session, self._io)
        # __call__ serves float32 logits straight from the binding; a float16 output goes the general way (converted)
        # and so does an input convention (mapped by Engine before _run)
        self._fast_call = self._fast if (self._torch_out is torch.float32 and convention.identity
                                          and (self._static_batch or 1) == 1) else None
        self._local = threading.local()  # one IO binding per calling thread
        self.use_convention(convention)

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` (for benchmarks and inspection)."""
        return self._session

    @property
    def io_names(self) -> tuple[str, str]:
        """Names of the graph's input and output."""
        return self._io.input_name, self._io.output_name

    @property
    def io_binding(self) -> bool:
        """Whether calls bind torch memory directly (always on CUDA; on the CPU when ONNX Runtime allows it)."""
        return self._cuda or self._fast is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``: float32 (N, num_classes) on ``x.device`` (see :meth:`Engine.__call__`).

        The common case, a contiguous CPU tensor of the graph's input dtype with 1 to ``max_batch`` inputs, is served
        here with the fewest possible touches of torch (shape, dtype, device, contiguity, address, one allocation):
        right after an inference each of them runs with cold caches and costs about a microsecond. Every other case
        (other dtype or device, strided views, empty or oversized batches, bad input) takes the general path of
        :class:`Engine`, with the same results.
        """
        fast = self._fast_call
        if fast is not None and type(x) is torch.Tensor:
            shape = x.shape
            if (len(shape) == 4 and shape[1:] == self.input_shape and x.dtype is self._torch_in and x.is_cpu
                    and x.is_contiguous() and 0 < shape[0] <= self.max_batch):
                return self._run_bound_cpu(fast, x, shape)
        return super().__call__(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        fixed = self._static_batch
        if fixed is not None and x.shape[0] < fixed:  # a fixed-batch graph: the last chunk padded
            return run_fixed_batch(self._run, x, fixed)
        if self._cuda:
            return self._run_bound(x)
        if x.dtype is not self._torch_in or not x.is_cpu:
            x = x.to("cpu", self._torch_in)
        if self._fast is None:
            return self._run_numpy(x)
        if not x.is_contiguous():
            x = x.contiguous()
        return self._run_bound_cpu(self._fast, x, x.shape)

    def _run_bound_cpu(self, fast: _CpuBinding, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Run a contiguous CPU batch of the input dtype through this thread's IO binding into a fresh tensor.

        The output is allocated by numpy and wrapped by ``torch.from_numpy``: ``torch.empty`` goes through the
        dispatcher and costs several microseconds more per call right after an inference (measured on the loaded
        2-core development machine).
        """
        new, run, device, input_name, input_element, output_name, output_element, output_dtype, k = fast
        n = shape[0]
        out = torch.from_numpy(np.empty((n, k), output_dtype))
        try:
            binding = self._local.binding
        except AttributeError:
            binding = self._local.binding = new()
        # The binding holds raw addresses: both tensors stay alive (referenced here) until the run has returned, and
        # every call rebinds both before running, so a stale address is never read.
        binding.bind_input(input_name, device, input_element, shape, x.data_ptr())
        binding.bind_output(output_name, device, output_element, (n, k), out.data_ptr())
        run(binding, None)
        return out

    def _run_numpy(self, x: torch.Tensor) -> torch.Tensor:
        """The public ``InferenceSession.run`` on a numpy view of ``x`` (a CPU tensor of the input dtype)."""
        arr = x.detach().numpy() if x.requires_grad else x.numpy()  # zero-copy either way
        (out,) = self._session.run(self._outputs, {self._io.input_name: arr})
        return torch.from_numpy(out)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """IO binding: ONNX Runtime reads the input from and writes the logits into torch CUDA memory."""
        xin = x.detach().to(self.device, self._torch_in).contiguous()
        out = torch.empty((int(xin.shape[0]), self.num_classes), dtype=self._torch_out, device=self.device)
        binding = self._session.io_binding()
        binding.bind_input(self._io.input_name, device_type="cuda", device_id=self._index,
                           element_type=self._io.input_dtype, shape=tuple(xin.shape), buffer_ptr=xin.data_ptr())
        binding.bind_output(self._io.output_name, device_type="cuda", device_id=self._index,
                            element_type=self._io.output_dtype, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input is written before ONNX Runtime reads it
        self._session.run_with_iobinding(binding)  # returns once the outputs are written
        return out

    @property
    def parity_runtime(self) -> str:
        """``tensorrt`` when ONNX Runtime's TensorRT provider runs the graph: it builds TensorRT kernels and, unlike the
        kit's own TensorRT build, cannot turn TF32 off (no provider option), so it gets TensorRT's FP32 tolerance."""
        return "tensorrt" if "TensorrtExecutionProvider" in self.providers else "onnxruntime"

    def describe(self) -> dict[str, Any]:
        """What the engine is, with the active providers."""
        return {**super().describe(), "providers": list(self.providers)}
