"""The MT side of the supernet-quality study (mos_models.common.study): HAT's space at a
preset, supernets and standalone models trained by ``MTTask``, scored by validation loss (every
validation sentence) and test BLEU (beam search, sacrebleu; the first ``test_sentences``)."""
from pathlib import Path
from typing import Callable, Dict, Optional

from ..common.study import Metric, StudyFamily
from .config import PRESETS, MTSpace, describe
from .data import detect_lang, load_split, make_batches
from .model import StaticTransformer, param_count
from .train import MTConfig, MTTask, evaluate_loss, tokenizer_for
from .translate import evaluate_bleu

SCORE_TOKENS = 2048   # tokens per scoring batch: the scores do not depend on it


class MTStudy(StudyFamily):
    name = "mt"
    metrics = (Metric("bleu", "test BLEU", True), Metric("valid_loss", "valid loss", False))
    task_class = MTTask

    def __init__(self, data, preset: str = "tiny", max_tokens: Optional[int] = None,
                 num_experts: int = 2, router_hidden: int = 128,
                 test_sentences: Optional[int] = None, beam: int = 4, lenpen: float = 0.6):
        if preset not in PRESETS:
            raise ValueError(f"mt study: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        self.data, self.preset = str(Path(data).resolve()), preset
        self.max_tokens = max_tokens or PRESETS[preset].max_tokens
        self.num_experts, self.router_hidden = num_experts, router_hidden
        self.test_sentences, self.beam, self.lenpen = test_sentences, beam, lenpen
        self.tokenizer = tokenizer_for(self.data, preset)

    def space(self) -> MTSpace:
        return MTSpace(PRESETS[self.preset].space)

    def params(self, arch) -> int:
        return param_count(arch, len(self.tokenizer), PRESETS[self.preset].space.qkv_dim)

    def describe(self, arch) -> str:
        return describe(arch)

    def _config(self, **kw) -> MTConfig:
        return MTConfig(data=self.data, preset=self.preset, max_tokens=self.max_tokens,
                        num_experts=self.num_experts, router_hidden=self.router_hidden, **kw)

    def supernet_config(self, kind: str) -> MTConfig:
        return self._config(supernet=kind)

    def standalone_config(self, arch) -> MTConfig:
        return self._config(arch=arch)

    def scorer(self, device) -> Callable[[StaticTransformer], Dict[str, float]]:
        lang = detect_lang(self.data)
        valid_src, valid_tgt, _ = load_split(self.data, "valid", self.tokenizer, lang)
        batches = make_batches(valid_src, valid_tgt, SCORE_TOKENS)
        test_src, _, refs = load_split(self.data, "test", self.tokenizer, lang)

        def score(model) -> Dict[str, float]:
            bleu = evaluate_bleu(model, self.tokenizer, test_src, refs, self.beam, self.lenpen,
                                 device, self.test_sentences)
            return {"bleu": bleu["bleu"],
                    "valid_loss": evaluate_loss(model, batches, valid_src, valid_tgt, device)}
        return score

    def settings(self) -> Dict:
        return {"data": self.data, "preset": self.preset, "max_tokens": self.max_tokens,
                "num_experts": self.num_experts, "router_hidden": self.router_hidden,
                "vocab_size": len(self.tokenizer), "test_sentences": self.test_sentences,
                "beam": self.beam, "lenpen": self.lenpen}
