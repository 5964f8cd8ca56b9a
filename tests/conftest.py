import os

import torch

# Without a GPU the Triton backend is tested through its interpreter on CPU tensors; the variable
# must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
