"""What the task packs share: seeded generation that every process reproduces."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medtune.tasks import get_task

SCRIPT = """
import hashlib, json, sys
from medtune.tasks import get_task
task = get_task(sys.argv[1])
data = [task.generate_sft(120, seed=3), task.generate_dpo(60, seed=3), task.generate_test(60, seed=4)]
print(hashlib.sha256(json.dumps(data, ensure_ascii=False, sort_keys=True).encode()).hexdigest())
"""


@pytest.mark.parametrize("name", ["aria", "headache"])
def test_generated_data_does_not_depend_on_the_process_hash_seed(name):
    """Set iteration order changes with PYTHONHASHSEED; a seeded generator must not draw in that order."""

    def digest(hash_seed: str) -> str:
        env = {"PYTHONHASHSEED": hash_seed, "PATH": ""}
        return subprocess.run(
            [sys.executable, "-c", SCRIPT, name], env=env, capture_output=True, text=True, check=True
        ).stdout

    digests = {digest(seed) for seed in ("1", "2", "3")}
    assert len(digests) == 1 and len(digests.pop()) == 65


def test_preference_triplets_cycle_through_the_rejection_kinds():
    task = get_task("headache")
    kinds = [t["rejected_kind"] for t in task.generate_dpo(9, seed=0)]
    assert kinds == task.rejection_kinds * 3
    assert all(t["rejected"] != t["chosen"] for t in task.generate_dpo(9, seed=0))


def test_default_sizes_are_each_packs_own():
    aria, headache = get_task("aria"), get_task("headache")
    assert (aria.sft_size, aria.dpo_size, headache.sft_size, headache.dpo_size) == (1500, 420, 500, 200)
    assert len(headache.generate_dpo()) == 200
