"""Training methods by name. A method is a small module with a `Config` dataclass (its YAML section,
named after the method) and a class with: plan(), on_epoch_start(), step(), on_epoch_end(),
state_dict(), load_state_dict(). `step` leaves the update direction in the parameters' .grad; the
training loop (train.py) clips and applies it. To add a method: write methods/NAME.py, decorate the
class with @register("NAME"), and import the module below."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def method_configs() -> dict[str, type]:
    return {name: cls.Config for name, cls in METHODS.items()}


from . import dualselect, sft  # noqa: E402,F401  (registration)
