"""Offline ranking: datasets, features, TorchRec multi-task models, LightGBM, registry."""
