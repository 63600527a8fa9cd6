"""fold_constants: the old tool's scenarios, TF 1 and TF 2 frozen graphs, control edges, and the
C++ engine as oracle."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    build,
    consts_of,
    frozen_function_graph,
    graph_from_text,
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    requires_oracle,
    run_graph,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import canonical_input_name


def placeholder(name, shape=None):
    return tf.compat.v1.placeholder(tf.float32, shape=shape, name=name)


def canonical(graph_def) -> dict[str, tuple[str, list[str]]]:
    """Node name -> (op, inputs with explicit ports): the oracle writes fed inputs as ``ph:0``."""
    return {n.name: (n.op, [canonical_input_name(i) for i in n.input]) for n in graph_def.node}


ONE_TO_100 = np.arange(1, 101, dtype=np.float32)


def add_then_mul():
    """Scenario (a): out = (a + b) * ph with a = b = [1..100]."""
    a = tf.constant(ONE_TO_100, name="a_const")
    b = tf.constant(ONE_TO_100, name="b_const")
    tf.raw_ops.Mul(x=tf.raw_ops.Add(x=a, y=b, name="add"), y=placeholder("ph"), name="out")


def shape_then_cast():
    """Scenario (d): out = float(shape of a [1,1,3] Const) * ph."""
    shape = tf.raw_ops.Shape(input=tf.constant(np.ones((1, 1, 3), np.float32), name="shaped_const"), name="shape")
    tf.raw_ops.Mul(x=tf.raw_ops.Cast(x=shape, DstT=tf.float32, name="cast"), y=placeholder("ph"), name="out")


def relu_of_add():
    """Scenario (e): the output itself is foldable."""
    c = tf.constant([1.0, -2.0], name="c_const")
    tf.raw_ops.Relu(features=tf.raw_ops.Add(x=c, y=c, name="add"), name="relu_output")


ADD_THEN_MUL = build(add_then_mul)
SHAPE_THEN_CAST = build(shape_then_cast)
RELU_OF_ADD = build(relu_of_add)


@pytest.mark.parametrize(("inputs", "outputs"), [(["ph"], ["out"]), (["ph:0"], ["out:0"])], ids=["names", "ports"])
def test_folds_subgraph_without_inputs(inputs, outputs):
    result = TransformGraph(ADD_THEN_MUL, inputs, outputs, ["fold_constants"])
    assert ops_by_name(result) == {"out": "Mul", "ph": "Placeholder", "add/_0__cf__0": "Const"}
    assert list(nodes_by_name(result)["out"].input) == ["add/_0__cf__0", "ph"]
    assert set(nodes_by_name(result)["add/_0__cf__0"].attr) == {"dtype", "value"}
    feeds = {"ph": ONE_TO_100}
    np.testing.assert_array_equal(run_graph(result, ["out"], feeds)[0], run_graph(ADD_THEN_MUL, ["out"], feeds)[0])


@pytest.mark.parametrize(
    "transform",
    [
        "fold_constants(exclude_op=Add)",
        "fold_constants(exclude_node=add)",
        "fold_constants(max_constant_size_in_bytes=10)",
    ],
    ids=["exclude_op", "exclude_node", "too-big"],
)
def test_blocked_fold_leaves_graph_unchanged(transform):
    assert TransformGraph(ADD_THEN_MUL, ["ph"], ["out"], [transform]) == ADD_THEN_MUL


def test_max_constant_size_lets_small_results_fold():
    result = TransformGraph(ADD_THEN_MUL, ["ph"], ["out"], ["fold_constants(max_constant_size_in_bytes=400)"])
    assert "add/_0__cf__0" in ops_by_name(result)


def test_shape_of_const_folds_and_counts_its_stand_in():
    result = TransformGraph(SHAPE_THEN_CAST, ["ph"], ["out"], ["fold_constants"])
    # TensorFlow numbered the Shape's own stand-in Const first, hence __cf__1.
    assert ops_by_name(result) == {"out": "Mul", "ph": "Placeholder", "cast/_0__cf__1": "Const"}
    np.testing.assert_array_equal(consts_of(result)["cast/_0__cf__1"], [1.0, 1.0, 3.0])


def shape_ops_of_input():
    """Size, Rank and ShapeN of a fed [2, 3] input: all known statically."""
    ph = placeholder("ph", [2, 3])
    shapes = tf.raw_ops.ShapeN(input=[ph, ph], name="shape_n")
    parts = [tf.raw_ops.Size(input=ph, name="size"), tf.raw_ops.Rank(input=ph, name="rank"),
             tf.reduce_sum(shapes[0], name="sum0"), tf.reduce_prod(shapes[1], name="prod1")]
    total = tf.raw_ops.AddN(inputs=parts, name="total")
    tf.raw_ops.Mul(x=tf.raw_ops.Cast(x=total, DstT=tf.float32, name="cast"), y=ph, name="out")


SHAPE_OPS_OF_INPUT = build(shape_ops_of_input)


def test_size_rank_and_shape_n_fold_from_static_shapes():
    result = TransformGraph(SHAPE_OPS_OF_INPUT, ["ph"], ["out"], ["fold_constants"])
    # Four shape-op stand-ins (Size, Rank, ShapeN x 2) come first in TensorFlow's count.
    assert ops_by_name(result) == {"ph": "Placeholder", "cast/_0__cf__4": "Const", "out": "Mul"}
    assert list(nodes_by_name(result)["cast/_0__cf__4"].input) == ["^ph"]
    assert consts_of(result)["cast/_0__cf__4"] == 6 + 2 + 5 + 6


PLACEHOLDER_WITH_OUTPUT_SHAPES = graph_from_text("""
node { name: "shaped_ph" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } }
  attr { key: "_output_shapes" value { list { shape { dim { size: 1 } dim { size: 1 } dim { size: 3 } } } } } }
