"""A tiny Llama model and a locally trained byte-level BPE tokenizer, for tests and CPU smoke runs.

Nothing is downloaded: the model is built from a ``LlamaConfig`` with seeded random weights and the
tokenizer is trained on a small generated corpus (arithmetic, python snippets, english words).
"""
from __future__ import annotations

import random

import torch

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, "<|endoftext|>"]

# ChatML-style: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt is
# the assistant header "<|im_start|>assistant\n". eos is <|im_end|>, so a sampled answer ends its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = ("the a an is are was be to of and in that it for on with as at by from this def return "
          "if else elif for while import print class self true false none not or list dict int str "
          "sum value result answer number question solve correct feedback solution test error "
          "output input function first second add multiply subtract total each step so then "
          "user assistant system")


def tiny_corpus(seed: int = 0, lines: int = 600) -> list[str]:
    """A deterministic small corpus: arithmetic, python snippets, english-ish sentences."""
    rng, words = random.Random(seed), _WORDS.split()
    out = []
    for i in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = i % 3
        if kind == 0:
            op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
            out.append(f"What is {a} {op} {b}? The answer is {value}.")
        elif kind == 1:
            name = rng.choice(["add", "solve", "total", "f", "g", "count"])
            out.append(f"def {name}(x, y):\n    return x {rng.choice('+-*')} y + {a}\n\n"
                       f"print({name}({a}, {b}))\nassert {name}(1, 2) == {b}")
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + ".")
    return out


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer on :func:`tiny_corpus`; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=None,
                                   additional_special_tokens=[IM_START, "<|endoftext|>"],
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def build_tiny(dirpath=None, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
               seed: int = 0):
    """A tiny ``LlamaForCausalLM`` and its tokenizer, deterministic for ``seed``. Saved under
    ``dirpath`` when given, so ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(dirpath)`` load them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size, seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=2048,
                         initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if dirpath is not None:
        model.save_pretrained(dirpath)
        tokenizer.save_pretrained(dirpath)
    return model, tokenizer
