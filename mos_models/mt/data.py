"""Parallel data: a corpus built from gettext catalogs, sentencepiece, and token batching.

Data directory layout (what users of fairseq/HAT-style setups already have):

    DIR/{train,valid,test}.en, DIR/{train,valid,test}.<lang>   one sentence per line
    DIR/spm.model                                              joint sentencepiece model
                                                               (trained here when missing)

``build_corpus`` makes such a directory offline from the message catalogs installed under
``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``: English program messages and their human
translations. Cleaning: drop the catalog header, untranslated (empty) entries, multi-line
messages, pairs whose target is (nearly) a copy of the source, and overlong pairs; normalise
runs of whitespace to one space; keep placeholders (%s, {0}, $1...) and mnemonics as they are.
Fuzzy entries are left out of .mo files by msgfmt (unless compiled with --use-fuzzy, which the
format cannot show), so a .mo holds no fuzzy entry to drop. Pairs are de-duplicated and assigned
to splits by a hash of the case-folded source, so one source sentence never appears in two splits
and the splits do not depend on file order.
"""
import difflib
import hashlib
import json
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")
_WS = re.compile(r"\s+")
_PLACEHOLDER = re.compile(r"%(\d+\$)?[-+ #0']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?"
                          r"[diouxXeEfFgGaAcspn%]|\{[^{}]*\}")
_CHARSET = re.compile(r"charset=([A-Za-z0-9_.:-]+)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# reading catalogs

@dataclass
class CatalogEntry:
    context: Optional[str]
    msgid: str
    msgid_plural: Optional[str]
    msgstrs: List[str]


def read_mo(path) -> List[CatalogEntry]:
    """Entries of a GNU .mo file (either byte order), decoded with the header's charset."""
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        order = "<"
    elif magic == 0xDE120495:
        order = ">"
    else:
        raise ValueError(f"{path}: not a .mo file (bad magic {magic:#x})")
    _, count, orig_at, trans_at = struct.unpack(order + "4I", data[4:20])

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i:table + 8 * i + 8])
        return data[offset:offset + length]

    raw = [(string(orig_at, i), string(trans_at, i)) for i in range(count)]
    charset = "utf-8"
    for key, value in raw:
        if key == b"":
            match = _CHARSET.search(value.decode("ascii", "replace"))
            if match and match.group(1).upper() != "CHARSET":
                charset = match.group(1)
    entries = []
    for key, value in raw:
        if key == b"":
            continue  # the header
        ctx = None
        if b"\x04" in key:
            ctx_bytes, key = key.split(b"\x04", 1)
            ctx = ctx_bytes.decode(charset, "replace")
        ids = key.decode(charset, "replace").split("\x00")
        entries.append(CatalogEntry(ctx, ids[0], ids[1] if len(ids) > 1 else None,
                                    value.decode(charset, "replace").split("\x00")))
    return entries


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def near_copy(source: str, target: str, threshold: float = 0.9) -> bool:
    """True when the target is (nearly) the source: equal up to case and punctuation, or a
    character similarity ratio of at least ``threshold``."""
    a, b = source.casefold(), target.casefold()
    if re.sub(r"\W", "", a) == re.sub(r"\W", "", b):
        return True
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold


def clean_pair(source: str, target: str, max_chars: int = 300) -> Tuple[Optional[Tuple[str, str]], str]:
    """((source, target), "ok") after normalisation, or (None, reason it was dropped)."""
    if not source.strip() or not target.strip():
        return None, "empty"
    if "\n" in source.strip() or "\n" in target.strip():
        return None, "multi-line"
    source, target = normalise(source), normalise(target)
    if len(source) > max_chars or len(target) > max_chars:
        return None, "too long"
    if not re.search(r"[^\W\d_]", _PLACEHOLDER.sub("", source)):
        return None, "no words"
    if near_copy(source, target):
        return None, "copy"
    return (source, target), "ok"


def catalog_pairs(paths: Sequence, max_chars: int = 300) -> Tuple[List[Tuple[str, str]], Dict]:
    """Cleaned, de-duplicated (source, target) pairs of the given .mo files, plus counts of what
    was dropped and why. Singular forms only (plural forms depend on the language's rules)."""
    pairs, seen, stats = [], set(), {"entries": 0, "duplicate": 0}
    for path in paths:
        for entry in read_mo(path):
            stats["entries"] += 1
            pair, reason = clean_pair(entry.msgid, entry.msgstrs[0] if entry.msgstrs else "",
                                      max_chars)
            if pair is None:
                stats[reason] = stats.get(reason, 0) + 1
            elif pair in seen:
                stats["duplicate"] += 1
            else:
                seen.add(pair)
                pairs.append(pair)
    return pairs, stats


