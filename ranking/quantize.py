"""Serving variants of a TorchRec ranker with row-wise quantized embedding tables.

TorchRec's inference quantization (``torchrec.inference.modules.quantize_embeddings``) swaps the
model's ``EmbeddingBagCollection`` for a ``QuantEmbeddingBagCollection`` whose tables run on fbgemm's
CPU n-bit kernels. Each table row is stored in fbgemm's fused row-wise format::

    [fp16 scale, fp16 bias][dim int8 codes]          int8: dim + 4 bytes per row (fp32: 4 * dim)
    [fp16 scale, fp16 bias][dim / 2 bytes of int4]   int4: dim / 2 + 4 bytes per row

and a pooled lookup dequantizes ``code * scale + bias`` on the fly. Everything else (MLPs, gates,
towers, dense encodings) stays fp32. The per-row 4 bytes bound the ratio to fp32 from below:
``(dim + 4) / (4 dim) = 1/4 + 1/dim`` for int8 and ``1/8 + 1/dim`` for int4 (dim 16: 31.25% and
18.75%), so small embedding dimensions cannot reach the ratios reported for wide production tables.

Rows are aligned to 1 byte (fbgemm's CPU default) instead of TorchRec's default 16, which would pad
a dim-16 int8 row from 20 to 32 bytes; the saved state holds the unpadded rows, so it does not
depend on the alignment a loader chooses.

The saved variant (``weights.int8.pt``, ``weights.int4.pt``; see ``ranking.artifacts``) is a plain
state dict of tensors, loadable with ``torch.load(..., weights_only=True)``: the table rows as
``uint8`` (N, row bytes), the rest as in ``weights.pt``. Importing this module is light (no torch):
the train and service configs validate ``quantize`` through it.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass

from strategy.checks import as_dict, as_str, check_keys
from strategy.errors import Errors

QUANTIZE = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
SCALE_BIAS_BYTES = 4          # fbgemm's fp16 scale + fp16 bias at the head of each row
ROW_ALIGNMENT = 1             # fbgemm's CPU default (TorchRec's 16 is a GPU's)
TABLE_PREFIX = "ebc.embedding_bags."


class VariantError(ValueError):
    """A quantized serving variant that is missing, corrupt or does not fit its model."""


@dataclass(frozen=True)
class ServingConfig:
    """The train config's ``serving`` section: ``quantize`` int8 | int4 | none, the serving variant
    registered beside the fp32 weights (``none``: the fp32 weights serve)."""

    quantize: str = "none"


def serving_config_from_dict(errs: Errors, data, path: str = "serving") -> ServingConfig | None:
    """Validated :class:`ServingConfig` from a YAML mapping; problems go to ``errs``."""
    obj = as_dict(errs, data, path)
    if obj is None:
        return None
    check_keys(errs, obj, path, ("quantize",))
    quantize = as_str(errs, obj.get("quantize", "none"), f"{path}.quantize", choices=QUANTIZE)
    return ServingConfig(quantize) if quantize is not None else None


def variant_file(to: str) -> str:
    """The version folder's file of the ``to`` variant, e.g. ``weights.int8.pt``."""
    return f"weights.{to}.pt"


def _check_to(to: str) -> None:
    if to not in BITS:
        raise ValueError(f"quantize: '{to}' is not allowed (allowed: {', '.join(BITS)})")


def row_bytes(dim: int, to: str) -> int:
    """Bytes of one quantized row of width ``dim`` (scale and bias included, no padding)."""
    return dim * BITS[to] // 8 + SCALE_BIAS_BYTES


def _tables(module) -> list:
    return list(module.ebc.embedding_bag_configs())


