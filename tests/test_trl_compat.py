"""Coming from TRL: its reward contract, its reward functions, its quick start and its config fields, unchanged.

Reward functions in every signature TRL's RLOO documentation shows (docs/source/rloo_trainer.md, "Using a
custom reward function"), TRL's own ``trl.rewards`` (TRL 1.16 in the test extra), TRL's RLOO quick start
with a tiny local Qwen2-architecture chat model standing in for the hub model, and a YAML config holding
the TrainingArguments / RLOOConfig fields TRL users set.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from rloo import RLOOConfig, train
from rloo.rewards import build_rewards, score_completions

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny random Qwen2-architecture chat model: the tiny tokenizer with ChatML tokens and template, EOS
    <|im_end|> (as Qwen2-0.5B-Instruct's)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = tmp_path_factory.mktemp("tiny-qwen2-chat")
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()), bos_token=None, eos_token="<|endoftext|>", pad_token="<|padding|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def deepmath_like_rows(n: int = 8) -> list[dict]:
    """Rows shaped as trl-lib/DeepMath-103K's: a user message and a LaTeX solution."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i}? Put the answer in \\boxed{{}}."}],
             "solution": f"${2 * i}$"} for i in range(n)]


# -------------------------------------------------------------------------------- the reward contract
CALLS: dict[str, dict] = {}


def record(name):
    def keep(**kwargs):
        CALLS[name] = kwargs
    return keep


def example_1(completion_ids, **kwargs):  # TRL docs, Example 1: token ids only
    record("example_1")(completion_ids=completion_ids, **kwargs)
    return [float(len(ids)) for ids in completion_ids]


def example_1_1(completions, **kwargs):  # Example 1.1: completions only, keyword
    return [float(len(completion)) for completion in completions]


def keyword_only(*, completions, prompts, **kwargs):  # keyword-only parameters: never called positionally
    return [float(len(completion) - len(prompt)) for completion, prompt in zip(completions, prompts)]


def positional_prompts_and_completions(prompts, completions, **kwargs):  # rloo's old documented form
    return [float(len(p) > len(c)) for p, c in zip(prompts, completions)]


def example_3(completions, ground_truth, **kwargs):  # Example 3: a dataset column by name
    return [1.0 if truth in completion else 0.0 for completion, truth in zip(completions, ground_truth)]


def example_4_math(prompts, completions, task, **kwargs):  # Example 4: multi-task, None where not applicable
    return [float(len(c)) if t == "math" else None for c, t in zip(completions, task)]


def with_trainer_state(completions, trainer_state, **kwargs):
    CALLS["trainer_state"] = {"global_step": trainer_state.global_step, "max_steps": trainer_state.max_steps}
    return [float(trainer_state.global_step)] * len(completions)


def example_6(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):  # Example 6: logging
    rewards = [1.0 if truth in completion else 0.0 for completion, truth in zip(completions, ground_truth)]
    log_extra("golden_answer", list(ground_truth))
    log_metric("accuracy", sum(rewards) / len(rewards))
    return rewards


def test_reward_functions_in_every_documented_signature_are_called_by_keyword():
    sources = build_rewards([example_1, example_1_1, positional_prompts_and_completions, example_3, example_4_math,
                             with_trainer_state, keyword_only])
    from transformers import TrainerState

    logged = {}
    rewards_NF = score_completions(
        sources, ["p1", "p2"], [" 42", " a b"], {"ground_truth": ["42", "7"], "task": ["math", "code"]},
        shared={"trainer_state": TrainerState(global_step=3, max_steps=10), "log_metric": logged.__setitem__,
                "log_extra": lambda column, values: None},
        completion_ids=[[5, 6], [7, 8, 9]], prompt_ids=[[1], [2]], truncated=[False, True])
    assert rewards_NF[:, 0].tolist() == [2.0, 3.0]
    assert rewards_NF[:, 1].tolist() == [3.0, 4.0]
    assert rewards_NF[:, 2].tolist() == [0.0, 0.0]
    assert rewards_NF[:, 3].tolist() == [1.0, 0.0]
    assert rewards_NF[0, 4].item() == 3.0 and torch.isnan(rewards_NF[1, 4])  # None -> not scorable by that source
    assert rewards_NF[:, 5].tolist() == [3.0, 3.0]
    assert rewards_NF[:, 6].tolist() == [1.0, 2.0]
    # TRL's keywords, every dataset column, and rloo's extra per-sample lists
    assert {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "ground_truth",
            "task", "prompt_ids", "truncated"} <= set(CALLS["example_1"])


def test_async_reward_functions_run_concurrently():
    """Two async functions that each wait for the other to have started: run one after the other, they would
    never finish (bounded by a generous timeout so a failure cannot hang the suite)."""
    started = {}

    def make(me, other):
        async def reward(completions, **kwargs):
            started.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(started.setdefault(other, asyncio.Event()).wait(), timeout=60)
            return [1.0] * len(completions)
        reward.__name__ = me
        return reward

    sources = build_rewards([make("a", "b"), make("b", "a"), example_1_1])
    rewards_NF = score_completions(sources, ["p"], [" x"], {}, completion_ids=[[1]])
    assert rewards_NF.tolist() == [[1.0, 1.0, 2.0]]


