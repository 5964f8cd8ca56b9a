"""Text data for BERT masked-language-model pretraining.

The default corpus is the docstrings of the installed Python standard library: English prose
written by people, present offline wherever this Python is. Docstrings are cleaned (code, doctest
and markup lines dropped, paragraphs joined into one line each, duplicates removed) and split into
train/valid by a hash of the module path, so the split is deterministic and no module's text sits
on both sides. Any plain-text files (one document or sentence per line) can be used instead.

A sentencepiece unigram tokenizer is trained on the train split. Token ids 0-4 are the specials
[PAD] [UNK] [CLS] [SEP] [MASK]. Each split is stored as one stream of ids with [SEP] after every
line; training packs the stream into blocks of ``[CLS] ... [SEP]`` (RoBERTa's full-sentences).
"""
import ast
import hashlib
import json
import os
import re
import sysconfig
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
              "lib2to3", "turtledemo", "ensurepip", "venv"}


def _hash_percent(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 100


_ROLE = re.compile(r":[a-zA-Z]+(?::[a-zA-Z]+)?:`~?([^`]*)`")   # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*)\*\*?")
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z]+")


def clean_paragraph(lines: Sequence[str]) -> Optional[str]:
    """One docstring paragraph (its lines) as a cleaned line of prose, or None to drop it.

    Dropped: doctests, indented blocks (code, argument tables), reST directives and
    paragraphs that are mostly symbols or identifiers rather than words.
    """
    if not lines or any(l.startswith((" ", "\t", ">>>", "...", ".. ", "$ ", "%")) for l in lines):
        return None
    text = " ".join(l.strip() for l in lines)
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    if text.endswith("::"):
        text = text[:-1]
    words = text.split(" ")
    if len(words) < 6 or len(text) > 2000 or not text.isascii():
        return None
    plain = sum(1 for w in words if _WORD.fullmatch(w.strip(".,;:!?()'\"")))
    if plain < 0.7 * len(words):           # identifiers, paths, numbers, code
        return None
    if sum(c in "{}[]=<>|\\_#@" for c in text) > 0.03 * len(text):
        return None
    return text


