"""Math tests for rloo.objective: hand-computed numbers, loop references, gradients, invariances."""

from __future__ import annotations

import math

import pytest
import torch

from rloo.objective import (
    apply_missing_eos_penalty,
    combine_rewards,
    kl_penalty,
    normalize_advantages,
    policy_loss,
    rloo_advantages,
)

NAN = float("nan")
INF = float("inf")


def _close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, equal_nan=True)


# --- rloo_advantages -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rloo_reference_numbers(dtype):
    """DESIGN.md §2 reference numbers."""
    rewards_PK = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 1]], dtype=dtype)
    advantages_PK = rloo_advantages(rewards_PK)
    assert advantages_PK.dtype == dtype
    _close(advantages_PK.flatten(), [-2, -2 / 3, 2 / 3, 2, -1 / 3, -1 / 3, -1 / 3, 1])
    _close(rloo_advantages(torch.tensor([[1, NAN, 3, 5]], dtype=dtype)), [[-3, 0, 0, 3]])


def test_rloo_groups_without_two_scorable_are_zero():
    rewards_PK = torch.tensor([[NAN, 7.0, NAN, NAN], [NAN, NAN, NAN, NAN], [2.0, 4.0, NAN, NAN]])
    advantages_PK = rloo_advantages(rewards_PK)
    assert not advantages_PK.isnan().any()
    _close(advantages_PK, [[0, 0, 0, 0], [0, 0, 0, 0], [-2, 2, 0, 0]])


def test_rloo_infinite_rewards_are_unscorable():
    advantages_PK = rloo_advantages(torch.tensor([[1.0, INF, 3.0, -INF, 5.0]]))
    _close(advantages_PK, [[-3, 0, 0, 0, 3]])


def test_rloo_equals_scaled_centering_when_all_scorable():
    generator = torch.Generator().manual_seed(0)
    for k in (2, 3, 4, 8):
        rewards_PK = torch.randn(16, k, generator=generator, dtype=torch.float64)
        expected_PK = k / (k - 1) * (rewards_PK - rewards_PK.mean(dim=1, keepdim=True))
        _close(rloo_advantages(rewards_PK), expected_PK, tol=1e-12)
        # The baseline excludes the sample itself, so each row's advantages sum to zero.
        _close(rloo_advantages(rewards_PK).sum(dim=1), torch.zeros(16), tol=1e-12)


def _rloo_loop_reference(rewards: list[list[float]]) -> list[list[float]]:
    """The formula of DESIGN.md §2, written as plainly as possible."""
    advantages = []
    for row in rewards:
        scorable = [j for j, r in enumerate(row) if math.isfinite(r)]
        out = [0.0] * len(row)
        if len(scorable) >= 2:
            for i in scorable:
                baseline = sum(row[j] for j in scorable if j != i) / (len(scorable) - 1)
                out[i] = row[i] - baseline
        advantages.append(out)
    return advantages


@pytest.mark.parametrize("seed", range(20))
def test_rloo_matches_loop_reference_with_random_nans(seed):
    generator = torch.Generator().manual_seed(seed)
    num_prompts = int(torch.randint(1, 9, (1,), generator=generator))
    k = int(torch.randint(2, 9, (1,), generator=generator))
    rewards_PK = torch.randn(num_prompts, k, generator=generator, dtype=torch.float64) * 3
    missing_PK = torch.rand(num_prompts, k, generator=generator) < 0.3
    rewards_PK[missing_PK] = NAN
    expected = _rloo_loop_reference(rewards_PK.tolist())
    _close(rloo_advantages(rewards_PK), expected, tol=1e-9)
    _close(rloo_advantages(rewards_PK.float()), expected, tol=1e-5)


def test_rloo_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]))


# --- scores ----------------------------------------------------------------------------------


def test_combine_rewards_weights_and_nan_patterns():
    rewards_NF = torch.tensor(
        [
            [1.0, 2.0, 4.0],  # all sources: 0.5*1 + 2*2 - 1*4 = 0.5
            [NAN, 2.0, 4.0],  # first skipped: 4 - 4 = 0
            [3.0, NAN, INF],  # only first: 1.5
            [NAN, NAN, NAN],  # unscorable
            [-INF, NAN, NAN],  # unscorable
        ]
    )
    weights_F = torch.tensor([0.5, 2.0, -1.0])
    scores_N = combine_rewards(rewards_NF, weights_F)
    _close(scores_N, [0.5, 0.0, 1.5, NAN, NAN])
    assert scores_N.isnan().tolist() == [False, False, False, True, True]