def test_conversational_prompts_and_completions_are_message_lists(chat_model_dir, tmp_path):
    """As TRL: a conversational dataset gives reward functions the prompt messages and each completion as
    [{"role": "assistant", "content": ...}]; example 2's format reward, example 6's logging and a function of
    trainer_state run as written, in training and in the held-out evaluation before and after it."""
    seen = {}

    def format_reward_func(completions, **kwargs):  # TRL docs, Example 2
        import re
        seen["completions"], seen["prompts"] = completions, kwargs["prompts"]
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        return [1.0 if re.match(pattern, completion[0]["content"]) else 0.0 for completion in completions]

    rows = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "ground_truth": str(i)} for i in range(8)]
    cfg = RLOOConfig(num_generations=2, per_device_train_batch_size=4, max_completion_length=6, max_steps=2,
                     save_steps=0, num_eval_samples=4, output_dir=str(tmp_path / "run"), disable_tqdm=True)
    result = train(cfg, model=str(chat_model_dir), rewards=[format_reward_func, example_6, with_trainer_state],
                   train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]))
    assert result.eval_before["num_prompts"] == result.eval_after["num_prompts"] == 4
    assert result.eval_before["rewards/with_trainer_state"] == 0.0 and result.eval_after["rewards/with_trainer_state"] == 2.0
    assert all(prompt in [row["prompt"] for row in rows] for prompt in seen["prompts"])  # the dataset's messages
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in seen["completions"])
    assert all("accuracy" in m for m in result.metrics)  # log_metric values land in metrics.jsonl


# ------------------------------------------------------------------------------------------ trl.rewards
def test_trl_rewards_run_unchanged():
    from trl.rewards import accuracy_reward, get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

    sources = build_rewards([think_format_reward, accuracy_reward, get_soft_overlong_punishment(8, 4),
                             get_repetition_penalty_reward(ngram_size=2)])
    completions = [[{"role": "assistant", "content": "<think>2+2</think> \\boxed{4}"}],
                   [{"role": "assistant", "content": "no idea"}]]
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    rewards_NF = score_completions(sources, prompts, completions, {"solution": ["$4$", "$4$"]},
                                   completion_ids=[[1, 2, 3], [5, 5, 5, 5, 5, 5, 5]])
    assert rewards_NF[:, 0].tolist() == [1.0, 0.0]  # think_format_reward
    assert rewards_NF[:, 1].tolist() == [1.0, 0.0]  # accuracy_reward (math_verify)
    assert rewards_NF[:, 2].tolist() == [0.0, -0.75]  # soft overlong punishment: 7 tokens of a limit 8, cache 4
    assert rewards_NF[0, 3].item() == 0.0 and rewards_NF[1, 3].item() < 0  # repeated bigrams are penalised
    # TRL's `trl rloo --reward_funcs` names load the same functions
    assert build_rewards(["think_format_reward", "accuracy_reward"]).fns == [think_format_reward, accuracy_reward]


# ------------------------------------------------------------------------------------------ porting
def test_trl_rloo_quick_start_runs_with_only_the_import_and_the_trainer_call_changed(chat_model_dir, tmp_path,
                                                                                     monkeypatch):
    """TRL's documented quick start (rloo_trainer.md):

        from datasets import load_dataset
        from trl import RLOOTrainer
        from trl.rewards import accuracy_reward

        dataset = load_dataset("trl-lib/DeepMath-103K", split="train")

        trainer = RLOOTrainer(
            model="Qwen/Qwen2-0.5B-Instruct",
            reward_funcs=accuracy_reward,
            train_dataset=dataset,
        )
        trainer.train()

    Here the dataset is rows of the same shape (no hub) and the model a tiny local Qwen2 chat model; the
    rest runs on rloo's library defaults, TRL's (k = 2, 8 completions per batch, 512 new tokens, 3 epochs)."""
    monkeypatch.chdir(tmp_path)
    dataset = Dataset.from_list(deepmath_like_rows(8))  # for: load_dataset("trl-lib/DeepMath-103K", split="train")

    from rloo import train  # was: from trl import RLOOTrainer
    from trl.rewards import accuracy_reward

    result = train(  # was: trainer = RLOOTrainer(...); trainer.train()
        model=str(chat_model_dir),
        rewards=accuracy_reward,
        train_dataset=dataset,
    )
    assert result.config.num_generations == 2 and result.config.max_completion_length == 512
    assert len(result.metrics) == result.config.sizes.max_steps == 3 * 8 // 4  # 3 epochs of 2 generation batches
    assert all(m["rewards/accuracy_reward"] is not None for m in result.metrics)
    assert (tmp_path / result.output_dir / "model.safetensors").is_file() and result.output_dir.parent == Path("runs")


