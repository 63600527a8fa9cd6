"""The freeze stage: the SavedModel the pipeline optimises as a frozen GraphDef, and the notebook's
graph summary before and after freezing."""

from __future__ import annotations


def freeze_stage(saved_model: str, samples_dir, out: str, out_summary: str) -> str:
    """Freeze ``saved_model`` to ``out`` and write the notebook's summary before and after; the
    signature the pipeline calls (the model stage's) must survive freezing. Returns the stage's line."""
    from ..errors import UserError
    from ..saved_model import freeze_saved_model
    from .describe import describe_graph, saved_model_graph_def
    from .io import write_json
    from .model import ModelSpec

    spec = ModelSpec.load(samples_dir)
    frozen = freeze_saved_model(saved_model)
    if spec.signature not in frozen.signatures:
        raise UserError(f"{saved_model}: signature '{spec.signature}' is not in the frozen model "
                        f"(has {', '.join(sorted(frozen.signatures))})")
    frozen.save(out)
    summary = {
        "exported": describe_graph(saved_model_graph_def(saved_model)),
        "frozen": describe_graph(frozen.graph_def),
    }
    write_json(out_summary, summary)
    return (f"freeze: {summary['exported']['total_nodes']} -> {summary['frozen']['total_nodes']} nodes, "
            f"{summary['frozen']['variable_count']} variables left -> {out}")
