"""Tiny random configs of the causal-LM architectures rloo's users bring (transformers 5.19), built in tests.

Width 64, 2 layers (hybrids: one layer of each kind), vocab 512 (the tiny test tokenizer's: EOS 0, pad 1).
The config's own pad id is 2, so the embedding row of the tokenizer's pad token (1) is random, not zero,
and padding that leaked into a state-space layer's state would show. Sliding windows are 8 tokens,
shorter than the test prompts; every dropout rate a config has is 0.1, so a trainer that leaves one on
is caught; the MoE configs return router logits.
"""

from __future__ import annotations

from transformers import AutoConfig

WINDOW = 8
_COMMON = dict(vocab_size=512, pad_token_id=2, bos_token_id=0, eos_token_id=0)
_LLAMA_LIKE = dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True)
_MAMBA2 = dict(mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)

# name -> (model_type, config kwargs)
SPECS: dict[str, tuple[str, dict]] = {
    "gpt_neox": ("gpt_neox", dict(_LLAMA_LIKE, num_key_value_heads=None, rotary_pct=0.25)),
    "llama": ("llama", _LLAMA_LIKE),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=16)),
    "qwen3_moe": ("qwen3_moe", dict(_LLAMA_LIKE, head_dim=16, **_MOE)),
    "qwen2_moe": ("qwen2_moe", dict(_LLAMA_LIKE, shared_expert_intermediate_size=32, **_MOE)),
    "mistral": ("mistral", dict(_LLAMA_LIKE, sliding_window=WINDOW)),
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)),
    "gemma": ("gemma", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW)),
    "gemma3_text": ("gemma3_text", dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"],
                                        final_logit_softcapping=30.0)),
    "phi3": ("phi3", _LLAMA_LIKE),
    "phi": ("phi", dict(_LLAMA_LIKE, num_key_value_heads=None)),
    "starcoder2": ("starcoder2", dict(_LLAMA_LIKE, sliding_window=WINDOW)),
    "olmo2": ("olmo2", _LLAMA_LIKE),
    "cohere": ("cohere", _LLAMA_LIKE),
    "granite": ("granite", dict(_LLAMA_LIKE, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.25)),
    "smollm3": ("smollm3", dict(_LLAMA_LIKE, no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=WINDOW)),
    "gpt2": ("gpt2", dict(_COMMON, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256)),
    "gptj": ("gptj", dict(_COMMON, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256, rotary_dim=8)),
    "opt": ("opt", dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                        word_embed_proj_dim=64, max_position_embeddings=256, layerdrop=0.1)),
    "falcon": ("falcon", dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128)),
    "falcon_alibi": ("falcon", dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_hidden_size=128, alibi=True, multi_query=False, parallel_attn=False, bias=True)),
    "bloom": ("bloom", dict(_COMMON, hidden_size=64, n_layer=2, n_head=4)),
    "mamba": ("mamba", dict(_COMMON, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)),
    "mamba2": ("mamba2", dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, n_groups=1,
                              state_size=16, expand=2, conv_kernel=4, chunk_size=16)),
    "jamba": ("jamba", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                            mamba_d_conv=4, mamba_expand=2, output_router_logits=True)),
    "bamba": ("bamba", dict(_LLAMA_LIKE, attn_layer_indices=[1], **_MAMBA2)),
    "falcon_h1": ("falcon_h1", dict(_LLAMA_LIKE, mamba_d_ssm=128, **_MAMBA2)),
    "qwen3_next": ("qwen3_next", dict(_LLAMA_LIKE, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                      linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                      linear_num_key_heads=2, linear_num_value_heads=4,
                                      shared_expert_intermediate_size=32, **_MOE)),
    "lfm2": ("lfm2", dict(_LLAMA_LIKE, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
                          block_multiple_of=1)),
}
ARCHITECTURES = list(SPECS)
DROPOUT_WORDS = ("dropout", "pdrop", "layerdrop", "jitter")


def tiny_config(name: str):
    """The tiny config of ``name``, every dropout-like rate it has (and a router jitter) set to 0.1."""
    model_type, kwargs = SPECS[name]
    config = AutoConfig.for_model(model_type, **{key: value for key, value in kwargs.items() if value is not None})
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and any(word in key for word in DROPOUT_WORDS):
            setattr(config, key, 0.1)
    return config
