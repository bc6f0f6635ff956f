"""gpu-marked: the shared-prompt equivalences and a short run on a CUDA device (skipped elsewhere).

The same checks as the CPU tests (test_models.py, test_rewards.py, test_train_e2e.py), on the GPU's
own kernels: float32 and bfloat16 log-probs and gradients, shared vs repeated, and generation; and
the strategies accelerate runs only on GPUs (FSDP2, DeepSpeed ZeRO-2/3) started on one GPU with a
reference and a reward model, against the plain run.
"""

import pytest
import torch

from rloo.generation.hf import HFGenerator
from rloo.logprobs import completion_logprobs
from rloo.models import load_policy

from test_models import K, PAD, PROMPTS, padded_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCES = {  # log-prob abs, gradient rel: bf16 rounds to 3 significant digits
    "float32": (1e-4, 1e-3),
    "bfloat16": (5e-2, 5e-2),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_prompt_equals_repeated_prompt_on_gpu(tiny_model_dir, dtype):
    policy = load_policy(str(tiny_model_dir), torch_dtype=dtype).cuda().eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    batch = [t.cuda() for t in padded_batch()]
    weights_BT = torch.linspace(-1.0, 2.0, batch[2].numel(), device="cuda").view_as(batch[2])
    results = {}
    for share in (True, False):
        logprobs_BT, _ = completion_logprobs(policy, *batch, temperature=0.7, share_prompt=share)
        grads = torch.autograd.grad((logprobs_BT * weights_BT).sum(), params)
        results[share] = (logprobs_BT.detach().float(), [g.float() for g in grads])
    atol, rel = TOLERANCES[dtype]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=atol)
    for (name, _), shared, repeated in zip(policy.named_parameters(), results[True][1], results[False][1]):
        scale = repeated.abs().max().clamp(min=1e-12)
        assert ((shared - repeated).abs().max() / scale).item() < rel, name


def test_shared_prefill_generation_equals_repeated_on_gpu(tiny_model_dir):
    model = load_policy(str(tiny_model_dir), torch_dtype="float32").cuda().double()  # float64: exact ties
    eos_ids = list(range(0, 512, 5))
    results = []
    for share in (True, False):
        generator = HFGenerator(model, pad_token_id=PAD, eos_token_ids=eos_ids, max_new_tokens=9, temperature=0.8,
                                share_prompt=share)
        torch.manual_seed(3)
        results.append(generator.generate(PROMPTS, K).completion_ids_BT)
    assert torch.equal(results[0], results[1])


def test_two_steps_on_gpu(tiny_model_dir, tmp_path):
    from test_train_e2e import tiny_config

    from rloo import train

    result = train(tiny_config(tiny_model_dir, tmp_path / "run", num_eval_samples=0))
    assert len(result.metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert (result.output_dir / "model.safetensors").is_file()


def test_torchrun_on_one_gpu_equals_the_plain_run(tiny_model_dir, tmp_path):
    """A torchrun-launched process on CUDA (NCCL group of one) trains as the plain process does."""
    from test_distributed import COMMON, max_difference, torchrun
    from test_train_e2e import tiny_config

    from rloo import train

    plain = train(tiny_config(tiny_model_dir, tmp_path / "plain", per_device_train_batch_size=4, **COMMON)).output_dir
    ddp = tmp_path / "ddp"
    torchrun(1, tiny_model_dir, ddp, per_device_train_batch_size=4)
    assert max_difference(plain, ddp) <= 1e-4


STRATEGY_RUN = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, save_steps=0, num_eval_samples=3)


def plain_run(tiny_model_dir, reward_dir, out):
    from test_distributed import COMMON
    from test_train_e2e import tiny_config

    from rloo import train

    return train(tiny_config(tiny_model_dir, out, reward_model_name_or_path=str(reward_dir), reward_weights=None,
                             **{**COMMON, **STRATEGY_RUN})).output_dir


