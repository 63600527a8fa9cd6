"""Stage convert_peer@PEER: the exported SavedModel -> one peer artefact (LiteRT, ONNX or OpenVINO) of
params.yaml's 'peers.variants', checked on the calibration rows before it is written; a peer that
cannot convert this model writes one line saying why instead, and the pipeline goes on."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of 'peers.variants' in the params file")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--out", required=True, type=Path, help="the artefact's directory (models/peers/NAME)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.entries import peers_section
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.peer_stage import convert_peer_stage

    params = PipelineParams.load(args.params)
    params.section("peers")  # a missing section is named, not None
    spec = peers_section(params).variant(args.name, params.path)
    print(convert_peer_stage(spec, args.exported, args.samples, args.out))


if __name__ == "__main__":
    run_stage("convert_peer", main)
