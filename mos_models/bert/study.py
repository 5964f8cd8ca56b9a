"""The BERT side of the supernet-quality study (mos_models.common.study): a space at a preset,
supernets and standalone models trained by ``BertTask`` (MLM), scored on the validation blocks
with their fixed masks: MLM loss (mean cross-entropy over the masked positions) and perplexity
(its exp). The corpus has no test split, so both come from the validation split."""
import math
from pathlib import Path
from typing import Callable, Dict, Optional

from ..common.study import Metric, StudyFamily
from .model import BertMLM, param_count
from .train import BertConfig, BertTask, masked_valid, mlm_perplexity


class BertStudy(StudyFamily):
    name = "bert"
    metrics = (Metric("perplexity", "valid perplexity", False),
               Metric("valid_loss", "valid MLM loss", False))
    task_class = BertTask

    def __init__(self, data, preset: str = "tiny", space: str = "supershaper",
                 num_experts: int = 2, router_hidden: int = 128, pre_norm: bool = False,
                 seq_len: Optional[int] = None, batch_size: Optional[int] = None,
                 dropout: Optional[float] = None, valid_blocks: Optional[int] = None,
                 space_def: Optional[Dict] = None):
        """``space_def``: a space's to_dict() instead of the preset's (tests use micro spaces)."""
        base = BertConfig(data=str(Path(data).resolve()), preset=preset, space=space,
                          num_experts=num_experts, router_hidden=router_hidden,
                          pre_norm=pre_norm, seq_len=seq_len, batch_size=batch_size,
                          dropout=dropout, space_def=space_def)
        task = BertTask(base)   # fills the preset's and the data's values
        self.base, self._space, self.valid_blocks = task.config, task.space, valid_blocks

    def space(self):
        return self._space

    def params(self, arch) -> int:
        c = self.base
        return param_count(self._space.layout(arch), c.vocab_size, c.seq_len,
                           self._space.bottleneck, c.pre_norm)

    def describe(self, arch) -> str:
        layers = self._space.layout(arch).layers
        if len(set(layers)) == 1:
            hidden, heads, ffn = layers[0]
            return f"{len(layers)} x (hidden {hidden}, {heads} heads, FFN {ffn})"
        return "hidden " + "/".join(str(hidden) for hidden, _, _ in layers)

    def supernet_config(self, kind: str) -> BertConfig:
        return BertConfig(**{**vars(self.base), "supernet": kind})

    def standalone_config(self, arch) -> BertConfig:
        return BertConfig(**{**vars(self.base), "arch": arch})

    def scorer(self, device) -> Callable[[BertMLM], Dict[str, float]]:
        c = self.base
        inputs, labels = masked_valid(c.data, c.seq_len, c.vocab_size, self.valid_blocks)

        def score(model) -> Dict[str, float]:
            ppl = mlm_perplexity(model, inputs, labels, device=device)
            return {"perplexity": ppl, "valid_loss": math.log(ppl)}
        return score

    def settings(self) -> Dict:
        c = self.base
        return {"data": c.data, "preset": c.preset, "space": c.space_def,
                "num_experts": c.num_experts, "router_hidden": c.router_hidden,
                "pre_norm": c.pre_norm, "seq_len": c.seq_len, "batch_size": c.batch_size,
                "dropout": c.dropout, "weight_decay": c.weight_decay,
                "vocab_size": c.vocab_size, "valid_blocks": self.valid_blocks}
