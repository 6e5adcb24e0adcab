"""Properties for the meta-learner's settings: fixed, or checked on assignment.

Keras's `__setattr__` would store an assigned value beside a read-only
property, where nothing reads it; these properties refuse the assignment or
check the value instead.
"""


def fixed_at_construction(name):
    """A read-only property over `_<name>` whose assignment raises `AttributeError`.

    Args:
        name: The setting's name; its value lives in the `_<name>` attribute.

    Returns:
        The `property`.
    """

    def get(self):
        return getattr(self, "_" + name)

    def refuse(self, value):
        raise AttributeError(
            f"`{name}` is fixed at construction: it shapes the compiled steps "
            f"and the model's variables. Build a new `{type(self).__name__}` "
            f"with {name}={value!r} instead."
        )

    return property(get, refuse)


def checked_setting(name, check):
    """A property over `_<name>` that stores `check(name, value)` on assignment.

    Args:
        name: The setting's name; its value lives in the `_<name>` attribute.
        check: `check(name, value) -> value`, raising on a bad value (e.g.
            `_validation.check_positive_int`).

    Returns:
        The `property`.
    """

    def get(self):
        return getattr(self, "_" + name)

    def set(self, value):
        setattr(self, "_" + name, check(name, value))

    return property(get, set)
