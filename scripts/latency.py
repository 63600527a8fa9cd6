"""Stage latency@MODEL (and latency_peer@PEER): one model's call times at every batch size of
params.yaml's latency.batch_sizes against the exported model's, measured side by side with
TensorFlow's default kernels and threads (how it would serve on this machine), how each ran
(runtime, oneDNN setting), the machine (the machine stage's file) and the model's fidelity as
this machine's kernels compute it.

A variant whose int8 ops need oneDNN runs with TF_ENABLE_ONEDNN_OPTS=1 where oneDNN would be off;
then the exported model is timed twice: under the caller's setting, in a worker process, as the
yardstick of every ratio, and with oneDNN on in this process (exported_onednn)."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage

RUNTIMES = {"tf": "TensorFlow", "litert": "LiteRT (XNNPACK)", "onnx": "ONNX Runtime", "openvino": "OpenVINO CPU"}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of 'optimise' or of 'peers.variants' in params.yaml")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--model-path", required=True, type=Path, help="a SavedModel or a peer artefact's directory")
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--machine", required=True, type=Path, help="the machine stage's description")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import json
    import os

    from serving_optimiser.errors import UserError
    from serving_optimiser.pipeline import evaluate, latency
    from serving_optimiser.pipeline.data import read_iris_csv, sample_around
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.machine import onednn_setting
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    signature = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params)).signature
    timing = latency.LatencyParams.from_section(section(params, "latency", args.params), args.params)
    model = evaluate.ModelEntry.find(params, args.model, args.params)
    try:
        machine = json.loads(args.machine.read_text())
        default = bool(machine["onednn_default"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--machine {args.machine}: not the machine stage's description (run it first)") from None
    caller = dict(os.environ)
    onednn_on, why = onednn_setting(caller.get("TF_ENABLE_ONEDNN_OPTS"), default)
    forced = model.needs_onednn and not onednn_on
    if forced:
        # The variant's int8 ops have no kernel without oneDNN's rewrites, which TensorFlow turns
        # on by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX.
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"

    rows = sample_around(read_iris_csv(args.eval, vocabulary), max(timing.batch_sizes), timing.seed)
    inputs = latency.batch_inputs(rows, timing.batch_sizes)
    predictors = {}
    for name, path in ((evaluate.REFERENCE, args.exported), (args.model, args.model_path)):
        predictors[name] = latency.timed_load(
            lambda name=name, path=path: evaluate.load_model(name, path, vocabulary, signature, model.threads),
            timing.load_repeats,
        )
    tensorflow = f"TensorFlow, oneDNN {why}"
    forced_how = "TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1"
    runtime = RUNTIMES[predictors[args.model][0].format]
    if model.kind == "peer":
        how = f"{runtime}, {model.threads} threads"
    else:
        how = f"{forced_how}: its int8 ops need it)" if forced else tensorflow
    models = [latency.TimedModel(name, latency.local_timer(call, inputs), seconds)
              for name, (call, seconds) in predictors.items()]
    models[0].how, models[1].how = (f"{forced_how})" if forced else tensorflow), how
    worker = None
    try:
        if forced:
            worker = latency.WorkerModel(args.exported, args.eval, vocabulary, signature, max(timing.batch_sizes),
                                         timing.seed, caller)
            models[0].name = "exported_onednn"
            models.insert(0, latency.TimedModel(evaluate.REFERENCE, worker.timer, worker.load_seconds, tensorflow))
        # Fidelity as this machine's kernels compute it (the evaluate stage's is pinned, the same
        # everywhere); they differ where kernels round differently per ISA (int8, the peer runtimes).
        largest = inputs[max(timing.batch_sizes)]
        agreement, max_dp = evaluate.fidelity(
            predictors[evaluate.REFERENCE][0](largest), predictors[args.model][0](largest)
        )
        measured = latency.measure_latency(models, timing)
    finally:
        if worker is not None:
            worker.close()
    figures = {name: latency.rounded(values) for name, values in measured.items()}
    here = {"agreement_this_machine": round(agreement, 6), "max_dp_this_machine": round(max_dp, 6)}
    process = latency.process_settings() | {"peer_runtime_threads": model.threads}
    write_json(args.out_details, {"machine": machine, "process": process, "measured": figures, "fidelity": here})
    mine = figures[args.model]["batches"]
    smallest, biggest = min(timing.batch_sizes), max(timing.batch_sizes)
    # Short names and 3 decimals keep `dvc metrics show` within 120 columns (README has the legend);
    # the whole curve is in the details file and the report.
    write_json(args.out_metrics, {f"t{latency.batch_label(size)}_x": round(mine[str(size)]["ratio"], 3)
                                  for size in (smallest, biggest)})
    curve = ", ".join(f"{latency.batch_label(size)}: {mine[str(size)]['ratio']:.3f}x" for size in timing.batch_sizes)
    print(f"latency: {args.model} ({how}): {curve} the export's time")


if __name__ == "__main__":
    run_stage("latency", main, pinned=False)
