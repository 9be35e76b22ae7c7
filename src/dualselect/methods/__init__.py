"""Training methods by name. A method is a small module with a `Config` dataclass (its YAML section,
named after the method) and a class with: plan(), on_epoch_start(), step(), on_epoch_end(),
state_dict(), load_state_dict(). `step` leaves the update direction in the parameters' .grad; the
training loop (train.py) clips and applies it, and returns metrics that include `trained_samples` and
`trained_tokens`: the samples and supervised tokens the update was actually computed from (summed into
run_info.json's budget). To add a method: write methods/NAME.py, decorate the class with
@register("NAME", summary=..., paper=..., needs=...), and import the module below.

`needs` says which data the method reads besides the task set: "task" (task only), "task+reference"
(data.reference is a pool of examples whose behaviour must be kept, e.g. safe refusals) or
"task+alignment" (data.reference is alignment data the method trains on directly) or "task+harmful" (known
harmful request -> compliance pairs that train a safety-degraded reference model)."""

from __future__ import annotations

from dataclasses import dataclass

NEEDS = {"task": "task data only",
         "task+reference": "task data + a reference pool (data.reference)",
         "task+alignment": "task data + alignment data (data.reference) it trains on",
         "task+harmful": "task data + known harmful pairs (data.reference or listed task ids) for a reference model"}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line
    paper: str  # citation ("ours" for project additions)
    needs: str  # a key of NEEDS


METHODS: dict[str, type] = {}
INFO: dict[str, MethodInfo] = {}


def register(name: str, *, summary: str, paper: str, needs: str):
    if needs not in NEEDS:
        raise ValueError(f"method {name}: needs must be one of {', '.join(NEEDS)}")

    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        INFO[name] = MethodInfo(name, summary, paper, needs)
        return cls

    return wrap


def method_configs() -> dict[str, type]:
    return {name: cls.Config for name, cls in METHODS.items()}


def listing() -> str:
    """The text of `dualselect methods`: every method, one line each, its paper and the data it needs."""
    lines = []
    for name in sorted(METHODS):
        i = INFO[name]
        lines += [f"{name}", f"    {i.summary}", f"    paper: {i.paper}", f"    data:  {NEEDS[i.needs]}"]
    return "\n".join(lines) + "\n"


from . import dsir, dualselect, feedback_gated, lisa, random_subset, safegrad, safeinstr, seal, sft, toss  # noqa: E402,F401  (registration)
