"""basic-pitch's audio-to-MIDI network: the authors' own TF SavedModel, with their .tflite and .onnx as peers.

``basic-pitch==0.4.0`` ships one model (``saved_models/icassp_2022/nmp``) three ways: a TF 2
SavedModel, a TFLite file and an ONNX file. The SavedModel is used as published (extracted from
the cached wheel, not re-exported). Its input is a window of mono audio at 22050 Hz, float32
[batch, 43844, 1] (2 s less one hop of 256 samples); a constant-Q front end inside the model turns
it into 172 frames, and three sigmoid heads give per-frame, per-pitch probabilities: ``note`` and
``onset`` over the 88 piano keys (MIDI 21-108), ``contour`` over 264 bins (3 per semitone).

Inputs: synthetic piano-like notes (a fundamental and four decaying harmonics) at known MIDI
pitches and onsets: single notes low to high, triads and a seventh chord, and two notes one after
the other. ``truth`` holds each row's pitches and onsets.
"""

from __future__ import annotations

import functools

import numpy as np

from published_models.inputs import SAMPLE_RATE, notes
from published_models.model import Output, PublishedModel, frozen, saved_model_parameters
from published_models.sources import WHEELS, extracted

SAMPLES = 43844  # AUDIO_SAMPLE_RATE * 2 - FFT_HOP in basic_pitch.constants
FRAMES = 172
FPS = SAMPLE_RATE / 256  # frames per second: one per FFT hop
LOWEST_MIDI = 21  # note and onset index 0 is A0
SAVED_MODEL = "basic_pitch/saved_models/icassp_2022/nmp"
TFLITE = "basic_pitch/saved_models/icassp_2022/nmp.tflite"
ONNX = "basic_pitch/saved_models/icassp_2022/nmp.onnx"
SAVED_MODEL_FILES = (
    f"{SAVED_MODEL}/saved_model.pb",
    f"{SAVED_MODEL}/variables/variables.data-00000-of-00001",
    f"{SAVED_MODEL}/variables/variables.index",
)

# (what it is, [(MIDI pitches struck together, onset in seconds), ...]) per row.
CLIPS: tuple[tuple[str, tuple[tuple[tuple[int, ...], float], ...]], ...] = (
    ("A4 alone", (((69,), 0.25),)),
    ("C4 alone", (((60,), 0.5),)),
    ("E2 alone (low)", (((40,), 0.1),)),
    ("C6 alone (high)", (((84,), 0.3),)),
    ("C major triad C4 E4 G4", (((60, 64, 67), 0.2),)),
    ("A minor seventh A3 C4 E4 G4", (((57, 60, 64, 67), 0.4),)),
    ("G3 then D5", (((55,), 0.1), ((74,), 1.0))),
    ("D major triad D3 F#3 A3", (((50, 54, 57), 0.3),)),
)


def _clip(events: tuple[tuple[tuple[int, ...], float], ...]) -> np.ndarray:
    wave = sum(notes(pitches, onset, SAMPLES, duration_s=0.8 if len(events) > 1 else 1.2) for pitches, onset in events)
    return (wave / max(1.0, 2.0 * float(np.max(np.abs(wave))))).astype(np.float32)


@functools.cache
def basic_pitch_nmp() -> PublishedModel:
    """basic-pitch 0.4.0's note/onset/contour network (audio in, per-frame per-pitch sigmoids out).

    Inputs: 8 windows of 43844 samples (22050 Hz, about 2 s) of synthetic piano-like notes and chords.
    """
    for member in SAVED_MODEL_FILES:
        extracted("basic-pitch", member)
    directory = extracted("basic-pitch", SAVED_MODEL_FILES[0]).parent
    audio = np.stack([_clip(events) for _, events in CLIPS])[..., None]
    pitches = np.zeros((len(CLIPS), 88), bool)
    onsets = np.full((len(CLIPS), 88), np.nan, np.float32)
    for row, (_, events) in enumerate(CLIPS):
        for chord, onset in events:
            for pitch in chord:
                pitches[row, pitch - LOWEST_MIDI] = True
                onsets[row, pitch - LOWEST_MIDI] = onset
    keys = tuple(f"midi_{pitch}" for pitch in range(LOWEST_MIDI, LOWEST_MIDI + 88))
    return PublishedModel(
        name="basic_pitch_nmp",
        wheel=WHEELS["basic-pitch"],
        source_files=SAVED_MODEL_FILES,
        saved_model=directory,
        signature="serving_default",
        inputs={"input_2": frozen(audio)},
        input_description=(
            f"{len(CLIPS)} mono windows of {SAMPLES} samples at {SAMPLE_RATE} Hz (float32 [rows, {SAMPLES}, 1], peak "
            "at most 0.5) of synthetic piano-like notes: " + "; ".join(what for what, _ in CLIPS)
        ),
        outputs={
            "note": Output("multi_label", (FRAMES, 88), "per frame, probability that each piano key sounds", keys),
            "onset": Output("multi_label", (FRAMES, 88), "per frame, probability that each piano key starts", keys),
            "contour": Output("multi_label", (FRAMES, 264), "per frame, pitch salience in thirds of a semitone"),
        },
        parameters=saved_model_parameters(directory),
        peers={"tflite": extracted("basic-pitch", TFLITE), "onnx": extracted("basic-pitch", ONNX)},
        peer_inputs={"serving_default_input_2:0": "input_2"},
        # The converters kept the SavedModel's outputs in sorted order: contour, note, onset.
        peer_outputs={
            "StatefulPartitionedCall:0": "contour",
            "StatefulPartitionedCall:1": "note",
            "StatefulPartitionedCall:2": "onset",
        },
        truth={"pitches": frozen(pitches), "onset_s": frozen(onsets)},
    )
