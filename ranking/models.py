"""TorchRec multi-task rankers: shared-bottom, MMoE and PLE on one ``EmbeddingBagCollection``.

Typed config dataclasses in TorchRec's style describe a model; :func:`build_model` builds it
from a fitted :class:`~ranking.features.FeatureEncoder` (tables, dense width) and the
objectives. Every architecture maps ``(dense (N, D), KeyedJaggedTensor)`` to logits (N, K),
one tower per objective, K in objective order. Binary towers output logits (BCE with logits);
regression towers output the *transformed* target (e.g. log1p of watch time; MSE).

Three options of :class:`ModelConfig` add to any architecture:

- ``interaction: dot`` (DLRM / FM style): each sparse feature's pooled embedding and the dense
  vector are projected to ``interaction_dim``; the pairwise dot products of these vectors join the
  body's input, so user x item affinities need not be learnt by an MLP from concatenated embeddings.
- ``bias_features`` (PAL / YouTube's "shallow tower"): sparse features (e.g. the logged ``position``)
  that bypass the body and feed a linear tower whose output is added to every objective's logit.
  They explain the logging bias during training; at serving the encoder fills a fixed default (the
  feature's ``fill``, e.g. position 1) so every candidate gets the same shift and the ranking is the
  body's alone.
- ``dense_encoding: piecewise | bucket | quantile`` (Gorishniy et al. 2022): the dense features enter
  the body through bins at their training quantiles (:class:`DenseEncoding`), so the MLP need not learn
  a GBDT's thresholds on heavy-tailed rates and counts itself. The bin edges are buffers of the state
  dict, fitted on the training rows by ``ranking.train.fit``; serving encodes exactly as training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from strategy.errors import Errors

ARCHS = ("shared_bottom", "mmoe", "ple")
INTERACTIONS = ("none", "dot")
DENSE_ENCODINGS = ("none", "quantile", "piecewise", "bucket")


@dataclass(frozen=True)
class ObjectiveConfig:
    """One predicted objective: ``type`` binary|regression, ``transform`` identity|log1p,
    ``loss_weight`` > 0 (not the blend weight), ``label`` the data column (default: the name, then
    the ``event``), ``output_scale`` the factor applied after ``expm1`` for a log1p regression:
    ``expm1`` of a log-space mean estimates a geometric mean, well below the mean; training sets it
    to Duan's smearing estimate ``mean(y) / mean(expm1(pred))`` on the validation rows, so the
    natural-unit predictions are unbiased in mean (see :func:`smearing_factor`)."""

    name: str
    type: str = "binary"
    transform: str = "identity"
    loss_weight: float = 1.0
    label: str | None = None
    event: str | None = None
    output_scale: float = 1.0   # natural-unit multiplier of a log1p regression (Duan's smearing factor)

    def label_candidates(self) -> list[str]:
        """Data columns that may hold this objective's label, in order of preference."""
        return [c for c in dict.fromkeys((self.label, self.name, self.event)) if c]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """The multi-task architecture.

    - ``arch``: ``shared_bottom`` (one bottom MLP ``bottom`` then towers), ``mmoe`` (``num_experts``
      experts of ``expert`` layers, one softmax gate per objective) or ``ple`` (``num_levels`` CGC
      levels, each with ``num_shared_experts`` shared and ``num_task_experts`` per-objective experts).
    - ``tower``: hidden layers of each objective's tower (a final Linear(., 1) is added).
    - ``interaction``: ``none`` or ``dot`` (pairwise dot products of the features' embeddings, each
      projected to ``interaction_dim``, appended to the body's input).
    - ``bias_features``: sparse feature names routed to a shallow linear tower added to the logits
      (position bias); they must be features of the spec.
    - ``dense_encoding``: how the dense features enter the body (see :class:`DenseEncoding`):
      ``none`` (the encoder's standardised values), ``quantile`` (each value's train quantile, in
      [-1, 1]), ``piecewise`` (piecewise-linear encoding over ``dense_bins`` train-quantile bins, then a
      per-feature Linear to ``dense_embedding_dim`` + ReLU) or ``bucket`` (a ``dense_embedding_dim``
      embedding per train-quantile bin). The bin boundaries are fitted on the training rows
      (:func:`fit_dense_encodings`, called by ``ranking.train.fit``) and saved as buffers of the state dict.
    """

    arch: str = "mmoe"
    bottom: tuple[int, ...] = (128, 64)
    expert: tuple[int, ...] = (64, 32)
    num_experts: int = 4
    num_shared_experts: int = 2
    num_task_experts: int = 1
    num_levels: int = 1
    tower: tuple[int, ...] = (32,)
    dropout: float = 0.0
    interaction: str = "none"
    interaction_dim: int = 16
    bias_features: tuple[str, ...] = ()
    dense_encoding: str = "none"
    dense_bins: int = 16
    dense_embedding_dim: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kw)


