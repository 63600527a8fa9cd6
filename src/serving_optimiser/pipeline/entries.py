"""Which model a name means: the exported model, a variant (an ``optimise`` list) or a peer (a
``peers.variants`` entry), and how it must run. Apart from :mod:`serving_optimiser.pipeline.params`
because it reads the transform catalogue (whether a variant's ops need oneDNN), which the data
stages (prepare, train, export) must not depend on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .params import PipelineParams

REFERENCE = "exported"


@dataclass(frozen=True)
class ModelEntry:
    """Where a model's name comes from in the params file, and how it must run."""

    name: str
    kind: str  # "exported", "variant" (an optimise list) or "peer" (a LiteRT / ONNX / OpenVINO artefact)
    needs_onednn: bool  # its ops run only on oneDNN's kernels (quantize_matmuls)
    threads: int  # the peer runtimes' threads (TensorFlow's are process-wide)
    lossy: tuple[str, ...] = ()  # a variant's lossy transforms (quantize_weights, ...), in list order

    @property
    def is_reference(self) -> bool:
        return self.kind == REFERENCE

    @classmethod
    def find(cls, params: PipelineParams, name: str) -> ModelEntry:
        """Read without importing TensorFlow, so a stage can pin its kernels before it loads."""
        from ..graph_transforms.catalogue import lossy_transforms, needs_onednn
        from ..graph_transforms.parser import parse_transforms

        peers = peers_section(params)
        threads = peers.threads if peers else 2
        if name == REFERENCE:
            return cls(name, REFERENCE, False, threads)
        variants = params.variants()
        if name in variants:
            # An auto variant may write any of its candidates: its lossy steps are theirs.
            lists = (list(params.auto_candidates(name).values()) if params.auto_objective(name) is not None
                     else [params.transforms(name)])
            steps = [step for transforms in lists for step in parse_transforms(" ".join(transforms))]
            lossy = tuple(dict.fromkeys(step.name for step in steps if step.name in lossy_transforms()))
            return cls(name, "variant", any(needs_onednn(transforms) for transforms in lists), threads, lossy)
        if peers and name in peers.variants:
            return cls(name, "peer", False, threads)
        known = sorted([*variants, *(peers.variants if peers else ())])
        raise UserError(f"{params.path}: no model '{name}' in 'optimise' or 'peers.variants' (has {', '.join(known)})")


def peers_section(params: PipelineParams):
    """The ``peers`` section, checked, or None when the params file has none."""
    if "peers" not in params.data:
        return None
    from ..params_file import check_stage_keys
    from ..peers.params import PeersParams

    peers = PeersParams.from_section(params.section("peers"), params.path)
    check_stage_keys(peers.variants, "peers.variants", params.path)
    return peers


def model_names(params: PipelineParams) -> list[str]:
    """Every variant, then every peer, each sorted: the report's rows after the exported model."""
    peers = peers_section(params)
    return sorted(params.variants()) + sorted(peers.variants if peers else [])