def _paragraphs(doc: str) -> Iterable[List[str]]:
    block: List[str] = []
    for line in doc.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def stdlib_documents(root: Optional[str] = None) -> List[Tuple[str, str]]:
    """(module path, cleaned paragraph) pairs from the standard library's docstrings, in a fixed
    order (sorted walk), first occurrence of each paragraph only."""
    root = root or sysconfig.get_paths()["stdlib"]
    seen, out = set(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            rel = os.path.relpath(path, root)
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                for block in _paragraphs(doc or ""):
                    text = clean_paragraph(block)
                    if text is not None and text not in seen:
                        seen.add(text)
                        out.append((rel, text))
    return out


def split_documents(docs: Sequence[Tuple[str, str]], valid_percent: int):
    """Deterministic train/valid split by a hash of each document's group key."""
    train, valid = [], []
    for key, text in docs:
        (valid if _hash_percent(key) < valid_percent else train).append(text)
    return train, valid


def read_text_files(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """(line, line) pairs of the non-empty lines of plain-text files: split per line."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs.extend((l, l) for l in (_SPACES.sub(" ", line).strip() for line in f) if l)
    return docs


class Tokenizer:
    """A sentencepiece model with BERT's special tokens at ids 0-4."""

    def __init__(self, model_file: str):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        expected = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        got = [self.sp.id_to_piece(i) for i in range(NUM_SPECIAL)]
        if got != expected:
            raise ValueError(f"Tokenizer: {model_file} has specials {got}, expected {expected}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i >= NUM_SPECIAL])


def train_tokenizer(train_lines: Sequence[str], out_dir: str, vocab_size: int) -> Tokenizer:
    import sentencepiece as spm
    prefix = os.path.join(out_dir, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_lines), model_prefix=prefix, model_type="unigram",
        vocab_size=vocab_size, character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=CLS,
        eos_id=SEP, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        control_symbols=["[MASK]"], num_threads=1, minloglevel=2, max_sentence_length=8192)
    return Tokenizer(prefix + ".model")


def encode_stream(tokenizer: Tokenizer, lines: Sequence[str]) -> Tensor:
    """All lines' ids as one int32 stream, [SEP] after each line."""
    ids: List[int] = []
    for line in lines:
        ids.extend(tokenizer.encode(line))
        ids.append(SEP)
    return torch.tensor(ids, dtype=torch.int32)


def prepare(out_dir: str, text_files: Optional[Sequence[str]] = None, vocab_size: int = 4000,
            valid_percent: int = 8) -> dict:
    """Writes train.txt, valid.txt, spm.model, train.pt, valid.pt and meta.json to out_dir."""
    if not 0 < valid_percent < 100:
        raise ValueError(f"prepare: valid_percent must be in (0, 100), got {valid_percent}")
    os.makedirs(out_dir, exist_ok=True)
    docs = read_text_files(text_files) if text_files else stdlib_documents()
    train, valid = split_documents(docs, valid_percent)
    if not train or not valid:
        raise ValueError(f"prepare: the split left {len(train)} train and {len(valid)} valid "
                         "documents; give more text")
    for name, lines in (("train", train), ("valid", valid)):
        with open(os.path.join(out_dir, name + ".txt"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    tokenizer = train_tokenizer(train, out_dir, vocab_size)
    meta = {"source": list(text_files) if text_files else "python-stdlib-docstrings",
            "vocab_size": tokenizer.vocab_size, "valid_percent": valid_percent}
    for name, lines in (("train", train), ("valid", valid)):
        stream = encode_stream(tokenizer, lines)
        torch.save(stream, os.path.join(out_dir, name + ".pt"))
        meta[name] = {"lines": len(lines), "chars": sum(map(len, lines)),
                      "tokens": int(stream.numel())}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def load_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m mos_models.bert data --out "
                                f"{data_dir}` first")
    with open(path) as f:
        return json.load(f)


def load_blocks(data_dir: str, split: str, seq_len: int) -> Tensor:
    """The split's stream packed into (num_blocks, seq_len) int64 rows [CLS] ... [SEP]; the
    stream's tail that does not fill a block is dropped."""
    if seq_len < 3:
        raise ValueError(f"load_blocks: seq_len must be >= 3, got {seq_len}")
    stream = torch.load(os.path.join(data_dir, split + ".pt")).long()
    body = seq_len - 2
    n = stream.numel() // body
    if n == 0:
        raise ValueError(f"load_blocks: {split} has {stream.numel()} tokens, fewer than one "
                         f"block of {seq_len}")
    blocks = torch.empty(n, seq_len, dtype=torch.long)
    blocks[:, 0] = CLS
    blocks[:, 1:-1] = stream[:n * body].view(n, body)
    blocks[:, -1] = SEP
    return blocks


def mask_tokens(ids: Tensor, vocab_size: int, generator: Optional[torch.Generator] = None,
                mask_prob: float = 0.15) -> Tuple[Tensor, Tensor]:
    """BERT's masking: each non-special position is chosen with probability ``mask_prob``; of the
    chosen, 80% become [MASK], 10% a random non-special token, 10% stay. Returns (inputs,
    labels) with labels -100 at unchosen positions."""
    if ids.dtype != torch.long:
        raise TypeError(f"mask_tokens: ids must be int64, got {ids.dtype}")
    u = torch.rand(ids.shape, generator=generator)
    chosen = (u < mask_prob) & (ids >= NUM_SPECIAL)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(ids, MASK), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def unigram_perplexity(train_stream: Tensor, targets: Tensor, vocab_size: int) -> float:
    """Perplexity of ``targets`` under the train split's unigram distribution of non-special
    tokens (add-one smoothed): the baseline an MLM must beat."""
    counts = torch.bincount(train_stream.long(), minlength=vocab_size).double()
    counts[:NUM_SPECIAL] = 0
    counts[NUM_SPECIAL:] += 1
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[targets.long()].mean()))
