"""Generated tasks for an offline continual-learning run (`dualselect continual`, {demo_data} in a config).

Three small tasks of distinct kinds, each with a train and a test split that never share a prompt:

* ``sentiment``: the demo's generated reviews (demo_data.task_examples), answer ``positive`` / ``negative``;
* ``arithmetic``: the sum of two two-digit numbers, answer the number (graded by the last number);
* ``topic``: the topic of a generated sentence, answer ``sports`` / ``science`` / ``food`` / ``travel``.

A prompt belongs to the train or the test split by a stable hash of its text, whatever n and seed. The safety
files (refusal reference pool, held-out harmful and benign prompts) are the demo's (demo_data.write_demo_data).
Everything is pure Python and deterministic given the seed.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from . import demo_data
from .errors import DualSelectError
from .logs import write_jsonl

TASKS = ("sentiment", "arithmetic", "topic")
ARITHMETIC_INSTRUCTION = "Add the two numbers. Answer with the sum only."
TOPIC_INSTRUCTION = "Which topic is this sentence about? Answer with one word: sports, science, food or travel."
TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subjects": ["The striker", "Our goalkeeper", "The home team", "The young sprinter", "The tennis champion",
                     "The coach", "The visiting side", "The captain"],
        "actions": ["scored twice in", "was injured during", "celebrated after", "trained hard for",
                    "lost badly in", "was sent off in"],
        "objects": ["the cup final", "the derby", "the qualifying race", "the second half", "the league match",
                    "the penalty shootout", "the championship game", "the relay"],
    },
    "science": {
        "subjects": ["The research team", "A physicist", "The lab", "The astronomers", "A chemist",
                     "The biologists", "The telescope team", "A geologist"],
        "actions": ["published results on", "measured", "discovered", "ran an experiment on", "built a model of",
                    "observed"],
        "objects": ["a distant galaxy", "the new enzyme", "quantum particles", "the rock samples",
                    "cell division", "the magnetic field", "a rare isotope", "the gene sequence"],
    },
    "food": {
        "subjects": ["The chef", "My grandmother", "The bakery", "Our cook", "The street vendor", "The pastry team",
                     "The new bistro", "A food critic"],
        "actions": ["baked", "seasoned", "served", "slow-cooked", "tasted", "grilled"],
        "objects": ["the sourdough bread", "a spicy curry", "the chocolate cake", "fresh pasta",
                    "the vegetable soup", "a lemon tart", "the roast chicken", "garlic noodles"],
    },
    "travel": {
        "subjects": ["The tourists", "My cousin", "The backpackers", "Our tour group", "The pilot",
                     "The cruise passengers", "A travel blogger", "The hikers"],
        "actions": ["flew to", "booked a hostel in", "took the night train to", "went sightseeing in",
                    "missed the ferry to", "explored"],
        "objects": ["Lisbon", "the old harbour town", "the mountain villages", "the island resort", "Kyoto",
                    "the coastal road", "the desert oasis", "the capital"],
    },
}
_TAILS = ["last week.", "yesterday.", "this morning.", "over the weekend.", "again.", "at last."]


def _split_of(text: str) -> str:
    """About 1 in 4 prompts belongs to the test split, by a stable hash of the text."""
    return "test" if int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 4 == 0 else "train"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{ARITHMETIC_INSTRUCTION}\n\n{a} + {b}", str(a + b)


def _topic(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    words = TOPICS[topic]
    sentence = (f"{rng.choice(words['subjects'])} {rng.choice(words['actions'])} {rng.choice(words['objects'])} "
                f"{rng.choice(_TAILS)}")
    return f"{TOPIC_INSTRUCTION}\n\nSentence: {sentence}", topic


def task_examples(task: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct examples of one generated task and split: dicts with ``prompt`` and ``answer``."""
    if task not in TASKS:
        raise DualSelectError(f"unknown generated task {task!r} (tasks: {', '.join(TASKS)})")
    if split not in ("train", "test"):
        raise DualSelectError(f"generated task {task}: split must be 'train' or 'test', got {split!r}")
    if task == "sentiment":
        return [{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in demo_data.task_examples(n, seed, split)]
    make = _arithmetic if task == "arithmetic" else _topic
    rng = random.Random(f"continual-{task}-{split}-{seed}")
    out, seen = [], set()
    for _ in range(n):
        for _ in range(10_000):
            prompt, answer = make(rng)
            if prompt not in seen and _split_of(prompt) == split:
                break
        else:
            raise DualSelectError(f"generated task {task}: could not draw {n} distinct {split} prompts")
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": answer})
    return out


def write_continual_demo_data(out_dir: Path, seed: int = 0, n_train: int = 300, n_test: int = 100,
                              n_reference: int = 100, n_heldout_harmful: int = 100) -> dict[str, Path]:
    """Write the generated tasks and the safety files into `out_dir`; returns {name: path}:
    ``<task>_train`` (id, messages, answer), ``<task>_test`` (id, prompt, answer) for every task of TASKS,
    ``reference`` (harmful -> refusal), ``heldout_harmful`` and ``heldout_benign`` (prompts)."""
    out_dir = Path(out_dir)
    files = {}
    for task in TASKS:
        train = task_examples(task, n_train, seed, "train")
        test = task_examples(task, n_test, seed, "test")
        files[f"{task}_train"] = write_jsonl(out_dir / f"{task}_train.jsonl", [
            {"id": f"{task}-train-{i:04d}", "messages": [{"role": "user", "content": ex["prompt"]},
                                                         {"role": "assistant", "content": ex["answer"]}],
             "answer": ex["answer"]} for i, ex in enumerate(train)])
        files[f"{task}_test"] = write_jsonl(out_dir / f"{task}_test.jsonl", [
            {"id": f"{task}-test-{i:04d}", "prompt": ex["prompt"], "answer": ex["answer"]}
            for i, ex in enumerate(test)])
    safety = demo_data.write_demo_data(out_dir / "safety", seed=seed, n_task=0, harmful_fraction=0.0, n_task_test=0,
                                       n_align_harmful=0, n_reference=n_reference,
                                       n_heldout_harmful=n_heldout_harmful)
    for name in ("reference", "heldout_harmful", "heldout_benign"):
        files[name] = safety[name]
    return files