node { name: "shape" op: "Shape" input: "shaped_ph"
  attr { key: "T" value { type: DT_FLOAT } } attr { key: "out_type" value { type: DT_INT32 } } }
node { name: "cast" op: "Cast" input: "shape"
  attr { key: "SrcT" value { type: DT_INT32 } } attr { key: "DstT" value { type: DT_FLOAT } } }
node { name: "ph" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "out" op: "Mul" input: "cast" input: "ph" attr { key: "T" value { type: DT_FLOAT } } }
""")


@pytest.mark.parametrize(
    ("inputs", "expected_controls"), [(["ph"], []), (["ph", "shaped_ph"], ["^shaped_ph"])], ids=["unfed", "input"]
)
def test_output_shapes_fold_shape_when_kept(inputs, expected_controls):
    result = TransformGraph(
        PLACEHOLDER_WITH_OUTPUT_SHAPES, inputs, ["out"], ["fold_constants(clear_output_shapes=false)"]
    )
    # A shape read off a fed input still waits for that input, as TensorFlow's own pass did.
    assert list(nodes_by_name(result)["cast/_0__cf__1"].input) == expected_controls
    np.testing.assert_array_equal(consts_of(result)["cast/_0__cf__1"], [1.0, 1.0, 3.0])


def test_output_shapes_are_cleared_by_default():
    result = TransformGraph(PLACEHOLDER_WITH_OUTPUT_SHAPES, ["ph"], ["out"], ["fold_constants"])
    assert op_counts(result)["Shape"] == 1
    assert not any("_output_shapes" in node.attr for node in result.node)


def test_output_node_is_never_replaced():
    result = TransformGraph(RELU_OF_ADD, [], ["relu_output"], ["fold_constants"])
    assert ops_by_name(result) == {"relu_output": "Relu", "add/_0__cf__0": "Const"}
    np.testing.assert_array_equal(run_graph(result, ["relu_output"])[0], [2.0, 0.0])


def test_placeholder_with_default():
    def graph():
        default = tf.constant([1.0, 2.0], name="default_value")
        listed = tf.raw_ops.PlaceholderWithDefault(input=default, shape=[2], name="listed")
        unlisted = tf.raw_ops.PlaceholderWithDefault(input=default, shape=[2], name="unlisted")
        tf.raw_ops.Mul(x=listed, y=tf.raw_ops.Neg(x=unlisted, name="neg"), name="out")

    result = TransformGraph(build(graph), ["listed"], ["out"], ["fold_constants"])
    nodes = nodes_by_name(result)
    assert nodes["listed"].op == "Placeholder" and not nodes["listed"].input
    assert list(nodes["listed"].attr["shape"].shape.dim) == list(build(graph).node[1].attr["shape"].shape.dim)
    assert ops_by_name(result) == {"listed": "Placeholder", "neg/_0__cf__0": "Const", "out": "Mul"}
    np.testing.assert_array_equal(run_graph(result, ["out"], {"listed": [3.0, 4.0]})[0], [-3.0, -8.0])


def test_prunes_unreachable_nodes_and_keeps_unused_inputs():
    def graph():
        add_then_mul()
        tf.raw_ops.Neg(x=tf.constant([5.0], name="unused_const"), name="unused_neg")
        placeholder("unused_input")

    result = TransformGraph(build(graph), ["ph", "unused_input"], ["out"], ["fold_constants"])
    assert set(ops_by_name(result)) == {"out", "ph", "unused_input", "add/_0__cf__0"}


def test_input_must_be_a_placeholder():
    with pytest.raises(TransformError, match="input 'add' is a Add, expected a Placeholder"):
        TransformGraph(ADD_THEN_MUL, ["add"], ["out"], ["fold_constants"])


def test_needs_an_output():
    with pytest.raises(TransformError, match="fold_constants: needs at least one output"):
        TransformGraph(ADD_THEN_MUL, ["ph"], [], ["fold_constants"])


def test_ignore_errors_leaves_graph_unchanged():
    assert TransformGraph(ADD_THEN_MUL, ["add"], ["out"], ["fold_constants(ignore_errors=true)"]) == ADD_THEN_MUL


def test_stateful_ops_are_not_folded():
    def graph():
        noise = tf.raw_ops.RandomUniform(shape=tf.constant([3], name="shape_const"), dtype=tf.float32, name="noise")
        tf.raw_ops.Mul(x=noise, y=placeholder("ph"), name="out")

    result = TransformGraph(build(graph), ["ph"], ["out"], ["fold_constants"])
    assert ops_by_name(result) == ops_by_name(build(graph))


def test_control_input_on_folded_subgraph_moves_to_its_replacement():
    def graph():
        ph = placeholder("ph", [2])
        gate = tf.raw_ops.Relu(features=ph, name="gate")
        with tf.control_dependencies([gate]):
            gated = tf.constant([1.0, 2.0], name="gated_const")
        neg = tf.raw_ops.Neg(x=gated, name="neg")
        tf.raw_ops.Mul(x=neg, y=ph, name="out")
        with tf.control_dependencies([neg]):
            tf.raw_ops.Mul(x=ph, y=ph, name="waits_for_neg")

    result = TransformGraph(build(graph), ["ph"], ["out", "waits_for_neg"], ["fold_constants"])
    nodes = nodes_by_name(result)
    assert list(nodes["neg/_0__cf__0"].input) == ["^gate"]
    # ^neg waited for nothing but what neg waited for: ^gate.
    assert list(nodes["waits_for_neg"].input) == ["ph", "ph", "^gate"]
    assert set(nodes) == {"ph", "gate", "neg/_0__cf__0", "out", "waits_for_neg"}


def test_lowered_cond_folds_inside_branches():
    variable = tf.Variable(3.0)

    def branchy(x):
        return tf.cond(tf.reduce_sum(x) > 0, lambda: x * (variable + 1.0), lambda: x - tf.constant(2.0) * 3.0)

    graph = frozen_function_graph(branchy, tf.TensorSpec([2], tf.float32))
    result = TransformGraph(graph, ["x"], ["Identity"], ["fold_constants"])
    assert op_counts(result)["Merge"] == op_counts(graph)["Merge"]
    assert "NoOp" not in op_counts(result)
    folded = [n for n in result.node if "__cf__" in n.name]
    # A Const folded inside a branch keeps the branch's pivot as control input.
    assert folded and all(any(i.startswith("^cond/pivot") for i in n.input) for n in folded)
    for x in ([1.0, 2.0], [-1.0, -2.0]):
        feeds = {"x": np.array(x, np.float32)}
        expected = run_graph(graph, ["Identity"], feeds)[0]
        np.testing.assert_array_equal(run_graph(result, ["Identity"], feeds)[0], expected)


def tf2_dense_graph():
    weights = tf.Variable(np.arange(6, dtype=np.float32).reshape(3, 2) / 6.0)
    bias = tf.Variable(np.array([0.5, -1.0], np.float32))
    return frozen_function_graph(
        lambda features: tf.nn.softmax(tf.matmul(features, weights) * tf.sqrt(4.0) + bias),
        tf.TensorSpec([None, 3], tf.float32, name="features"),
    )


TF2_FEATURES = np.arange(6, dtype=np.float32).reshape(2, 3)


def test_tf2_frozen_graph_loses_noop_and_duplicate_weights():
    graph = tf2_dense_graph()
    assert "NoOp" in op_counts(graph)
    result = TransformGraph(graph, ["features"], ["Identity"], ["fold_constants"])
    assert "NoOp" not in op_counts(result)
    assert op_counts(result) == {
        "Placeholder": 1, "Const": 3, "MatMul": 1, "Mul": 1, "AddV2": 1, "Softmax": 1, "Identity": 1
    }
    assert not [i for n in result.node for i in n.input if i.startswith("^")]
    feeds = {"features": TF2_FEATURES}
    np.testing.assert_array_equal(run_graph(result, ["Identity"], feeds)[0], run_graph(graph, ["Identity"], feeds)[0])


def test_tf1_frozen_graph():
    graph = tf.Graph()
    with graph.as_default():
        x = placeholder("x", [None, 3])
        w = tf.compat.v1.get_variable("w", initializer=np.arange(6, dtype=np.float32).reshape(3, 2))
        y = tf.nn.softmax(tf.matmul(x, w) * (tf.sqrt(tf.constant(4.0)) * tf.ones([2])), name="softmax")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(session, graph.as_graph_def(), [y.op.name])
    result = TransformGraph(frozen, ["x"], ["softmax"], ["fold_constants"])
    assert op_counts(result) == {"Placeholder": 1, "Const": 2, "MatMul": 1, "Mul": 1, "Softmax": 1}
    feeds = {"x": TF2_FEATURES}
    np.testing.assert_array_equal(run_graph(result, ["softmax"], feeds)[0], run_graph(frozen, ["softmax"], feeds)[0])


def iris_dnn_graph():
    """The notebook's model: 4 feature placeholders, 4 x 512 ReLU layers, 3 classes."""
    rng = np.random.default_rng(0)
    sizes = [4, 512, 512, 512, 512, 3]
    layers = [
        (tf.Variable(rng.normal(size=(m, n)).astype(np.float32) / 20), tf.Variable(np.zeros(n, np.float32)))
        for m, n in itertools.pairwise(sizes)
    ]

    def model(sepal_length, sepal_width, petal_length, petal_width):
        x = tf.stack([sepal_length, sepal_width, petal_length, petal_width], axis=1)
        for weights, bias in layers[:-1]:
            x = tf.nn.relu(tf.matmul(x, weights) + bias)
        return tf.nn.softmax(tf.matmul(x, layers[-1][0]) + layers[-1][1])

    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    return frozen_function_graph(model, *[tf.TensorSpec([None], tf.float32, name=n) for n in names]), names


