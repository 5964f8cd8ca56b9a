"""The MT Transformer: one forward, two owners.

``Transformer`` holds the forward code (pre-norm encoder-decoder, sinusoidal positions, one
vocabulary shared by both sides and the output projection, incremental decoding). Its two
subclasses differ only in their leaf modules:

- ``MTSupernet``: elastic modules at the largest sizes; ``set_arch(arch)`` selects a
  sub-network. Attention projections are plain weight-sharing ``ElasticLinear(kind="standard")``;
  both FFN linears of every layer are ``ElasticLinear(kind=<supernet kind>)``, i.e. MoSLinear for
  the "neuron" and "layer" kinds, whose routers read the 10-number architecture encoding.
- ``StaticTransformer``: plain nn.Linear / nn.LayerNorm / nn.Embedding sized for one
  architecture (what ``MTSupernet.export`` returns); no experts, routers or elastic code paths.

Attention follows HAT: the projections map to a fixed ``qkv_dim`` that the active number of
heads splits; each decoder layer attends to the concatenation (along time) of the outputs of the
last ``ende`` encoder layers, each passed through the encoder's final LayerNorm.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.elastic import ElasticLayerNorm, ElasticLinear, set_backend
from ..common.evolution import Arch
from .config import ARCH_DIM, MTSpace, SpaceConfig
from .data import PAD

Cache = List[Dict[str, Dict[str, Tensor]]]


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal position embeddings (len(positions), dim), as in "Attention is all you need"."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                     * (-math.log(10000.0) / max(half - 1, 1)))
    angles = positions.float()[:, None] * freq[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class Attention(nn.Module):
    def __init__(self, q_proj, k_proj, v_proj, out_proj, num_heads: int, dropout: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, x: Tensor, memory: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                cache: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """x (B, Tq, E); memory (B, Tk, E_mem) for cross attention (None: self attention);
        key_padding_mask (B, Tk), True at padding. ``cache`` (incremental decoding): self
        attention appends this step's keys/values; cross attention computes them once."""
        q = self.q_proj(x)
        if memory is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            source = x if memory is None else memory
            k, v = self.k_proj(source), self.v_proj(source)
            if cache is not None:
                if memory is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
                cache["k"], cache["v"] = k, v
        batch, t_q, width = q.shape
        heads = self.num_heads
        q = q.view(batch, t_q, heads, -1).transpose(1, 2)
        k = k.view(batch, k.shape[1], heads, -1).transpose(1, 2)
        v = v.view(batch, v.shape[1], heads, -1).transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]
        if causal and t_q > 1:
            t_k = k.shape[2]
            allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=x.device).tril(t_k - t_q)
            mask = allowed if mask is None else mask & allowed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, t_q, width))


class FeedForward(nn.Module):
    def __init__(self, fc1, fc2, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.dropout = fc1, fc2, dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, self_attn, ffn, norm1, norm2, dropout: float):
        super().__init__()
        self.self_attn, self.ffn, self.norm1, self.norm2 = self_attn, ffn, norm1, norm2
        self.dropout = dropout

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        x = x + F.dropout(self.self_attn(self.norm1(x), key_padding_mask=padding), self.dropout,
                          self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


class DecoderLayer(nn.Module):
    def __init__(self, self_attn, cross_attn, ffn, norm1, norm2, norm3, ende: int,
                 dropout: float):
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.norm1, self.norm2, self.norm3 = norm1, norm2, norm3
        self.ende, self.dropout = ende, dropout

    def forward(self, x: Tensor, memory: Tensor, memory_padding: Tensor,
                cache: Optional[Dict[str, Dict[str, Tensor]]] = None) -> Tensor:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        h = self.self_attn(self.norm1(x), causal=True, cache=self_cache)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.cross_attn(self.norm2(x), memory, key_padding_mask=memory_padding,
                            cache=cross_cache)
        x = x + F.dropout(h, self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm3(x)), self.dropout, self.training)


class EncoderOut:
    """Normalised outputs of the last encoder layers (oldest first) and the source padding."""

    def __init__(self, states: List[Tensor], padding: Tensor):
        self.states, self.padding = states, padding

    def memory(self, ende: int) -> Tuple[Tensor, Tensor]:
        """Keys/values source of a decoder layer attending to the last ``ende`` layers."""
        chosen = self.states[-ende:]
        if len(chosen) == 1:
            return chosen[0], self.padding
        return torch.cat(chosen, 1), self.padding.repeat(1, len(chosen))

    def index_select(self, order: Tensor) -> "EncoderOut":
        return EncoderOut([s.index_select(0, order) for s in self.states],
                          self.padding.index_select(0, order))


