"""Never apply a non-finite meta-step.

One diverging task (an inner learning rate too large for the data, a NaN in
an image, a huge outer step) turns the meta-weights into NaN in the very step
it happens, and Keras's `TerminateOnNaN` only stops after that step has been
applied and saved. The guard snapshots every variable a meta-step writes,
lets the step run, and puts the snapshot back if the step made a finite value
non-finite; the step's number and the first variable it broke are recorded in
a variable the host reads after each call of the train function, which then
raises before any callback (a backup, say) sees the broken step.
"""

import tensorflow as tf

from keras_reptile import _distribution


class NonFiniteGuard:
    """Undoes and reports a meta-step that made any variable non-finite.

    Kept out of Keras's variable tracking (a plain object, its variables are
    raw `tf.Variable`s): the flag is bookkeeping, not model state, so it is
    neither saved nor part of `model.weights`.

    Args:
        strategy: The model's distribution strategy; the flag variables are
            created in its scope.
    """

    def __init__(self, strategy):
        with strategy.scope():
            # 0: nothing went wrong; n: meta-step n (1-based) was undone.
            self._step = tf.Variable(
                0, dtype=tf.int64, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self._culprit = tf.Variable(
                0, dtype=tf.int64, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def run(self, variables, iterations, step_fn):
        """Runs `step_fn()`; restores `variables` if it broke one of them.

        Args:
            variables: Every variable `step_fn` may write.
            iterations: The outer optimizer's iteration counter (read before
                the step for the step's number).
            step_fn: The meta-step's updates.
        """
        floats = _floating(variables)
        before = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
        step = tf.identity(iterations) + 1
        step_fn()
        # A value that was already non-finite (a mask constant, say) is not
        # this step's doing; a finite one that became NaN or Inf is.
        broke = [
            tf.reduce_any(tf.logical_and(
                tf.math.is_finite(before[i]),
                tf.logical_not(tf.math.is_finite(tf.convert_to_tensor(variables[i]))),
            ))
            for i in floats
        ]
        broke = tf.stack(broke) if broke else tf.zeros([1], tf.bool)
        # Once a step was undone, the rest of a multi-step execution is too:
        # training stops at the first bad step.
        undo = tf.logical_or(tf.reduce_any(broke), self._step > 0)
        _restore_if(undo, variables, before)
        first = tf.logical_and(undo, self._step == 0)
        self._culprit.assign(tf.where(
            first, tf.argmax(tf.cast(broke, tf.int64), output_type=tf.int64),
            self._culprit,
        ))
        self._step.assign(tf.where(first, tf.cast(step, tf.int64), self._step))

    def check(self, variables_fn, context_fn):
        """Raises (and resets the flag) if a meta-step was undone.

        Args:
            variables_fn: Returns the same list that was passed to `run`.
            context_fn: Returns words for the message: what was kept.
        """
        step = int(self._step.numpy())
        if not step:
            return
        culprit = int(self._culprit.numpy())
        self._step.assign(0)
        variables = variables_fn()
        variable = variables[_floating(variables)[culprit]]
        name = getattr(variable, "path", variable.name)
        context = context_fn()
        raise FloatingPointError(
            f"Meta-step {step} made `{name}` non-finite (NaN or Inf), so it was "
            f"not applied and training stopped. {context} are those after "
            f"meta-step {step - 1}; backups are untouched. Common causes: an "
            "inner or outer learning rate too large for the data, or NaN/Inf "
            "in the training episodes."
        )


def _floating(variables):
    return [i for i, v in enumerate(variables) if tf.as_dtype(v.dtype).is_floating]


def _restore_if(undo, variables, before):
    if tf.distribute.get_replica_context() is None or _distribution.replicas() == 1:
        def restore():
            for variable, value in zip(variables, before):
                variable.assign(value)
            return tf.constant(True)

        tf.cond(undo, restore, lambda: tf.constant(False))
        return
    # A cond whose branch assigns mirrored variables cannot run in a replica
    # context, so every copy is written unconditionally; `undo` and the
    # values are the same on every replica (all synchronised after the step).
    _distribution.assign_everywhere(
        variables,
        [tf.where(undo, b, tf.convert_to_tensor(v)) for v, b in zip(variables, before)],
    )


def check_adaptation(weights_after, steps, variables, weights=None, outputs=None):
    """Raises if adapting to a task made a weight or an output non-finite.

    `fit`'s guard covers meta-steps; this covers `adapt()` and
    `adapt_and_predict()`, which would otherwise return a model with NaN
    weights or NaN predictions without a word. Finite results cost one
    check; only a non-finite weight makes it rerun adaptations of fewer
    steps (a bisection), to name the step that broke it.

    Args:
        weights_after: `weights_after(k)` returns the trainable weights
            after `k` adaptation steps, in the order of `variables`.
        steps: The number of steps of the adaptation checked.
        variables: The wrapped model's trainable variables at the
            meta-weights (their names go in the message).
        weights: The adapted weights, if at hand (`adapt`).
        outputs: The query outputs of the adapted weights (`adapt_and_predict`).

    Raises:
        FloatingPointError: If a weight or an output is NaN or Inf.
    """
    if outputs is not None and _all_finite(outputs):
        return
    if weights is not None and all(_all_finite(w) for w in weights):
        return
    if not all(_all_finite(v) for v in variables):
        name = _name(variables, _first_non_finite(variables))
        raise FloatingPointError(
            f"Expected finite meta-weights to adapt from. Received: `{name}` "
            "is already non-finite (NaN or Inf) before adaptation."
        )
    if weights is None:
        weights = weights_after(steps)
    if all(_all_finite(w) for w in weights):
        count = int(tf.math.count_nonzero(~tf.math.is_finite(outputs)))
        raise FloatingPointError(
            f"Expected finite outputs after adaptation. Received: {count} NaN "
            f"or Inf values in the query outputs, although all {steps} "
            "adaptation steps kept every weight finite: the query inputs are "
            "too large for the model (e.g. values near the float32 limit, "
            "3.4e38). Scale the inputs as in meta-training."
        )
    # The first step after which a weight is non-finite: the weights after
    # step `low - 1` are finite, those after step `high` are not.
    low, high = 1, steps
    while low < high:
        middle = (low + high) // 2
        if all(_all_finite(w) for w in weights_after(middle)):
            low = middle + 1
        else:
            high = middle
    broken = weights if high == steps else weights_after(high)
    name = _name(variables, _first_non_finite(broken))
    raise FloatingPointError(
        f"Adaptation step {high} of {steps} made `{name}` non-finite (NaN or "
        "Inf), so nothing was returned; the meta-weights are untouched. "
        "Common causes: an inner learning rate too large for the data, or "
        "support inputs too large for the model (e.g. values near the "
        "float32 limit, 3.4e38)."
    )


def _all_finite(value):
    value = tf.convert_to_tensor(value)
    if not value.dtype.is_floating:
        return True
    return bool(tf.reduce_all(tf.math.is_finite(value)))


def _first_non_finite(values):
    return next(i for i, v in enumerate(values) if not _all_finite(v))


def _name(variables, index):
    if index < len(variables):
        variable = variables[index]
        return getattr(variable, "path", getattr(variable, "name", f"weight {index}"))
    return f"weight {index}"


def kept_description(has_non_trainable, carries_inner_state):
    """What an undone meta-step keeps, as the start of `check`'s sentence.

    Args:
        has_non_trainable: Whether the network has non-trainable variables.
        carries_inner_state: Whether the inner optimizer's state is carried.

    Returns:
        E.g. "The meta-weights, the outer optimizer's state and the carried
        inner-optimizer state".
    """
    kept = ["the meta-weights", "the outer optimizer's state"]
    if has_non_trainable:
        kept.append("the non-trainable state (e.g. BatchNorm statistics)")
    if carries_inner_state:
        kept.append("the carried inner-optimizer state")
    text = ", ".join(kept[:-1]) + " and " + kept[-1]
    return text[0].upper() + text[1:]
