"""How a meta-step is shared across `tf.distribute` replicas.

Each replica adapts an equal share of a meta-batch's tasks, and the outer
optimizer sums gradients across replicas (Keras's convention), so every
per-replica quantity is a local mean scaled by `1 / replicas`. These helpers
are the one place that arithmetic and the cross-replica writes live; they
read the strategy of the current context, so they work unchanged on one
device.
"""

import tensorflow as tf

from keras_reptile import _compat


def replicas():
    """The number of replicas of the current strategy (1 outside one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_mean(values):
    """This replica's share of the mean of `values` over all tasks.

    Args:
        values: One tensor per local task, all of the same shape.

    Returns:
        `sum(values) / len(values) / replicas()`: summed across replicas it
        is the mean over every task of the meta-batch.
    """
    return tf.add_n(list(values)) / len(values) / replicas()


def replica_share(optimizer, gradient):
    """A replica's contribution to an outer gradient the optimizer sums.

    `scale_loss` is the identity for a plain optimizer; a
    `LossScaleOptimizer` (mixed precision) or `loss_scale_factor` divides
    gradients by the scale, which these gradients never had.

    Args:
        optimizer: The outer `keras.optimizers.Optimizer`.
        gradient: This replica's mean gradient, a list of tensors.

    Returns:
        The list of tensors to hand to `optimizer.apply`.
    """
    share = 1.0 / replicas()
    return [optimizer.scale_loss(g * share) for g in gradient]


def unscaled_loss(loss):
    """A task's loss without Keras's division by the number of replicas.

    Keras losses are divided by the number of replicas under
    `tf.distribute`, for gradients that are summed across replicas; a task's
    loss and its inner loop are local to one replica.
    """
    count = replicas()
    return loss * count if count > 1 else loss


def check_even_split(tasks, count):
    """Raises before any work unless `tasks` splits evenly over `count` replicas.

    Args:
        tasks: The meta-batch size, or None if unknown (nothing to check).
        count: The number of replicas.
    """
    if tasks is not None and tasks % count:
        # tf.data splits a batch into near-equal parts, larger ones first.
        raise_uneven_split(
            [tasks // count + (i < tasks % count) for i in range(count)]
        )


def raise_uneven_split(sizes):
    """Raises the error for a meta-batch split over replicas as `sizes`."""
    raise ValueError(
        "Expected the meta-batch to divide evenly across the "
        f"{len(sizes)} replicas (each replica adapts its share of "
        f"the tasks). Received a meta-batch of {sum(sizes)} tasks, "
        f"split as {sizes}. Use a `meta_batch_size` that is a "
        f"multiple of {len(sizes)}."
    )


def assign_summed(variables, values):
    """Assigns the cross-replica sums of `values` to mirrored `variables`.

    Float values are replica-local shares (see `replica_mean`) and are summed
    across replicas; integer values (seed state) are the same on every
    replica and are assigned as they are. On one replica, or outside a
    replica context, the values are assigned directly.
    """
    context = tf.distribute.get_replica_context()
    if context is None or replicas() == 1:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return
    if not variables:
        return
    floats = [i for i, v in enumerate(values) if v.dtype.is_floating]
    # `all_reduce` of an empty list fails under MirroredStrategy.
    reduced = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [values[i] for i in floats]
    ) if floats else []
    values = list(values)
    for i, value in zip(floats, reduced):
        values[i] = value
    assign_everywhere(variables, values)


def assign_everywhere(variables, values):
    """Writes `values` (equal on every replica) to every copy of `variables`.

    Keras creates BatchNormalization statistics with aggregation "none",
    which cannot be assigned in a replica context, and a `tf.cond` whose
    branch assigns mirrored variables cannot run there either: every copy is
    updated in a cross-replica merge call instead.
    """
    context = tf.distribute.get_replica_context()
    if context is None or replicas() == 1:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return

    def update(strategy, *values):
        for variable, value in zip(variables, values):
            strategy.extended.update(
                variable.value, lambda v, x: v.assign(x), args=(value,), group=False
            )

    context.merge_call(update, args=tuple(values))


def one_task_per_replica(task, count):
    """A meta-batch of `count` copies of one task's arrays.

    Under `tf.distribute` each replica adapts its share of a meta-batch: one
    copy of the task per replica, and identical copies average to the task's
    own update.

    Args:
        task: A dict of `[rows, ...]` tensors.
        count: The number of replicas.

    Returns:
        A dict of `[count, rows, ...]` tensors.
    """
    return {key: tf.stack([value] * count) for key, value in task.items()}


def first_replica_batch(data, strategy):
    """The first replica's part of a distributed batch, as tensors.

    Raises the uneven-split error if the replicas' parts of an episode batch
    differ in size (tf.data splits a batch that does not divide evenly).
    """
    if isinstance(data, dict) and "support_x" in data:
        sizes = [
            int(v.shape[0])
            for v in strategy.experimental_local_results(data["support_x"])
        ]
        if len(set(sizes)) > 1:
            raise_uneven_split(sizes)
    return tf.nest.map_structure(
        lambda v: tf.convert_to_tensor(strategy.experimental_local_results(v)[0]),
        data,
    )


def logs_for_workers(logs):
    """Step logs that Keras can reduce across workers.

    Keras reduces step outputs across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars
    (tensorflow/tensorflow#72388); over a length-1 axis it is the mean over
    replicas, as on one worker.
    """
    if not _compat.in_multi_worker_mode(tf.distribute.get_strategy()):
        return logs
    return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}


def tasks_run_in_parallel(setting):
    """Whether a meta-batch's tasks adapt concurrently (`parallel_tasks`).

    Args:
        setting: The meta-learner's `parallel_tasks`: `"auto"`, True or False.

    Returns:
        `setting` if it is a bool. On `"auto"`, True on machines without GPUs
        and TPUs, where concurrent tasks overlap the per-op overhead of small
        ops on the cores; False on those, whose kernels run one at a time
        anyway and where chained tasks keep one task's activations alive.
    """
    if setting != "auto":
        return setting
    return not (tf.config.list_logical_devices("GPU")
                + tf.config.list_logical_devices("TPU"))
