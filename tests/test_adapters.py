"""LoRA adapters (use_peft, TRL's lora_* names, train(peft_config=...)): the reference is the base model with
the adapters off (no copy of its weights, the same log-probs as the frozen base), only the adapters train,
the run folder holds them, and a stopped run resumes bit-identically."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rloo import train
from rloo.adapters import adapters_off, has_adapters
from rloo.checkpoint import committed_checkpoints
from rloo.errors import TrainingInterrupted
from rloo.logprobs import completion_logprobs
from rloo.run import setup
from test_reliability import StopAt
from test_train_e2e import tiny_config

pytest.importorskip("peft")  # the test extra installs it


def test_the_reference_is_the_base_model_with_its_adapters_off_and_no_copy(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", beta=0.05)
    run = setup(cfg, None, None, None, None, None, peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    try:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        policy = run.accelerator.unwrap_model(run.policy)
        assert run.reference is None and has_adapters(policy)
        # parameter storage: the base's own tensors once, plus the adapters, and nothing else
        adapter_numel = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
        assert adapter_numel > 0 and all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())
        storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
        assert len(storages) == len(list(policy.parameters()))
        assert sum(p.numel() for p in policy.parameters()) == sum(p.numel() for p in base.parameters()) + adapter_numel
        with torch.no_grad():  # adapters that change the output, so that turning them off is seen
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.2)
        torch.manual_seed(0)
        prompt_ids, completion_ids = torch.randint(2, 500, (2, 6)), torch.randint(2, 500, (4, 5))
        masks = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
        args = (prompt_ids, masks[0], completion_ids, masks[1], 1.0)
        policy.eval()
        with torch.no_grad():
            with_adapters, _ = completion_logprobs(run.policy, *args)
            with adapters_off(run.policy) as reference:
                off, _ = completion_logprobs(reference, *args)
            frozen, _ = completion_logprobs(base, *args, share_prompt=False)
        assert (with_adapters - frozen).abs().max() > 1e-3
        assert (off - frozen).abs().max() <= 1e-6
    finally:
        run.generator.close()
        run.lock.release()


def test_a_peft_model_trains_its_own_adapters_against_its_base_without_a_copy(tiny_model_dir, tmp_path):
    """train(model=get_peft_model(...)): the model's adapters train, the reference is its base (adapters off)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", beta=0.05, max_steps=1, num_eval_samples=0)
    run = setup(cfg, peft_model, None, None, None, None)
    try:
        policy = run.accelerator.unwrap_model(run.policy)
        assert run.reference is None and has_adapters(policy) and policy is peft_model.get_base_model()
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
            n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad}
    finally:
        run.generator.close()
        run.lock.release()
    out = train(tiny_config(tiny_model_dir, tmp_path / "trained", beta=0.05, max_steps=1, num_eval_samples=0),
                model=peft_model).output_dir
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_a_lora_run_trains_only_its_adapters_saves_them_and_resumes_exactly(tiny_model_dir, tmp_path):
    settings = dict(use_peft=True, lora_r=4, learning_rate=5e-2, max_steps=2, save_steps=1, num_eval_samples=0,
                    reward_weights=None)
    full = train(tiny_config(tiny_model_dir, tmp_path / "full", **settings), rewards=["grounding", StopAt(None)])
    out = full.output_dir
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter) and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the folder holds the adapter, not a second copy of the base
    assert full.metrics[-1]["kl"] != 0.0  # the policy moved away from its base, the reference
    assert all(m["sampling_logprob_gap"] < 1e-6 for m in full.metrics)  # lora_dropout off too (disable_dropout)
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05  # the user's rate, kept
    trained = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers loads the base and the adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(trained(ids).logits, base(ids).logits)
        trained.disable_adapters()
        assert torch.equal(trained(ids).logits, base(ids).logits)  # under the adapters, the base is the start's
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model_dir, part, **settings), rewards=["grounding", StopAt(1, signal.SIGTERM)])
    assert committed_checkpoints(part)[-1].name == "step-000001"
    train(tiny_config(tiny_model_dir, part, resume_from_checkpoint="latest", **settings),
          rewards=["grounding", StopAt(None)])
    checkpoint = committed_checkpoints(part)[-1]  # the adapter and its optimizer, not the base weights
    assert (checkpoint / "adapter.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = load_file(part / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)


def test_merge_adapter_writes_the_merged_model_beside_its_adapter_and_both_quick_starts_run(tiny_model_dir, tmp_path,
                                                                                            monkeypatch, capsys):
    settings = dict(use_peft=True, lora_r=4, learning_rate=5e-2, max_steps=1, num_eval_samples=0, reward_weights=None)
    adapter_run = train(tiny_config(tiny_model_dir, tmp_path / "adapter-run", **settings),
                        rewards=["grounding", StopAt(None)]).output_dir
    merged_run = train(tiny_config(tiny_model_dir, tmp_path / "merged-run", merge_adapter=True, **settings),
                       rewards=["grounding", StopAt(None)]).output_dir
    assert (merged_run / "model.safetensors").is_file() and not (merged_run / "adapter_config.json").exists()
    assert (merged_run / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_run).eval()  # a plain model: no peft needed
    assert merged.state_dict().keys() == AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().keys()
    on_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    on_base.load_adapter(str(merged_run / "adapter"))
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits - on_base.eval()(ids).logits).abs().max() <= 1e-5  # W + B A, merged
    assert "It is a LoRA adapter (r = 4, alpha = 32)" in (adapter_run / "README.md").read_text()
    assert "library_name: peft" in (adapter_run / "README.md").read_text()
    assert "is merged into the weights" in (merged_run / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # each card's quick start, as written, from the folder that holds the run
    for out in (adapter_run, merged_run):
        exec(re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1), {})
        assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("overrides, message", [
    ({"use_peft": True, "push_to_hub": True, "hub_model_id": "someone/adapter"},
     "^push_to_hub with use_peft: the adapter's base '.*' is not a Hub model"),
    pytest.param({"load_in_4bit": True}, "^load_in_4bit: quantized base weights need a CUDA GPU and the bitsandbytes",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs here: test_gpu.py")),
    ({"load_in_4bit": True, "load_in_8bit": True}, "^load_in_4bit and load_in_8bit: choose one of them"),
    ({"use_peft": True, "lora_r": 0}, "^lora_r must be >= 1"),
])
def test_lora_settings_rloo_cannot_run_are_one_line(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tiny_model_dir, tmp_path / "run", **overrides))
