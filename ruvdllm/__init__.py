"""ruvdllm: a runtime for masked-diffusion language models (see README.md).

``load`` and ``Runtime`` are imported on first use (PEP 562), so ``import ruvdllm`` stays
light and ``python -m ruvdllm.corpus`` (or ``.tokenizer``, ``.quant``) runs its module
once, not after the package already imported it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ruvdllm.runtime import Runtime, load

__all__ = ["Runtime", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ruvdllm import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'ruvdllm' has no attribute {name!r}")
