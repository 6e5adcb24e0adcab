"""The checks a meta-learner's entry points run on their data, before any work.

`fit`, `evaluate`, `predict`, the `*_on_batch` methods, `adapt`,
`adapt_and_predict` and `meta_update` check, then run. `EntryChecks` is
given what the checks read (the wrapped network, the compiled loss, the
algorithm, the strategy, a build callback), never the meta-learner; the
rules themselves live in `_validation` and `_distribution`.
"""

from keras_reptile import _compat
from keras_reptile import _distribution
from keras_reptile import _validation
from keras_reptile import algorithms
from keras_reptile._losses import loss_kind


class EntryChecks:
    """Checks a call's data against a meta-learner's network, loss and strategy.

    Args:
        network: The wrapped `keras.Model`.
        algorithm: The `keras_reptile.algorithms.MetaAlgorithm`.
        strategy: The distribution strategy: its replica count splits the
            meta-batch, and an unbuilt network is built in its scope.
        build: `build(example_shape)`: builds the meta-learner (and the
            network) for examples of that shape.
        compiled: Whether the meta-learner is compiled.
        compiled_loss: Keras's compiled loss (None before `compile`).
        loss: The `loss` given to `compile()`.
        head: The meta-learner's head, or None.
    """

    def __init__(self, network, algorithm, strategy, build, *, compiled,
                 compiled_loss, loss, head):
        self._network = network
        self._algorithm = algorithm
        self._strategy = strategy
        self._build = build
        self._compiled = (compiled, compiled_loss, loss, head)

    def compiled(self):
        """Raises unless the meta-learner is compiled with a loss that fits."""
        _validation.check_compiled(*self._compiled)

    def call(self, kind, x, is_batch=False, validation_data=None, callbacks=None,
             optimizer=None):
        """Checks the data of a `fit`/`evaluate`/`predict`/`*_on_batch` call.

        Args:
            kind: "train", "test" or "predict".
            x: The call's data (a dataset, or one batch if `is_batch`).
            is_batch: Whether `x` is one batch (`*_on_batch`).
            validation_data: `fit`'s validation data.
            callbacks: `fit`'s callbacks (None for `train_on_batch`).
            optimizer: The outer optimizer, whose learning rate the
                callbacks are checked against.
        """
        validation = _validation.episode_element(validation_data)
        replicas = self._strategy.num_replicas_in_sync
        _distribution.check_even_split(_validation.meta_batch_size(validation), replicas)
        _distribution.check_even_split(_validation.meta_batch_size(x, is_batch), replicas)
        if kind == "train":
            _validation.check_second_order_replicas(
                self._algorithm, self._algorithm.differentiates_inner_loop, replicas
            )
        if kind != "predict":
            self.episode_data("x", x, is_batch)
        if kind != "train":
            return
        _validation.check_trainable(self._network)
        if validation is not None:
            self.episode_data("validation_data", validation)
        if callbacks is not None:
            _validation.check_callbacks(callbacks, _compat.raw_learning_rate(optimizer))

    def episode_data(self, source, data, is_batch=False):
        """Checks the targets of the episodes a call will read, up front.

        See `_validation.check_episode_targets`; data that is not episodes,
        or whose shapes are known only once the step runs, is left to the
        step's own checks.

        Args:
            source: The argument's name for messages ("x", "validation_data").
            data: A dataset of episodes, or one batch if `is_batch`.
            is_batch: Whether `data` is one batch.
        """
        spec = _validation.episode_spec(data, is_batch)
        if spec is None:
            return
        self.compiled()
        example = _validation.example_spec(spec)
        if example is None:
            return
        example_shape, x_dtype = example
        if not self._network.built:
            with self._strategy.scope():
                self._build(example_shape)
        _validation.check_episode_targets(
            source, data, spec,
            _validation.output_shape(self._network, example_shape, x_dtype),
            loss_kind(self._compiled[2])[0],
        )

    def episodes(self, data, check_query_y=True):
        """A step's episode batch as checked tensors, the network built for it.

        Args:
            data: One batch of episodes (a dict of `[tasks, rows, ...]`).
            check_query_y: Whether `query_y` must be present.

        Returns:
            The dict of tensors (see `_validation.check_episodes`).
        """
        episodes = _validation.check_episodes(data, check_query_y)
        self._build(episodes["support_x"].shape[2:])
        return episodes

    def prediction_episodes(self, data):
        """`predict`'s episode batch, whose `query_y` is ignored, as checked tensors."""
        data = dict(data)
        # Only the shape matters for the checks; no loss is computed.
        data["query_y"] = data["support_y"][:, :1]
        episodes = self.episodes(data, check_query_y=False)
        episodes["query_y"] = None
        return episodes

    def task(self, support_x, support_y, query_x=None, query_y=None,
             query_targets=False):
        """One task's arrays as checked tensors (see `_validation.check_task`)."""
        self.compiled()
        return _validation.check_task(
            self._network, loss_kind(self._compiled[2])[0], support_x, support_y,
            query_x, query_y, build=self._build, query_targets=query_targets,
        )

    def meta_update_task(self, support_x, support_y, query_x=None, query_y=None):
        """`meta_update`'s task as a dict of checked tensors, keyed as episodes.

        Without a query set, Reptile's support set stands in for it (its
        outer gradient never reads the query set; it only shapes the logs);
        an algorithm that differentiates a query loss raises instead.
        """
        support_x, support_y, query_x, query_y = self.task(
            support_x, support_y, query_x, query_y, query_targets=True
        )
        if query_x is None:
            _validation.check_query_needed(
                self._algorithm, not isinstance(self._algorithm, algorithms.Reptile)
            )
            query_x, query_y = support_x, support_y
        return dict(zip(_validation.EPISODE_KEYS, (support_x, support_y, query_x, query_y)))


def steps(steps, default):
    """A call's `steps` argument checked, or `default` where it is None."""
    if steps is None:
        return default
    return _validation.check_positive_int("steps", steps)
