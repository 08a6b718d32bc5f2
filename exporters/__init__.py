"""Export to ONNX and TensorRT, and the runners that execute exported artifacts."""