def catalog_files(locale_dir, lang: str) -> List[Path]:
    folder = Path(locale_dir) / lang / "LC_MESSAGES"
    files = sorted({p.resolve() for p in folder.glob("*.mo")})  # symlinks counted once
    if not files:
        raise FileNotFoundError(f"no .mo catalogs under {folder}; installed languages: "
                                f"{', '.join(installed_languages(locale_dir)) or 'none'}")
    return files


def installed_languages(locale_dir) -> List[str]:
    root = Path(locale_dir)
    return sorted(p.name for p in root.iterdir()
                  if any((p / "LC_MESSAGES").glob("*.mo"))) if root.is_dir() else []


def _bucket(source: str) -> float:
    digest = hashlib.sha1(source.casefold().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_pairs(pairs: Sequence[Tuple[str, str]], valid_fraction: float,
                test_fraction: float) -> Dict[str, List[Tuple[str, str]]]:
    """Deterministic splits by a hash of the case-folded source: every translation of one source
    lands in the same split. Each split is sorted by (hash, pair), i.e. shuffled reproducibly."""
    splits = {name: [] for name in SPLITS}
    for pair in pairs:
        h = _bucket(pair[0])
        name = "valid" if h < valid_fraction else "test" if h < valid_fraction + test_fraction \
            else "train"
        splits[name].append((h, pair))
    return {name: [p for _, p in sorted(items)] for name, items in splits.items()}


def write_split(directory: Path, split: str, lang: str, pairs: Sequence[Tuple[str, str]]) -> None:
    for side, index in (("en", 0), (lang, 1)):
        with open(directory / f"{split}.{side}", "w", encoding="utf-8") as f:
            f.writelines(pair[index] + "\n" for pair in pairs)


def build_corpus(out_dir, lang: str = "de", locale_dir="/usr/share/locale",
                 valid_fraction: float = 0.03, test_fraction: float = 0.03,
                 max_chars: int = 300, vocab_size: int = 8000, log=print) -> Dict:
    """Builds DIR/{train,valid,test}.{en,lang}, DIR/spm.model and DIR/stats.json."""
    if lang == "en" or not re.fullmatch(r"[A-Za-z]{2,3}([_@][A-Za-z0-9]+)*", lang):
        raise ValueError(f"build_corpus: lang must be a locale name other than 'en' such as "
                         f"'de' or 'pt_BR', got {lang!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = catalog_files(locale_dir, lang)
    pairs, stats = catalog_pairs(files, max_chars)
    splits = split_pairs(pairs, valid_fraction, test_fraction)
    for name, items in splits.items():
        if not items:
            raise ValueError(f"build_corpus: split {name!r} is empty ({len(pairs)} pairs in all);"
                             " the catalogs are too few for a corpus")
        write_split(out, name, lang, items)
    stats.update(lang=lang, catalogs=len(files), pairs=len(pairs),
                 **{f"{name}_pairs": len(items) for name, items in splits.items()})
    train_sentencepiece(out, lang, vocab_size)
    stats["copy_bleu_test"] = copy_bleu(out, "test", lang)
    with open(out / "stats.json", "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
    log(f"built {out}: {len(pairs)} pairs from {len(files)} catalogs "
        f"(train {stats['train_pairs']}, valid {stats['valid_pairs']}, test "
        f"{stats['test_pairs']}); copy-the-source test BLEU {stats['copy_bleu_test']:.2f}")
    return stats


def copy_bleu(data_dir, split: str, lang: str) -> float:
    """BLEU of copying the source sentence as the translation (the trivial baseline)."""
    import sacrebleu
    sources = read_lines(Path(data_dir) / f"{split}.en")
    targets = read_lines(Path(data_dir) / f"{split}.{lang}")
    return float(sacrebleu.corpus_bleu(sources, [targets]).score)


# ----------------------------------------------------------------------------------------------
# sentencepiece and datasets

def read_lines(path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def detect_lang(data_dir) -> str:
    langs = sorted({p.suffix[1:] for p in Path(data_dir).glob("train.*")} - {"en"})
    if len(langs) != 1:
        raise ValueError(f"{data_dir}: expected train.en and one train.<lang>, found "
                         f"{[p.name for p in Path(data_dir).glob('train.*')]}")
    return langs[0]


def train_sentencepiece(data_dir, lang: str, vocab_size: int = 8000) -> Path:
    """A joint unigram model on train.en + train.<lang>; ids: pad 0, unk 1, bos 2, eos 3.
    The vocabulary shrinks to what the text supports when it is small."""
    import sentencepiece as spm
    data_dir = Path(data_dir)
    lines = read_lines(data_dir / "train.en") + read_lines(data_dir / f"train.{lang}")
    floor = len(set("".join(lines))) + 8  # every character needs a piece, plus the specials
    size = max(min(vocab_size, len(set(" ".join(lines).split())) + floor), floor)
    prefix = str(data_dir / "spm")
    while True:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=size,
                model_type="unigram", character_coverage=1.0, pad_id=PAD, unk_id=UNK,
                bos_id=BOS, eos_id=EOS, num_threads=1, minloglevel=2,
                hard_vocab_limit=True, split_digits=True, max_sentence_length=4096)
            break
        except RuntimeError as exc:  # "Vocabulary size too high": the text supports fewer
            if "too high" not in str(exc) or size <= floor:
                raise
            size = max(int(size * 0.8), floor)
    return data_dir / "spm.model"


class Tokenizer:
    def __init__(self, model_path):
        import sentencepiece as spm
        self.path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, lines: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(lines))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS])