@pytest.mark.parametrize("batch_field", [{"steps_per_generation": 2}, {"generation_batch_size": 4}])
def test_a_trl_config_file_with_its_fields_trains(chat_model_dir, tmp_path, batch_field):
    """A YAML config of the TRL fields rloo used to refuse (TrainingArguments' and RLOOConfig's), through the CLI;
    the generation batch named either way (TRL takes one of the two)."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in deepmath_like_rows(8)))
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def brevity(completions, **kwargs):
            return [-len(c[0]["content"]) / 10 for c in completions]
    """))
    config = {
        "model_name_or_path": str(chat_model_dir), "dataset_name": str(data), "reward_funcs": ["my_rewards.brevity"],
        "bf16": False, "report_to": "none", "warmup_steps": 0.5, "chat_template_kwargs": {"enable_thinking": False},
        "generation_kwargs": {"top_k": 50, "max_new_tokens": 6}, "min_p": 0.05, "repetition_penalty": 1.1,
        **batch_field, "model_init_kwargs": {"dtype": "float32", "attn_implementation": "eager"},
        "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 0.5}, "dtype": "float32",
        "per_device_train_batch_size": 2, "num_generations": 2, "max_steps": 4, "logging_steps": 1, "save_steps": 0,
        "num_eval_samples": 0, "output_dir": str(tmp_path / "run"), "disable_tqdm": True, "eval_strategy": "no",
        "push_to_hub": False, "learning_rate": 1e-5, "beta": 0.05, "gradient_checkpointing": False,
    }
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "rloo", "train", "--config", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert max(m["completion_length"] for m in metrics) <= 6  # generation_kwargs' max_new_tokens
    rates = [m["learning_rate"] for m in metrics]
    assert rates[0] < rates[1] < rates[2] > rates[3]  # warm-up over half the steps, then the cosine decay
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["top_k"] == 50 and saved["max_completion_length"] == 6 and saved["attn_implementation"] == "eager"
    assert saved["dataset_eval_split"] == "test"  # TRL's default (dataset_test_split): this one-file dataset has none


def test_reward_funcs_take_trls_forms_and_can_be_emptied(tiny_model_dir, tmp_path):
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kwargs):\n    return [-len(c) for c in completions]\n")
    base = [sys.executable, "-m", "rloo", "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
            "rloo:tldr", "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "4",
            "--max_completion_length", "4", "--max_prompt_length", "32", "--num_eval_samples", "0", "--save_steps", "0",
            "--disable_tqdm"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(base + ["--reward_funcs", "my_rewards.brevity", "--output_dir", str(tmp_path / "a")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rewards/brevity" in (tmp_path / "a" / "metrics.jsonl").read_text()
    done = subprocess.run(base + ["--config", "tldr-tiny", "--reward_funcs", "--output_dir", str(tmp_path / "b")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("rloo train: error: reward_funcs / reward_model_name_or_path: "
                                                    "give at least one reward source")


def test_eval_of_a_run_trained_with_a_python_callable_says_how_to_pass_it(tiny_model_dir, tmp_path):
    def brevity(completions, **kwargs):
        return [-len(c) for c in completions]

    cfg = RLOOConfig(model_name_or_path=str(tiny_model_dir), dataset_name="rloo:tldr", dataset_eval_split="validation",
                     num_generations=2, per_device_train_batch_size=4, max_completion_length=4, max_prompt_length=32,
                     max_steps=1, num_eval_samples=0, save_steps=0, output_dir=str(tmp_path / "run"), disable_tqdm=True)
    out = train(cfg, rewards=[brevity]).output_dir
    done = subprocess.run([sys.executable, "-m", "rloo", "eval", "--model", str(out), "--num_samples", "2"],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "brevity" in last and "train(rewards=...)" in last and "--reward_funcs path/to/file.py:function" in last


def test_train_without_prompts_or_a_model_is_an_error_as_in_trl(tiny_model_dir):
    with pytest.raises(ValueError, match="^train_dataset: give the training prompts"):
        train(RLOOConfig(model_name_or_path=str(tiny_model_dir), reward_funcs=["grounding"]))
    with pytest.raises(ValueError, match="^model_name_or_path: name the policy"):
        train(RLOOConfig(dataset_name="rloo:tldr", reward_funcs=["grounding"]))


def test_a_reward_model_with_the_policys_vocabulary_reads_chat_data_through_its_template(chat_model_dir):
    """On chat prompts a reward model is given prompt + completion messages through its own chat template (TRL's
    input, ending with its end-of-turn token), not the policy's token ids, which lack that suffix."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from rloo.rewards import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    torch.manual_seed(0)
    classifier = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    rm = RewardModel(classifier, tokenizer, policy_tokenizer=tokenizer)
    assert rm.scores_token_ids  # the same vocabulary: text prompts are scored on the policy's ids
    prompt = [{"role": "user", "content": "What is 1 + 1?"}]
    completion = [{"role": "assistant", "content": "The answer is 2."}]
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    policy_prompt = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]
    score = rm(prompts=[prompt], completions=[completion], prompt_ids=[policy_prompt],
               completion_ids=[tokenizer("The answer is 2.<|im_end|>", add_special_tokens=False)["input_ids"]],
               truncated=[False])
    with torch.no_grad():
        direct = classifier(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert score == pytest.approx([direct], abs=1e-5)
