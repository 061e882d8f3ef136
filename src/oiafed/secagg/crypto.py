"""The primitives secure aggregation uses, all from the ``cryptography`` package.

* key agreement: X25519 (``agree``), raw 32-byte public keys;
* key derivation: HKDF-SHA256 (``derive``), one label per use, the run's session id and the
  round in its ``info``, so keys never repeat across rounds or runs;
* pseudo-random generator: AES-256 in CTR mode over zero bytes, keyed by a 32-byte seed, with
  an all-zero counter block (``prg``): deterministic, the same stream on every machine;
* authenticated encryption of shares: AES-256-GCM with a random 96-bit nonce (``seal`` and
  ``unseal``); the associated data binds the ciphertext to its session, round, sender and
  recipient, so a share replayed from another round or moved to another pair fails.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from oiafed.exceptions import SecureAggregationError

KEY_BYTES = 32
NONCE_BYTES = 12
MASK_LABEL = b"oiafed-secagg/v1 pairwise mask"
SHARE_LABEL = b"oiafed-secagg/v1 share encryption"


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what Shamir shares)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def agree(key: X25519PrivateKey, peer: bytes) -> bytes:
    """The X25519 shared secret of ``key`` and the raw public key ``peer``.

    Raises:
        SecureAggregationError: when ``peer`` is not a valid public key.
    """
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:
        raise SecureAggregationError(f"not an X25519 public key: {exc}") from exc


def derive(secret: bytes, label: bytes, context: bytes) -> bytes:
    """A 32-byte key from ``secret`` by HKDF-SHA256, with ``label`` and ``context`` as info."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=label + b"|" + context).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 (little-endian) from a 32-byte ``seed``: AES-256-CTR
    with an all-zero initial counter block, encrypting zero bytes."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated (AES-256-GCM): nonce, then ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """What ``seal`` encrypted.

    Raises:
        SecureAggregationError: when the ciphertext, its tag or ``associated`` differ from
            what was sealed (tampered, replayed from another round, or for another pair).
    """
    if len(blob) < NONCE_BYTES + 16:
        raise SecureAggregationError("an encrypted share too short to be one")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecureAggregationError("an encrypted share failed authentication (tampered, "
                                     "replayed, or not meant for this pair)") from None
