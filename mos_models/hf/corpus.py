"""Text for calibration, evaluation and training when the user brings none.

``corpus.txt`` beside this file: a few hundred short sentences of plain English on everyday
topics (weather, food, science, history, travel, nature, family...), one per line, written for
this project and under the project's own licence; small enough to ship, varied enough to
calibrate importance scores and to smoke-test training. ``load_texts`` reads a user's text files
instead (``--data``); ``text_batches`` tokenizes either into padded batches.
"""
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


def default_corpus() -> List[str]:
    """The embedded sentences, in file order."""
    return load_texts(CORPUS_PATH)


def load_texts(path: str) -> List[str]:
    """The non-empty lines of a text file, or of every ``*.txt`` file under a directory
    (sorted by path)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
        if not files:
            raise ValueError(f"--data {path!r}: the directory holds no .txt files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"--data {path!r}: no such file or directory")
    texts = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"--data {path!r} holds no text")
    return texts


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def text_batches(tokenizer, texts: Optional[Sequence[str]] = None, batch_size: int = 16,
                 max_length: int = 64, num_batches: Optional[int] = None
                 ) -> List[Dict[str, Tensor]]:
    """``texts`` (default: the embedded corpus) tokenized with ``tokenizer`` (special tokens
    added, truncated to ``max_length``) into batches of ``batch_size`` sentences, right-padded:
    dicts of input_ids and attention_mask (and token_type_ids when the tokenizer makes them).
    Tokenizers without a pad token (e.g. Llama's) pad with eos; the mask hides the padding.
    ``num_batches``: at most that many (the first ones)."""
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"text_batches: batch_size must be >= 1 and max_length >= 2, got "
                         f"{batch_size} and {max_length}")
    texts = list(default_corpus() if texts is None else texts)
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(texts), batch_size):
        if num_batches is not None and len(batches) >= num_batches:
            break
        encoded = tokenizer(texts[start:start + batch_size], truncation=True,
                            max_length=max_length)
        width = max(len(ids) for ids in encoded["input_ids"])
        batch = {}
        for key, pad_value in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in encoded:
                batch[key] = torch.tensor([row + [pad_value] * (width - len(row))
                                           for row in encoded[key]], dtype=torch.long)
        batches.append(batch)
    return batches