MODEL_KEYS = tuple(ModelConfig.__dataclass_fields__)


def model_config_from_dict(errs: Errors, data: dict, path: str = "model") -> ModelConfig | None:
    """Validated :class:`ModelConfig` from a YAML mapping; problems go to ``errs``."""
    from strategy.checks import as_dict, as_list, as_number, as_str, check_keys

    obj = as_dict(errs, data, path)
    if obj is None:
        return None
    before = len(errs.items)
    check_keys(errs, obj, path, MODEL_KEYS)
    kw = {}
    if "arch" in obj:
        kw["arch"] = as_str(errs, obj["arch"], f"{path}.arch", choices=ARCHS)
    for key in ("bottom", "expert", "tower"):
        if key in obj:
            items = as_list(errs, obj[key], f"{path}.{key}", max_len=16) or []
            vals = [as_number(errs, v, f"{path}.{key}[{i}]", lo=1, hi=8192, integer=True) for i, v in enumerate(items)]
            if key != "tower" and not vals:
                errs.add(f"{path}.{key}", "at least one layer is required", "required")
            kw[key] = tuple(vals)
    for key in ("num_experts", "num_shared_experts", "num_task_experts", "num_levels"):
        if key in obj:
            kw[key] = as_number(errs, obj[key], f"{path}.{key}", lo=1 if key != "num_shared_experts" else 0,
                                hi=64, integer=True)
    if "dropout" in obj:
        kw["dropout"] = as_number(errs, obj["dropout"], f"{path}.dropout", lo=0, hi=1, hi_open=True)
    if "interaction" in obj:
        kw["interaction"] = as_str(errs, obj["interaction"], f"{path}.interaction", choices=INTERACTIONS)
    if "interaction_dim" in obj:
        kw["interaction_dim"] = as_number(errs, obj["interaction_dim"], f"{path}.interaction_dim", lo=1, hi=1024,
                                          integer=True)
    if "bias_features" in obj:
        items = as_list(errs, obj["bias_features"], f"{path}.bias_features", max_len=16) or []
        kw["bias_features"] = tuple(as_str(errs, v, f"{path}.bias_features[{i}]") for i, v in enumerate(items))
    if "dense_encoding" in obj:
        kw["dense_encoding"] = as_str(errs, obj["dense_encoding"], f"{path}.dense_encoding", choices=DENSE_ENCODINGS)
    if "dense_bins" in obj:
        kw["dense_bins"] = as_number(errs, obj["dense_bins"], f"{path}.dense_bins", lo=2, hi=1024, integer=True)
    if "dense_embedding_dim" in obj:
        kw["dense_embedding_dim"] = as_number(errs, obj["dense_embedding_dim"], f"{path}.dense_embedding_dim",
                                              lo=1, hi=1024, integer=True)
    if len(errs.items) != before:
        return None
    return ModelConfig(**kw)


