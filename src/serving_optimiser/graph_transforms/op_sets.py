"""Named sets of op types that more than one module asks about, so that "is this a variable?"
has one answer per question. Plain strings only: importing this module never loads TensorFlow.
"""

from __future__ import annotations

# Ref variables of TF 1: the only variables the old tool's summarize_graph knew.
REF_VARIABLE_OPS = frozenset({"Variable", "VariableV2"})

# What the old summarize_graph (and the notebook's describe_graph) counted as variables: the ref
# variables plus TF 2's resource variable handle. Kept apart from VARIABLE_OPS so their counts
# stay comparable with the old tool's output.
SUMMARIZED_VARIABLE_OPS = REF_VARIABLE_OPS | {"VarHandleOp"}

# Every op that holds variable state a frozen graph no longer has: a graph still holding one
# is not frozen (quantize_weights refuses it, freezing reports it as left unfrozen).
VARIABLE_OPS = SUMMARIZED_VARIABLE_OPS | {"_VarHandlesOp", "TemporaryVariable", "AutoReloadVariable"}

# Ops a signature input may be when freezing: what a feed can replace.
PLACEHOLDER_OPS = frozenset({"Placeholder", "PlaceholderWithDefault", "PlaceholderV2"})

# v1 control flow, which freezing leaves of tf.cond and tf.while_loop (lower_control_flow): a
# Switch sends a "dead" tensor down the branch not taken and out of a finished loop, and a Merge
# forwards whichever input is alive. A Switch's ports are dead independently, so a control edge
# from the Switch itself fires every time, even when the port a consumer reads is dead.
SWITCH_OPS = frozenset({"Switch", "RefSwitch", "_SwitchN"})
MERGE_OPS = frozenset({"Merge", "RefMerge", "_XlaMerge"})
