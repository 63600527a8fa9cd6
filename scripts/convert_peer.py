"""Stage convert_peer@PEER: the exported SavedModel -> one peer artefact (LiteRT, ONNX or OpenVINO) of
params.yaml's 'peers.variants', checked on the calibration rows before it is written; where the
SavedModel does not convert or its artefact fails the check, the frozen model (--frozen) is
converted instead; a peer that cannot convert this model writes one line saying why, and the
pipeline goes on."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of 'peers.variants' in the params file")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--frozen", type=Path, help="the freeze stage's directory, converted where --exported fails")
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--out", required=True, type=Path, help="the artefact's directory (models/peers/NAME)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.atomic import atomic_file
    from serving_optimiser.peers import convert
    from serving_optimiser.pipeline.artefacts import UNSUPPORTED_FILE
    from serving_optimiser.pipeline.entries import peers_section
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.peer_stage import convert_peer_stage

    params = PipelineParams.load(args.params)
    params.section("peers")  # a missing section is named, not None
    spec = peers_section(params).variant(args.name, params.path)
    line = convert_peer_stage(spec, args.exported, args.samples, args.out)
    unsupported = args.out / UNSUPPORTED_FILE
    if args.frozen is not None and unsupported.is_file():
        # convert_peer_stage takes one source, so the frozen model is its second run (the
        # library's convert_peer(frozen=...) does both in one call).
        reason = unsupported.read_text()
        with convert.frozen_saved_model(args.frozen) as source:
            line = convert_peer_stage(spec, source, args.samples, args.out)
            failed = unsupported.is_file()
            text = (convert.both_reasons(reason, args.frozen, unsupported.read_text(), source) + "\n" if failed
                    else convert.frozen_source_line(args.exported, args.frozen, reason))
        with atomic_file(unsupported if failed else args.out / convert.SOURCE_FILE) as stream:
            stream.write(text)
        line = (f"convert_peer: {spec.name} cannot convert this model: {text.strip()}" if failed
                else f"{line}, from the frozen model {args.frozen}")
    print(line)


if __name__ == "__main__":
    run_stage("convert_peer", main)
