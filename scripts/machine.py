"""Stage machine: what decides a timing on this machine (CPU, ISA features, cores, runtime
versions, oneDNN's default and setting), without importing TensorFlow. Always run; the latency
stages depend on its file, so they are re-timed exactly when it changes."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.machine import describe_machine, machine_line

    machine = describe_machine()
    write_json(args.out, machine)
    print(f"machine: {machine_line(machine)}")


if __name__ == "__main__":
    run_stage("machine", main, pinned=False)  # describes the caller's environment, as the latency stages see it
