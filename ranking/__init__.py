"""Offline ranking: datasets, features, TorchRec multi-task models, LightGBM, registry."""

import logging

# torchrec's import makes torch.fx warn about a renamed helper on every process start; not ours to fix
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
