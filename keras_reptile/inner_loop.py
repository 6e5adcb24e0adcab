"""The functional inner loop shared by meta-training, evaluation and `adapt()`.

Reptile adapts a copy of the meta-weights to one task with a few steps of an
ordinary optimizer. Doing that with the wrapped model's variables would
mutate the meta-weights and serialise every task behind one set of
variables, so the loop here is functional: weights are tensors threaded
through `Layer.stateless_call`, and the optimizer update is a pure function
of (gradients, weights, optimizer state).

Keras optimizers cannot be used functionally on the TensorFlow backend
(`Optimizer.stateless_apply` raises there), so `InnerOptimizer` restates the
update rule of each supported Keras optimizer exactly as the optimizer
applies it: gradient clipping, then decoupled weight decay, then the
optimizer's own `update_step`, then variable constraints, with learning-rate
schedules evaluated at the inner iteration. Tests check each rule against
the real optimizer applied eagerly, step by step.

Everything here is built from differentiable TensorFlow ops, so the adapted
weights stay differentiable with respect to the initial weights (which
second-order methods such as MAML need).
"""

import keras
import tensorflow as tf

from keras_reptile import _compat

_OPT = keras.optimizers

# Inner loops up to this many steps are unrolled into the graph; longer ones
# (evaluation's 50 steps) become a `tf.while_loop`. Unrolling is ~20% faster
# per step (and much faster under XLA) but graph-optimisation time grows
# with the number of unrolled steps: 5 tasks x 50 unrolled steps took minutes
# to compile on a 2-core CPU.
MAX_UNROLLED_STEPS = 10

# Exact types: a user subclass may override `update_step`, and silently
# applying the parent's rule to it would give wrong numbers.
_SUPPORTED = {
    _OPT.SGD: "sgd",
    _OPT.Adam: "adam",
    _OPT.AdamW: "adam",
    _OPT.Adamax: "adamax",
    _OPT.RMSprop: "rmsprop",
    _OPT.Adagrad: "adagrad",
    _OPT.Lion: "lion",
}


def supported_optimizers():
    """Returns the names of the Keras optimizers usable as inner optimizers."""
    return sorted(cls.__name__ for cls in _SUPPORTED)