def mlp(in_dim: int, layers, dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    """Linear+ReLU(+Dropout) stack; ``last_act=False`` leaves the final Linear bare."""
    mods: list[nn.Module] = []
    dims = [in_dim, *layers]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        mods.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            mods.append(nn.ReLU())
            if dropout:
                mods.append(nn.Dropout(dropout))
    return nn.Sequential(*mods)


def linears(module: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of an :func:`mlp` stack (or of a tower: its mlp and last Linear), in order."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class StackedWeights:
    """Parallel MLPs of one shape (MMoE's experts, the towers) as stacked tensors, for inference: layer
    ``l`` as ``(weight (P, in, out), bias (P, 1, out))``, so the P stacks run as one ``baddbmm`` per
    layer instead of P small matmuls. Rebuilt when a parameter changes (training, ``load_state_dict``)."""

    def __init__(self) -> None:
        self._key = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, stacks: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_stack = [linears(m) for m in stacks]
        key = tuple((p.data_ptr(), p._version) for ls in per_stack for lin in ls for p in (lin.weight, lin.bias))
        if key != self._key:
            self.layers = [(torch.stack([ls[i].weight.detach().T for ls in per_stack]),
                            torch.stack([ls[i].bias.detach() for ls in per_stack]).unsqueeze(1))
                           for i in range(len(per_stack[0]))]
            self._key = key
        return self.layers


def run_stacked(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, last_act: bool) -> torch.Tensor:
    """``x`` (P, N, in) through stacked Linear+ReLU layers (ReLU after the last one too when ``last_act``)."""
    for i, (w, b) in enumerate(layers):
        x = torch.baddbmm(b, x, w)
        if last_act or i < len(layers) - 1:
            x = torch.relu_(x)
    return x


def fast_inference(module: nn.Module) -> bool:
    """Whether the stacked inference path applies: eval mode and no autograd (serving)."""
    return not module.training and not torch.is_grad_enabled()


class Towers(nn.Module):
    """One tower per objective: inputs (K, N, H) or (N, H) -> logits (N, K)."""

    def __init__(self, in_dim: int, num_tasks: int, layers, dropout: float):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(in_dim, layers, dropout), nn.Linear(layers[-1] if layers else in_dim, 1))
            for _ in range(num_tasks))
        self._stacked = StackedWeights()

    def forward(self, inputs) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
            inputs = (inputs.unsqueeze(0).expand(len(self.towers), -1, -1) if fast_inference(self)
                      else [inputs] * len(self.towers))
        if fast_inference(self):
            x = inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs))
            return run_stacked(self._stacked.get(list(self.towers)), x, last_act=False).squeeze(2).T.contiguous()
        return torch.cat([t(x) for t, x in zip(self.towers, inputs)], dim=1)


class SharedBottom(nn.Module):
    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.bottom = mlp(in_dim, cfg.bottom, cfg.dropout)
        self.towers = Towers(cfg.bottom[-1], num_tasks, cfg.tower, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.towers(self.bottom(x))


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018)."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.experts = nn.ModuleList(mlp(in_dim, cfg.expert, cfg.dropout) for _ in range(cfg.num_experts))
        self.gates = nn.ModuleList(nn.Linear(in_dim, cfg.num_experts) for _ in range(num_tasks))
        self.towers = Towers(cfg.expert[-1], num_tasks, cfg.tower, cfg.dropout)
        self._experts, self._gates = StackedWeights(), StackedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_inference(self):   # every expert, gate and tower in one batched matmul per layer
            layers = self._experts.get(list(self.experts))
            w0, b0 = layers[0]                                                   # (E, in, H1), (E, 1, H1)
            first = torch.relu_(torch.addmm(b0.reshape(1, -1), x, w0.permute(1, 0, 2).reshape(x.shape[1], -1)))
            experts = run_stacked(layers[1:], first.reshape(len(x), len(layers[0][0]), -1).transpose(0, 1),
                                  last_act=True)                                  # (E, N, H)
            gw, gb = self._gates.get(list(self.gates))[0]                        # (T, in, E), (T, 1, E)
            # gate logits laid out (T, E, N): a softmax over E and the weighted sum of the experts are then
            # contiguous elementwise passes (a last-dim softmax over E = 2..8 and a bmm of N tiny matrices
            # cost 10x more at N = 500)
            logits = torch.addmm(gb.reshape(-1, 1), gw.permute(0, 2, 1).reshape(-1, x.shape[1]), x.T)
            gates = torch.softmax(logits.reshape(len(gw), -1, len(x)), dim=1)    # (T, E, N)
            mixed = (gates.unsqueeze(-1) * experts.unsqueeze(0)).sum(1)          # (T, N, H)
            return self.towers(mixed)
        experts = torch.stack([e(x) for e in self.experts], dim=1)              # (N, E, H)
        mixed = [torch.bmm(torch.softmax(g(x), dim=-1).unsqueeze(1), experts).squeeze(1) for g in self.gates]
        return self.towers(mixed)


