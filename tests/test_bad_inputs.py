"""Issue 12: every error a user can cause ends in one line naming the file, row, field or option, with
no traceback (docs/reliability.md). The CLI runs in-process (``rloo.cli.main``), as `rloo` would."""

from __future__ import annotations

import shutil
import sys

import datasets
import pytest

from rloo.cli import main

TRAIN = ["train", "--max_steps", "1", "--num_eval_samples", "0", "--per_device_train_batch_size", "4",
         "--max_completion_length", "4", "--disable_tqdm", "--reward_funcs", "summary_length"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir):
    """Files a new user might hand rloo, each broken in one way."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "syntax.yaml").write_text("learning_rate: [1, 2\n")
    (root / "latin1.yaml").write_bytes(b"learning_rate: 1e-3\nx: \xff\xfe\n")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (root / "garbage.csv").write_bytes(b'\x00\x01garbage,,,"\n"""\x02\n')
    (root / "empty.jsonl").write_text("")
    datasets.Dataset.from_dict({"prompt": ["a b c"] * 50}).to_parquet(str(root / "good.parquet"))
    (root / "truncated.parquet").write_bytes((root / "good.parquet").read_bytes()[:300])
    for name in ("truncated-model", "bad-header-model", "no-tokenizer"):
        shutil.copytree(tiny_model_dir, root / name)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (root / "truncated-model" / "model.safetensors").write_bytes(weights[:1000])
    (root / "bad-header-model" / "model.safetensors").write_bytes(b"\xff" * 7 + b"\x7f{garbage")
    for path in (root / "no-tokenizer").iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()
    return root


CASES = {
    # name: (argv with {bad} / {model} / {out}, the command, what the one line must say)
    "yaml-syntax": (["train", "--config", "{bad}/syntax.yaml"], "train",
                    "syntax.yaml, line 2, column 1: not valid YAML"),
    "yaml-not-utf8": (["train", "--config", "{bad}/latin1.yaml"], "train",
                      "latin1.yaml, line 2, column 4: not UTF-8 text (byte 0xff)"),
    "jsonl-not-utf8": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "{bad}/latin1.jsonl"], "train",
                       "latin1.jsonl, line 1, column 16: not UTF-8 text (byte 0xe9)"),
    "garbage-csv": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "{bad}/garbage.csv"], "train",
                    "garbage.csv: not a readable csv file"),
    "truncated-parquet": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "{bad}/truncated.parquet"],
                          "train", "truncated.parquet: not a readable parquet file"),
    "empty-jsonl": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "{bad}/empty.jsonl"], "train",
                    "empty.jsonl is empty: no rows"),
    "truncated-safetensors": ([*TRAIN, "--model_name_or_path", "{bad}/truncated-model", "--dataset_name",
                               "rloo:tldr"], "train",
                              "truncated-model/model.safetensors is not a readable safetensors file"),
    "bad-header-safetensors": (["generate", "--model", "{bad}/bad-header-model", "hello"], "generate",
                               "bad-header-model/model.safetensors is not a readable safetensors file"),
    "no-tokenizer": ([*TRAIN, "--model_name_or_path", "{bad}/no-tokenizer", "--dataset_name", "rloo:tldr"], "train",
                     "no-tokenizer' holds no tokenizer"),
    "causal-lm-as-reward-model": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "rloo:tldr",
                                   "--reward_model_name_or_path", "{model}"], "train",
                                  "(GPTNeoXForCausalLM) has no trained score head: its checkpoint lacks score.weight"),
    "seed-negative": ([*TRAIN, "--model_name_or_path", "{model}", "--dataset_name", "rloo:tldr", "--seed", "-1"],
                      "train", "seed must be in 0..2**32-1"),
    "learning-rate-inf": (["train", "--learning_rate", "inf"], "train", "learning_rate must be finite, got inf"),
    "epochs-inf": (["train", "--max_steps", "-1", "--num_train_epochs", "inf"], "train",
                   "num_train_epochs must be finite, got inf"),
    "generate-no-tokens": (["generate", "--model", "{model}", "--max_new_tokens", "0", "hi"], "generate",
                           "--max_new_tokens must be >= 1, got 0"),
    "generate-no-generations": (["generate", "--model", "{model}", "--num_generations", "0", "hi"], "generate",
                                "--num_generations must be >= 1, got 0"),
    "generate-negative-temperature": (["generate", "--model", "{model}", "--temperature", "-1", "hi"], "generate",
                                      "--temperature must be >= 0 (0 = greedy), got -1.0"),
    "eval-negative-samples": (["eval", "--model", "{model}", "--dataset", "rloo:tldr", "--num_samples", "-5"], "eval",
                              "--num_samples must be >= 1"),
    "train-vllm-missing": (["train", "--use_vllm", "true"], "train", "use_vllm: vLLM is not installed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_line_naming_it(case, bad, tiny_model_dir, tmp_path, capsys, monkeypatch):
    argv, command, expected = CASES[case]
    if case.endswith("vllm-missing"):
        monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM: import vllm fails
    argv = [a.format(bad=bad, model=tiny_model_dir) for a in argv]
    if command == "train":
        argv += ["--output_dir", str(tmp_path / "run")]
    monkeypatch.delenv("RLOO_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rloo {command}: error: ") and expected in last, last
    assert not (tmp_path / "run").exists()  # a run refused before its first step leaves no folder behind
