"""Twin builders for models trained elsewhere, one module per kind of source, none importing another.

- :mod:`kit.twins.layouts`: weights files read without unpickling code, the state dict found in released layouts,
  strict loading that names the first offending tensor;
- :mod:`kit.twins.from_program`: ``torch.export`` programs (``.pt2``), checked before torch reads them;
- :mod:`kit.twins.from_onnx`: an ONNX graph as a differentiable torch module (:class:`~kit.twins.from_onnx.OnnxModule`);
- :mod:`kit.twins.hub`: ``timm:NAME`` / ``torchvision:NAME`` architectures (optional packages, nothing downloaded).

The front door that picks one and folds the model's input convention in is :mod:`exporters.twins` (it checks an
ONNX twin against ONNX Runtime, which this layer may not import).
"""
