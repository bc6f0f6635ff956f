"""Mixed precision (precision.py): bf16 compute with float32 master weights keeps the small updates that
pure bf16 weights round away, stays within bf16 rounding of a float32 run, and resumes bit-identically."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rloo import RLOOConfig, train
from rloo.checkpoint import committed_checkpoints
from rloo.errors import TrainingInterrupted
from rloo.precision import Precision, mixed_precision_mode, resolve_precision, updates_lost_share
from test_reliability import StopAt, assert_same_run, cfg_for
from test_train_e2e import tiny_config


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny policy as a bf16 checkpoint (config dtype bfloat16), as Qwen / Llama / Gemma ship."""
    folder = tmp_path_factory.mktemp("tiny-bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def changed_share(start: dict, end: dict) -> float:
    changed = sum(int((start[key].float() != end[key].float()).sum()) for key in start)
    return changed / sum(t.numel() for t in start.values())


def test_bf16_mixed_precision_keeps_updates_that_pure_bf16_loses(bf16_model_dir, tmp_path, caplog):
    """5 steps at the rloo_tldr learning rate 3e-6 from a bf16 checkpoint: float32 weights and compute,
    bf16 mixed precision, and pure bf16 weights (pure_low_precision, which warns)."""
    common = dict(num_eval_samples=0, max_steps=5, learning_rate=3e-6, lr_scheduler_type="constant", save_steps=0,
                  beta=0.05)
    fp32 = train(tiny_config(bf16_model_dir, tmp_path / "fp32", torch_dtype="float32", bf16=False, **common))
    mixed = train(tiny_config(bf16_model_dir, tmp_path / "mixed", torch_dtype="bfloat16", bf16=True, **common))
    with caplog.at_level(logging.WARNING, logger="rloo.precision"):
        pure = train(tiny_config(bf16_model_dir, tmp_path / "pure", torch_dtype="bfloat16", bf16=True,
                                 pure_low_precision=True, **common))
    start = load_file(bf16_model_dir / "model.safetensors")
    weights = {name: load_file(run.output_dir / "model.safetensors") for name, run in
               (("fp32", fp32), ("mixed", mixed), ("pure", pure))}
    shares = {name: changed_share(start, w) for name, w in weights.items()}
    assert shares["mixed"] >= 0.95 * shares["fp32"], shares
    assert shares["pure"] < 0.5 * shares["fp32"], shares  # the failure mixed precision avoids (so this test can fail)
    assert any("round away" in record.getMessage() for record in caplog.records)
    # The run folder holds the float32 master weights (a bf16 copy would round the updates away again).
    assert all(t.dtype == torch.float32 for t in weights["mixed"].values())
    # Within bf16 rounding of the float32 run: the elements within one bf16 spacing of the float32 run's value (the
    # rest are near-zero biases, whose spacing is smaller than an update), and updates in the same direction.
    within = moved = agree = 0
    for key, reference in weights["fp32"].items():
        _, exponent = torch.frexp(reference.abs())
        spacing = torch.ldexp(torch.ones_like(reference), exponent - 8)  # bf16: 8 significant bits
        within += int(((weights["mixed"][key] - reference).abs() <= spacing).sum())
        update_fp32, update_mixed = reference - start[key].float(), weights["mixed"][key] - start[key].float()
        changed = (update_fp32 != 0) | (update_mixed != 0)
        moved += int(changed.sum())
        agree += int(((update_fp32.sign() == update_mixed.sign()) & changed).sum())
    assert within / sum(t.numel() for t in start.values()) >= 0.99
    assert agree / moved >= 0.95
    # The reference computes as the policy does (float32 weights under the same autocast): no KL at step 1.
    assert abs(mixed.metrics[0]["kl"]) <= 1e-6 and abs(fp32.metrics[0]["kl"]) <= 1e-6


def test_bf16_resume_is_bit_identical(bf16_model_dir, tmp_path):
    """4 steps == 2 steps + SIGTERM + resume + 2 steps, under bf16 mixed precision: the checkpoint holds the
    float32 master weights and AdamW state, and autocast on the CPU is deterministic."""
    settings = dict(save_steps=2, reward_weights=None, torch_dtype="bfloat16", bf16=True)
    full = train(cfg_for(bf16_model_dir, tmp_path / "full", **settings), rewards=["grounding", StopAt(None)]).output_dir
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train(cfg_for(bf16_model_dir, part, **settings), rewards=["grounding", StopAt(2)])
    assert committed_checkpoints(part)[-1].name == "step-000002"
    resumed = train(cfg_for(bf16_model_dir, part, resume_from_checkpoint="latest", **settings),
                    rewards=["grounding", StopAt(None)]).output_dir
    assert_same_run(full, resumed)
    assert all(t.dtype == torch.float32 for t in load_file(committed_checkpoints(part)[-1] / "model.safetensors").values())


def test_resuming_in_another_precision_is_refused(bf16_model_dir, tmp_path):
    settings = dict(save_steps=2, reward_weights=None, torch_dtype="bfloat16")
    with pytest.raises(TrainingInterrupted):
        train(cfg_for(bf16_model_dir, tmp_path / "run", bf16=True, **settings), rewards=["grounding", StopAt(2)])
    with pytest.raises(Exception, match=r"precision 'float32 weights, bfloat16 compute' -> 'float32 weights, float32"):
        train(cfg_for(bf16_model_dir, tmp_path / "run", bf16=False, resume_from_checkpoint="latest", **settings),
              rewards=["grounding", StopAt(None)])


def test_precision_rules():
    cfg = RLOOConfig(bf16=None, fp16=False, pure_low_precision=False)
    assert mixed_precision_mode(cfg, cuda_available=False) == "no"  # TRL's bf16 default, off on a CPU
    assert mixed_precision_mode(RLOOConfig(bf16=True), cuda_available=False) == "bf16"
    with pytest.raises(ValueError, match="fp16: .*GPU"):
        mixed_precision_mode(RLOOConfig(fp16=True), cuda_available=False)
    assert resolve_precision(cfg, "bf16", torch.bfloat16) == Precision(torch.float32, torch.bfloat16, torch.float32)
    # Where the strategy casts the parameters (DeepSpeed, FSDP2), the reference computes in the compute dtype.
    assert resolve_precision(cfg, "bf16", torch.bfloat16, casts_parameters=True).frozen == torch.bfloat16
    pure = RLOOConfig(pure_low_precision=True)
    assert resolve_precision(pure, "bf16", torch.bfloat16).weights == torch.bfloat16
    with pytest.raises(ValueError, match="pure_low_precision"):
        resolve_precision(pure, "bf16", torch.float32)


def test_updates_lost_share_is_the_share_below_half_a_spacing():
    # bf16 spacing at 1.0 is 2**-7: an update of 3e-6 is lost there; at 1e-4 (spacing 2**-21) it is kept.
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1e-4], dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.weight = weight
    assert updates_lost_share(model, 3e-6) == 0.75
    assert updates_lost_share(model, 1e-2) == 0.0
    assert updates_lost_share(model.float(), 3e-6) == 0.0  # float32 weights keep them


def test_checkpoints_from_before_the_precision_fingerprint_resume(tiny_model_dir, tmp_path):
    """A checkpoint written before the fingerprint had precision and steps_per_generation resumes when the run
    has what the old code implied (float32, one generation per step)."""
    settings = dict(save_steps=2, reward_weights=None)
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train(cfg_for(tiny_model_dir, part, **settings), rewards=["grounding", StopAt(2)])
    latest = committed_checkpoints(part)[-1]
    state = json.loads((latest / "state.json").read_text())
    for key in ("precision", "steps_per_generation"):
        del state["fingerprint"][key]
    (latest / "state.json").write_text(json.dumps(state))
    committed = json.loads((latest / "COMMITTED").read_text())
    committed["files"]["state.json"] = (latest / "state.json").stat().st_size
    (latest / "COMMITTED").write_text(json.dumps(committed))
    resumed = train(cfg_for(tiny_model_dir, part, resume_from_checkpoint="latest", **settings),
                    rewards=["grounding", StopAt(None)])
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