class Transformer(nn.Module):
    """Forward code shared by MTSupernet and StaticTransformer. Subclasses provide the
    modules and ``embedding_weight(side)`` ((vocab, dim) of "encoder" or "decoder")."""

    encoder_layers: nn.ModuleList
    decoder_layers: nn.ModuleList
    encoder_norm: nn.Module
    decoder_norm: nn.Module
    num_encoder_layers: int
    num_decoder_layers: int
    dropout: float

    def embedding_weight(self, side: str) -> Tensor:
        raise NotImplementedError

    def _embed(self, tokens: Tensor, side: str, start: int = 0) -> Tensor:
        weight = self.embedding_weight(side)
        dim = weight.shape[1]
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = F.embedding(tokens, weight, PAD) * math.sqrt(dim) + sinusoids(positions, dim)
        return F.dropout(x, self.dropout, self.training)

    def encode(self, src: Tensor) -> EncoderOut:
        padding = src.eq(PAD)
        x = self._embed(src, "encoder")
        keep = max(layer.ende for layer in self.decoder_layers[:self.num_decoder_layers])
        states = []
        for i, layer in enumerate(self.encoder_layers[:self.num_encoder_layers]):
            x = layer(x, padding)
            if i >= self.num_encoder_layers - keep:
                states.append(self.encoder_norm(x))
        return EncoderOut(states, padding)

    def decode(self, tgt_in: Tensor, enc: EncoderOut, cache: Optional[Cache] = None,
               start: int = 0) -> Tensor:
        """Logits (B, T, vocab). With ``cache`` (a list, filled on the first call), tgt_in holds
        only the new tokens from position ``start`` on."""
        x = self._embed(tgt_in, "decoder", start)
        layers = self.decoder_layers[:self.num_decoder_layers]
        if cache is not None and not cache:
            cache.extend({} for _ in layers)
        for i, layer in enumerate(layers):
            memory, memory_padding = enc.memory(layer.ende)
            x = layer(x, memory, memory_padding, None if cache is None else cache[i])
        return F.linear(self.decoder_norm(x), self.embedding_weight("decoder"))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(tgt_in, self.encode(src))

    def compile_units(self) -> List[nn.Module]:
        """The blocks --compile compiles one by one (mos_models.common.compile): attention and
        FFN blocks, whose graphs depend on a few sizes each, not on the whole architecture."""
        return [m for m in self.modules() if isinstance(m, (Attention, FeedForward))]