def test_iris_notebook_list_keeps_the_outputs():
    # How long it takes is scripts/bench_transforms.py's business: a time limit here would fail
    # on a busy shared machine without anything being wrong.
    graph, inputs = iris_dnn_graph()
    transforms = [
        "remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)", "fold_batch_norms",
        "fold_old_batch_norms", "strip_unused_nodes", "sort_by_execution_order",
    ]
    result = TransformGraph(graph, inputs, ["Identity"], transforms)
    feeds = {name: np.linspace(0, 1, 5, dtype=np.float32) for name in inputs}
    np.testing.assert_allclose(
        run_graph(result, ["Identity"], feeds)[0], run_graph(graph, ["Identity"], feeds)[0], rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# The C++ engine as oracle
# ---------------------------------------------------------------------------------------------


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "inputs", "outputs", "transform"),
    [
        (ADD_THEN_MUL, ["ph"], ["out"], "fold_constants"),
        (ADD_THEN_MUL, ["ph:0"], ["out:0"], "fold_constants"),
        (ADD_THEN_MUL, ["ph"], ["out"], "fold_constants(exclude_op=Add)"),
        (ADD_THEN_MUL, ["ph"], ["out"], "fold_constants(max_constant_size_in_bytes=10)"),
        (SHAPE_THEN_CAST, ["ph"], ["out"], "fold_constants"),
        (RELU_OF_ADD, [], ["relu_output"], "fold_constants"),
        (PLACEHOLDER_WITH_OUTPUT_SHAPES, ["ph"], ["out"], "fold_constants(clear_output_shapes=false)"),
        (PLACEHOLDER_WITH_OUTPUT_SHAPES, ["ph", "shaped_ph"], ["out"], "fold_constants(clear_output_shapes=false)"),
        (SHAPE_OPS_OF_INPUT, ["ph"], ["out"], "fold_constants"),
    ],
    ids=["a", "a-ports", "b-exclude-op", "c-too-big", "d-shape", "e-output", "output-shapes", "output-shapes-fed",
         "size-rank-shape-n"],
)
def test_matches_oracle(graph, inputs, outputs, transform):
    ours = TransformGraph(graph, inputs, outputs, [transform])
    oracle = oracle_transform(graph, inputs, outputs, transform)
    assert canonical(ours) == canonical(oracle)
    ours_values, oracle_values = consts_of(ours), consts_of(oracle)
    for name, value in oracle_values.items():
        np.testing.assert_array_equal(ours_values[name], value, err_msg=name)


