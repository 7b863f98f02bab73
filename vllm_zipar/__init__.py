"""vllm-zipar: autoregressive image generation in vLLM's V1 engine, with ZipAR parallel decoding."""

__version__ = "0.1.0"
