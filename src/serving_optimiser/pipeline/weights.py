"""The trained weights file, models/weights.npz: (kernel, bias) per Dense layer, input to output.

Apart from training so that the export stage, which only reads the file, does not depend on how
the weights were trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError


def save_weights(weights: list[tuple[np.ndarray, np.ndarray]], path: str | Path) -> None:
    """Save the inference weights as an .npz (no optimiser slots)."""
    from ..atomic import atomic_file

    arrays = {}
    for index, (kernel, bias) in enumerate(weights):
        arrays[f"layer{index}_kernel"] = kernel
        arrays[f"layer{index}_bias"] = bias
    with atomic_file(path, "wb") as stream:
        np.savez(stream, **arrays)


def load_weights(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found (run the train stage first)")
    with np.load(path) as data:
        count = len(data.files) // 2
        return [(data[f"layer{i}_kernel"], data[f"layer{i}_bias"]) for i in range(count)]
