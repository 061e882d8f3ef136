"""The wire form of secure-aggregation messages: a JSON object per step (bytes as base64),
and the masked input as a safetensors payload. Everything decoded is checked field by field;
nothing is pickled. A bad message is a ``SecureAggregationError``.

Steps (``proto/oiafed.proto``, message ``SecAgg``), after the round's ``TrainTask``:

====  ==============  =========================================================================
step  from            data
====  ==============  =========================================================================
1     client          ADVERTISE: ``{"cipher": b64, "mask": b64}`` (its two public keys)
2     server          KEYS: ``{"session", "round", "threshold", "length", "bound",
                      "precision_bits", "weighted", "clip_norm", "keys": {id: {"cipher",
                      "mask"}}}``
3     client          SHARES: ``{"shares": {recipient: b64 ciphertext}}``
4     server          ROUTED: ``{"shares": {sender: b64 ciphertext}}``
\\-    client          the masked input, as the task's update (``encode_masked``; its header
                      names the session, round and sender)
5     server          SURVIVORS: ``{"survivors": [id, ...]}``
6     client          UNMASK: ``{"shares": {id: ["seed" | "mask_key", hex]}}``
====  ==============  =========================================================================
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oiafed.client_state import CLIENT_ID_PATTERN
from oiafed.exceptions import SecureAggregationError, WireError
from oiafed.runtime.envelope import PROTOCOL
from oiafed.runtime.tensors import Payload, decode_payload
from oiafed.secagg import quantize
from oiafed.secagg.crypto import KEY_BYTES
from oiafed.secagg.protocol import PublicKeys, RoundParams
from oiafed.secagg.shamir import PRIME

ADVERTISE, KEYS, SHARES, ROUTED, SURVIVORS, UNMASK = 1, 2, 3, 4, 5, 6
MAX_MESSAGE = 1 << 22
"""The largest step message accepted, in bytes (one gRPC message)."""
MASKED = "masked"


@dataclass(frozen=True)
class Encoding:
    """How a client turns its update into integers (``quantize``): the clipping ``bound``,
    ``precision_bits``, whether it weights by its sample count (``weighted``) and the L2
    norm it clips its update to first (``clip_norm``: central DP's ``C``; None: no L2 clip)."""

    bound: float
    precision_bits: int
    weighted: bool
    clip_norm: float | None = None


def encode_advertise(keys: PublicKeys) -> bytes:
    return _dump({"cipher": _b64(keys.cipher), "mask": _b64(keys.mask)})


def decode_advertise(data: bytes) -> PublicKeys:
    obj = _load(data)
    return PublicKeys(_key(obj, "cipher"), _key(obj, "mask"))


def encode_keys(params: RoundParams, encoding: Encoding, keys: dict[str, PublicKeys]) -> bytes:
    return _dump({"session": _b64(params.session), "round": params.round_num,
                  "threshold": params.threshold, "length": params.length,
                  "bound": encoding.bound, "precision_bits": encoding.precision_bits,
                  "weighted": encoding.weighted, "clip_norm": encoding.clip_norm,
                  "keys": {cid: {"cipher": _b64(k.cipher), "mask": _b64(k.mask)}
                           for cid, k in keys.items()}})


def decode_keys(data: bytes) -> tuple[RoundParams, Encoding, dict[str, PublicKeys]]:
    obj = _load(data)
    keys = _ids(obj, "keys")
    params = RoundParams(_bytes(obj, "session"), _int(obj, "round"), _int(obj, "threshold"),
                         _int(obj, "length"))
    bound = obj.get("bound")
    if not isinstance(bound, int | float) or isinstance(bound, bool) or not 0 < bound < 2**62:
        raise SecureAggregationError("KEYS: bound must be a positive number")
    clip = obj.get("clip_norm")
    if clip is not None and (not isinstance(clip, int | float) or isinstance(clip, bool)
                             or not 0 < clip < 2**62):
        raise SecureAggregationError("KEYS: clip_norm must be a positive number or null")
    bits = _int(obj, "precision_bits")
    if not 1 <= bits <= quantize.MAX_PRECISION_BITS or not quantize.fits(1, bound, bits):
        raise SecureAggregationError(f"KEYS: precision_bits must be in "
                                     f"1..{quantize.MAX_PRECISION_BITS} with "
                                     f"bound * 2**precision_bits < 2**63")
    encoding = Encoding(float(bound), bits, obj.get("weighted") is True,
                        None if clip is None else float(clip))
    return params, encoding, {cid: PublicKeys(_key(k, "cipher"), _key(k, "mask"))
                              for cid, k in keys.items()}


def encode_ciphertexts(shares: dict[str, bytes]) -> bytes:
    return _dump({"shares": {cid: _b64(blob) for cid, blob in shares.items()}})


def decode_ciphertexts(data: bytes) -> dict[str, bytes]:
    shares = _ids(_load(data), "shares")
    out = {}
    for cid, blob in shares.items():
        if not isinstance(blob, str):
            raise SecureAggregationError("a ciphertext must be base64 text")
        out[cid] = _unb64(blob)
    return out


def encode_survivors(survivors: list[str]) -> bytes:
    return _dump({"survivors": survivors})


def decode_survivors(data: bytes) -> list[str]:
    survivors = _load(data).get("survivors")
    if not isinstance(survivors, list) or not all(
            isinstance(c, str) and CLIENT_ID_PATTERN.fullmatch(c) for c in survivors):
        raise SecureAggregationError("SURVIVORS: a list of client ids expected")
    return survivors


def encode_unmask(shares: dict[str, tuple[str, int]]) -> bytes:
    return _dump({"shares": {cid: [kind, format(value, "x")]
                             for cid, (kind, value) in shares.items()}})


def decode_unmask(data: bytes) -> dict[str, tuple[str, int]]:
    out = {}
    for cid, entry in _ids(_load(data), "shares").items():
        if (not isinstance(entry, list) or len(entry) != 2 or entry[0] not in ("seed", "mask_key")
                or not isinstance(entry[1], str) or len(entry[1]) > 140):
            raise SecureAggregationError("UNMASK: each share must be [kind, hex]")
        try:
            value = int(entry[1], 16)
        except ValueError:
            raise SecureAggregationError("UNMASK: a share that is not hex") from None
        if not 0 <= value < PRIME:
            raise SecureAggregationError("UNMASK: a share outside the field")
        out[cid] = (entry[0], value)
    return out


def encode_masked(params: RoundParams, client_id: str, y: np.ndarray) -> Payload:
    """The masked input ``y`` (uint64) of ``client_id`` as a payload (an int64 tensor of the
    same bits), its header naming the session, round and sender. The header is not a MAC:
    against a network attacker the stream's TLS protects it (module ``runtime.grpc.auth``)."""
    header = json.dumps({"v": PROTOCOL, "kind": MASKED, "session": _b64(params.session),
                         "round": params.round_num, "client_id": client_id},
                        separators=(",", ":"))
    return Payload({MASKED: torch.from_numpy(y.view(np.int64))}, {"oiafed": header})


def decode_masked(data: bytes | bytearray | memoryview, params: RoundParams, client_id: str
                  ) -> np.ndarray:
    """The masked input in ``encode_masked``'s bytes, which must be ``client_id``'s for the
    session and round of ``params``.

    Raises:
        SecureAggregationError: on another kind, session, round, client, or tensor layout.
    """
    try:
        tensors, metadata = decode_payload(data)
        header = json.loads(metadata["oiafed"])
    except (WireError, KeyError, ValueError) as exc:
        raise SecureAggregationError(f"a masked input that is not one: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL or header.get("kind") != MASKED:
        raise SecureAggregationError("a masked input of another kind or protocol version")
    if (header.get("session") != _b64(params.session) or header.get("round") != params.round_num
            or header.get("client_id") != client_id):
        raise SecureAggregationError(f"a masked input of {header.get('client_id')!r:.80} for "
                                     f"another session or round (round "
                                     f"{header.get('round')!r:.20}): a replayed message")
    tensor = tensors.get(MASKED)
    if set(tensors) != {MASKED} or tensor is None or tensor.dtype != torch.int64 or tensor.dim() != 1:
        raise SecureAggregationError("a masked input must be one int64 vector")
    return tensor.numpy().view(np.uint64).copy()


# -- JSON helpers ----------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise SecureAggregationError(f"a message of {len(data)} bytes, over {MAX_MESSAGE}")
    try:
        obj = json.loads(data)
    except ValueError:
        raise SecureAggregationError("a message that is not JSON") from None
    if not isinstance(obj, dict):
        raise SecureAggregationError("a message that is not a JSON object")
    return obj


def _ids(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict) or not all(CLIENT_ID_PATTERN.fullmatch(c) for c in value):
        raise SecureAggregationError(f"{key!r} must map client ids to values")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**40:
        raise SecureAggregationError(f"{key!r} must be an integer >= 0")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecureAggregationError("a value that is not base64") from None


def _bytes(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise SecureAggregationError(f"{key!r} must be base64 text")
    return _unb64(value)


def _key(obj: object, key: str) -> bytes:
    if not isinstance(obj, dict):
        raise SecureAggregationError("public keys must be a JSON object")
    value = _bytes(obj, key)
    if len(value) != KEY_BYTES:
        raise SecureAggregationError(f"{key!r} is not a 32-byte public key")
    return value