class CGC(nn.Module):
    """One customized-gate-control level of PLE (Tang et al., RecSys 2020)."""

    def __init__(self, in_dims: list[int], num_tasks: int, cfg: ModelConfig, last: bool):
        super().__init__()
        s, t = cfg.num_shared_experts, cfg.num_task_experts
        shared_in = in_dims[-1]
        self.shared = nn.ModuleList(mlp(shared_in, cfg.expert, cfg.dropout) for _ in range(s))
        self.task = nn.ModuleList(
            nn.ModuleList(mlp(in_dims[k], cfg.expert, cfg.dropout) for _ in range(t)) for k in range(num_tasks))
        self.task_gates = nn.ModuleList(nn.Linear(in_dims[k], s + t) for k in range(num_tasks))
        self.shared_gate = None if last else nn.Linear(shared_in, s + t * num_tasks)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shared_x = inputs[-1]
        shared = [e(shared_x) for e in self.shared]
        task_out = [[e(inputs[k]) for e in experts] for k, experts in enumerate(self.task)]
        outs = []
        for k, gate in enumerate(self.task_gates):
            ex = torch.stack(task_out[k] + shared, dim=1)
            w = torch.softmax(gate(inputs[k]), dim=-1).unsqueeze(1)
            outs.append(torch.bmm(w, ex).squeeze(1))
        if self.shared_gate is not None:
            ex = torch.stack([e for tk in task_out for e in tk] + shared, dim=1)
            w = torch.softmax(self.shared_gate(shared_x), dim=-1).unsqueeze(1)
            outs.append(torch.bmm(w, ex).squeeze(1))
        return outs