def loss_fn(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
            reduction: str = "mean") -> Tensor:
    """Label-smoothed cross-entropy over non-padding target tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing,
                           reduction=reduction)


# ----------------------------------------------------------------------------------------------

class MTSupernet(Transformer):
    """Elastic encoder-decoder supernet over ``MTSpace(config)``.

    kind: "neuron" / "layer" (FFN linears are MoSLinear with neuron- or layer-wise routers) or
    "standard" (the weight-sharing baseline: the same model with plain sliced FFN linears).
    """

    def __init__(self, vocab_size: int, config: SpaceConfig, kind: str = "neuron",
                 num_experts: int = 2, router_hidden: int = 128, backend: str = "auto"):
        super().__init__()
        self.vocab_size, self.config, self.kind = vocab_size, config, kind
        self.num_experts, self.router_hidden = num_experts, router_hidden
        self.space = MTSpace(config)
        self.dropout = config.dropout
        e, f, q = max(config.embed_choices), max(config.ffn_choices), config.qkv_dim
        heads, p = max(config.head_choices), config.dropout
        if any(q % h for h in config.head_choices):
            raise ValueError(f"MTSupernet: qkv_dim {q} must be divisible by every head count "
                             f"{config.head_choices}")

        def plain(n_in, n_out):
            return ElasticLinear(n_in, n_out, kind="standard", arch_dim=ARCH_DIM)

        def ffn():
            mos = {"kind": kind, "arch_dim": ARCH_DIM, "num_experts": num_experts,
                   "router_hidden": router_hidden, "backend": backend}
            return FeedForward(ElasticLinear(e, f, **mos), ElasticLinear(f, e, **mos), p)

        def attention():
            return Attention(plain(e, q), plain(e, q), plain(e, q), plain(q, e), heads, p)

        self.embedding = nn.Embedding(vocab_size, e, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, 0.0, e ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(attention(), ffn(), ElasticLayerNorm(e), ElasticLayerNorm(e), p)
            for _ in range(config.max_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(attention(), attention(), ffn(), ElasticLayerNorm(e),
                         ElasticLayerNorm(e), ElasticLayerNorm(e), 1, p)
            for _ in range(config.max_decoder_layers))
        self.encoder_norm, self.decoder_norm = ElasticLayerNorm(e), ElasticLayerNorm(e)
        self.set_arch(self.space.largest())

    def embedding_weight(self, side: str) -> Tensor:
        dim = self.encoder_embed if side == "encoder" else self.decoder_embed
        return self.embedding.weight[:, :dim]

    def set_backend(self, backend: str) -> "MTSupernet":
        set_backend(self, backend)
        return self

    def set_arch(self, arch: Arch) -> "MTSupernet":
        arch = self.space.validate(arch)
        self.arch = arch
        encoding = torch.tensor(self.space.encode(arch), dtype=self.embedding.weight.dtype,
                                device=self.embedding.weight.device)
        q = self.config.qkv_dim
        e_enc, e_dec = arch["encoder_embed"], arch["decoder_embed"]
        self.encoder_embed, self.decoder_embed = e_enc, e_dec
        self.num_encoder_layers, self.num_decoder_layers = (arch["encoder_layers"],
                                                            arch["decoder_layers"])

        def set_attention(attn, heads, e_query, e_memory):
            attn.num_heads = heads
            attn.q_proj.set_arch(None, e_query, q)
            attn.k_proj.set_arch(None, e_memory, q)
            attn.v_proj.set_arch(None, e_memory, q)
            attn.out_proj.set_arch(None, q, e_query)

        def set_ffn(ffn, width, embed):
            ffn.fc1.set_arch(encoding, embed, width)
            ffn.fc2.set_arch(encoding, width, embed)

        for i, layer in enumerate(self.encoder_layers[:self.num_encoder_layers]):
            set_attention(layer.self_attn, arch[f"encoder_heads_{i}"], e_enc, e_enc)
            set_ffn(layer.ffn, arch[f"encoder_ffn_{i}"], e_enc)
            layer.norm1.set_arch(e_enc)
            layer.norm2.set_arch(e_enc)
        for i, layer in enumerate(self.decoder_layers[:self.num_decoder_layers]):
            set_attention(layer.self_attn, arch[f"decoder_self_heads_{i}"], e_dec, e_dec)
            set_attention(layer.cross_attn, arch[f"decoder_cross_heads_{i}"], e_dec, e_enc)
            set_ffn(layer.ffn, arch[f"decoder_ffn_{i}"], e_dec)
            layer.ende = min(arch[f"decoder_ende_{i}"], self.num_encoder_layers)
            for norm in (layer.norm1, layer.norm2, layer.norm3):
                norm.set_arch(e_dec)
        self.encoder_norm.set_arch(e_enc)
        self.decoder_norm.set_arch(e_dec)
        return self

    def hparams(self) -> Dict:
        return {"vocab_size": self.vocab_size, "config": self.config.to_dict(), "kind": self.kind,
                "num_experts": self.num_experts, "router_hidden": self.router_hidden}

    @torch.no_grad()
    def export(self, arch: Arch) -> "StaticTransformer":
        """A StaticTransformer for ``arch`` whose outputs equal this supernet's for ``arch``."""
        arch = self.space.validate(arch)
        self.set_arch(arch)
        static = StaticTransformer(self.vocab_size, arch, self.config.qkv_dim, self.dropout)
        static.to(self.embedding.weight.device, self.embedding.weight.dtype)
        static.encoder_embedding.weight.copy_(self.embedding_weight("encoder"))
        static.decoder_embedding.weight.copy_(self.embedding_weight("decoder"))
        modules = dict(self.named_modules())
        for name, target in static.named_modules():
            source = modules.get(name)
            if isinstance(source, ElasticLinear):
                target.load_state_dict(source.to_linear().state_dict())
            elif isinstance(source, ElasticLayerNorm):
                target.load_state_dict(source.to_layer_norm().state_dict())
        return static


