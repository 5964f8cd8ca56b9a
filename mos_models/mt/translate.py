"""Beam search with incremental decoding, and BLEU (sacrebleu) on detokenised output.

The model runs in eval mode under no_grad with its architecture fixed, so every MoS layer
computes its collapsed weights once (MoSLinear's eval cache) and each decoding step is plain
F.linear calls; self-attention keys/values are cached and extended one step at a time, and
cross-attention keys/values are computed once per sentence.
"""
import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import BOS, EOS, PAD, UNK, Tokenizer, collate, make_batches
from .model import Transformer


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, beam: int = 4, lenpen: float = 0.6,
                max_len_a: float = 1.5, max_len_b: int = 10, max_len: int = 256
                ) -> List[List[int]]:
    """Best hypothesis (token ids without BOS/EOS) for each row of ``src`` (B, S).

    Hypotheses are ranked by log-probability / length**lenpen (length counts the EOS); a
    sentence is finished once ``beam`` hypotheses have ended, and EOS is forced at
    min(max_len_a * source length + max_len_b, max_len) tokens."""
    if beam < 1:
        raise ValueError(f"beam_search: beam must be >= 1, got {beam}")
    model.eval()
    batch, device = src.shape[0], src.device
    limit = int(min(max_len_a * int(src.ne(PAD).sum(1).max()) + max_len_b, max_len))
    enc = model.encode(src).index_select(torch.arange(batch, device=device)
                                         .repeat_interleave(beam))
    cache: list = []
    tokens = torch.full((batch * beam, 1), BOS, dtype=torch.long, device=device)
    scores = torch.full((batch, beam), -math.inf, device=device)
    scores[:, 0] = 0.0
    finished: List[List] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(limit):
        logits = model.decode(tokens[:, -1:], enc, cache, start=step)[:, -1]
        lprobs = F.log_softmax(logits.float(), dim=-1)
        lprobs[:, PAD] = lprobs[:, BOS] = -math.inf
        if step == limit - 1:
            eos = lprobs[:, EOS].clone()
            lprobs.fill_(-math.inf)
            lprobs[:, EOS] = eos
        vocab = lprobs.shape[1]
        candidates = (scores.view(-1, 1) + lprobs).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * vocab), dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        new_scores = torch.full((batch, beam), -math.inf, device=device)
        origin = torch.arange(batch * beam, device=device).view(batch, beam).clone()
        next_tokens = torch.full((batch, beam), EOS, dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                if score == -math.inf:
                    break
                row, token = b * beam + index // vocab, index % vocab
                if token == EOS:  # as fairseq: an ending counts only among the top `beam`
                    if rank < beam and len(finished[b]) < beam:
                        finished[b].append((score / (step + 1) ** lenpen,
                                            tokens[row, 1:].tolist()))
                elif kept < beam:
                    new_scores[b, kept], origin[b, kept], next_tokens[b, kept] = score, row, token
                    kept += 1
                if kept >= beam:
                    break
            if len(finished[b]) >= beam or step == limit - 1:
                done[b] = True
        if all(done):
            break
        order = origin.view(-1)
        for layer_cache in cache:
            self_cache = layer_cache["self"]
            self_cache["k"] = self_cache["k"].index_select(0, order)
            self_cache["v"] = self_cache["v"].index_select(0, order)
        tokens = torch.cat([tokens.index_select(0, order), next_tokens.view(-1, 1)], 1)
        scores = new_scores
    return [max(hyps)[1] if hyps else [] for hyps in finished]


def translate(model: Transformer, tokenizer: Tokenizer, sources: Sequence[Sequence[int]],
              beam: int = 4, lenpen: float = 0.6, max_tokens: int = 2048, device="cpu",
              progress: Optional[callable] = None) -> List[str]:
    """Detokenised translations of tokenised sources (ids ending with EOS), in input order."""
    model.eval()
    outputs: List[Optional[str]] = [None] * len(sources)
    for indices in make_batches(sources, None, max(max_tokens // beam, 1)):
        src, _, _ = collate(indices, sources, None, device)
        for i, ids in zip(indices, beam_search(model, src, beam, lenpen)):
            outputs[i] = tokenizer.decode([t for t in ids if t not in (PAD, BOS, EOS, UNK)])
        if progress is not None:
            progress(len(indices))
    return outputs


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Dict:
    import sacrebleu
    result = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    return {"bleu": float(result.score), "bleu_text": str(result)}


def evaluate_bleu(model: Transformer, tokenizer: Tokenizer, sources, references,
                  beam: int = 4, lenpen: float = 0.6, device="cpu", limit: Optional[int] = None,
                  progress=None) -> Dict:
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, beam, lenpen, device=device,
                           progress=progress)
    result = bleu(hypotheses, references)
    result.update(sentences=len(sources), beam=beam, lenpen=lenpen,
                  seconds=time.perf_counter() - start, hypotheses=hypotheses)
    return result