def quantize_module(module, to: str):
    """A copy of ``module`` (a :class:`ranking.models.MultiTaskRanker`, fp32) whose embedding tables are
    row-wise ``to`` (int8 | int4) through TorchRec's ``quantize_embeddings``; in eval mode."""
    import torch
    from torchrec import EmbeddingBagCollection
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    _check_to(to)
    tables = _tables(module)
    if not tables:
        raise VariantError("the model has no embedding tables to quantize (dense features only)")
    odd = [t.name for t in tables if to == "int4" and t.embedding_dim % 2]
    if odd:
        raise VariantError(f"int4 packs two values a byte: tables {', '.join(odd)} have an odd embedding dim")
    out = copy.deepcopy(module).cpu().eval()
    quant_prep_customize_row_alignment(out, [EmbeddingBagCollection], ROW_ALIGNMENT)
    dtype = torch.qint8 if to == "int8" else torch.quint4x2
    with warnings.catch_warnings():   # TorchRec 1.8 swaps modules through torch.ao.quantization, which
        warnings.simplefilter("ignore", DeprecationWarning)   # torch deprecates on every call (still works)
        return quantize_embeddings(out, dtype=dtype, inplace=True).eval()


def _plain(tensor):
    """The uint8 bytes behind TorchRec's packed ``UInt4Tensor`` (a plain tensor as it is)."""
    from torchrec.tensor_types import UIntXTensor

    return tensor.elem if isinstance(tensor, UIntXTensor) else tensor


def quantized_state(qmodule, to: str) -> dict:
    """The state dict of a :func:`quantize_module` result as plain tensors: each table's unpadded
    fused rows (uint8, (N, :func:`row_bytes`)), the other tensors as they are."""
    dims = {t.name: t.embedding_dim for t in _tables(qmodule)}
    state = {}
    for key, value in qmodule.state_dict().items():
        value = _plain(value).detach().cpu()
        table = key[len(TABLE_PREFIX):-len(".weight")] if key.startswith(TABLE_PREFIX) else None
        if table in dims:
            value = value[:, :row_bytes(dims[table], to)]
        state[key] = value.contiguous().clone()
    return state


def load_quantized_module(tables, dense_dim: int, objectives, config, to: str, state: dict):
    """A :class:`ranking.models.MultiTaskRanker` serving ``state`` (:func:`quantized_state`) with
    row-wise ``to`` tables; a state that does not fit the model is a :class:`VariantError`."""
    import torch
    from torchrec.modules.embedding_configs import DataType
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    from .models import MultiTaskRanker

    _check_to(to)
    weights = {}
    for t in tables:
        key = f"{TABLE_PREFIX}{t.name}.weight"
        rows = state.get(key)
        want = (t.num_embeddings, row_bytes(t.embedding_dim, to))
        if rows is None:
            raise VariantError(f"the {to} state has no table '{t.name}' ({key})")
        if rows.dtype != torch.uint8 or tuple(rows.shape) != want:
            raise VariantError(f"table '{t.name}': expected uint8 rows of shape {want} for {to}, got "
                               f"{rows.dtype} {tuple(rows.shape)}")
        weights[t.name] = (rows[:, SCALE_BIAS_BYTES:], rows[:, :SCALE_BIAS_BYTES])   # (codes, scale + bias)
    module = MultiTaskRanker(tables, dense_dim, objectives, config, device=torch.device("meta"))
    data_type = DataType.INT8 if to == "int8" else DataType.INT4
    module.ebc = QuantEmbeddingBagCollection([dataclasses.replace(t, data_type=data_type) for t in tables],
                                             is_weighted=False, device=torch.device("cpu"),
                                             table_name_to_quantized_weights=weights, row_alignment=ROW_ALIGNMENT)
    rest = {k: v for k, v in state.items() if not k.startswith(TABLE_PREFIX)}
    try:
        result = module.load_state_dict(rest, strict=False)
    except RuntimeError as exc:
        raise VariantError(f"the {to} state does not fit the model: {exc}") from None
    missing = [k for k in result.missing_keys if not k.startswith(TABLE_PREFIX)]
    if missing or result.unexpected_keys:
        raise VariantError(f"the {to} state does not fit the model: missing {missing or 'none'}, "
                           f"unexpected {result.unexpected_keys or 'none'}")
    return module.eval()


def embedding_bytes(module) -> int:
    """Bytes of the model's embedding tables as held in memory (fp32 parameters or quantized rows)."""
    return sum(_plain(v).numel() * _plain(v).element_size() for v in module.ebc.state_dict().values())


def model_bytes(module) -> int:
    """Bytes of every tensor of the model's state (tables, MLPs, buffers)."""
    return sum(_plain(v).numel() * _plain(v).element_size() for v in module.state_dict().values())
