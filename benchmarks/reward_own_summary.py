"""Can ``rloo reward-model`` learn what can be learned? Each bundled TL;DR post with its own reference summary
chosen over another post's (the post 7 rows further on; so every summary is chosen once and rejected once,
and only matching it to its post tells them apart; ``--negatives N``: N such pairs per training post), trained from the tldr-tiny policy and measured on
the validation posts (pairs built the same way, never trained on).

    python benchmarks/reward_own_summary.py --output_dir runs/own-summary [rloo reward-model flags...]

Writes the pairs to <output_dir>.pairs/{train,validation}.jsonl, runs ``rloo reward-model`` on them as a user
would, and prints the held-out accuracy before and after with its standard error.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from rloo.data import BUNDLED_DATASETS


SHIFTS = (7, 101, 503, 211, 997)


def read_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"][split].read_text().splitlines()]


def pairs(split: str, shifts: tuple[int, ...]) -> list[dict]:
    rows = read_rows(split)
    return [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": rows[(i + shift) % len(rows)]["completion"]}
            for shift in shifts for i, row in enumerate(rows)]


def overlap_accuracy(train_rows: list[dict], validation: list[dict]) -> float:
    """The ceiling a bag of words reaches: a summary scores the IDF weights (over the training rows) of its
    words found in the post; the fraction of validation pairs whose chosen scores higher."""
    words = lambda text: set(re.findall(r"[a-z']+", text.lower()))
    df = collections.Counter(w for row in train_rows for w in words(row["prompt"] + row["completion"]))
    score = lambda post, summary: sum(math.log(len(train_rows) / (1 + df[w])) for w in words(summary) & words(post))
    return sum(score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in validation) / len(validation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--negatives", type=int, default=1, choices=range(1, len(SHIFTS) + 1),
                        help="training pairs per post: its summary against that many other posts' (shifts "
                             f"{SHIFTS}); the validation pairs always use one (shift 7)")
    parser.add_argument("--overlap_baseline", action="store_true",
                        help="print the word-overlap baseline's held-out accuracy and train nothing")
    args, flags = parser.parse_known_args()
    if args.overlap_baseline:
        print(f"word-overlap baseline: held-out accuracy {overlap_accuracy(read_rows('train'), pairs('validation', SHIFTS[:1])):.3f}")
        return
    folder = Path(args.output_dir + ".pairs")
    folder.mkdir(parents=True, exist_ok=True)
    for split, shifts in (("train", SHIFTS[:args.negatives]), ("validation", SHIFTS[:1])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(split, shifts)))
    command = [sys.executable, "-m", "rloo", "reward-model", "--model_name_or_path", "rloo:tldr-tiny-sft",
               "--dataset_name", str(folder), "--dataset_eval_split", "validation", "--output_dir", args.output_dir,
               "--disable_tqdm", "true", *flags]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    figures = json.loads((Path(args.output_dir) / "eval.json").read_text())
    for when in ("before", "after"):
        f = figures[when]
        print(f"{when}: held-out accuracy {f['accuracy']:.3f} ± {f['accuracy_se']:.3f} ({f['num_pairs']} pairs), "
              f"loss {f['loss']:.4f}")


if __name__ == "__main__":
    main()
