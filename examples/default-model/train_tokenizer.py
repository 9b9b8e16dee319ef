"""Train the default model's byte-level BPE tokenizer on the corpus's train split.

Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``OUT``: transformers'
``PreTrainedTokenizerFast`` (and so mlx-lm's ``load_tokenizer``) reads them from the local folder
with no network. Special token: ``<|endoftext|>`` (id 0), the document separator and EOS.

    python examples/default-model/train_tokenizer.py --corpus /tmp/dm/corpus --out /tmp/dm/tokenizer --vocab 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import read_split  # noqa: E402

EOS = "<|endoftext|>"


def train(corpus: Path, out: Path, vocab_size: int = 4096, min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = [text for _, text in read_split(corpus, "train")]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "unk_token": None,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok


def load(folder: Path):
    """The saved tokenizer as transformers loads it (offline, from the folder)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args(argv)
    tok = train(a.corpus, a.out, a.vocab)
    hf = load(a.out)
    sample = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = hf.encode(sample)
    assert hf.decode(ids) == sample, "tokenizer does not round-trip"
    valid = "".join(t for _, t in read_split(a.corpus, "valid"))
    n = len(tok.encode(valid).ids)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(valid) / n:.2f} chars/token on valid, "
          f"eos id {hf.eos_token_id}")


if __name__ == "__main__":
    main()
