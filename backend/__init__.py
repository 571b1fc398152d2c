"""krita-sdxl backend: the ZeroMQ service, its job queue, the diffusers pipelines and the CLI."""