class StaticTransformer(Transformer):
    """A plain Transformer of one architecture (no experts, routers or elastic layers).

    ``shared_embedding``: one table for both sides and the output projection, each side using
    its leading columns, as in the supernet (``from_scratch`` models); otherwise each side has
    its own table (what ``MTSupernet.export`` writes: the same function, as copies)."""

    def __init__(self, vocab_size: int, arch: Arch, qkv_dim: int, dropout: float = 0.1,
                 shared_embedding: bool = False):
        super().__init__()
        self.vocab_size, self.arch, self.qkv_dim = vocab_size, dict(arch), qkv_dim
        self.dropout, self.shared_embedding = dropout, shared_embedding
        e_enc, e_dec = arch["encoder_embed"], arch["decoder_embed"]
        self.num_encoder_layers, self.num_decoder_layers = (arch["encoder_layers"],
                                                            arch["decoder_layers"])
        p = dropout

        def attention(heads, e_query, e_memory):
            return Attention(nn.Linear(e_query, qkv_dim), nn.Linear(e_memory, qkv_dim),
                             nn.Linear(e_memory, qkv_dim), nn.Linear(qkv_dim, e_query), heads, p)

        def ffn(width, embed):
            return FeedForward(nn.Linear(embed, width), nn.Linear(width, embed), p)

        if shared_embedding:
            self.embedding = nn.Embedding(vocab_size, max(e_enc, e_dec), padding_idx=PAD)
        else:
            self.encoder_embedding = nn.Embedding(vocab_size, e_enc, padding_idx=PAD)
            self.decoder_embedding = nn.Embedding(vocab_size, e_dec, padding_idx=PAD)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(attention(arch[f"encoder_heads_{i}"], e_enc, e_enc),
                         ffn(arch[f"encoder_ffn_{i}"], e_enc), nn.LayerNorm(e_enc),
                         nn.LayerNorm(e_enc), p)
            for i in range(self.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(attention(arch[f"decoder_self_heads_{i}"], e_dec, e_dec),
                         attention(arch[f"decoder_cross_heads_{i}"], e_dec, e_enc),
                         ffn(arch[f"decoder_ffn_{i}"], e_dec), nn.LayerNorm(e_dec),
                         nn.LayerNorm(e_dec), nn.LayerNorm(e_dec),
                         min(arch[f"decoder_ende_{i}"], self.num_encoder_layers), p)
            for i in range(self.num_decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(e_enc), nn.LayerNorm(e_dec)

    @classmethod
    def from_scratch(cls, vocab_size: int, arch: Arch, config: SpaceConfig) -> "StaticTransformer":
        """A freshly initialised model of ``arch`` parameterised and initialised as the
        supernet's sub-network: one shared embedding table, N(0, width^-1/2) with a zero padding
        row; nn.Linear's own initialisation (ElasticLinear's rule, at this layer's size); the
        space's qkv_dim and dropout. The standalone baseline of the supernet-quality study."""
        model = cls(vocab_size, arch, config.qkv_dim, config.dropout, shared_embedding=True)
        weight = model.embedding.weight
        with torch.no_grad():
            nn.init.normal_(weight, 0.0, weight.shape[1] ** -0.5)
            weight[PAD].zero_()
        return model

    def embedding_weight(self, side: str) -> Tensor:
        if self.shared_embedding:
            dim = self.arch["encoder_embed" if side == "encoder" else "decoder_embed"]
            return self.embedding.weight[:, :dim]
        return (self.encoder_embedding if side == "encoder" else self.decoder_embedding).weight

    def set_arch(self, arch=None) -> "StaticTransformer":
        """No-op, so that the supernet training loop can train a static model too."""
        return self

    def hparams(self) -> Dict:
        return {"vocab_size": self.vocab_size, "arch": self.arch, "qkv_dim": self.qkv_dim,
                "dropout": self.dropout, "shared_embedding": self.shared_embedding}


def param_count(arch: Arch, vocab_size: int, qkv_dim: int, shared_embedding: bool = True) -> int:
    """Parameters of ``StaticTransformer(vocab_size, arch, qkv_dim, shared_embedding=...)``,
    counted without building it."""
    e_enc, e_dec, q = arch["encoder_embed"], arch["decoder_embed"], qkv_dim

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    def attention(e_query, e_memory):
        return linear(e_query, q) + 2 * linear(e_memory, q) + linear(q, e_query)

    n = vocab_size * (max(e_enc, e_dec) if shared_embedding else e_enc + e_dec)
    n += 2 * e_enc + 2 * e_dec                                     # final LayerNorms
    for i in range(arch["encoder_layers"]):
        ffn = arch[f"encoder_ffn_{i}"]
        n += attention(e_enc, e_enc) + linear(e_enc, ffn) + linear(ffn, e_enc) + 4 * e_enc
    for i in range(arch["decoder_layers"]):
        ffn = arch[f"decoder_ffn_{i}"]
        n += attention(e_dec, e_dec) + attention(e_dec, e_enc)
        n += linear(e_dec, ffn) + linear(ffn, e_dec) + 6 * e_dec
    return n


def build_model(hparams: Dict) -> Transformer:
    """A model from ``hparams()`` of either class (as stored in checkpoints and exports)."""
    if "arch" in hparams:
        return StaticTransformer(hparams["vocab_size"], hparams["arch"], hparams["qkv_dim"],
                                 hparams["dropout"], hparams.get("shared_embedding", False))
    return MTSupernet(hparams["vocab_size"], SpaceConfig.from_dict(hparams["config"]),
                      hparams["kind"], hparams["num_experts"], hparams["router_hidden"])