@requires_oracle
def test_tf1_graph_with_several_folds_matches_oracle_numbering():
    def graph():
        c = tf.constant([1.0, 2.0], name="c_const")
        ph = placeholder("ph")
        negated, exponent = tf.raw_ops.Neg(x=c, name="neg"), tf.raw_ops.Exp(x=c, name="exp")
        tf.raw_ops.AddN(inputs=[exponent, negated, ph], name="sum")
        tf.raw_ops.Mul(x=negated, y=ph, name="product")

    ours = TransformGraph(build(graph), ["ph"], ["sum", "product"], ["fold_constants"])
    oracle = oracle_transform(build(graph), ["ph"], ["sum", "product"], "fold_constants")
    # Names follow the sorted producer names: exp before neg.
    assert canonical(ours) == canonical(oracle)
    assert {"exp/_0__cf__0", "neg/_1__cf__1"} <= set(ops_by_name(ours))


@requires_oracle
def test_tf2_graph_differs_from_oracle_only_by_the_noop_it_keeps():
    graph = tf2_dense_graph()
    ours = TransformGraph(graph, ["features"], ["Identity"], ["fold_constants"])
    oracle = oracle_transform(graph, ["features"], ["Identity"], "fold_constants")
    # The oracle keeps the NoOp, so the weights survive twice: as Consts and as folded copies.
    extra = set(ops_by_name(oracle)) - set(ops_by_name(ours))
    assert "NoOp" in extra and {ops_by_name(oracle)[name] for name in extra} == {"NoOp", "Identity", "Const"}
    assert len(oracle.node) > len(ours.node)
    ours_canonical, oracle_canonical = canonical(ours), canonical(oracle)
    assert ours_canonical["Identity"][1] == [i for i in oracle_canonical["Identity"][1] if not i.startswith("^")]
    for name in ours_canonical:
        if name != "Identity":
            assert ours_canonical[name] == oracle_canonical[name], name
    feeds = {"features": TF2_FEATURES}
    np.testing.assert_array_equal(run_graph(ours, ["Identity"], feeds)[0], run_graph(oracle, ["Identity"], feeds)[0])


