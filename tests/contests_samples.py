"""Shared by the test modules: the real CodeContests samples (tests/data), and a sample
problem in deepmind/code_contests's columns with a known Python 3 solution."""
import json
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent / "data" / "sandboxfusion-samples"
CONTESTS = SAMPLES / "code_contests-20.jsonl"

TSHIRTS = """from collections import Counter
n = int(input())
a = Counter(input().strip() for _ in range(n))
b = Counter(input().strip() for _ in range(n))
print(n - sum((a & b).values()))
"""
"""A Python 3 solution of sample 3, "1000_A. Codehorses T-shirts"."""


def samples() -> list[dict]:
    return [json.loads(line) for line in CONTESTS.read_text().splitlines() if line.strip()]


def contests_row(sample: dict, solution: str | None, n_public: int = 2, n_private: int = 8) -> dict:
    """A sample problem in deepmind/code_contests's columns: its tests split into public, private
    and generated ones; ``solution`` its Python 3 solution (None: none)."""
    tests = json.loads(sample["test"])
    cols = [tests[:n_public], tests[n_public:n_public + n_private], tests[n_public + n_private:]]

    def col(ts):
        return {"input": [t["input"]["stdin"] for t in ts], "output": [t["output"]["stdout"] for t in ts]}

    return {"name": json.loads(sample["labels"])["name"], "description": sample["content"],
            **{f"{k}_tests": col(ts) for k, ts in zip(("public", "private", "generated"), cols)},
            "solutions": {"language": [3] if solution else [], "solution": [solution] if solution else []},
            "source": 2, "difficulty": 7}