class InnerOptimizer:
    """A pure-function restatement of a Keras optimizer's update.

    Args:
        optimizer: A `keras.optimizers.Optimizer` of one of the types listed
            by `supported_optimizers()`. Only its hyperparameters are read;
            its variables are never touched.
        variables: The model variables the optimizer will update, in the
            order the weight tensors are passed to `update`. Used for the
            per-variable facts an optimizer consults: the weight-decay
            exclusions and the variable constraints.
    """

    # Indices of the weights the rule adapts (ANIL: the head's); None: all.
    # The inner loop takes no gradient for the others, which stay fixed.
    adapted = None
    # Meta-learned variables of the rule itself (Meta-SGD's learning rates),
    # learned with the meta-weights; a Keras optimizer's rule has none.
    parameters = ()

    def __init__(self, optimizer, variables):
        kind = _SUPPORTED.get(type(optimizer))
        if kind is None:
            raise TypeError(
                "Expected `inner_optimizer` to be one of the Keras optimizers "
                f"{supported_optimizers()} (or their string names). Received: "
                f"inner_optimizer={optimizer!r} of type "
                f"{type(optimizer).__name__}."
            )
        check_supported_options(optimizer)
        self.optimizer = optimizer
        self.kind = kind
        self.variables = list(variables)
        self._decay_mask = [
            optimizer.weight_decay is not None
            and _compat.uses_weight_decay(optimizer, v)
            for v in self.variables
        ]

    def with_parameters(self, values):
        """The rule with `parameters` read from tensors `values` instead.

        The task engine passes the parameters' values beside the
        meta-weights, so that an outer gradient reaches them; a rule without
        parameters is returned unchanged.
        """
        del values
        return self

    def learning_rate(self, step):
        """The learning rate Keras would use at 0-based iteration `step`."""
        lr = _compat.raw_learning_rate(self.optimizer)
        if isinstance(lr, _OPT.schedules.LearningRateSchedule):
            return lr(step)
        if isinstance(lr, keras.Variable):
            return lr.value
        if callable(lr):
            return lr()
        return lr

    def init(self, params):
        """Returns the optimizer state for a fresh optimizer on `params`."""
        opt = self.optimizer
        zeros = [tf.zeros_like(p) for p in params]
        if self.kind == "sgd":
            return {"m": zeros} if opt.momentum != 0 else {}
        if self.kind == "adam":
            state = {"m": zeros, "v": list(zeros)}
            if opt.amsgrad:
                state["v_hat"] = list(zeros)
            return state
        if self.kind == "adamax":
            return {"m": zeros, "u": list(zeros)}
        if self.kind == "rmsprop":
            state = {"v": zeros}
            if opt.momentum > 0:
                state["m"] = list(zeros)
            if opt.centered:
                state["avg"] = list(zeros)
            return state
        if self.kind == "adagrad":
            return {
                "acc": [
                    tf.fill(tf.shape(p), tf.cast(opt.initial_accumulator_value, p.dtype))
                    for p in params
                ]
            }
        return {"m": zeros}  # lion

    def update(self, grads, params, state, step):
        """One optimizer step.

        Args:
            grads: Gradients, one per parameter (`None` leaves it unchanged,
                as Keras does for a variable without gradient).
            params: Current parameter tensors.
            state: The state from `init` or a previous `update`.
            step: 0-based iteration (the optimizer's `iterations` before the
                step), a Python int or scalar tensor.

        Returns:
            `(new_params, new_state)`.
        """
        opt = self.optimizer
        lr_value = self.learning_rate(step)
        live = [i for i, g in enumerate(grads) if g is not None]
        clipped = _clip([grads[i] for i in live], opt)
        new_params = list(params)
        new_state = {key: list(values) for key, values in state.items()}
        for i, g in zip(live, clipped):
            p = params[i]
            lr = tf.cast(lr_value, p.dtype)
            g = tf.cast(g, p.dtype)
            if self._decay_mask[i]:
                p = p - p * tf.cast(opt.weight_decay, p.dtype) * lr
            slots = {key: values[i] for key, values in state.items()}
            p, slots = getattr(self, "_" + self.kind)(g, p, slots, lr, step)
            constraint = getattr(self.variables[i], "constraint", None)
            if constraint is not None:
                p = constraint(p)
            new_params[i] = p
            for key, value in slots.items():
                new_state[key][i] = value
        return new_params, new_state

    # Each rule mirrors the `update_step` of the Keras optimizer, operation
    # for operation, so float32 results match the real optimizer bit for bit
    # or to the last ulp.

    def _sgd(self, g, p, s, lr, step):
        opt = self.optimizer
        if opt.momentum == 0:
            return p - g * lr, s
        momentum = tf.cast(opt.momentum, p.dtype)
        m = s["m"] * momentum - g * lr
        if opt.nesterov:
            return p + (m * momentum - g * lr), {"m": m}
        return p + m, {"m": m}

    def _adam(self, g, p, s, lr, step):
        opt = self.optimizer
        local_step = tf.cast(step + 1, p.dtype)
        beta_1_power = tf.pow(tf.cast(opt.beta_1, p.dtype), local_step)
        beta_2_power = tf.pow(tf.cast(opt.beta_2, p.dtype), local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = s["m"] + (g - s["m"]) * (1 - opt.beta_1)
        v = s["v"] + (tf.square(g) - s["v"]) * (1 - opt.beta_2)
        new = {"m": m, "v": v}
        if opt.amsgrad:
            v = tf.maximum(s["v_hat"], v)
            new["v_hat"] = v
        return p - (m * alpha) / (_sqrt(v) + opt.epsilon), new

    def _adamax(self, g, p, s, lr, step):
        opt = self.optimizer
        local_step = tf.cast(step + 1, p.dtype)
        beta_1_power = tf.pow(tf.cast(opt.beta_1, p.dtype), local_step)
        m = s["m"] + (g - s["m"]) * (1 - opt.beta_1)
        u = tf.maximum(opt.beta_2 * s["u"], tf.abs(g))
        p = p - (lr * m) / ((1 - beta_1_power) * (u + opt.epsilon))
        return p, {"m": m, "u": u}

    def _rmsprop(self, g, p, s, lr, step):
        opt = self.optimizer
        rho = opt.rho
        v = rho * s["v"] + (1 - rho) * tf.square(g)
        new = {"v": v}
        if opt.centered:
            avg = rho * s["avg"] + (1 - rho) * g
            new["avg"] = avg
            denominator = v - tf.square(avg) + opt.epsilon
        else:
            denominator = v + opt.epsilon
        increment = (lr * g) / tf.sqrt(denominator)
        if opt.momentum > 0:
            m = opt.momentum * s["m"] + increment
            new["m"] = m
            return p - m, new
        return p - increment, new

    def _adagrad(self, g, p, s, lr, step):
        acc = s["acc"] + tf.square(g)
        p = p - (lr * g) / tf.sqrt(acc + self.optimizer.epsilon)
        return p, {"acc": acc}

    def _lion(self, g, p, s, lr, step):
        opt = self.optimizer
        beta_1 = tf.cast(opt.beta_1, p.dtype)
        beta_2 = tf.cast(opt.beta_2, p.dtype)
        p = p - lr * tf.sign(s["m"] * beta_1 + g * (1.0 - beta_1))
        m = s["m"] * beta_2 + g * (1.0 - beta_2)
        return p, {"m": m}


def get_optimizer(identifier=None):
    """Resolves and validates an inner optimizer.

    Args:
        identifier: A Keras optimizer instance, string name or config;
            `None` gives the paper's `Adam(learning_rate=1e-3, beta_1=0.0)`.

    Returns:
        A `keras.optimizers.Optimizer` that `InnerOptimizer` supports.
    """
    if identifier is None:
        optimizer = _OPT.Adam(1e-3, beta_1=0.0)
    else:
        optimizer = _OPT.get(identifier)
    InnerOptimizer(optimizer, [])  # raises for unsupported types or options
    return optimizer


def check_supported_options(optimizer):
    """Rejects optimizer options the functional inner loop cannot honour."""
    unsupported = {
        "use_ema": optimizer.use_ema,
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
        "loss_scale_factor": optimizer.loss_scale_factor,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(
                f"The inner optimizer does not support `{name}`: adaptation "
                "runs a fixed number of plain optimizer steps from a fresh "
                f"optimizer state. Received: {name}={value!r}"
            )


@tf.custom_gradient
def _sqrt(x):
    """`tf.sqrt(x)` for x >= 0, with derivative 0 instead of inf at x = 0.

    Adam's second moment is exactly 0 for a weight that never had a
    gradient (e.g. an unused class of a prototype head); MAML differentiates
    through `sqrt(v)`, and inf times the zero gradient flowing there is NaN.
    The values are those of `tf.sqrt`, from that one op: the guard costs
    nothing when nothing is differentiated (evaluation, Reptile, FOMAML),
    where it was a tenth of an evaluation's op time.
    """
    y = tf.sqrt(x)

    def grad(upstream):
        return tf.where(x > 0, tf.raw_ops.SqrtGrad(y=y, dy=upstream), 0.0)

    return y, grad


def _clip(grads, opt):
    """Clips as Keras's TensorFlow optimizers do; returns dense gradients."""
    # Same precedence as `Optimizer._clip_gradients`. The TensorFlow backend
    # clips each gradient with `tf.clip_by_norm`, which for the
    # `IndexedSlices` of an embedding takes the norm of the slices as they
    # are (repeated rows not yet summed): clip before densifying.
    if opt.clipnorm and opt.clipnorm > 0:
        return [tf.convert_to_tensor(tf.clip_by_norm(g, opt.clipnorm)) for g in grads]
    grads = [tf.convert_to_tensor(g) for g in grads]
    if opt.global_clipnorm and opt.global_clipnorm > 0:
        norm = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in grads])))
        clip = opt.global_clipnorm
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return [g * scale for g in grads]
    if opt.clipvalue and opt.clipvalue > 0:
        return [tf.clip_by_value(g, -opt.clipvalue, opt.clipvalue) for g in grads]
    return grads


