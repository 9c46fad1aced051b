"""The expected tensors of one adapter bank, and the flat vector view aggregators work on.

Robust aggregators treat each node's bank update as one vector in R^d; `BankLayout` fixes
the order (tensor names sorted) and shapes so flatten/unflatten are exact inverses and every
node's vector lines up coordinate by coordinate.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import numpy as np


@dataclass(frozen=True)
class BankLayout:
    """Names and shapes of one bank's trained tensors (e.g. the LoRA B matrices)."""

    shapes: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("a bank layout needs at least one tensor")
        for name, shape in self.shapes.items():
            if not shape or any(int(s) < 1 for s in shape):
                raise ValueError(f"tensor {name!r} has invalid shape {shape}")
        object.__setattr__(
            self, "shapes", {k: tuple(int(s) for s in self.shapes[k]) for k in sorted(self.shapes)}
        )

    @property
    def size(self) -> int:
        """Number of scalars in the bank (the dimension d of its flat vector)."""
        return sum(prod(shape) for shape in self.shapes.values())

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the tensors (sorted by name) into one float64 vector."""
        if set(tensors) != set(self.shapes):
            raise ValueError(f"tensors {sorted(tensors)} do not match layout {list(self.shapes)}")
        parts = []
        for name, shape in self.shapes.items():
            array = np.asarray(tensors[name], dtype=np.float64)
            if array.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
            parts.append(array.ravel())
        return np.concatenate(parts)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector back into float32 tensors of the layout's shapes."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, expected ({self.size},)")
        out, start = {}, 0
        for name, shape in self.shapes.items():
            end = start + prod(shape)
            out[name] = flat[start:end].reshape(shape).astype(np.float32)
            start = end
        return out
