"""Benchmark: int8 against float on Keras-built models at realistic sizes (ResNet50, MobileNetV2 and
EfficientNetB0 at 224 x 224, a MultiHeadAttention encoder, a wide MLP) and on the published PReLU
face network (mtcnn_onet, its authors' weights), beside LiteRT full int8 and OpenVINO + NNCF int8
of the same model, all timed in this process; then issue 29's targets, PASS or FAIL per figure.

    python scripts/bench_int8_models.py
        [--models resnet50,mobilenet_v2,efficientnet_b0,encoder,wide_mlp,mtcnn_onet]
        [--batch-sizes 1,16,64] [--rounds 7] [--keep DIR] [--quick] [--serving-batch-size N]

Per model and candidate: the ratio to float at each batch size (median of per-round ratios,
interleaved rounds in a seeded random order), the median call in ms, and top-1 agreement with
float and max |diff| / float's output range on held-out rows (calibration uses other rows), and
the int8 layers of our int8 candidates. mtcnn_onet's agreement is face_prob's; its box and
landmarks are judged as regressions in the notes.
--serving-batch-size N adds int8_bN: the int8 list through optimise_saved_model's speed guard
at N rows (layers go back to float while the whole model is not faster than the export); below
16 rows the same list without fuse_layer_norms (make bench-int8 passes --serving-batch-size 1).
The targets: with AVX-512 VNNI (and no ONEDNN_MAX_CPU_ISA cap below it) those of issue 29 point 3;
otherwise only the AVX2 one (no model's int8 slower than float at batch >= 16).
How each model is made to answer like a trained one: model_builders.int8_models. The CPU
line comes first; progress goes to stderr. --quick shrinks every model (a smoke test, minutes
to seconds). Set ONEDNN_MAX_CPU_ISA=AVX2 TF_ENABLE_ONEDNN_OPTS=1 to emulate an AVX2-only CPU.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from model_builders.int8_models import MODEL_NAMES
from serving_optimiser.runtime import quiet_tensorflow


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--keep", help="write the models here instead of a temporary directory")
    parser.add_argument("--quick", action="store_true", help="small models and data: a smoke test")
    parser.add_argument("--serving-batch-size", type=int, metavar="N",
                        help="also time int8 through the speed guard at N rows (candidate int8_bN)")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from model_builders import int8_models
    from serving_optimiser.pipeline.machine import describe_machine, machine_line

    names = args.models.split(",")
    unknown = [name for name in names if name not in int8_models.MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(int8_models.MODEL_NAMES)}")
    try:
        batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if batch_sizes[0] < 1 or args.rounds < 1 or (args.serving_batch_size is not None and args.serving_batch_size < 1):
        parser.error("batch sizes, --rounds and --serving-batch-size must be positive")
    machine = describe_machine()
    from serving_optimiser.graph_transforms.transforms._int8 import int8_kernels_available
    from serving_optimiser.runtime import kernel_settings

    print(f"CPU: {machine_line(machine)}; environment {json.dumps(machine['environment'])}; "
          f"TensorFlow threads {json.dumps(kernel_settings())}", flush=True)
    if not int8_kernels_available():
        print("oneDNN's int8 kernels do not run in this process: set TF_ENABLE_ONEDNN_OPTS=1 (x86-64 only)")
        return 1
    sizes = int8_models.QUICK if args.quick else int8_models.FULL
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_int8_models_") as scratch:
        base = Path(args.keep or scratch)
        for name in names:
            try:
                results.append(int8_models.bench_model(name, base, sizes, batch_sizes, args.rounds,
                                                       serving_batch_size=args.serving_batch_size))
            except Exception as error:  # noqa: BLE001 - one line per failed model, the others go on
                failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
                print(f"FAILED {failures[-1]}", flush=True)
    for result in results:
        print(f"\n{result.model} ({result.summary}): {result.how}")
        for note in result.notes:
            print(f"  {note}")
    print()
    print("\n".join(int8_models.table(results, batch_sizes)))
    isa = int8_models.target_isa(machine)
    targets = int8_models.evaluate_targets(results, batch_sizes, isa)
    verdicts = [target.passed for target in targets]
    which = "AVX-512 VNNI: issue 29 point 3" if isa == "avx512_vnni" else \
        "AVX2: no model slower than float at batch >= 16"
    print(f"\nTargets ({which}): "
          f"{verdicts.count(True)} PASS, {verdicts.count(False)} FAIL, {verdicts.count(None)} not measurable")
    for target in targets:
        print(f"  {target.line()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