def stateless_call(
    model, params, state, x, *, training, return_losses=False, layer=None
):
    """Calls `model` on `x` with its variables replaced by tensors.

    Like `Layer.stateless_call`, but through `model.__call__`, so that the
    training mode reaches every layer even when the model's own `call` takes
    no `training` argument.

    `layer`, if given, is called instead of `model`: a part of it (e.g. a
    model computing an intermediate output) whose variables are among
    `model`'s.

    Returns:
        `(outputs, new_state)`, plus the model's losses (regularisers,
        activity losses) computed from `params` when `return_losses`.
    """
    mapping = list(zip(model.trainable_variables, params))
    mapping += list(zip(model.non_trainable_variables, state))
    with keras.StatelessScope(
        state_mapping=mapping, collect_losses=return_losses
    ) as scope:
        outputs = (model if layer is None else layer)(x, training=training)
        losses = model.losses if return_losses else None
    new_state = [scope.get_current_value(v) for v in model.non_trainable_variables]
    if return_losses:
        return outputs, new_state, losses
    return outputs, new_state


def fori_loop(num_iterations, body, state):
    """Runs `state = body(i, state)` for `i` in `range(num_iterations)`.

    A Python int unrolls the loop into the graph (fastest for the handful of
    steps of meta-training, and what XLA compiles best); a tensor builds a
    `tf.while_loop`, so the count can be an input of a served graph.
    """
    if isinstance(num_iterations, int):
        for i in range(num_iterations):
            state = body(i, state)
        return state
    return tf.while_loop(
        lambda i, _: i < num_iterations,
        lambda i, s: (i + 1, body(i, s)),
        (tf.constant(0, tf.int32), state),
    )[1]


