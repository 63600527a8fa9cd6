"""The TensorFlow runtime: a SavedModel signature served through ``tf.saved_model.load``, the
reference every peer is compared with (it converts to nothing: the SavedModel is the source)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import numpy as np

from ..errors import UserError, first_line
from ..runtime import native_output_silenced
from .base import LoadOptions, Predictor, input_rows


class TFPredictor(Predictor):
    """A SavedModel signature through ``tf.saved_model.load``.

    TensorFlow's thread pools are process-wide and fixed at start-up, so ``threads`` is not applied
    here: set ``tf.config.threading`` before the first TensorFlow op (see ``scripts/bench_peers.py``).
    """

    format = "tf"

    def __init__(self, artefact: str, loaded, signature_fn, constant, load_seconds: float) -> None:
        specs = signature_fn.structured_input_signature[1]
        super().__init__(artefact, load_seconds, sorted(specs))
        self._loaded = loaded  # the signature's variables live as long as the loaded object
        self._signature = signature_fn
        self._constant = constant
        self._dtypes = {key: spec.dtype for key, spec in specs.items()}

    @classmethod
    def open(cls, path: str | Path, options: LoadOptions) -> Self:
        artefact = options.artefact(path)
        if not (Path(path) / "saved_model.pb").is_file():
            raise UserError(f"{artefact}: not a SavedModel (no saved_model.pb)")
        with native_output_silenced():
            import tensorflow as tf

            start = time.perf_counter()
            try:
                loaded = tf.saved_model.load(str(path), tags=["serve"])
            except (OSError, ValueError, tf.errors.OpError) as error:
                raise UserError(f"{artefact}: cannot load SavedModel ({first_line(error)})") from None
            seconds = time.perf_counter() - start
        signature = options.signature
        if signature not in loaded.signatures:
            raise UserError(f"{artefact}: no signature '{signature}' (has {', '.join(sorted(loaded.signatures))})")
        return cls(artefact, loaded, loaded.signatures[signature], tf.constant, seconds)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        input_rows(self.artefact, inputs, self.input_keys)
        tensors = {key: self._constant(np.asarray(inputs[key]), dtype=dtype) for key, dtype in self._dtypes.items()}
        outputs = self._signature(**tensors)
        return {name: value.numpy() for name, value in outputs.items()}


PREDICTOR = TFPredictor
