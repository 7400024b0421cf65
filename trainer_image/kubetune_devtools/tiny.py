"""A tiny Llama-shaped model and tokenizer, built on the fly (no downloads).

Used by the tests, the demo and the CPU benchmark: a few hundred thousand parameters train in seconds on one
CPU core, yet the model has every part a real one has (RoPE, GQA, SwiGLU, RMSNorm), so LoRA targets, packing
and checkpointing are exercised for real.

    model, tokenizer = build_tiny_model(seed=0)
    save_tiny_model("/tmp/tiny")            # config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# ChatML-style markers, registered as special tokens so each is exactly one token id.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough English, chat and code-ish text for a byte-level BPE to learn a few hundred merges.
_CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "or",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "it",
    "this",
    "that",
    "these",
    "those",
    "for",
    "with",
    "on",
    "at",
    "by",
    "from",
    "as",
    "user",
    "assistant",
    "system",
    "tool",
    "question",
    "answer",
    "what",
    "how",
    "why",
    "when",
    "where",
    "who",
    "which",
    "please",
    "thank",
    "you",
    "hello",
    "model",
    "train",
    "training",
    "data",
    "dataset",
    "loss",
    "step",
    "steps",
    "epoch",
    "learning",
    "rate",
    "token",
    "tokens",
    "batch",
    "adapter",
    "kubernetes",
    "cluster",
    "pod",
    "job",
    "node",
    "gpu",
    "cpu",
    "memory",
    "storage",
    "bucket",
    "object",
    "prefix",
    "upload",
    "download",
    "file",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "number",
    "add",
    "plus",
    "minus",
    "times",
    "equals",
    "result",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "color",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "river",
    "mountain",
    "city",
    "country",
    "yes",
    "no",
    "maybe",
    "true",
    "false",
    "good",
    "bad",
    "new",
    "old",
    "big",
    "small",
    "first",
    "last",
    "next",
    "previous",
    "start",
    "stop",
    "end",
]


def _corpus() -> list[str]:
    words = _CORPUS_WORDS
    lines = []
    for i in range(400):
        # A deterministic walk through the word list gives varied but reproducible sentences.
        sentence = " ".join(words[(i * 7 + j * 13) % len(words)] for j in range(8 + i % 9))
        lines.append(sentence.capitalize() + ("?" if i % 5 == 0 else "."))
        lines.append(f"{i} + {i % 17} = {i + i % 17}")
    return lines


def build_tiny_tokenizer(vocab_size: int = 512, chat_template: bool = True) -> Any:
    """A byte-level BPE tokenizer (every string encodes; no unknown token) trained on a built-in corpus.

    With ``chat_template=False`` the tokenizer has no chat template, so the trainer's default one applies.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
    )
    if chat_template:
        wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped


def build_tiny_model(
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 4096,
    chat_template: bool = True,
) -> tuple[Any, Any]:
    """A randomly initialised ``LlamaForCausalLM`` (fp32) and its tokenizer; same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, tokenizer


def save_tiny_model(directory: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Build the tiny model and write it as a Hugging Face model directory (safetensors + tokenizer)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_model(seed=seed, **kwargs)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