@requires_oracle
def test_tf2_recipe_matches_oracle():
    graph = tf2_dense_graph()
    recipe = ["remove_control_dependencies", "remove_nodes(op=Identity)", "fold_constants"]
    ours = TransformGraph(graph, ["features"], ["Identity"], recipe)
    oracle = oracle_transform(graph, ["features"], ["Identity"], recipe)
    assert canonical(ours) == canonical(oracle)
    ours_values = consts_of(ours)
    for name, value in consts_of(oracle).items():
        np.testing.assert_array_equal(ours_values[name], value, err_msg=name)


@requires_oracle
def test_unlisted_placeholder_is_left_alone_where_oracle_fails():
    def graph():
        negated = tf.raw_ops.Neg(x=tf.constant([1.0], name="c_const"), name="neg")
        tf.raw_ops.AddN(inputs=[negated, placeholder("ph", [1])], name="out")

    # The oracle tries to evaluate an unfed Placeholder whose shape is fully known.
    with pytest.raises(ValueError, match="You must feed a value for placeholder tensor 'ph'"):
        oracle_transform(build(graph), [], ["out"], "fold_constants")
    result = TransformGraph(build(graph), [], ["out"], ["fold_constants"])
    assert ops_by_name(result) == {"neg/_0__cf__0": "Const", "ph": "Placeholder", "out": "AddN"}


