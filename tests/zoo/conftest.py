"""The zoo's session cache: each model is built once into a temporary directory, and optimised
once per transform list, by the first test that asks (tests of one model share an xdist group,
so one worker builds it). The heavy models run only with ``SERVING_OPTIMISER_ZOO=full``
(``make test-zoo``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from model_builders.zoo import LISTS, MODELS, Built, signature_inputs
from serving_optimiser.saved_model import SavedModelError, optimise_saved_model

# A signature call of these models on 256 rows takes under 5 s here (ResNet50's); one still
# running after this long is a loop that no longer ends, and fails its tests instead of hanging.
COMPARE_TIMEOUT_S = {True: 300.0, False: 60.0}


@dataclass
class Optimised:
    """One model after one transform list: the converted SavedModel and the report, or the
    one-line error that stopped ``optimise_saved_model``."""

    directory: Path
    report: dict | None = None
    error: str | None = None

    def checked(self) -> dict:
        if self.error is not None:
            pytest.fail(self.error)
        return self.report


class Zoo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Built] = {}
        self._optimised: dict[tuple[str, str], Optimised] = {}

    def original(self, name: str) -> Path:
        return self.root / name

    def built(self, name: str) -> Built:
        if name not in self._built:
            self._built[name] = MODELS[name].build(str(self.original(name)))
        return self._built[name]

    def sample_inputs(self, name: str) -> dict:
        return signature_inputs(self.original(name), self.built(name).inputs)

    def optimised(self, name: str, list_name: str) -> Optimised:
        key = (name, list_name)
        if key not in self._optimised:
            result = Optimised(self.root / f"{name}.{list_name}")
            try:
                result.report = optimise_saved_model(
                    self.original(name), result.directory, LISTS[list_name],
                    sample_inputs=self.sample_inputs(name),
                    compare_timeout_s=COMPARE_TIMEOUT_S[MODELS[name].heavy],
                )
            except SavedModelError as error:
                result.error = f"{name} after the {list_name} list: {error}"
            self._optimised[key] = result
        return self._optimised[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))
