"""Keras model files in: a Keras 3 ``.keras`` file, or a Keras 2 ``.h5`` through tf-keras, exported
as a SavedModel with a ``serving_default`` signature the rest of the tool reads.

Published models often ship as Keras files, not SavedModels (``fer``'s emotion classifier is a
Keras 2 ``.h5``). The export calls the model in inference mode through one ``tf.function`` whose
input names are the model's own input names and whose outputs are keyed by the model's output
names, so a client sees the names the model's author chose. Keras 2 files need tf-keras, installed
with ``pip install --no-deps tf-keras==2.21.0`` (its metadata asks for the full ``tensorflow``
wheel, which would overwrite tensorflow-cpu's files; it needs nothing tensorflow-cpu lacks);
without it the error is one line saying so.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SavedModelError

KERAS3_SUFFIXES = (".keras",)
KERAS2_SUFFIXES = (".h5", ".hdf5")
SIGNATURE_KEY = "serving_default"


def is_keras_file(path: str | Path) -> bool:
    """A file whose suffix says Keras 3 (``.keras``) or Keras 2 (``.h5``, ``.hdf5``)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in KERAS3_SUFFIXES + KERAS2_SUFFIXES


def _load(path: Path):
    """The model and which Keras read it; one-line errors for a missing extra or a bad file."""
    if path.suffix.lower() in KERAS3_SUFFIXES:
        import keras

        loader, flavour = keras.saving.load_model, "keras3"
    else:
        try:
            import tf_keras
        except ImportError:
            raise SavedModelError(
                f"{path}: a Keras 2 .h5 file needs tf-keras: pip install --no-deps tf-keras==2.21.0"
            ) from None
        loader, flavour = tf_keras.models.load_model, "keras2_h5"
    try:
        return loader(str(path), compile=False), flavour
    except Exception as error:  # noqa: BLE001 - any reader error is the file's: one line naming it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SavedModelError(f"{path}: not a Keras model file Keras can read ({first})") from None


def _clean(name: str, fallback: str) -> str:
    """A signature key from a Keras tensor or layer name (``input_layer:0`` -> ``input_layer``)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name.split(":")[0].split("/")[0]).strip("_")
    return name or fallback


def _names(tensors, fallback: str) -> list[str]:
    names = [_clean(getattr(tensor, "name", "") or "", f"{fallback}_{i}") for i, tensor in enumerate(tensors)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # two tensors named alike get _1, _2 ... so no input shadows another
        seen[name] = seen.get(name, -1) + 1
        unique.append(name if not seen[name] else f"{name}_{seen[name]}")
    return unique


def export_keras_file(path: str | Path, out_dir: str | Path) -> dict:
    """Export the Keras file ``path`` as a SavedModel in ``out_dir`` (which must not exist yet);
    returns what the report says of it: ``{"source_format", "signature", "inputs", "outputs"}``."""
    import tensorflow as tf

    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise SavedModelError(f"{path}: no such file")
    if path.suffix.lower() not in KERAS3_SUFFIXES + KERAS2_SUFFIXES:
        raise SavedModelError(f"{path}: not a Keras file (expected .keras, .h5 or .hdf5)")
    model, flavour = _load(path)
    inputs = list(model.inputs)
    input_names = _names(inputs, "input")
    output_names = list(getattr(model, "output_names", None) or [])
    outputs = list(model.outputs)
    if len(output_names) != len(outputs):
        output_names = _names(outputs, "output")
    specs = [tf.TensorSpec([None if d is None else int(d) for d in tensor.shape], tf.as_dtype(tensor.dtype), name)
             for tensor, name in zip(inputs, input_names)]

    class Exported(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # tracked: its variables are saved with the module

        @tf.function(input_signature=specs)
        def serve(self, *args):
            values = self.model(list(args) if len(args) > 1 else args[0], training=False)
            values = values if isinstance(values, list | tuple) else [values]
            return {name: tf.identity(value, name=name) for name, value in zip(output_names, values)}

    module = Exported()
    tf.saved_model.save(module, str(out_dir), signatures={SIGNATURE_KEY: module.serve})
    return {
        "source": str(path),
        "source_format": flavour,
        "signature": SIGNATURE_KEY,
        "inputs": {name: {"shape": spec.shape.as_list(), "dtype": spec.dtype.name} for name, spec in
                   zip(input_names, specs)},
        "outputs": output_names,
    }
