"""Stage convert_peer@PEER: the exported SavedModel -> one peer artefact (LiteRT, ONNX or OpenVINO) of
params.yaml's 'peers.variants', checked on the train split before it is written."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of 'peers.variants' in params.yaml")
    parser.add_argument("--exported", required=True)
    parser.add_argument("--train", required=True, help="calibration and check rows")
    parser.add_argument("--out", required=True, type=Path, help="the artefact's directory (models/peers/NAME)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.errors import UserError
    from serving_optimiser.peers.convert import convert_peer
    from serving_optimiser.peers.params import PeersParams
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv
    from serving_optimiser.pipeline.params import check_stage_keys, load_params, require_list, section

    if args.out.name != args.name:
        raise UserError(f"--out {args.out}: the directory must be named after the peer '{args.name}'")
    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    peers = PeersParams.from_section(section(params, "peers", args.params), args.params)
    check_stage_keys(peers.variants, "peers.variants", args.params)
    spec = peers.variant(args.name, args.params)
    features, _ = features_and_labels(read_iris_csv(args.train, vocabulary), vocabulary)
    written = convert_peer(spec, args.exported, args.out.parent, features, vocabulary)
    size = sum(path.stat().st_size for path in written.parent.iterdir())
    print(f"convert_peer: {args.name} ({spec.format}, {spec.quantization}) -> {written} ({size} bytes)")


if __name__ == "__main__":
    run_stage("convert_peer", main)
