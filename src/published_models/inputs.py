"""Realistic sample inputs made from what packages ship: sample photos and synthetic tones and chords.

No data set is downloaded. The photos are scikit-image's sample images, read out of its cached
wheel (``sources.WHEELS``) and decoded with TensorFlow: the astronaut (Eileen Collins, a frontal,
smiling face) gives face crops, jittered in position, scale, brightness and mirror image; the
other photos (coffee, bricks, grass, gravel, rocket, cat, motorcycle) and the astronaut's suit and
flag give patches without a face. The audio is synthetic: piano-like notes (a fundamental and
decaying harmonics) at known MIDI pitches, alone and as chords, with known onsets. Everything is
seeded, so each call returns the same arrays.
"""

from __future__ import annotations

import functools

import numpy as np

from published_models.sources import read_member

# The astronaut's face in astronaut.png (512 x 512): a square x0, y0, x1, y1 in pixels around the box
# that mtcnn's ONet regresses (about 177, 55, 269, 173: hairline to chin, ear to ear), as mtcnn squares
# its boxes before ONet.
ASTRONAUT_FACE = (165, 56, 281, 172)

# Photos without a face, and boxes on the astronaut photo that hold no face (flag, suit, helmet, rocket).
BACKGROUND_PHOTOS = (
    "skimage/data/coffee.png",
    "skimage/data/brick.png",
    "skimage/data/grass.png",
    "skimage/data/gravel.png",
    "skimage/data/rocket.jpg",
    "skimage/data/motorcycle_left.png",
)
ASTRONAUT_BACKGROUND = ((0, 0, 90, 200), (40, 300, 200, 460), (290, 340, 500, 512), (360, 0, 470, 280))

SAMPLE_RATE = 22050  # basic-pitch's rate
A4_HZ = 440.0


@functools.cache
def photo(member: str) -> np.ndarray:
    """A scikit-image sample photo (a path in its wheel) as uint8 [height, width, 3] RGB."""
    import tensorflow as tf

    image = tf.io.decode_image(read_member("scikit-image", member), channels=3, expand_animations=False)
    array = image.numpy()
    array.setflags(write=False)
    return array


def _crop(image: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """``box`` (x0, y0, x1, y1, may reach outside the image: zero padded) resized to size x size, float32."""
    import tensorflow as tf

    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    boxes = np.array([[y0 / height, x0 / width, y1 / height, x1 / width]], np.float32)
    crop = tf.image.crop_and_resize(image[None].astype(np.float32), boxes, [0], [size, size]).numpy()[0]
    return crop[:, ::-1] if flip else crop


def face_crops(rows: int, size: int, seed: int = 0, margin: float = 0.0) -> np.ndarray:
    """``rows`` crops of the astronaut's face, float32 RGB in [0, 255], [rows, size, size, 3].

    Row 0 is the face box itself, widened by ``margin`` of its side on each edge; the others move it
    by up to 8 % of its side, scale it by 0.9-1.15, mirror half of them and change brightness by up
    to ±20 % (clipped to [0, 255]).
    """
    rng = np.random.default_rng(seed)
    image = photo("skimage/data/astronaut.png")
    x0, y0, x1, y1 = ASTRONAUT_FACE
    side_x, side_y = (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin)
    crops = []
    for row in range(rows):
        if row == 0:
            shift, scale, flip, gain = (0.0, 0.0), 1.0, False, 1.0
        else:
            shift = tuple(rng.uniform(-0.08, 0.08, 2))
            scale, flip, gain = rng.uniform(0.9, 1.15), bool(rng.integers(2)), rng.uniform(0.8, 1.2)
        cx, cy = (x0 + x1) / 2 + shift[0] * side_x, (y0 + y1) / 2 + shift[1] * side_y
        half_x, half_y = scale * side_x / 2, scale * side_y / 2
        crop = _crop(image, (cx - half_x, cy - half_y, cx + half_x, cy + half_y), size, flip)
        crops.append(np.clip(crop * gain, 0.0, 255.0))
    return np.stack(crops).astype(np.float32)


def background_patches(rows: int, size: int, seed: int = 1) -> np.ndarray:
    """``rows`` square patches without a face, float32 RGB in [0, 255], [rows, size, size, 3].

    Taken in turn from the background photos (a side of 15-60 % of the photo's shorter edge) and the
    astronaut photo's faceless boxes (60-100 % of the box's shorter edge), at seeded positions.
    """
    rng = np.random.default_rng(seed)
    sources = [(member, None) for member in BACKGROUND_PHOTOS]
    sources += [("skimage/data/astronaut.png", box) for box in ASTRONAUT_BACKGROUND]
    patches = []
    for row in range(rows):
        member, region = sources[row % len(sources)]
        image = photo(member)
        if region is None:
            rx0, ry0, rx1, ry1 = 0, 0, image.shape[1], image.shape[0]
            side = rng.uniform(0.15, 0.6) * min(image.shape[:2])
        else:
            rx0, ry0, rx1, ry1 = region
            side = rng.uniform(0.6, 1.0) * min(rx1 - rx0, ry1 - ry0)
        x0 = rng.uniform(rx0, rx1 - side)
        y0 = rng.uniform(ry0, ry1 - side)
        patches.append(_crop(image, (x0, y0, x0 + side, y0 + side), size, flip=False))
    return np.stack(patches).astype(np.float32)


def gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of float RGB [..., 3] as [..., 1] (OpenCV's RGB2GRAY weights, which fer uses)."""
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return (rgb @ weights)[..., None].astype(np.float32)


def midi_hz(pitch: int) -> float:
    """The frequency of a MIDI pitch in equal temperament (A4 = MIDI 69 = 440 Hz)."""
    return A4_HZ * 2.0 ** ((pitch - 69) / 12.0)


def notes(pitches: tuple[int, ...], onset_s: float, samples: int, duration_s: float = 1.2) -> np.ndarray:
    """Piano-like notes at ``pitches`` struck together at ``onset_s``, float32 [samples], peak 0.5.

    Each note is a fundamental and four harmonics (amplitudes 1, 1/2, 1/3, ...), a 5 ms attack, an
    exponential decay (time constant 0.5 s) and a 50 ms release after ``duration_s``.
    """
    t = np.arange(samples) / SAMPLE_RATE
    local = t - onset_s
    envelope = np.where(local < 0, 0.0, np.minimum(local / 0.005, 1.0) * np.exp(-np.maximum(local, 0) / 0.5))
    envelope *= np.clip((onset_s + duration_s + 0.05 - t) / 0.05, 0.0, 1.0)
    wave = np.zeros(samples)
    for pitch in pitches:
        f0 = midi_hz(pitch)
        for harmonic in range(1, 6):
            if harmonic * f0 < SAMPLE_RATE / 2:
                wave += np.sin(2 * np.pi * harmonic * f0 * t) / harmonic
    wave *= envelope
    peak = np.max(np.abs(wave))
    return (0.5 * wave / peak if peak > 0 else wave).astype(np.float32)
