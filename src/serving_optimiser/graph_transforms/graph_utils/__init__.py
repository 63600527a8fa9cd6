"""GraphDef helpers shared by every transform, one module per concern; every public name is
re-exported here, so ``from ..graph_utils import X`` works whichever module holds ``X``.

- :mod:`.inputs`: input strings ``[^]node[:port]`` (parse, canonical ``name:0``, data/control);
- :mod:`.graphs`: name/consumer maps, copies, filtering, reachability, execution order;
- :mod:`.nodes`: Const <-> numpy, NodeDefs and attrs from plain values, dtype names;
- :mod:`.matching`: the op-type pattern matcher and its replace helper;
- :mod:`.renaming`: rewriting inputs through a rename map, renaming nodes, colocation attrs;
- :mod:`.op_defs`: OpDef lookup (function library, then TF's registry) and argument dtypes.

Transforms never parse input strings themselves, so the subtle conventions of the C++ tool
(``^ctrl``, ``name:port``, canonical ``name:0``) live in one place.
"""

from .graphs import (
    consumers_map,
    copy_graph,
    filter_nodes,
    find_invalid_inputs,
    lowered_control_flow_nodes,
    new_graph_like,
    node_map,
    reachable_names,
    remove_unreachable,
    sort_by_execution_order,
)
from .inputs import (
    canonical_input_name,
    control_inputs,
    data_inputs,
    is_control_input,
    node_name_from_input,
    parse_input,
    tensor_name,
)
from .matching import (
    GraphMatcher,
    NodeMatch,
    OpTypePattern,
    ReplacementGenerator,
    pattern,
    replace_matching_op_types,
)
from .nodes import DTYPE_ATTRS, const_value, dtype_name, make_const_node, make_node, make_tensor_proto, set_attr
from .op_defs import arg_types, library_signatures, lookup_op_def, output_types
from .renaming import COLOCATION_PREFIX, fix_colocation_attrs, rename_node_inputs, rename_nodes

__all__ = [
    "COLOCATION_PREFIX",
    "DTYPE_ATTRS",
    "GraphMatcher",
    "NodeMatch",
    "OpTypePattern",
    "ReplacementGenerator",
    "arg_types",
    "canonical_input_name",
    "const_value",
    "consumers_map",
    "control_inputs",
    "copy_graph",
    "data_inputs",
    "dtype_name",
    "filter_nodes",
    "find_invalid_inputs",
    "fix_colocation_attrs",
    "is_control_input",
    "library_signatures",
    "lookup_op_def",
    "lowered_control_flow_nodes",
    "make_const_node",
    "make_node",
    "make_tensor_proto",
    "new_graph_like",
    "node_map",
    "node_name_from_input",
    "output_types",
    "parse_input",
    "pattern",
    "reachable_names",
    "remove_unreachable",
    "rename_node_inputs",
    "rename_nodes",
    "replace_matching_op_types",
    "set_attr",
    "sort_by_execution_order",
    "tensor_name",
]
