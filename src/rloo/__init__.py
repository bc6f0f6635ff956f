"""rloo: fine-tune causal language models with RLOO (REINFORCE Leave-One-Out).

Public API: ``RLOOConfig``, ``train``, ``evaluate``, ``rloo_advantages``.
"""

__version__ = "0.1.0"