def test_combine_rewards_single_source_is_identity_with_unit_weight():
    rewards_NF = torch.tensor([[0.25], [NAN], [-3.0]], dtype=torch.float64)
    _close(combine_rewards(rewards_NF, torch.ones(1)), [0.25, NAN, -3.0])


def test_missing_eos_penalty():
    scores_N = torch.tensor([1.0, 2.0, NAN, -0.5])
    truncated_N = torch.tensor([True, False, True, True])
    penalized_N = apply_missing_eos_penalty(scores_N, truncated_N, penalty=1.0)
    _close(penalized_N, [0.0, 2.0, NAN, -1.5])
    unchanged_N = apply_missing_eos_penalty(scores_N, truncated_N, penalty=0.0)
    _close(unchanged_N, scores_N)
    assert unchanged_N is not scores_N
    _close(scores_N, [1.0, 2.0, NAN, -0.5])  # input untouched


# --- KL --------------------------------------------------------------------------------------


def test_kl_k1_and_k3_hand_numbers_ignore_padding():
    old_BT = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -9.0, -9.0]], dtype=torch.float64)
    # Padding (mask 0) holds -inf in ref: it must not leak into the sums.
    ref_BT = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -INF, 5.0]], dtype=torch.float64)
    mask_BT = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # k1: sum (old - ref) = 0.5 - 1 + 0 = -0.5 ; 0.2
    _close(kl_penalty(old_BT, ref_BT, mask_BT, "k1"), [-0.5, 0.2], tol=1e-12)
    # k3: d = ref - old = [-0.5, 1, 0], [-0.2]
    k3_row0 = (math.exp(-0.5) + 0.5 - 1) + (math.exp(1) - 1 - 1) + 0.0
    k3_row1 = math.exp(-0.2) + 0.2 - 1
    _close(kl_penalty(old_BT, ref_BT, mask_BT, "k3"), [k3_row0, k3_row1], tol=1e-12)
    _close(kl_penalty(old_BT, ref_BT, mask_BT), [-0.5, 0.2], tol=1e-12)  # default is k1


def test_kl_k3_is_nonnegative_and_zero_on_policy():
    generator = torch.Generator().manual_seed(1)
    old_BT = -torch.rand(32, 10, generator=generator) * 5
    ref_BT = -torch.rand(32, 10, generator=generator) * 5
    mask_BT = torch.rand(32, 10, generator=generator) < 0.7
    assert (kl_penalty(old_BT, ref_BT, mask_BT, "k3") >= 0).all()
    _close(kl_penalty(old_BT, old_BT, mask_BT, "k3"), torch.zeros(32))
    _close(kl_penalty(old_BT, old_BT, mask_BT, "k1"), torch.zeros(32))


def test_kl_unknown_estimator_is_named():
    logprobs_BT = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="'k2'"):
        kl_penalty(logprobs_BT, logprobs_BT, torch.ones(1, 2), estimator="k2")


# --- normalisation ---------------------------------------------------------------------------


def test_normalize_advantages():
    advantages_B = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    std = math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3)  # unbiased std, mean 3
    expected = [(a - 3) / (std + 1e-4) for a in (1, 2, 3, 6)]
    normalized_B = normalize_advantages(advantages_B)
    _close(normalized_B, expected, tol=1e-12)
    assert abs(float(normalized_B.mean())) < 1e-12
    _close(normalize_advantages(torch.tensor([5.0])), [0.0])


# --- policy loss -----------------------------------------------------------------------------


