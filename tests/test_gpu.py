"""gpu-marked: the shared-prompt equivalences and a short run on a CUDA device (skipped elsewhere).

The same checks as the CPU tests (test_models.py, test_rewards.py, test_train_e2e.py), on the GPU's
own kernels: float32 and bfloat16 log-probs and gradients, shared vs repeated, and generation.
"""

import pytest
import torch

from rloo.generation.hf import HFGenerator
from rloo.models import completion_logprobs, load_policy

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
