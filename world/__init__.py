"""The simulated feed world: the ground truth that demos, tests, benchmarks, the tuner and closed-loop
experiments run against (users with latent interests, human and LLM-generated items, correlated
feedback with position bias; optionally a living world where items are born and expire and interests
drift). Depends on ``strategy`` only (for config validation); pure numpy, no torch.

    from world import World, WorldConfig
    world = World.from_yaml("conf/sim/default.yaml")
    impressions, events = world.simulate_logs()
"""
from .config import (BaseRates, Effects, GeneratorConfig, HumanConfig, LivingConfig, PositionBias, UsersConfig,
                     WatchConfig, WorldConfig)
from .core import World, auc, oracle_aucs, simulate, summarize

__all__ = ["World", "WorldConfig", "GeneratorConfig", "HumanConfig", "UsersConfig", "BaseRates", "Effects",
           "PositionBias", "WatchConfig", "LivingConfig", "auc", "oracle_aucs", "simulate", "summarize"]
