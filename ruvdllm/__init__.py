"""ruvdllm: a runtime for masked-diffusion language models (see README.md)."""

from ruvdllm.runtime import Runtime, load

__all__ = ["Runtime", "load"]
