"""A small byte-level BPE tokenizer (GPT-2's scheme, GPT-2's EOS) trained in milliseconds, for tests that
need a real tokenizer without the 50k-entry GPT-2 vocabulary."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["Llanowar Elves", "Sword of Fire and Ice", "Jace, the Mind Sculptor", "Creature — Elf Druid | G |",
          "the quick brown fox jumps over the lazy dog", "Elspeth, Sun's Champion"]


def make_tokenizer(corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
