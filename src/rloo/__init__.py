"""rloo: fine-tune causal language models with RLOO (REINFORCE Leave-One-Out; Ahmadian et al., ACL 2024).

Public API::

    from rloo import RLOOConfig, train, evaluate, rloo_advantages

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


def evaluate(*args, **kwargs):
    """See ``rloo.evaluate.evaluate``."""
    from rloo.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["RLOOConfig", "load_config", "train", "evaluate", "rloo_advantages", "__version__"]
