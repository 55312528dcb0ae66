"""Tiny random-init Gemma 4 text models with locally trained tokenizers.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with `tokenizers` on
text the caller supplies, the model is transformers' `Gemma4ForCausalLM` built from a config.
Both are saved as an ordinary Hugging Face checkpoint directory so that the quickstart and the
tests go through the same loading path (`posttrain.models.load_policy`) as a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma4ForCausalLM, Gemma4TextConfig, PreTrainedTokenizerFast

# Gemma's special-token layout: pad 0, eos 1, bos 2, unk 3, then the chat-turn markers.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
END_OF_TURN = "<turn|>"

# Gemma 4's chat format: <bos><|turn>user\n...<turn|>\n<|turn>model\n...<turn|>\n
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer with Gemma 4's special tokens and chat template.

    Digits are split one per token so that arithmetic answers have a regular token structure.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|turn>", END_OF_TURN],
        padding_side="left",
    )
    wrapped.chat_template = GEMMA4_CHAT_TEMPLATE
    return wrapped


def tiny_gemma4_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 128,
    sliding_window: int = 64,
    eos_token_ids: list[int] | None = None,
) -> Gemma4TextConfig:
    """A Gemma 4 text config small enough for CPU, keeping the family's structure.

    Sliding and full attention layers alternate (the last one is full, as Gemma 4 requires),
    final logit softcapping is on (30.0, as in every released model), embeddings are tied.
    `global_head_dim` must be given explicitly: Gemma 4 defaults full-attention layers to
    512-wide heads. Per-layer embeddings are disabled (0) to keep the model tiny.
    """
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)]
    layer_types[-1] = "full_attention"
    return Gemma4TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        global_head_dim=head_dim,
        sliding_window=sliding_window,
        layer_types=layer_types,
        max_position_embeddings=1024,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab_size,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=eos_token_ids if eos_token_ids is not None else [1],
    )


def save_tiny_gemma4(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    **config_overrides,
) -> Path:
    """Build a random-init tiny `Gemma4ForCausalLM` and save it with its tokenizer (safetensors)."""
    out_dir = Path(out_dir)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    config = tiny_gemma4_config(len(tokenizer), eos_token_ids=eos_ids, **config_overrides)
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
