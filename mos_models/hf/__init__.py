"""MoS supernets from pretrained Hugging Face transformers models (needs ``transformers`` and
``safetensors``).

    from mos_models import hf
    sn = hf.to_supernet(model, num_experts=2, granularity="neuron", calibration=batches)
    sn.set_arch(ffn=768, layers=4)      # or sn.set_arch({"ffn": 768, "layers": 4}); None = full
    out = sn(**batch)                   # the same output type as model(**batch)
    sn.export("out/small")              # a stock model directory for AutoModel*.from_pretrained

Modules: families (which models, recognised by structure), importance (calibration: neuron and
layer importance, neuron permutation), supernet (to_supernet, HFSupernet, HFSpace), export
(to_static, export, load_pretrained), distill (in-place distillation losses), metrics
(teacher_cosine, perplexity, cost_report), corpus (the embedded text and text_batches), train
(HFTask: training on the shared core, ``python -m mos_models.hf train``), runs (evaluate, search
and export of a run), tiny (small model directories for tests and demos).
"""
from .corpus import default_corpus, load_texts, text_batches
from .distill import (DISTILL_KINDS, distill_loss, hidden_cosine, hidden_mse, kl_logits,
                      last_hidden)
from .export import Pretrained, export, load_pretrained, to_static
from .families import FAMILIES, SUPPORTED, detect
from .metrics import cost_report, mean_pool, perplexity, teacher_cosine
from .supernet import (ElasticLayerList, HFSpace, HFSupernet, default_choices, from_hparams,
                       to_supernet)

__all__ = [
    "DISTILL_KINDS", "ElasticLayerList", "FAMILIES", "HFSpace", "HFSupernet", "Pretrained",
    "SUPPORTED", "cost_report", "default_choices", "default_corpus", "detect", "distill_loss",
    "export", "from_hparams", "hidden_cosine", "hidden_mse", "kl_logits", "last_hidden", "load_pretrained",
    "load_texts", "mean_pool", "perplexity", "teacher_cosine", "text_batches", "to_static",
    "to_supernet",
]