class PLE(nn.Module):
    """Progressive layered extraction: ``num_levels`` CGC levels, then towers."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        levels = []
        dims = [in_dim] * (num_tasks + 1)
        for level in range(cfg.num_levels):
            last = level == cfg.num_levels - 1
            levels.append(CGC(dims, num_tasks, cfg, last))
            dims = [cfg.expert[-1]] * (num_tasks + 1)
        self.levels = nn.ModuleList(levels)
        self.num_tasks = num_tasks
        self.towers = Towers(cfg.expert[-1], num_tasks, cfg.tower, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x] * (self.num_tasks + 1)
        for level in self.levels:
            inputs = level(inputs)
        return self.towers(inputs[: self.num_tasks])


class DenseEncoding(nn.Module):
    """Dense features (N, D) -> an encoding fitted on the training rows' quantiles.

    GBDTs split heavy-tailed counts and rates at data-driven thresholds; an MLP fed standardised
    values must learn those thresholds itself. Following Gorishniy et al. (NeurIPS 2022, "On
    embeddings for numerical features in tabular deep learning"), each feature d gets ``bins``
    bins whose edges ``b_0 < ... < b_T`` are quantiles of the training values (duplicates removed:
    a feature with few distinct values gets fewer, the rest have zero width and encode as 0).

    - ``piecewise``: ``e_t = clamp((x - b_{t-1}) / (b_t - b_{t-1}), 0, 1)`` (the PLE encoding), then a
      per-feature ``Linear(bins, dim)`` + ReLU; output (N, D * dim).
    - ``bucket``: the index of the bin holding x (values outside [b_0, b_T] go to the first/last bin)
      looks up a per-feature ``dim`` embedding; output (N, D * dim).
    - ``quantile``: the mean of the piecewise components, i.e. x's position in the training
      distribution (interpolated between the quantiles), mapped to [-1, 1]; output (N, D).

    The edges are plain tensors: buffers ``edges`` (D, bins + 1) and ``fitted`` (a 0-d bool), so
    the registry's ``weights_only=True`` load restores them and serving encodes exactly as training.
    Forward before :meth:`fit` (or a state-dict load) raises.
    """

    def __init__(self, dense_dim: int, mode: str, bins: int, dim: int):
        super().__init__()
        if mode not in DENSE_ENCODINGS[1:]:
            raise ValueError(f"model.dense_encoding: '{mode}' is not allowed (allowed: {', '.join(DENSE_ENCODINGS)})")
        self.mode, self.bins, self.dim, self.dense_dim = mode, int(bins), int(dim), int(dense_dim)
        self.register_buffer("edges", torch.zeros(dense_dim, self.bins + 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        if mode == "piecewise":
            self.weight = nn.Parameter(torch.empty(dense_dim, self.bins, self.dim))
            self.bias = nn.Parameter(torch.empty(dense_dim, self.dim))
            bound = 1.0 / math.sqrt(self.bins)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
        elif mode == "bucket":
            self.embedding = nn.Embedding(dense_dim * self.bins, self.dim)
            nn.init.normal_(self.embedding.weight, std=0.1)
            self.register_buffer("offsets", torch.arange(dense_dim) * self.bins, persistent=False)
        self.out_dim = dense_dim if mode == "quantile" else dense_dim * self.dim

    @torch.no_grad()
    def fit(self, dense) -> "DenseEncoding":
        """Set the bin edges from training rows ``dense`` (N, D): per feature, the distinct values of
        its ``bins + 1`` quantiles, padded at the top with the largest (zero-width bins)."""
        x = np.asarray(dense.detach().cpu().numpy() if isinstance(dense, torch.Tensor) else dense, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dense_dim:
            raise ValueError(f"DenseEncoding.fit: expected (N, {self.dense_dim}) dense rows, got {tuple(x.shape)}")
        edges = np.zeros((self.dense_dim, self.bins + 1), dtype=np.float64)
        levels = np.linspace(0.0, 1.0, self.bins + 1)
        for d in range(self.dense_dim):
            col = x[:, d][np.isfinite(x[:, d])]
            if not len(col):
                continue
            u = np.unique(np.quantile(col, levels))
            edges[d, :len(u)] = u
            edges[d, len(u):] = u[-1]
        self.edges.copy_(torch.from_numpy(edges).to(self.edges.dtype))
        self.fitted.fill_(True)
        return self

    def piecewise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D, bins) piecewise-linear components (0 for zero-width bins)."""
        lo, hi = self.edges[:, :-1], self.edges[:, 1:]
        width = hi - lo
        ok = width > 0
        e = ((x.unsqueeze(-1) - lo) / torch.where(ok, width, torch.ones_like(width))).clamp(0.0, 1.0)
        return torch.where(ok, e, torch.zeros_like(e))

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D) bin index in [0, bins) (right-closed inner edges; zero-width bins unused)."""
        inner = self.edges[:, 1:-1].contiguous()                                # (D, bins - 1)
        return torch.searchsorted(inner, x.t().contiguous(), right=True).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("DenseEncoding is not fitted: call ranking.models.fit_dense_encodings(model, "
                               "train_dense) before training (ranking.train.fit does), or load a trained state dict")
        if self.mode == "bucket":
            idx = self.bucket(x) + self.offsets
            return self.embedding(idx).flatten(1)
        e = self.piecewise(x)
        if self.mode == "quantile":
            n = (self.edges[:, 1:] > self.edges[:, :-1]).sum(1).clamp_min(1)
            return 2.0 * e.sum(-1) / n - 1.0
        h = torch.einsum("ndb,dbk->ndk", e, self.weight) + self.bias
        return torch.relu(h).flatten(1)


def fit_dense_encodings(model: nn.Module, dense, refit: bool = False) -> int:
    """Fit every not yet fitted :class:`DenseEncoding` of ``model`` (any wrapper, e.g. DMP) on the
    training rows ``dense`` (N, D); ``refit=True`` refits fitted ones too. Returns how many were fitted."""
    n = 0
    for m in model.modules():
        if isinstance(m, DenseEncoding) and (refit or not bool(m.fitted)):
            m.fit(dense)
            n += 1
    return n


class DotInteraction(nn.Module):
    """DLRM-style pairwise interaction: F feature vectors (N, d_f) (+ the dense vector) are projected to
    a common ``dim``; the output is the F' (F' - 1) / 2 pairwise dot products (N, F'(F'-1)/2)."""

    def __init__(self, dims: list[int], dense_dim: int, dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, dim, bias=False) for d in dims)
        self.dense_proj = nn.Linear(dense_dim, dim) if dense_dim else None
        n = len(dims) + (1 if dense_dim else 0)
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = n * (n - 1) // 2

    def forward(self, embs: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        vecs = [p(e) for p, e in zip(self.proj, embs)]
        if self.dense_proj is not None:
            vecs.append(self.dense_proj(dense))
        v = torch.stack(vecs, dim=1)                                            # (N, F', dim)
        z = torch.bmm(v, v.transpose(1, 2))                                     # (N, F', F')
        return z[:, self.rows, self.cols]


class MultiTaskRanker(nn.Module):
    """``EmbeddingBagCollection`` + dense features -> a multi-task body -> logits (N, K).

    Args:
        tables: ``torchrec.EmbeddingBagConfig`` list (from ``FeatureEncoder.embedding_bag_configs()``).
        dense_dim: number of dense features D.
        objectives: the K objectives, in output order.
        config: the architecture (``interaction``, ``bias_features``: see the module docstring).
        device: where to build the tables (``torch.device("meta")`` before DMP sharding).
    """

    def __init__(self, tables, dense_dim: int, objectives, config: ModelConfig, device=None):
        super().__init__()
        from torchrec import EmbeddingBagCollection

        self.objectives = tuple(objectives)
        self.config = config
        self.ebc = EmbeddingBagCollection(tables=list(tables), device=device)
        # the body's input order: features in table order (a sharded EBC may return its keys in
        # another order, so forward() reorders by name)
        self.feature_order = [f for t in tables for f in t.feature_names]
        dims = {f: t.embedding_dim for t in tables for f in t.feature_names}
        unknown = [f for f in config.bias_features if f not in dims]
        if unknown:
            raise ValueError(f"bias_features {unknown} are not sparse features of the spec "
                             f"(features: {', '.join(self.feature_order)})")
        self.bias_names = [f for f in self.feature_order if f in config.bias_features]
        self.body_names = [f for f in self.feature_order if f not in config.bias_features]
        offsets = np.concatenate([[0], np.cumsum([dims[f] for f in self.feature_order])]).tolist()
        self._slices = {f: (offsets[j], offsets[j + 1]) for j, f in enumerate(self.feature_order)}
        emb_dim = sum(dims[f] for f in self.body_names)
        self.dense_encoding = None
        if config.dense_encoding != "none" and dense_dim:
            self.dense_encoding = DenseEncoding(dense_dim, config.dense_encoding, config.dense_bins,
                                                config.dense_embedding_dim)
        in_dim = emb_dim + (self.dense_encoding.out_dim if self.dense_encoding is not None else dense_dim)
        self.interaction = None
        if config.interaction == "dot":
            self.interaction = DotInteraction([dims[f] for f in self.body_names], dense_dim, config.interaction_dim)
            in_dim += self.interaction.out_dim
        self.bias_tower = (nn.Linear(sum(dims[f] for f in self.bias_names), len(self.objectives))
                           if self.bias_names else None)
        body = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}[config.arch]
        self.body = body(in_dim, len(self.objectives), config)

    def _pooled(self, sparse) -> dict[str, torch.Tensor]:
        if not self.feature_order:   # dense features only
            return {}
        kt = self.ebc(sparse)
        if list(kt.keys()) != self.feature_order:
            return kt.to_dict()
        values = kt.values()
        return {f: values[:, a:b] for f, (a, b) in self._slices.items()}

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        emb = self._pooled(sparse)
        body_embs = [emb[f] for f in self.body_names]
        body_dense = self.dense_encoding(dense) if self.dense_encoding is not None else dense
        parts = body_embs + ([body_dense] if dense.shape[1] else [])
        if self.interaction is not None:
            parts.append(self.interaction(body_embs, dense))
        logits = self.body(torch.cat(parts, dim=1))
        if self.bias_tower is not None:
            logits = logits + self.bias_tower(torch.cat([emb[f] for f in self.bias_names], dim=1))
        return logits


def build_model(encoder, objectives, config: ModelConfig, device=None) -> MultiTaskRanker:
    """A :class:`MultiTaskRanker` whose tables match the fitted ``encoder``."""
    return MultiTaskRanker(encoder.embedding_bag_configs(), encoder.dense_dim, objectives, config, device)


def transform_labels(labels: np.ndarray, objectives) -> np.ndarray:
    """Raw labels (N, K) -> training targets (log1p for log1p regressions)."""
    out = np.asarray(labels, dtype=np.float32).copy()
    for k, o in enumerate(objectives):
        if o.transform == "log1p":
            out[:, k] = np.log1p(np.clip(out[:, k], 0, None))
    return out


def to_natural(outputs: torch.Tensor, objectives) -> torch.Tensor:
    """Model outputs (N, K) -> natural units: probabilities for binary, inverse-transformed values
    (``expm1`` for log1p, clipped at 0) for regression."""
    cols = []
    for k, o in enumerate(objectives):
        y = outputs[:, k]
        if o.type == "binary":
            y = torch.sigmoid(y)
        elif o.transform == "log1p":
            y = torch.expm1(y).clamp_min(0.0)
            scale = float(getattr(o, "output_scale", 1.0) or 1.0)
            if scale != 1.0:
                y = y * scale
        cols.append(y)
    return torch.stack(cols, dim=1)


def smearing_factor(outputs, labels) -> float:
    """Duan's smearing estimate for a log1p regression: ``mean(y) / mean(expm1(pred))`` over rows
    (``outputs``: model outputs in log1p space, ``labels``: natural-unit targets). Multiplying
    ``expm1(pred)`` by it makes the predictions' mean equal the labels' mean (1.0 when undefined)."""
    z = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    ok = np.isfinite(z) & np.isfinite(y)
    pred = np.clip(np.expm1(z[ok]), 0.0, None)
    if not ok.any() or pred.mean() <= 0 or y[ok].mean() <= 0:
        return 1.0
    return float(y[ok].mean() / pred.mean())


def with_smearing(objectives, outputs, labels) -> tuple:
    """``objectives`` with ``output_scale`` set by :func:`smearing_factor` for each log1p regression
    (``outputs``/``labels``: (N, K) raw model outputs and natural-unit labels, e.g. of the validation set)."""
    import dataclasses

    out = []
    for k, o in enumerate(objectives):
        if o.type == "regression" and o.transform == "log1p":
            o = dataclasses.replace(o, output_scale=round(smearing_factor(outputs[:, k], labels[:, k]), 6))
        out.append(o)
    return tuple(out)


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-objective losses: BCE-with-logits (binary), MSE (regression)."""

    def __init__(self, objectives):
        super().__init__()
        self.objectives = tuple(objectives)
        self.register_buffer("weights", torch.tensor([o.loss_weight for o in objectives], dtype=torch.float32))
        self.register_buffer("binary", torch.tensor([o.type == "binary" for o in objectives]))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (total loss, per-objective losses (K,)); ``weights`` (B,) weigh the rows (a
        weighted mean over the batch, e.g. inverse-propensity weights)."""
        bce = nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        mse = (outputs - targets) ** 2
        if weights is None:
            bce, mse = bce.mean(0), mse.mean(0)
        else:
            w = (weights / weights.sum())[:, None]
            bce, mse = (bce * w).sum(0), (mse * w).sum(0)
        per = torch.where(self.binary, bce, mse)
        return (per * self.weights).sum(), per.detach()


class PlainMultiTaskRanker(nn.Module):
    """The same shape in plain PyTorch (``nn.EmbeddingBag`` per table), for the benchmark."""

    def __init__(self, tables, dense_dim: int, objectives, config: ModelConfig):
        super().__init__()
        if config.dense_encoding != "none":
            raise ValueError("PlainMultiTaskRanker takes the standardised dense features only "
                             f"(model.dense_encoding: none, got '{config.dense_encoding}')")
        self.tables = list(tables)
        self.bags = nn.ModuleDict({t.name: nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode="mean",
                                                                include_last_offset=True)
                                   for t in self.tables})
        self.feature_table = [(f, t.name) for t in self.tables for f in t.feature_names]
        emb_dim = sum(t.embedding_dim * len(t.feature_names) for t in tables)
        body = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}[config.arch]
        self.body = body(emb_dim + dense_dim, len(objectives), config)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        jts = sparse.to_dict()
        embs = [self.bags[t](jts[f].values(), jts[f].offsets()) for f, t in self.feature_table]
        return self.body(torch.cat(embs + [dense], dim=1))