@pytest.mark.parametrize("gather", [True, False])
def test_fsdp2_on_one_gpu_trains_like_the_plain_run(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path, gather):
    """configs/accelerate/fsdp.yaml on one process: policy, reference and reward model sharded (a group
    of one), generation gathered once or layer by layer; the same parameters as without FSDP."""
    from test_distributed import accelerate_launch, max_difference, rewards_of, torchrun

    plain = plain_run(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path / "plain")
    fsdp = tmp_path / "fsdp"
    torchrun(1, tiny_model_dir, fsdp, launcher=accelerate_launch("fsdp", 1), ds3_gather_for_generation=gather,
             reward_model_name_or_path=str(tiny_policy_reward_model_dir), reward_weights=None, **STRATEGY_RUN)
    assert max_difference(plain, fsdp) <= 1e-4
    assert [r["reward"] for r in rewards_of(plain)] == pytest.approx([r["reward"] for r in rewards_of(fsdp)], abs=1e-4)
    assert (fsdp / "eval.json").is_file()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_one_gpu_starts_and_trains(tiny_model_dir, tiny_policy_reward_model_dir, tmp_path, stage):
    """configs/accelerate/zero2.yaml / zero3.yaml on one process (bf16, as the configs say): the run
    completes with a reference and a reward model, changes the weights and writes the run folder."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from test_distributed import accelerate_launch, torchrun

    out = tmp_path / stage
    torchrun(1, tiny_model_dir, out, launcher=accelerate_launch(stage, 1), torch_dtype="bfloat16", bf16=True,
             reward_model_name_or_path=str(tiny_policy_reward_model_dir), reward_weights=None, **STRATEGY_RUN)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 and (out / "eval.json").is_file()


@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_a_sharded_run_resumes_like_an_uninterrupted_run_on_one_gpu(tiny_model_dir, tiny_policy_reward_model_dir,
                                                                     tmp_path, config):
    """The trainer's checkpoints under FSDP2 / ZeRO-3 (shards.py; its pieces, ZeRO-2's too, are tested on CPU
    in test_sharding.py): a run resumed from another run's step-2 checkpoint ends with that run's weights and
    rewards, with a reference and a reward model sharded like the policy."""
    if config != "fsdp":
        pytest.importorskip("deepspeed")
    from rloo.checkpoint import read_checkpoint, step_folder
    from test_distributed import accelerate_launch, max_difference, rewards_of, torchrun

    dtype = {} if config == "fsdp" else dict(torch_dtype="bfloat16", bf16=True)  # the DeepSpeed configs say bf16
    settings = dict(launcher=accelerate_launch(config, 1), per_device_train_batch_size=4, save_steps=2, max_steps=4,
                    lr_scheduler_type="constant", reward_model_name_or_path=str(tiny_policy_reward_model_dir),
                    reward_weights=None, num_eval_samples=0, **dtype)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(1, tiny_model_dir, full, **settings)
    checkpoint = step_folder(full, 2)
    assert read_checkpoint(checkpoint)[0]["layout"] == config
    torchrun(1, tiny_model_dir, resumed, resume_from_checkpoint=str(checkpoint), **settings)
    # bit-identical on CPU (test_reliability.py); CUDA's scatter-adds may round differently between runs
    assert max_difference(full, resumed) <= 1e-4
    assert ([r["reward"] for r in rewards_of(full)][2:]
            == pytest.approx([r["reward"] for r in rewards_of(resumed)], abs=1e-4))


def test_bf16_mixed_precision_on_gpu_keeps_updates_and_starts_with_zero_kl(tiny_model_dir, tmp_path):
    """CUDA autocast: bf16 mixed precision (float32 master weights) changes as many weights as float32 at the
    rloo_tldr learning rate, and the reference computes as the policy does (KL 0 at step 1)."""
    from safetensors.torch import load_file

    from test_train_e2e import tiny_config

    from rloo import train

    common = dict(num_eval_samples=0, max_steps=5, learning_rate=3e-6, lr_scheduler_type="constant", save_steps=0)
    runs = {bf16: train(tiny_config(tiny_model_dir, tmp_path / str(bf16), bf16=bf16, **common)) for bf16 in (False, True)}
    start = load_file(tiny_model_dir / "model.safetensors")
    shares = {}
    for bf16, result in runs.items():
        end = load_file(result.output_dir / "model.safetensors")
        shares[bf16] = sum(int((start[k] != end[k].float()).sum()) for k in start) / sum(t.numel() for t in start.values())
    assert shares[True] >= 0.95 * shares[False], shares
    assert abs(runs[True].metrics[0]["kl"]) <= 1e-6


def test_fp16_mixed_precision_trains_on_gpu(tiny_model_dir, tmp_path):
    """fp16 with accelerate's loss scaling: an overflow is the scaler's to skip (it lowers the scale), not a
    non-finite step that stops the run."""
    from test_train_e2e import tiny_config

    from rloo import train

    result = train(tiny_config(tiny_model_dir, tmp_path / "run", fp16=True, num_eval_samples=0, max_steps=4,
                               learning_rate=1e-3, save_steps=0))
    assert len(result.metrics) == 4 and result.metrics[-1]["num_nonfinite_steps"] == 0
    assert (result.output_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "gemma2", "mistral", "mamba2", "bamba"])
def test_architectures_share_prompts_exactly_on_gpu(name, tiny_tokenizer):
    """tests/test_architectures.py's equivalence on CUDA kernels (float32): shared = repeated log-probs."""
    from architectures import tiny_config as arch_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config(name), dtype=torch.float32).cuda().eval()
    batch = [t.cuda() for t in padded_batch()]
    shared, _ = completion_logprobs(model, *batch, temperature=0.7)
    repeated, _ = completion_logprobs(model, *batch, temperature=0.7, share_prompt=False)
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-4)


