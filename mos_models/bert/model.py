"""BERT for masked-language modelling: the supernet and the static model it exports.

One forward implementation (``BertLayer``, ``BertMLM``) serves both. The supernet fills it with
elastic modules (``mos_models.common``): ``ElasticLinear`` of kind "standard" (weight sharing:
the first rows/columns of one weight) for the bottleneck, attention and head projections, and of
the chosen supernet kind ("neuron", "layer" or "standard") for the two FFN linears, as in the
paper (section 3.4); ``ElasticEmbedding``/``ElasticLayerNorm`` slice their leading features.
``BertSupernet.export(arch)`` fills the same classes with plain nn.Linear/nn.Embedding/
nn.LayerNorm copies of the active sub-network, MoS experts collapsed and routers dropped.

A layer: with a bottleneck (SuperShaper's space) the layer reads the backbone stream x (width
E), projects it down to its hidden size H, runs attention and FFN at width H and adds its
up-projection back to the stream. Without one (homogeneous space) the stream itself has width
H. Post-LN as BERT (the default): h <- LN(h + f(h)) for attention and FFN, and
x <- LN(x + up(h)). Pre-LN (``pre_norm=True``): h <- h + f(LN(h)), x <- x + up(block(down(LN(x)))),
and one LN after the last layer. No token-type embeddings and no pooler: the model is
pretrained by MLM only (no next-sentence task).
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.elastic import ElasticEmbedding, ElasticLayerNorm, ElasticLinear
from .data import PAD
from .space import Layout, space_from_dict

IGNORE = -100


class BertLayer(nn.Module):
    def __init__(self, down: Optional[nn.Module], q: nn.Module, k: nn.Module, v: nn.Module,
                 o: nn.Module, ln_attn: nn.Module, ffn1: nn.Module, ffn2: nn.Module,
                 ln_ffn: nn.Module, up: Optional[nn.Module], ln_out: Optional[nn.Module],
                 heads: int, dropout: float, pre_norm: bool = False):
        super().__init__()
        self.down, self.q, self.k, self.v, self.o = down, q, k, v, o
        self.ln_attn, self.ffn1, self.ffn2, self.ln_ffn = ln_attn, ffn1, ffn2, ln_ffn
        self.up, self.ln_out = up, ln_out
        self.heads, self.dropout, self.pre_norm = heads, dropout, pre_norm

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def _attention(self, h: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        b, t, width = h.shape

        def split(y):
            return y.view(b, t, self.heads, width // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                           attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self._drop(self.o(a.transpose(1, 2).reshape(b, t, width)))

    def _ffn(self, h: Tensor) -> Tensor:
        return self._drop(self.ffn2(F.gelu(self.ffn1(h))))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        if self.pre_norm:   # x + up(block(down(LN(x)))), each sub-block h + f(LN(h))
            h = x if self.down is None else self.down(self.ln_out(x))
            h = h + self._attention(self.ln_attn(h), attn_mask)
            h = h + self._ffn(self.ln_ffn(h))
            return h if self.up is None else x + self._drop(self.up(h))
        h = x if self.down is None else self.down(x)     # BERT's post-LN
        h = self.ln_attn(h + self._attention(h, attn_mask))
        h = self.ln_ffn(h + self._ffn(h))
        return h if self.up is None else self.ln_out(x + self._drop(self.up(h)))


class BertMLM(nn.Module):
    """Embeddings, ``depth`` layers, and the MLM head (dense, GELU, LN, decoder tied to the
    token embedding). Calls: ``forward(ids)`` -> logits (B, T, V); ``forward(ids, labels)`` ->
    mean cross-entropy over the positions whose label is not -100 (the head only runs there);
    ``encode(ids)`` -> the last layer's states, for fine-tuning heads."""

    def __init__(self, tok: nn.Module, pos: nn.Module, ln_emb: nn.Module,
                 layers: Sequence[BertLayer], head_dense: nn.Module, head_ln: nn.Module,
                 out_bias: Tensor, dropout: float, ln_final: Optional[nn.Module] = None):
        super().__init__()
        self.tok, self.pos, self.ln_emb = tok, pos, ln_emb
        self.layers = nn.ModuleList(layers)
        self.ln_final = ln_final   # pre-LN models: LN of the last layer's output
        self.depth = len(self.layers)
        self.head_dense, self.head_ln = head_dense, head_ln
        self.out_bias = nn.Parameter(out_bias)
        self.dropout = dropout

    @property
    def max_len(self) -> int:
        return self.pos.num_embeddings

    def encode(self, ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"BertMLM: ids must be an int64 (batch, seq) tensor, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"BertMLM: sequence length {ids.shape[1]} exceeds max_len "
                             f"{self.max_len}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln_emb(self.tok(ids) + self.pos(positions))
        x = F.dropout(x, self.dropout, self.training)
        mask = None
        if attention_mask is not None:   # (B, T), True/1 = a real token
            mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers[:self.depth]:
            x = layer(x, mask)
        return x if self.ln_final is None else self.ln_final(x)

    def _decoder_weight(self) -> Tensor:
        width = getattr(self.tok, "active_dim", self.tok.embedding_dim)
        return self.tok.weight[:, :width]

    def head(self, h: Tensor) -> Tensor:
        h = self.head_ln(F.gelu(self.head_dense(h)))
        return F.linear(h, self._decoder_weight(), self.out_bias)

    def forward(self, ids: Tensor, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
        h = self.encode(ids, attention_mask)
        if labels is None:
            return self.head(h)
        chosen = labels != IGNORE
        return F.cross_entropy(self.head(h[chosen]), labels[chosen], reduction=reduction)

    @property
    def pre_norm(self) -> bool:
        return self.ln_final is not None

    def compile_units(self) -> List[nn.Module]:
        """The blocks --compile compiles one by one (mos_models.common.compile): the layers,
        whose graphs depend on one layer's sizes (hidden, heads, FFN), not the architecture."""
        return list(self.layers)

    @staticmethod
    def static(vocab_size: int, max_len: int, layout: Layout, bottleneck: bool,
               dropout: float = 0.1, pre_norm: bool = False) -> "BertMLM":
        """A plain (static) BERT of the given layout, freshly initialised."""
        e = layout.embed_dim
        layers = []
        for hidden, heads, ffn in layout.layers:
            layers.append(BertLayer(
                nn.Linear(e, hidden) if bottleneck else None,
                *(nn.Linear(hidden, hidden) for _ in range(4)), nn.LayerNorm(hidden),
                nn.Linear(hidden, ffn), nn.Linear(ffn, hidden), nn.LayerNorm(hidden),
                nn.Linear(hidden, e) if bottleneck else None,
                nn.LayerNorm(e) if bottleneck else None, heads, dropout, pre_norm))
        model = BertMLM(nn.Embedding(vocab_size, e, padding_idx=PAD), nn.Embedding(max_len, e),
                        nn.LayerNorm(e), layers, nn.Linear(e, e), nn.LayerNorm(e),
                        torch.zeros(vocab_size), dropout,
                        nn.LayerNorm(e) if pre_norm else None)
        model.apply(_bert_init)
        return model


def _bert_init(module: nn.Module) -> None:
    """Embeddings N(0, 0.02) as BERT (the padding row zero). Linear layers keep nn.Linear's
    initialisation (each MoS expert alike): its std 1/sqrt(3 fan_in) is BERT's 0.02 at width
    768 and keeps the same gain at the narrow widths of the CPU presets, where a fixed 0.02
    shrinks the signal through every projection and stalls training at the unigram plateau."""
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def param_count(layout: Layout, vocab_size: int, max_len: int, bottleneck: bool,
                pre_norm: bool = False) -> int:
    """Parameters of the static model of ``layout`` (what ``export`` produces), embeddings and
    MLM head included, the tied decoder counted once."""
    e = layout.embed_dim
    n = vocab_size * e + max_len * e + 2 * e          # embeddings + LN
    n += e * e + e + 2 * e + vocab_size               # head dense, LN, output bias
    n += 2 * e if pre_norm else 0                     # final LN
    for h, _, f in layout.layers:
        n += 4 * (h * h + h) + 2 * h                  # attention + LN
        n += h * f + f + f * h + h + 2 * h            # FFN + LN
        if bottleneck:
            n += e * h + h + h * e + e + 2 * e        # down, up, LN
    return n


class BertSupernet(BertMLM):
    """The BERT supernet of a search space (``space.SuperShaperSpace``/``HomogeneousSpace``).

    ``supernet``: "neuron" / "layer" (FFN linears are MoSLinear, neuron- or layer-wise) or
    "standard" (plain weight sharing). ``set_arch(arch)`` selects a sub-network and feeds its
    encoding to every FFN router; ``export(arch)`` returns the static BertMLM of that arch.
    """

    def __init__(self, space, vocab_size: int, max_len: int, supernet: str = "neuron",
                 num_experts: int = 2, router_hidden: int = 128, dropout: float = 0.1,
                 backend: str = "auto", pre_norm: bool = False):
        d = space.max_dims()
        e, hidden, ffn = d["embed_dim"], d["hidden"], d["ffn"]
        arch_dim = space.arch_dim

        def std(n_in, n_out):
            return ElasticLinear(n_in, n_out, kind="standard", arch_dim=arch_dim)

        def ffn_linear(n_in, n_out):
            return ElasticLinear(n_in, n_out, kind=supernet, arch_dim=arch_dim,
                                 num_experts=num_experts, router_hidden=router_hidden,
                                 backend=backend)

        bottleneck = space.bottleneck
        layers = [BertLayer(std(e, hidden) if bottleneck else None,
                            *(std(hidden, hidden) for _ in range(4)), ElasticLayerNorm(hidden),
                            ffn_linear(hidden, ffn), ffn_linear(ffn, hidden),
                            ElasticLayerNorm(hidden),
                            std(hidden, e) if bottleneck else None,
                            ElasticLayerNorm(e) if bottleneck else None, d["heads"], dropout,
                            pre_norm)
                  for _ in range(d["num_layers"])]
        super().__init__(ElasticEmbedding(vocab_size, e, padding_idx=PAD),
                         ElasticEmbedding(max_len, e), ElasticLayerNorm(e), layers,
                         std(e, e), ElasticLayerNorm(e), torch.zeros(vocab_size), dropout,
                         ElasticLayerNorm(e) if pre_norm else None)
        self.space, self.supernet, self.vocab_size = space, supernet, vocab_size
        self.num_experts, self.router_hidden = num_experts, router_hidden
        self.apply(_bert_init)
        self.arch = None
        self.set_arch(space.largest())

    def set_arch(self, arch) -> "BertSupernet":
        layout = self.space.layout(arch)
        encoding = torch.tensor(self.space.encode(arch), dtype=self.out_bias.dtype,
                                device=self.out_bias.device)
        e = layout.embed_dim
        for m in (self.tok, self.pos, self.ln_emb, self.head_ln, self.ln_final):
            if m is not None:
                m.set_arch(e)
        self.head_dense.set_arch(None, e, e)
        self.depth = len(layout.layers)
        for layer, (hidden, heads, ffn) in zip(self.layers, layout.layers):
            layer.heads = heads
            if layer.down is not None:
                layer.down.set_arch(None, e, hidden)
                layer.up.set_arch(None, hidden, e)
                layer.ln_out.set_arch(e)
            for proj in (layer.q, layer.k, layer.v, layer.o):
                proj.set_arch(None, hidden, hidden)
            layer.ln_attn.set_arch(hidden)
            layer.ln_ffn.set_arch(hidden)
            layer.ffn1.set_arch(encoding, hidden, ffn)
            layer.ffn2.set_arch(encoding, ffn, hidden)
        self.arch = self.space.validate(arch)
        return self

    def hparams(self) -> Dict:
        """What ``build_supernet`` needs to rebuild this supernet (runs keep it)."""
        return {"space": self.space.to_dict(), "vocab_size": self.vocab_size,
                "max_len": self.max_len, "supernet": self.supernet,
                "num_experts": self.num_experts, "router_hidden": self.router_hidden,
                "dropout": self.dropout, "pre_norm": self.pre_norm}

    def layout(self, arch=None) -> Layout:
        return self.space.layout(self.arch if arch is None else arch)

    def param_count(self, arch=None) -> int:
        """Parameters of the static sub-network of ``arch`` (default: the active one)."""
        return param_count(self.layout(arch), self.vocab_size, self.max_len,
                           self.space.bottleneck, self.pre_norm)

    @torch.no_grad()
    def export(self, arch=None) -> BertMLM:
        """The static BertMLM of ``arch`` (default: the active one): plain modules holding copies
        of the active weights, MoS experts collapsed, no routers. Leaves the supernet set to
        ``arch``. The copy starts in eval mode."""
        if arch is not None:
            self.set_arch(arch)
        layers: List[BertLayer] = []
        for layer in self.layers[:self.depth]:
            def lin(m):
                return None if m is None else m.to_linear()

            def norm(m):
                return None if m is None else m.to_layer_norm()

            layers.append(BertLayer(lin(layer.down), lin(layer.q), lin(layer.k), lin(layer.v),
                                    lin(layer.o), norm(layer.ln_attn), lin(layer.ffn1),
                                    lin(layer.ffn2), norm(layer.ln_ffn), lin(layer.up),
                                    norm(layer.ln_out), layer.heads, self.dropout,
                                    layer.pre_norm))
        model = BertMLM(self.tok.to_embedding(), self.pos.to_embedding(),
                        self.ln_emb.to_layer_norm(), layers, self.head_dense.to_linear(),
                        self.head_ln.to_layer_norm(), self.out_bias.detach().clone(),
                        self.dropout, norm(self.ln_final))
        return model.eval()


def build_supernet(hparams: Dict) -> BertSupernet:
    """The supernet of ``BertSupernet.hparams()``."""
    h = dict(hparams)
    return BertSupernet(space_from_dict(h.pop("space")), h.pop("vocab_size"), h.pop("max_len"),
                        **h)


def static_hparams(model: BertMLM, layout: Layout, bottleneck: bool) -> Dict:
    """What ``build_static`` needs to rebuild a static BertMLM (exports keep it)."""
    return {"vocab_size": model.tok.num_embeddings, "max_len": model.max_len,
            "embed_dim": layout.embed_dim, "layers": [list(l) for l in layout.layers],
            "bottleneck": bool(bottleneck), "pre_norm": model.pre_norm, "dropout": model.dropout}


def build_static(hparams: Dict) -> BertMLM:
    h = hparams
    layout = Layout(h["embed_dim"], tuple(tuple(l) for l in h["layers"]))
    return BertMLM.static(h["vocab_size"], h["max_len"], layout, h["bottleneck"], h["dropout"],
                          h.get("pre_norm", False))


def build_model(hparams: Dict) -> BertMLM:
    """The supernet (``BertSupernet.hparams()``) or the static model (``static_hparams``, which
    lists the layers) of stored hyper-parameters."""
    return build_static(hparams) if "layers" in hparams else build_supernet(hparams)


def perplexity(loss_sum: float, count: int) -> float:
    return math.exp(loss_sum / max(count, 1))