@requires_oracle
def test_output_read_by_other_nodes_is_not_folded_for_them_unlike_oracle():
    ours = TransformGraph(ADD_THEN_MUL, ["ph"], ["out", "add"], ["fold_constants"])
    oracle = oracle_transform(ADD_THEN_MUL, ["ph"], ["out", "add"], "fold_constants")
    # The oracle keeps 'add' for the output and adds a folded copy for 'out'; we keep only 'add'.
    assert set(ops_by_name(oracle)) - set(ops_by_name(ours)) == {"add/_0__cf__0"}
    assert list(nodes_by_name(ours)["out"].input) == ["add", "ph"]


@requires_oracle
def test_control_edge_to_folded_node_differs_from_oracle():
    def graph():
        ph = placeholder("ph", [2])
        neg = tf.raw_ops.Neg(x=tf.constant([1.0, 2.0], name="c_const"), name="neg")
        tf.raw_ops.Mul(x=neg, y=ph, name="out")
        with tf.control_dependencies([neg]):
            tf.raw_ops.Mul(x=ph, y=ph, name="waits_for_neg")

    ours = TransformGraph(build(graph), ["ph"], ["out", "waits_for_neg"], ["fold_constants"])
    oracle = oracle_transform(build(graph), ["ph"], ["out", "waits_for_neg"], "fold_constants")
    # The oracle keeps the stateless 'neg' (and its input) alive for the control edge alone.
    assert set(ops_by_name(oracle)) - set(ops_by_name(ours)) == {"neg", "c_const"}
    assert list(nodes_by_name(ours)["waits_for_neg"].input) == ["ph", "ph"]


@requires_oracle
def test_unneeded_nodes_do_not_change_the_result_unlike_oracle():
    def chain(with_unneeded_reader):
        def graph():
            first = tf.raw_ops.Neg(x=tf.constant([1.0, 2.0], name="c_const"), name="first")
            second = tf.raw_ops.Neg(x=first, name="second")
            if with_unneeded_reader:
                tf.raw_ops.Mul(x=second, y=placeholder("ph", [2]), name="unneeded")

        return build(graph)

    ours = [TransformGraph(chain(flag), [], ["second"], ["fold_constants"]) for flag in (False, True)]
    oracle = [oracle_transform(chain(flag), [], ["second"], "fold_constants") for flag in (False, True)]
    assert canonical(ours[0]) == canonical(ours[1]) == canonical(oracle[0])
    assert list(nodes_by_name(ours[1])["second"].input) == ["first/_0__cf__0"]
    # The oracle folded before pruning: a reader the output does not need changed its result.
    assert list(nodes_by_name(oracle[1])["second"].input) == ["first"]


@requires_oracle
def test_exclude_op_also_stops_static_shape_folding_unlike_oracle():
    transform = "fold_constants(exclude_op=Shape)"
    ours = TransformGraph(SHAPE_THEN_CAST, ["ph"], ["out"], [transform])
    oracle = oracle_transform(SHAPE_THEN_CAST, ["ph"], ["out"], transform)
    assert ops_by_name(ours) == ops_by_name(SHAPE_THEN_CAST)
    assert "Shape" not in op_counts(oracle)


@requires_oracle
def test_fed_inputs_keep_their_spelling_unlike_oracle():
    ours = TransformGraph(ADD_THEN_MUL, ["ph"], ["out"], ["fold_constants"])
    oracle = oracle_transform(ADD_THEN_MUL, ["ph"], ["out"], "fold_constants")
    assert list(nodes_by_name(oracle)["out"].input) == ["add/_0__cf__0", "ph:0"]
    assert list(nodes_by_name(ours)["out"].input) == ["add/_0__cf__0", "ph"]