def test_fp16_resume_is_exact_on_gpu(tiny_model_dir, tmp_path):
    """The loss scaler's state (scale, growth tracker) is in the checkpoint: a stopped and resumed fp16 run ends
    with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from rloo import train
    from rloo.errors import TrainingInterrupted
    from test_reliability import StopAt, cfg_for

    settings = dict(save_steps=2, reward_weights=None, fp16=True)
    full = train(cfg_for(tiny_model_dir, tmp_path / "full", **settings), rewards=["grounding", StopAt(None)]).output_dir
    with pytest.raises(TrainingInterrupted):
        train(cfg_for(tiny_model_dir, tmp_path / "part", **settings), rewards=["grounding", StopAt(2)])
    resumed = train(cfg_for(tiny_model_dir, tmp_path / "part", resume_from_checkpoint="latest", **settings),
                    rewards=["grounding", StopAt(None)]).output_dir
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_qlora_trains_adapters_on_a_quantized_base(tiny_tokenizer, tmp_path, bits):
    """QLoRA (TRL's fields): the base loads quantized through bitsandbytes, only the adapters train, the reference
    is the quantized base with its adapters off (the KL starts at 0), and the run folder holds the adapter."""
    pytest.importorskip("bitsandbytes")
    from architectures import tiny_config as architecture_config
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from test_train_e2e import tiny_config

    from rloo import train
    from rloo.run import setup

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(architecture_config("llama"), dtype=torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    settings = dict(use_peft=True, lora_r=8, torch_dtype="bfloat16", bf16=True, num_eval_samples=0, learning_rate=1e-3,
                    **{bits: True})
    run = setup(tiny_config(folder, tmp_path / "probe", **settings), None, None, None, None, None)
    try:
        policy = run.accelerator.unwrap_model(run.policy)
        quantized = [m for m in policy.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
        assert quantized and run.reference is None
        assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())
    finally:
        run.generator.close()
        run.lock.release()
    result = train(tiny_config(folder, tmp_path / "run", **settings))
    assert abs(result.metrics[0]["kl"]) < 1e-3 and all(m["memory/update"] > 0 for m in result.metrics)
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
