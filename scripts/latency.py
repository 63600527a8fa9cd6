"""Stage latency@MODEL (and latency_peer@PEER): one model's call times at every batch size of
params.yaml's latency.batch_sizes against the exported model's, measured side by side with
TensorFlow's default kernels and threads (how it would serve on this machine), how each ran
(runtime, oneDNN setting), the machine (the machine stage's file) and the model's fidelity as
this machine's kernels compute it (serving_optimiser.pipeline.latency.latency_stage)."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of 'optimise' or of 'peers.variants' in the params file")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--model-path", required=True, type=Path, help="a SavedModel or a peer artefact's directory")
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--machine", required=True, type=Path, help="the machine stage's description")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.entries import ModelEntry
    from serving_optimiser.pipeline.latency import latency_stage
    from serving_optimiser.pipeline.params import PipelineParams

    params = PipelineParams.load(args.params)
    timing = params.latency()
    entry = ModelEntry.find(params, args.model)
    print(latency_stage(entry, args.exported, args.model_path, args.samples, args.machine, timing,
                        args.out_metrics, args.out_details))


if __name__ == "__main__":
    run_stage("latency", main, pinned=False)
