"""rloo: fine-tune causal language models with RLOO (REINFORCE Leave-One-Out; Ahmadian et al., ACL 2024).

Public API::

    from rloo import RLOOConfig, train, evaluate, rloo_advantages
    from rloo import SFTConfig, sft, RewardConfig, reward_model    # the recipe's first two stages

    cfg = load_config("tldr-tiny", {"max_steps": 20})    # or RLOOConfig(learning_rate=3e-6, ...)
    result = train(cfg, rewards=[my_reward_fn], train_dataset=my_dataset)
"""

__version__ = "0.1.0"

from rloo.config import RLOOConfig, load_config
from rloo.objective import rloo_advantages


def train(*args, **kwargs):
    """See ``rloo.trainer.train`` (imported lazily: importing rloo stays cheap)."""
    from rloo.trainer import train as _train

    return _train(*args, **kwargs)


def sft(*args, **kwargs):
    """See ``rloo.sft_stage.sft``: supervised fine-tuning (``rloo sft``)."""
    from rloo.sft_stage import sft as _sft

    return _sft(*args, **kwargs)


def reward_model(*args, **kwargs):
    """See ``rloo.reward_stage.reward_model``: a Bradley-Terry reward model (``rloo reward-model``)."""
    from rloo.reward_stage import reward_model as _reward_model

    return _reward_model(*args, **kwargs)


def __getattr__(name: str):
    """``SFTConfig`` and ``RewardConfig``, imported when first asked for."""
    if name == "SFTConfig":
        from rloo.sft_config import SFTConfig

        return SFTConfig
    if name == "RewardConfig":
        from rloo.reward_config import RewardConfig

        return RewardConfig
    raise AttributeError(f"module 'rloo' has no attribute '{name}'")


def evaluate(*args, **kwargs):
    """See ``rloo.held_out.evaluate``."""
    from rloo.held_out import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["RLOOConfig", "SFTConfig", "RewardConfig", "load_config", "train", "sft", "reward_model", "evaluate",
           "rloo_advantages", "__version__"]
