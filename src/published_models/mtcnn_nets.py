"""mtcnn's refinement (RNet) and output (ONet) networks: the authors' Keras code and weights, as SavedModels.

``mtcnn==1.0.0`` ships its networks as Keras model classes (``mtcnn/network/rnet.py``,
``onet.py``, which import only TensorFlow) and their weights as joblib files compressed with lz4.
Both come out of the cached wheel: the class is run from the wheel's own source, built, given the
published weights with ``set_weights`` (the authors' own loading), wrapped in a ``tf.Module`` and
saved with ``tf.saved_model.save``. Convolutions are followed by PReLU (per channel); the heads are
a softmax face probability ([not face, face]) and box (4) and, for ONet, landmark (10) regressions.

Inputs: the astronaut's face, jittered (the first half of the rows), and patches without a face
from scikit-image's other sample photos (the second half), each resized with bilinear
``crop_and_resize`` as mtcnn does and normalised as mtcnn does, ``(rgb - 127.5) / 128``.
"""

from __future__ import annotations

import functools
import io
import types
from pathlib import Path

import numpy as np

from published_models.inputs import background_patches, face_crops
from published_models.model import Output, PublishedModel, cached_saved_model, frozen, saved_model_parameters
from published_models.sources import WHEELS, read_member

ROWS = 32  # half faces, half not
FACE_LABELS = ("not_face", "face")
LANDMARKS = "left eye, right eye, nose, left mouth corner, right mouth corner"

_NETS = {
    # name: (class, input side, wheel code, wheel weights, outputs in the class's call order)
    "rnet": ("RNet", 24, "mtcnn/network/rnet.py", "mtcnn/assets/weights/rnet.lz4", ("box", "face_prob")),
    "onet": ("ONet", 48, "mtcnn/network/onet.py", "mtcnn/assets/weights/onet.lz4", ("box", "landmarks", "face_prob")),
}


def _keras_net(net: str):
    """The authors' Keras model ``net`` ('rnet' or 'onet') with their published weights."""
    import joblib

    class_name, side, code, weights, _ = _NETS[net]
    module = types.ModuleType(f"published_models._mtcnn_{net}")
    exec(compile(read_member("mtcnn", code), f"mtcnn-{WHEELS['mtcnn'].version}/{code}", "exec"), module.__dict__)
    model = getattr(module, class_name)()
    model.build((None, side, side, 3))
    # joblib's lz4 decompression needs the lz4 package (requirements.txt).
    model.set_weights(joblib.load(io.BytesIO(read_member("mtcnn", weights))))
    return model


def _export(net: str, directory: Path) -> None:
    import tensorflow as tf

    _, side, _, _, names = _NETS[net]
    module = tf.Module()
    module.net = _keras_net(net)

    @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32, name="image")])
    def serve(image):
        return dict(zip(names, module.net(image, training=False)))

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve.get_concrete_function()})


def _published(net: str) -> PublishedModel:
    _, side, code, weights, names = _NETS[net]
    directory = cached_saved_model(f"mtcnn_{net}", "mtcnn", functools.partial(_export, net))
    half = ROWS // 2
    pixels = np.concatenate([face_crops(half, side), background_patches(half, side)])
    outputs = {
        "box": Output("regression", (4,), "offsets of the box's x1, y1, x2, y2, as fractions of its width and height"),
        "landmarks": Output("regression", (10,), f"x of 5 landmarks then y, as fractions of the box ({LANDMARKS})"),
        "face_prob": Output("class", (2,), "softmax over [not face, face]", FACE_LABELS),
    }
    return PublishedModel(
        name=f"mtcnn_{net}",
        wheel=WHEELS["mtcnn"],
        source_files=(code, weights),
        saved_model=directory,
        signature="serving_default",
        inputs={"image": frozen(((pixels - 127.5) / 128.0).astype(np.float32))},
        input_description=(
            f"{ROWS} RGB patches of {side}x{side}, normalised as mtcnn does ((rgb - 127.5) / 128): rows 0-{half - 1} "
            f"crop the astronaut's face (scikit-image), jittered; rows {half}-{ROWS - 1} are patches without a face "
            "from scikit-image's other photos and the astronaut photo's background"
        ),
        outputs={name: outputs[name] for name in names},
        parameters=saved_model_parameters(directory),
        truth={"is_face": frozen(np.arange(ROWS) < half)},
    )


@functools.cache
def mtcnn_rnet() -> PublishedModel:
    """mtcnn 1.0.0's RNet (24x24x3; PReLU; face probability and box regression) as a SavedModel.

    Inputs: 32 patches of 24x24 RGB normalised to about [-1, 1]: 16 crops of the astronaut's face,
    16 patches without a face.
    """
    return _published("rnet")


@functools.cache
def mtcnn_onet() -> PublishedModel:
    """mtcnn 1.0.0's ONet (48x48x3; PReLU; face probability, box and landmark regression) as a SavedModel.

    Inputs: 32 patches of 48x48 RGB normalised to about [-1, 1]: 16 crops of the astronaut's face,
    16 patches without a face.
    """
    return _published("onet")