def load_split(data_dir, split: str, tokenizer: Tokenizer, lang: Optional[str] = None,
               max_len: int = 250) -> Tuple[List[List[int]], List[List[int]], List[str]]:
    """Token ids of source and target (with EOS; sentences clipped to ``max_len`` tokens) and
    the raw target sentences (references for BLEU)."""
    lang = lang or detect_lang(data_dir)
    sources = read_lines(Path(data_dir) / f"{split}.en")
    targets = read_lines(Path(data_dir) / f"{split}.{lang}")
    if len(sources) != len(targets):
        raise ValueError(f"{data_dir}: {split}.en has {len(sources)} lines but {split}.{lang} "
                         f"has {len(targets)}")
    src = [ids[:max_len - 1] + [EOS] for ids in tokenizer.encode(sources)]
    tgt = [ids[:max_len - 1] + [EOS] for ids in tokenizer.encode(targets)]
    return src, tgt, targets


def make_batches(src: Sequence[Sequence[int]], tgt: Optional[Sequence[Sequence[int]]],
                 max_tokens: int) -> List[List[int]]:
    """Sentence indices grouped by length so that each batch holds about ``max_tokens`` tokens,
    counting padding: batch size x (longest source + longest target) <= max_tokens."""
    lengths = [len(s) + (len(tgt[i]) if tgt is not None else 0) for i, s in enumerate(src)]
    order = sorted(range(len(src)), key=lambda i: (lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def epoch_batches(batches: List[List[int]], seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> List[List[int]]:
    """The batch order of an epoch (a shuffle that depends on seed and epoch only), this rank's
    share of it (every rank gets the same number of batches)."""
    order = list(range(len(batches)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    per_rank = len(order) // world_size
    return [batches[i] for i in order[rank * per_rank:(rank + 1) * per_rank]]


def collate(indices: Sequence[int], src, tgt=None, device="cpu"):
    """(src (B, S), tgt_in (B, T), tgt_out (B, T)) padded with PAD; tgt_in starts with BOS."""
    batch_src = [src[i] for i in indices]
    s = torch.full((len(indices), max(map(len, batch_src))), PAD, dtype=torch.long)
    for row, ids in enumerate(batch_src):
        s[row, :len(ids)] = torch.tensor(ids)
    if tgt is None:
        return s.to(device), None, None
    batch_tgt = [tgt[i] for i in indices]
    t_len = max(map(len, batch_tgt))
    t_in = torch.full((len(indices), t_len), PAD, dtype=torch.long)
    t_out = torch.full((len(indices), t_len), PAD, dtype=torch.long)
    for row, ids in enumerate(batch_tgt):
        t_out[row, :len(ids)] = torch.tensor(ids)
        t_in[row, 0] = BOS
        t_in[row, 1:len(ids)] = torch.tensor(ids[:-1])
    return s.to(device), t_in.to(device), t_out.to(device)


def iterate(batches: Sequence[List[int]], src, tgt, device="cpu") -> Iterator:
    for indices in batches:
        yield collate(indices, src, tgt, device)