def _batch(seed, num_sequences=8, num_tokens=6, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logprobs_BT = -torch.rand(num_sequences, num_tokens, generator=generator, dtype=dtype) * 3
    lengths_B = torch.randint(1, num_tokens + 1, (num_sequences,), generator=generator)
    mask_BT = torch.arange(num_tokens)[None, :] < lengths_B[:, None]
    advantages_B = torch.randn(num_sequences, generator=generator, dtype=dtype)
    return logprobs_BT, mask_BT, advantages_B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_on_policy_value_and_gradient(dtype):
    logprobs_BT, mask_BT, advantages_B = _batch(0, dtype=dtype)
    logprobs_BT.requires_grad_(True)
    num_sequences = 20  # the whole optimizer step holds more sequences than this micro-batch
    loss, metrics = policy_loss(
        logprobs_BT, logprobs_BT.detach(), advantages_B, mask_BT, num_sequences, 0.2, 0.2
    )
    _close(loss, -advantages_B.sum() / num_sequences)
    loss.backward()
    expected_BT = (-advantages_B[:, None] / num_sequences).expand_as(logprobs_BT) * mask_BT
    _close(logprobs_BT.grad, expected_BT)
    assert (logprobs_BT.grad[~mask_BT] == 0).all()
    assert float(metrics["clip_ratio"]) == 0.0
    _close(metrics["ratio_mean"], 1.0)
    assert not metrics["ratio_mean"].requires_grad


def test_policy_loss_clipping_hand_case():
    # Sequence 0: log rho = 0.5 (rho 1.65 > 1 + 0.2) with A = +1 -> clipped, zero gradient.
    # Sequence 1: same rho with A = -2 -> the unclipped term is the min; gradient flows.
    old_BT = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    logprobs_BT = torch.tensor([[-0.75, -0.75, 3.0], [-0.75, -0.75, 3.0]], requires_grad=True)
    mask_BT = torch.tensor([[1, 1, 0], [1, 1, 0]])
    advantages_B = torch.tensor([1.0, -2.0])
    loss, metrics = policy_loss(logprobs_BT, old_BT, advantages_B, mask_BT, 2, 0.2, 0.28)
    rho = math.exp(0.5)
    _close(loss, -(1.28 * 1.0 + rho * -2.0) / 2)
    loss.backward()
    _close(logprobs_BT.grad[0], [0.0, 0.0, 0.0])
    _close(logprobs_BT.grad[1], [rho, rho, 0.0])  # d/dlogp of -(rho * -2)/2 = rho
    _close(metrics["clip_ratio"], 0.5)
    _close(metrics["ratio_mean"], rho)


def test_policy_loss_low_clip_with_negative_advantage():
    # rho = exp(-1) < 1 - 0.2 with A < 0: clip(rho) * A = 0.8 * A is the min -> zero gradient.
    logprobs_BT = torch.tensor([[-2.0]], requires_grad=True)
    loss, metrics = policy_loss(logprobs_BT, torch.tensor([[-1.0]]), torch.tensor([-1.0]),
                                torch.ones(1, 1), 1, 0.2, 0.2)
    _close(loss, 0.8)
    loss.backward()
    _close(logprobs_BT.grad, [[0.0]])
    _close(metrics["clip_ratio"], 1.0)


def test_policy_loss_extreme_ratio_stays_finite():
    logprobs_BT = torch.tensor([[0.0], [0.0]], requires_grad=True)
    old_BT = torch.tensor([[-500.0], [-500.0]])
    loss, _ = policy_loss(logprobs_BT, old_BT, torch.tensor([1.0, -1.0]), torch.ones(2, 1),
                          2, 0.2, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs_BT.grad).all()


def test_policy_loss_grad_accumulation_equals_one_batch():
    logprobs_BT, mask_BT, advantages_B = _batch(3, num_sequences=8)
    generator = torch.Generator().manual_seed(4)
    old_BT = logprobs_BT + 0.1 * torch.randn(logprobs_BT.shape, generator=generator,
                                              dtype=logprobs_BT.dtype)
    full_BT = logprobs_BT.clone().requires_grad_(True)
    full_loss, _ = policy_loss(full_BT, old_BT, advantages_B, mask_BT, 8, 0.2, 0.28)
    full_loss.backward()

    micro_BT = logprobs_BT.clone().requires_grad_(True)
    total_loss = torch.zeros((), dtype=logprobs_BT.dtype)
    for rows in torch.arange(8).split(2):  # 4 micro-batches of 2 sequences
        loss, _ = policy_loss(micro_BT[rows], old_BT[rows], advantages_B[rows], mask_BT[rows],
                              8, 0.2, 0.28)
        loss.backward()
        total_loss += loss.detach()
    _close(total_loss, full_loss.detach())
    _close(micro_BT.grad, full_BT.grad)
    assert full_BT.grad.abs().sum() > 0


def test_policy_loss_rejects_bad_inputs():
    logprobs_BT = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_sequences"):
        policy_loss(logprobs_BT, logprobs_BT, torch.zeros(2), torch.ones(2, 3), 0, 0.2, 0.2)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs_BT, logprobs_BT, torch.zeros(3), torch.ones(2, 3), 2, 0.2, 0.2)
