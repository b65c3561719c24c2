"""Serving: the scheduler (engine), the OpenAI-compatible HTTP server, and the Triton model. Torch-free, like the runtime."""
