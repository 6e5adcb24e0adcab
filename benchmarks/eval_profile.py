"""Where an evaluation task's time goes: TensorFlow's per-op timings.

Traces `ReptileModel`'s evaluation of one meta-batch (the paper's 5-way
1-shot Omniglot setting by default: conv4, 5 tasks, 50 inner steps of 5
images, support statistics, query predictions), runs that graph with
TensorFlow's step statistics (`RunOptions.FULL_TRACE`) and sums the time of
every op execution by op type, then groups the types into what they do
(convolutions forward and backward, the rest of the forward and backward
passes, the inner optimizer's elementwise update, the loop's bookkeeping):

    python benchmarks/eval_profile.py
    python benchmarks/eval_profile.py --ways 20 --batch 10
    python benchmarks/eval_profile.py --batched-tasks false   # one branch per task

Op times are wall time per op summed over ops, so with the executor running
ops on several threads at once they add up to more than the step's wall
time; the shares are what matters. The traced run is slower than an
untraced one (the tracing itself costs per op).
"""

import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import keras_reptile  # noqa: E402

# Op types by job; the rest is "other" (shapes, gathers, control flow).
GROUPS = {
    "convolution, forward": ("Conv2D", "_FusedConv2D"),
    "convolution, backward (filter)": ("Conv2DBackpropFilter",),
    "convolution, backward (input)": ("Conv2DBackpropInput",),
    "dense": ("MatMul", "_MklMatMul", "BatchMatMulV2", "_FusedMatMul"),
    "batch norm and activations": (
        "Mean", "SquaredDifference", "Rsqrt", "Relu", "ReluGrad", "RsqrtGrad",
        "Sum", "Tile", "BroadcastTo", "Softmax", "LogSoftmax",
        "SparseSoftmaxCrossEntropyWithLogits", "BiasAdd", "BiasAddGrad"),
    "elementwise arithmetic (optimizer, loss)": (
        "Mul", "AddV2", "Sub", "RealDiv", "Sqrt", "Square", "Pow", "Neg",
        "SelectV2", "Greater", "Maximum", "AddN", "Cast", "DivNoNan", "FloorMod",
        "FloorDiv", "Exp", "Log", "ZerosLike", "OnesLike"),
    "loop and graph bookkeeping": (
        "Enter", "Exit", "Merge", "Switch", "NextIteration", "LoopCond", "Identity",
        "Const", "Less", "LogicalAnd", "Reshape", "Shape", "ShapeN", "Squeeze",
        "ExpandDims", "Pack", "StridedSlice", "ConcatV2", "Range", "GatherV2",
        "Transpose", "Unpack",
        "ReadVariableOp", "StopGradient", "NoOp", "_Retval", "_Arg"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3,
                        help="traced runs after one warm-up run; op times summed")
    parser.add_argument("--batched-tasks", choices=["auto", "false"], default="auto",
                        help="ReptileModel(batched_tasks=...): auto adapts the "
                        "tasks in one computation, false one branch per task")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    model = keras_reptile.ReptileModel(
        keras_reptile.models.conv4((28, 28, 1), num_classes=args.ways),
        eval_inner_steps=args.steps, eval_inner_batch_size=args.batch,
        batched_tasks={"auto": "auto", "false": False}[args.batched_tasks])
    model.compile(optimizer="sgd", jit_compile=False, loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((100 * 20, 28, 28, 1)).astype("float32")
    y = np.repeat(np.arange(100), 20)
    episodes = keras_reptile.episodes.from_arrays(
        x, y, ways=args.ways, shots=args.shots, query_shots=1,
        meta_batch_size=args.meta_batch, seed=0)
    batch = next(iter(episodes))
    model.predict_on_batch(batch)  # builds the model

    # The evaluation computation with the meta-weights frozen in as
    # constants, as a TF1 graph, whose session can trace every op.
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    frozen = convert_variables_to_constants_v2(
        tf.function(model.predict_step).get_concrete_function(batch))
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    session = tf.compat.v1.Session(graph=graph)
    feed = {graph.get_tensor_by_name(t.name): value.numpy()
            for t, value in zip(frozen.inputs, tf.nest.flatten(batch))}
    output = frozen.outputs[0].name
    fetch = graph.get_tensor_by_name(output)
    session.run(fetch, feed)  # warm-up
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    by_type = collections.Counter()
    walls = []
    types = {n.name: n.op for n in graph.as_graph_def().node}
    for _ in range(args.runs):
        metadata = tf.compat.v1.RunMetadata()
        start = time.perf_counter()
        session.run(fetch, feed, options=options, run_metadata=metadata)
        walls.append(time.perf_counter() - start)
        for device in metadata.step_stats.dev_stats:
            for node in device.node_stats:
                name = node.node_name.split(":")[0]
                op = types.get(name) or node.timeline_label.split("=")[-1].split("(")[0].strip()
                by_type[op] += node.op_end_rel_micros - node.op_start_rel_micros
    total = sum(by_type.values())
    groups = collections.Counter()
    for op, micros in by_type.items():
        group = next((g for g, ops in GROUPS.items() if op in ops), "other")
        groups[group] += micros
    print(f"{args.meta_batch} tasks of {args.ways}-way {args.shots}-shot, {args.steps} "
          f"inner steps of {args.batch}: traced wall time "
          f"{1000 * np.median(walls):.0f} ms per meta-batch, op time summed "
          f"{total / 1000 / args.runs:.0f} ms")
    for group, micros in groups.most_common():
        print(f"  {group:<42} {100 * micros / total:5.1f}%")
    print("Top op types:")
    for op, micros in by_type.most_common(12):
        print(f"  {op:<42} {100 * micros / total:5.1f}%")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir,
                        f"eval_profile-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(args=vars(args), wall_s=walls, op_micros=dict(by_type),
                       groups=dict(groups)), f, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
