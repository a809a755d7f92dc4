"""vqtok's HTTP service: settings, image policy, ONNX engine, micro-batcher, routes, CLI.

Never imports torch: the serving image has numpy + onnxruntime only.
"""
