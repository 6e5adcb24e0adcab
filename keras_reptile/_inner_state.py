"""The inner optimizer's state, fresh per task or carried across meta-steps.

A task's inner loop starts its optimizer from an `InnerOptimizerState`:
`FRESH` (new slots, iteration 0: the default, every task on its own) or the
state carried over from earlier meta-steps (`carry_inner_optimizer_state=
True`, as in Reptile's reference code, where one Adam instance runs through
all tasks). The carried state lives in model variables (`CarriedInnerState`)
so that it is saved with the model; the functions here are pure and shared
by training, evaluation, `adapt()` and export.
"""

from typing import Any
from typing import NamedTuple

import tensorflow as tf

from keras_reptile import _distribution


class InnerOptimizerState(NamedTuple):
    """Where a task's inner optimizer starts (optax style: a plain tuple).

    Attributes:
        slots: The optimizer's slots as `InnerOptimizer.init` lays them out
            (a dict of lists of tensors, one per trainable variable), or None
            for a fresh optimizer.
        iteration: The optimizer's iteration count at the start (a Python
            int or a scalar int64 tensor), which drives Adam's bias
            correction and learning-rate schedules.
    """

    slots: Any = None
    iteration: Any = 0

    @property
    def is_fresh(self):
        return self.slots is None


FRESH = InnerOptimizerState()


def after_meta_step(start, final_slots, steps):
    """The carried state after a meta-step whose tasks all began at `start`.

    Every task started from the carried state; the next meta-step carries on
    from the mean of where they ended (Reptile's reference code runs tasks
    one after another, so there the state passes from task to task instead),
    `steps` iterations later.

    Args:
        start: The `InnerOptimizerState` the tasks started from.
        final_slots: Each local task's slots after its inner loop.
        steps: Inner steps per task.

    Returns:
        An `InnerOptimizerState` whose slots are this replica's share of the
        mean over all tasks (see `_distribution.replica_mean`).
    """
    slots = {
        key: [
            _distribution.replica_mean([task[key][i] for task in final_slots])
            for i in range(len(values))
        ]
        for key, values in start.slots.items()
    }
    return InnerOptimizerState(slots, start.iteration + steps)


class CarriedInnerState:
    """The carried inner-optimizer state, kept in non-trainable variables.

    The variables are made with the owner's `add_weight`, so Keras tracks and
    saves them as the owner's own (one `inner_<slot>_<variable path>` per
    slot and variable, then `inner_iterations`). The state is tied to the
    trainable variables and to the optimizer's type and slot layout it was
    made for; a new learning rate keeps it valid.

    Args:
        add_weight: The owning layer's `add_weight`.
        rule: The `inner_loop.InnerOptimizer` of the inner loop.
    """

    def __init__(self, add_weight, rule):
        variables = rule.variables
        initial = rule.init([v.value for v in variables])
        self._slots = {}
        for key, values in initial.items():
            self._slots[key] = []
            for variable, value in zip(variables, values):
                slot = add_weight(
                    shape=variable.shape,
                    dtype=variable.dtype,
                    initializer="zeros",
                    trainable=False,
                    name=f"inner_{key}_" + variable.path.replace("/", "_"),
                )
                slot.assign(value)
                self._slots[key].append(slot)
        self._iterations = add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            name="inner_iterations",
        )
        self._made_for = layout(rule)

    def read(self, rule):
        """The carried state's tensors, after checking it still fits `rule`.

        Returns:
            An `InnerOptimizerState`.

        Raises:
            ValueError: If the trainable variables or the optimizer changed
                since the state was made.
        """
        expected, received = self._made_for, layout(rule)
        if expected != received:
            raise ValueError(
                "Expected the trainable variables and the inner optimizer to "
                "be the ones the carried inner-optimizer state was made for "
                "(`carry_inner_optimizer_state=True`): variables "
                f"{list(expected[0])}, {expected[1]} with slots "
                f"{list(expected[2])}. Received variables {list(received[0])}, "
                f"{received[1]} with slots {list(received[2])}. Build a new "
                "`ReptileModel` after freezing layers or changing the optimizer."
            )
        # Tensors, read once: the inner loops must not see the variables
        # change under them.
        slots = {
            key: [tf.convert_to_tensor(v) for v in values]
            for key, values in self._slots.items()
        }
        return InnerOptimizerState(slots, self._iterations.value)

    def assign(self, state):
        """Stores `state`, whose slots are replica shares (`after_meta_step`)."""
        variables, values = [self._iterations], [state.iteration]
        for key, slots in self._slots.items():
            variables.extend(slots)
            values.extend(state.slots[key])
        _distribution.assign_summed(variables, values)


def layout(rule):
    """What a carried state is tied to: variables, optimizer type, slot names."""
    return (
        tuple(v.path for v in rule.variables),
        type(rule.optimizer).__name__,
        tuple(sorted(rule.init([]))),
    )
