"""The convert_peer stage: one peer artefact of the exported model, or, where the peer's converter
cannot convert this model (it refuses, or what it writes does not answer valid outputs: NaN, wrong
shapes), a directory holding one line that says why (the evaluate, latency and report stages pass
it on, and the pipeline goes on with the other models). Every peer converts the Iris export, so
there a failure still stops the stage."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_directory
from ..errors import UserError
from .artefacts import UNSUPPORTED_FILE
from .model import Samples


def convert_peer_stage(spec, exported: Path, samples_dir: Path, out: Path) -> str:
    """Write ``out`` (named after the peer); return the line the stage prints."""
    from ..peers.convert import convert_peer, model_files

    if out.name != spec.name:
        raise UserError(f"--out {out}: the directory must be named after the peer '{spec.name}'")
    samples = Samples.load(samples_dir)
    model = samples.spec
    expected = {k: v for k, v in model.expected().items() if v[0] != "string" or k == "classes"}
    try:
        files = model_files(spec, exported, samples.calibration, model.signature)
        written = convert_peer(spec, exported, out.parent, samples.calibration, model.label_vocabulary,
                               model.signature, expected, files)
    except UserError as error:
        if model.source == "iris":
            raise  # every peer converts the Iris export: a failure there is a regression
        reason = " ".join(str(error).split())
        with atomic_directory(out) as temporary:
            (temporary / UNSUPPORTED_FILE).write_text(reason + "\n")
        return f"convert_peer: {spec.name} cannot convert this model: {reason}"
    size = sum(path.stat().st_size for path in written.parent.iterdir())
    return f"convert_peer: {spec.name} ({spec.format}, {spec.quantization}) -> {written} ({size} bytes)"