def is_unrolled(steps, recompute=False):
    """Whether `adapt(steps=steps, recompute=recompute)` unrolls its loop.

    Args:
        steps: The `steps` argument of `adapt`.
        recompute: The `recompute` argument of `adapt`.

    Returns:
        True if the steps are unrolled into the graph, False if they run in
        a `tf.while_loop`.
    """
    return isinstance(steps, int) and (steps <= MAX_UNROLLED_STEPS or recompute)


def adapt(
    model,
    trainable,
    non_trainable,
    x,
    y,
    *,
    loss_fn,
    optimizer,
    steps,
    batch_size,
    optimizer_state=None,
    first_iteration=0,
    return_optimizer_state=False,
    recompute=False,
):
    """Adapts weights to one task, functionally.

    Step `t` trains on the support rows `(t * batch_size + j) mod S`,
    `j = 0..batch_size-1`, so the batches walk through the (already
    shuffled) support set in order and wrap around.

    Args:
        model: A built Keras model; only its structure is used.
        trainable: Tensors for `model.trainable_variables` (the start point).
        non_trainable: Tensors for `model.non_trainable_variables`.
        x: Support inputs `[S, *input_shape]`.
        y: Support targets `[S, ...]`.
        loss_fn: `loss_fn(y_true, y_pred)` returning a scalar. Losses the
            model adds itself (regularisers, activity losses) are added,
            computed from the adapted weights.
        optimizer: An `InnerOptimizer`.
        steps: Number of steps; a Python int up to `MAX_UNROLLED_STEPS` (any
            Python int with `recompute`) is unrolled, anything else runs in
            a `tf.while_loop`.
        batch_size: Rows per step, Python int.
        optimizer_state: The optimizer state to start from (as returned by
            `InnerOptimizer.init`); `None` for a fresh optimizer.
        first_iteration: The optimizer's iteration count at the start
            (learning-rate schedules and bias corrections use it).
        return_optimizer_state: Whether to also return the final optimizer
            state.
        recompute: Whether a gradient taken through the loop (second-order
            MAML) recomputes each step's activations from the step's inputs
            instead of keeping them: memory for the carried weights and
            optimizer state per step instead of every activation, for about
            one more forward and backward pass per step.

    Returns:
        `(trainable, non_trainable)` after adaptation, and the optimizer
        state if `return_optimizer_state`.
    """
    if recompute and not isinstance(steps, int):
        raise ValueError(
            "Expected a Python int number of steps with `recompute=True` (the "
            f"recomputed loop is unrolled). Received: steps={steps!r}"
        )

    def task_loss(params, nt, xb, yb):
        y_pred, new_nt, losses = stateless_call(
            model, params, nt, xb, training=True, return_losses=True
        )
        loss = loss_fn(yb, y_pred)
        if losses:
            loss = loss + tf.add_n([tf.cast(tf.reduce_sum(l), loss.dtype) for l in losses])
        return loss, new_nt

    params, nt, optimizer_state = minimize(
        task_loss,
        trainable,
        non_trainable,
        x,
        y,
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        optimizer_state=optimizer_state,
        first_iteration=first_iteration,
        recompute=recompute,
    )
    if return_optimizer_state:
        return params, nt, optimizer_state
    return params, nt


