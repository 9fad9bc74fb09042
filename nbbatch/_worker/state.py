"""How one reducer's ``per_slot_reduce()`` value is stored: as JSON when it is plain data, else pickled.

Plain data is ``None``, ``bool``, ``int``, ``float``, ``str``, lists, tuples, dicts of those, torch
tensors and numpy arrays or scalars; a resume loads it without pickle and gets the same types back
(tuples stay tuples, tensors keep dtype, shape and device). Only other values are pickled; the
store signs both kinds, and a resume unpickles only states this user signed (``_store/trust.py``).
A blob starts with ``J`` (JSON) or ``P`` (pickle); older stores hold bare pickles. Must not import
DuckDB, ``_store``, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

import base64
import json
import pickle
from typing import Any

import cloudpickle
import numpy as np
import torch

__all__ = ["dump_state", "load_state"]

_TAG = "$nbbatch"


class _NotPlain(Exception):
    """The value holds something JSON cannot carry exactly; it is pickled instead."""


def dump_state(value: Any) -> bytes:
    """One reducer state as stored bytes: JSON when it is plain data, else a pickle."""
    try:
        return b"J" + json.dumps(_encode(value), separators=(",", ":")).encode()
    except (_NotPlain, ValueError, RecursionError):
        pass
    try:
        return b"P" + pickle.dumps(value)
    except Exception:
        return b"P" + bytes(cloudpickle.dumps(value))


def load_state(blob: bytes) -> Any:
    """The value of `dump_state` bytes (or of a bare pickle from a store written before signing).

    Only call it on states the store verified: a pickled state runs code when loaded.
    """
    if blob[:1] == b"J":
        return json.loads(blob[1:], object_hook=_decode)
    if blob[:1] == b"P":
        return pickle.loads(blob[1:])
    return pickle.loads(blob)


_SCALARS = (type(None), bool, int, float, str)


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list or kind is tuple:  # the hot path (a function reducer's values): no call per scalar
        items = [v if type(v) in _SCALARS else _encode(v) for v in value]
        return items if kind is list else {_TAG: "tuple", "v": items}
    if kind is dict:
        if all(type(k) is str for k in value) and _TAG not in value:
            return {k: v if type(v) in _SCALARS else _encode(v) for k, v in value.items()}
        return {_TAG: "dict", "v": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if kind is torch.Tensor:
        return _encode_tensor(value)
    if kind is np.ndarray or (isinstance(value, np.generic) and kind is value.dtype.type):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise _NotPlain
        return {_TAG: "ndarray" if kind is np.ndarray else "npscalar", "dtype": array.dtype.str,
                "shape": list(array.shape), "b64": _b64(np.ascontiguousarray(array).tobytes())}
    raise _NotPlain


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        raise _NotPlain
    flat = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)  # lazy views hold no bytes
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {_TAG: "tensor", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "device": str(t.device), "grad": bool(t.requires_grad), "b64": _b64(raw)}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _decode(value: dict[str, Any]) -> Any:
    """``json.loads`` object hook: rebuilds tagged values; JSON parses everything else in C."""
    tag = value.get(_TAG)
    if tag is None:
        return value
    if tag == "tuple":
        return tuple(value["v"])
    if tag == "dict":
        return {k: v for k, v in value["v"]}
    raw = base64.b64decode(value["b64"])
    if tag == "tensor":
        return _decode_tensor(value, raw)
    array = np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    return array if tag == "ndarray" else array[()]


def _decode_tensor(value: dict[str, Any], raw: bytes) -> torch.Tensor:
    dtype = getattr(torch, value["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"stored tensor dtype {value['dtype']!r} is not a torch dtype")
    if raw:
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(value["shape"])
    else:
        t = torch.empty(value["shape"], dtype=dtype)
    device = torch.device(value["device"])
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count():
        t = t.to(device)  # as pickle would put it back; elsewhere it stays on the CPU
    if value.get("grad"):
        t.requires_grad_(True)
    return t