def minimize(
    loss_fn,
    trainable,
    non_trainable,
    x,
    y,
    *,
    optimizer,
    steps,
    batch_size,
    optimizer_state=None,
    first_iteration=0,
    recompute=False,
    rows_axis=0,
):
    """The inner loop of `adapt` around any loss: batches, gradients, updates.

    Args:
        loss_fn: `loss_fn(params, non_trainable, x_batch, y_batch)` returning
            the scalar loss and the non-trainable values after the pass.
        trainable, non_trainable, x, y, optimizer, steps, batch_size,
        optimizer_state, first_iteration, recompute: As for `adapt`.
        rows_axis: The axis of `x` and `y` that holds the support rows
            (1 when a leading axis holds tasks).

    Returns:
        `(trainable, non_trainable, optimizer_state)` after the steps.
    """
    if isinstance(steps, int) and not is_unrolled(steps, recompute):
        steps = tf.constant(steps, tf.int32)
    num_rows = tf.shape(x)[rows_axis]
    offsets = tf.range(batch_size)
    adapted = optimizer.adapted

    def step_fn(t, carry):
        params, state, nt = carry
        rows = (t * batch_size + offsets) % num_rows
        xb = tf.gather(x, rows, axis=rows_axis)
        yb = tf.gather(y, rows, axis=rows_axis)
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss, new_nt = loss_fn(params, nt, xb, yb)
        if adapted is None:
            grads = tape.gradient(loss, params)
        else:
            # Only the adapted weights' gradients are computed (ANIL: no
            # backward pass below the head); `update` keeps the others.
            grads = [None] * len(params)
            for i, g in zip(adapted, tape.gradient(loss, [params[i] for i in adapted])):
                grads[i] = g
        iteration = t
        if not (isinstance(first_iteration, int) and first_iteration == 0):
            iteration = tf.cast(first_iteration, tf.int64) + tf.cast(t, tf.int64)
        params, state = optimizer.update(grads, params, state, iteration)
        return params, state, list(new_nt)

    if recompute:
        step_fn = _recomputed(step_fn)
    params = list(trainable)
    if optimizer_state is None:
        optimizer_state = optimizer.init(params)
    carry = (params, optimizer_state, list(non_trainable))
    params, optimizer_state, nt = fori_loop(steps, step_fn, carry)
    return list(params), list(nt), optimizer_state


def _recomputed(step_fn):
    """`step_fn` whose activations are recomputed when differentiated.

    A custom gradient keeps only a step's inputs (the carried weights,
    optimizer state and statistics) for the backward pass and runs the step
    again there, under a tape, to differentiate it; the step's own inner
    `GradientTape` is recorded by that tape, so second-order terms are kept.
    (`tf.recompute_grad` cannot be used: it runs the forward pass with
    recording stopped, and the step needs its inner tape.) Only for unrolled
    loops: inside a `tf.while_loop` the gradient would capture tensors from
    outside the loop body.
    """

    def step(t, carry):
        # Distinct tensors per slot: one tensor in two slots (Adam's zero
        # moments, say) would get each slot's gradient twice.
        flat = [tf.identity(v) for v in tf.nest.flatten(carry)]
        floating = [v.dtype.is_floating for v in flat]

        def call(values):
            return tf.nest.flatten(step_fn(t, tf.nest.pack_sequence_as(carry, list(values))))

        @tf.custom_gradient
        def run(*inputs):
            def grad(*upstream):
                # The recomputation must wait for the backward pass: a data
                # dependency on the incoming gradient (as tf.recompute_grad
                # does; control dependencies are not kept by XLA), which
                # also keeps graph optimisers from merging it with the
                # forward pass.
                probe = next(u for u in upstream if u is not None and u.dtype.is_floating)
                probe = tf.reduce_max(tf.reshape(probe, [-1])[:1])
                zero = tf.where(tf.math.is_nan(probe), float("nan"), 0.0)
                again_inputs = [
                    v + tf.cast(zero, v.dtype) if f else v for v, f in zip(inputs, floating)
                ]
                with tf.GradientTape() as tape:
                    tape.watch([v for v, f in zip(again_inputs, floating) if f])
                    again = call(again_inputs)
                grads = tape.gradient(
                    again, [v for v, f in zip(again_inputs, floating) if f],
                    output_gradients=list(upstream),
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                grads = iter(grads)
                return [next(grads) if f else None for f in floating]

            # The forward pass keeps nothing for the outer tape (which in
            # eager mode would otherwise record every activation); its inner
            # tape watches the weights itself.
            return call([tf.stop_gradient(v) for v in inputs]), grad

        return tf.nest.pack_sequence_as(carry, list(run(*flat)))

    return step
