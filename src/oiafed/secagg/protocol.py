"""The secure aggregation protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), §4 and Figure 4, in its honest-but-curious
form (without the ConsistencyCheck round and signatures, which guard against an actively
malicious server).

Each round of training, for the sampled clients ``U`` and threshold ``t``:

0. AdvertiseKeys: client ``u`` makes two X25519 key pairs, ``(c_u^PK, c_u^SK)`` to encrypt
   shares and ``(s_u^PK, s_u^SK)`` for pairwise masks, and sends both public keys. ``U1``: the
   clients that did (the round aborts when ``|U1| < t``); the server sends ``U1``'s keys to
   ``U1``.
1. ShareKeys: ``u`` draws a self-mask seed ``b_u``, Shamir-shares ``b_u`` and ``s_u^SK`` among
   ``U1`` (threshold ``t``) and sends each ``v`` its two shares, encrypted with AES-GCM under
   ``HKDF(X25519(c_u^SK, c_v^PK))``, the associated data naming session, round, ``u`` and ``v``.
   ``U2``: the clients that sent shares; each gets the ciphertexts addressed to it.
2. MaskedInputCollection: ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u}
   delta_uv PRG(s_uv)`` in Z_{2**64}, ``s_uv = HKDF(X25519(s_u^SK, s_v^PK))``, ``delta_uv = +1``
   when ``u < v`` else ``-1`` (the pairwise masks cancel in the sum). ``U3``: the clients whose
   masked input arrived.
3. Unmasking: ``u`` sends, for each ``v in U2``, its share of ``b_v`` when ``v in U3`` and of
   ``s_v^SK`` when not (never both for one ``v``). With ``t`` answers the server rebuilds every
   ``b_v`` of ``U3`` and every ``s_v^SK`` of the dropped ``U2 \\ U3``, and computes
   ``sum_{u in U3} x_u = sum y_u - sum PRG(b_u) - sum_{v dropped, u in U3} delta_uv PRG(s_uv)``.

``ClientRound`` and ``ServerRound`` hold one party's state for one round and speak in the
messages of ``messages.py``; they know nothing of gRPC. Every message is checked (its round,
its step, who may send it, once), and any failure is a ``SecureAggregationError``.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from oiafed.exceptions import SecureAggregationError, SecureAggregationFailed
from oiafed.secagg import shamir
from oiafed.secagg.crypto import (
    KEY_BYTES,
    MASK_LABEL,
    SHARE_LABEL,
    agree,
    derive,
    prg,
    private_bytes,
    public_bytes,
    seal,
    unseal,
)


@dataclass(frozen=True)
class RoundParams:
    """What the server fixes for one round and tells every client with the keys.

    Attributes:
        session: the run's random id (in every key derivation and associated data).
        round_num: the training round.
        threshold: ``t``: the fewest clients that must survive every step.
        length: the length of every client's input vector.
    """

    session: bytes
    round_num: int
    threshold: int
    length: int

    def context(self) -> bytes:
        return self.session + b"|" + str(self.round_num).encode()


@dataclass(frozen=True)
class PublicKeys:
    """A client's advertised public keys: ``cipher`` (for shares) and ``mask`` (for masks)."""

    cipher: bytes
    mask: bytes


@dataclass(frozen=True)
class Shares:
    """The two Shamir shares one client holds of another's secrets (``x``: its coordinate)."""

    x: int
    seed: int
    mask_key: int


def associated_data(params: RoundParams, sender: str, recipient: str) -> bytes:
    """AES-GCM associated data of a share from ``sender`` to ``recipient`` in this round."""
    return b"|".join([b"oiafed-secagg/v1 share", params.context(), sender.encode(),
                      recipient.encode()])


class ClientRound:
    """Client ``client_id``'s half of one round (Bonawitz et al., Figure 4, "User")."""

    def __init__(self, client_id: str, round_num: int) -> None:
        self.client_id = client_id
        self.round_num = round_num
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(KEY_BYTES)
        self.params: RoundParams | None = None
        self._keys: dict[str, PublicKeys] = {}
        self._received: dict[str, Shares] = {}
        self._members2: list[str] = []
        self._step = 0

    def advertise(self) -> PublicKeys:
        """Round 0 (AdvertiseKeys): this client's two public keys."""
        self._advance(0)
        return PublicKeys(public_bytes(self._cipher_key), public_bytes(self._mask_key))

    def share_keys(self, params: RoundParams, keys: Mapping[str, PublicKeys]
                   ) -> dict[str, bytes]:
        """Round 1 (ShareKeys): the encrypted shares of ``b_u`` and ``s_u^SK``, by recipient.

        Raises:
            SecureAggregationError: for another round, fewer than ``t`` clients, or a key
                list that does not hold this client's own keys.
        """
        self._advance(1)
        if params.round_num != self.round_num:
            raise SecureAggregationError(f"keys for round {params.round_num} in round "
                                         f"{self.round_num}")
        if len(keys) < params.threshold or params.threshold < 2:
            raise SecureAggregationError(f"{len(keys)} clients advertised keys; the threshold "
                                         f"is {params.threshold}")
        own = keys.get(self.client_id)
        if own != PublicKeys(public_bytes(self._cipher_key), public_bytes(self._mask_key)):
            raise SecureAggregationError("the server's key list does not hold this client's keys")
        advertised = [key for k in keys.values() for key in (k.cipher, k.mask)]
        if len(set(advertised)) != len(advertised):
            raise SecureAggregationError("two clients advertised the same key")
        self.params, self._keys = params, dict(keys)
        xs = coordinates(keys)
        seed_shares = shamir.split(int.from_bytes(self._seed, "big"), params.threshold,
                                   xs.values())
        key_shares = shamir.split(int.from_bytes(private_bytes(self._mask_key), "big"),
                                  params.threshold, xs.values())
        out = {}
        for peer, x in xs.items():
            shares = Shares(x, seed_shares[x], key_shares[x])
            if peer == self.client_id:
                self._received[peer] = shares
                continue
            out[peer] = seal(self._share_key(peer), encode_shares(shares),
                             associated_data(params, self.client_id, peer))
        return out

    def masked_input(self, ciphertexts: Mapping[str, bytes], x: np.ndarray) -> np.ndarray:
        """Round 2 (MaskedInputCollection): ``y_u`` for input ``x`` (uint64), given the shares
        addressed to this client by the other members of ``U2``.

        Raises:
            SecureAggregationError: for a share that fails authentication (tampered,
                replayed), a sender that advertised no keys, or fewer than ``t`` senders.
        """
        self._advance(2)
        params = self.round_params()
        if x.dtype != np.uint64 or x.shape != (params.length,):
            raise SecureAggregationError(f"the input must be {params.length} uint64 values")
        for sender, blob in ciphertexts.items():
            if sender == self.client_id or sender not in self._keys:
                raise SecureAggregationError(f"a share from {sender!r:.80}, which is not a "
                                             "member of the round")
            shares = decode_shares(unseal(self._share_key(sender), blob,
                                          associated_data(params, sender, self.client_id)))
            if shares.x != coordinates(self._keys)[self.client_id]:
                raise SecureAggregationError(f"the share from {sender} is for another client")
            self._received[sender] = shares
        self._members2 = sorted([*ciphertexts, self.client_id])
        if len(self._members2) < params.threshold:
            raise SecureAggregationError(f"{len(self._members2)} clients shared keys; the "
                                         f"threshold is {params.threshold}")
        y = x + prg(self._seed, params.length)
        for peer in self._members2:
            if peer != self.client_id:
                pairwise = prg(self._pair_seed(peer), params.length)
                y = y + pairwise if self.client_id < peer else y - pairwise
        return y

    def unmask(self, survivors: list[str]) -> dict[str, tuple[str, int]]:
        """Round 3 (Unmasking): for each ``v in U2``, ``("seed", share of b_v)`` when ``v`` is
        among ``survivors`` (``U3``), else ``("mask_key", share of s_v^SK)``.

        Raises:
            SecureAggregationError: when ``survivors`` holds a client outside ``U2``, lacks
                this one, or has fewer than ``t``.
        """
        self._advance(3)
        params = self.round_params()
        members = set(self._members2)
        alive = set(survivors)
        if not alive <= members or self.client_id not in alive or len(alive) < params.threshold:
            raise SecureAggregationError("the survivor list is not a subset of the round's "
                                         f"members of at least {params.threshold} holding this "
                                         "client")
        return {peer: ("seed", self._received[peer].seed) if peer in alive
                else ("mask_key", self._received[peer].mask_key)
                for peer in self._members2}

    def _advance(self, step: int) -> None:
        if step != self._step:
            raise SecureAggregationError(f"step {step} of the protocol out of order (expected "
                                         f"{self._step}): a replayed or repeated message")
        self._step += 1

    def round_params(self) -> RoundParams:
        """The round's parameters, once the server's keys came (``share_keys``).

        Raises:
            SecureAggregationError: before then.
        """
        if self.params is None:
            raise SecureAggregationError("no round parameters yet")
        return self.params

    def _share_key(self, peer: str) -> bytes:
        return derive(agree(self._cipher_key, self._keys[peer].cipher), SHARE_LABEL,
                      self.round_params().context())

    def _pair_seed(self, peer: str) -> bytes:
        return derive(agree(self._mask_key, self._keys[peer].mask), MASK_LABEL,
                      self.round_params().context())


class ServerRound:
    """The server's half of one round (Bonawitz et al., Figure 4, "Server"): it routes keys
    and shares, and learns only the sum of the surviving clients' inputs.

    Args:
        params: the round's parameters.
        sampled: the round's clients.
    """

    def __init__(self, params: RoundParams, sampled: list[str]) -> None:
        if params.threshold < 2 or params.threshold > len(sampled):
            raise SecureAggregationError(f"threshold {params.threshold} for {len(sampled)} "
                                         "clients: it must be in 2..clients")
        self.params = params
        self.sampled = frozenset(sampled)
        self.keys: dict[str, PublicKeys] = {}
        self.ciphertexts: dict[str, dict[str, bytes]] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.unmasking: dict[str, dict[str, tuple[str, int]]] = {}
        self._survivors: list[str] | None = None

    # -- what clients send ----------------------------------------------------------------

    def advertised(self, cid: str, keys: PublicKeys) -> None:
        self._check(cid, self.sampled, self.keys, "advertise keys")
        self.keys[cid] = keys

    def shared(self, cid: str, ciphertexts: Mapping[str, bytes]) -> None:
        self._check(cid, self.keys, self.ciphertexts, "share keys")
        if set(ciphertexts) != set(self.keys) - {cid}:
            raise SecureAggregationError(f"{cid} sent shares for other clients than the "
                                         "round's key holders")
        self.ciphertexts[cid] = dict(ciphertexts)

    def masked_input(self, cid: str, y: np.ndarray) -> None:
        """Take ``cid``'s masked input; refused once the survivors are named (too late)."""
        if self._survivors is not None:
            raise SecureAggregationError(f"{cid}'s masked input came after the survivors were "
                                         "named: too late for this round")
        self._check(cid, self.ciphertexts, self.masked, "send a masked input")
        if y.dtype != np.uint64 or y.shape != (self.params.length,):
            raise SecureAggregationError(f"{cid}'s masked input is not {self.params.length} "
                                         "uint64 values")
        self.masked[cid] = y

    def unmasked(self, cid: str, shares: Mapping[str, tuple[str, int]]) -> None:
        """Take ``cid``'s unmasking shares: one for every member of ``U2``, of the seed of
        each survivor and the mask key of each dropped client."""
        survivors = set(self.survivors())
        self._check(cid, survivors, self.unmasking, "send unmasking shares")
        if set(shares) != set(self.ciphertexts):
            raise SecureAggregationError(f"{cid} sent shares for other clients than the round's "
                                         "members")
        for peer, (kind, _) in shares.items():
            if kind != ("seed" if peer in survivors else "mask_key"):
                raise SecureAggregationError(f"{cid} sent a {kind!r:.20} share for {peer!r:.80}")
        self.unmasking[cid] = dict(shares)

    # -- what the server sends -------------------------------------------------------------

    def key_list(self) -> dict[str, PublicKeys]:
        """``U1``'s keys, for ``U1``.

        Raises:
            SecureAggregationFailed: when fewer than ``t`` clients advertised keys.
        """
        self._enough(self.keys, "advertised keys")
        return dict(self.keys)

    def sharers(self) -> list[str]:
        """``U2``: the clients that shared keys, sorted.

        Raises:
            SecureAggregationFailed: when fewer than ``t`` did.
        """
        self._enough(self.ciphertexts, "shared keys")
        return sorted(self.ciphertexts)

    def routed(self, cid: str) -> dict[str, bytes]:
        """The ciphertexts addressed to ``cid`` (by the other members of ``U2``).

        Raises:
            SecureAggregationFailed: when fewer than ``t`` clients shared keys.
        """
        self._enough(self.ciphertexts, "shared keys")
        return {sender: out[cid] for sender, out in self.ciphertexts.items() if sender != cid}

    def survivors(self) -> list[str]:
        """``U3``: the clients whose masked input arrived (fixed once asked).

        Raises:
            SecureAggregationFailed: when fewer than ``t`` did.
        """
        if self._survivors is None:
            self._enough(self.masked, "sent masked inputs")
            self._survivors = sorted(self.masked)
        return self._survivors

    def total(self) -> np.ndarray:
        """``sum_{u in U3} x_u`` in Z_{2**64}.

        Raises:
            SecureAggregationFailed: when fewer than ``t`` clients sent unmasking shares, or
                the shares rebuild no key or another key than the one advertised
                (inconsistent shares).
        """
        survivors = self.survivors()
        self._enough(self.unmasking, "sent unmasking shares")
        context = self.params.context()
        xs = coordinates(self.keys)
        length = self.params.length
        total = np.zeros(length, dtype=np.uint64)
        for u in survivors:
            total += self.masked[u]
        for u in survivors:
            seed = self._rebuild(u, "seed", xs)
            total -= prg(seed.to_bytes(KEY_BYTES, "big"), length)
        for v in sorted(set(self.ciphertexts) - set(survivors)):  # dropped after sharing
            secret = self._rebuild(v, "mask_key", xs).to_bytes(KEY_BYTES, "big")
            key = X25519PrivateKey.from_private_bytes(secret)
            if public_bytes(key) != self.keys[v].mask:
                raise self._failed(f"the shares of {v}'s mask_key rebuild another key")
            for u in survivors:  # remove u's pairwise mask with v: u added it as delta_uv
                pairwise = prg(derive(agree(key, self.keys[u].mask), MASK_LABEL, context),
                               length)
                total = total - pairwise if u < v else total + pairwise
        return total

    # -- plumbing --------------------------------------------------------------------------

    def _rebuild(self, owner: str, kind: str, xs: Mapping[str, int]) -> int:
        """``owner``'s ``kind`` secret from the unmasking answers (each holds a share of it)."""
        shares = {xs[holder]: given[owner][1] for holder, given in self.unmasking.items()}
        try:
            secret = shamir.reconstruct(shares, self.params.threshold)
        except SecureAggregationError as exc:
            raise self._failed(f"the shares of {owner}'s {kind}: {exc}") from exc
        if secret >= 1 << (8 * KEY_BYTES):
            raise self._failed(f"the shares of {owner}'s {kind} rebuild no key")
        return secret

    def _failed(self, why: str) -> SecureAggregationFailed:
        return SecureAggregationFailed(f"round {self.params.round_num}: secure aggregation "
                                       f"cannot unmask the sum: {why} (inconsistent shares)")

    def _check(self, cid: str, allowed: Collection[str], done: Mapping[str, object],
               what: str) -> None:
        if cid not in allowed:
            raise SecureAggregationError(f"{cid!r:.80} may not {what} in this round")
        if cid in done:
            raise SecureAggregationError(f"{cid} tried to {what} twice (a replayed message)")

    def _enough(self, answered: Mapping[str, object], what: str) -> None:
        if len(answered) < self.params.threshold:
            missing = sorted(self.sampled - set(answered))
            raise SecureAggregationFailed(
                f"round {self.params.round_num}: secure aggregation needs "
                f"runtime.secure_aggregation.threshold={self.params.threshold} clients, only "
                f"{len(answered)} {what} (missing: {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''})")


def coordinates(keys: Mapping[str, object]) -> dict[str, int]:
    """Each key holder's Shamir x-coordinate: its position (from 1) among the sorted ids."""
    return {cid: i for i, cid in enumerate(sorted(keys), start=1)}


def encode_shares(shares: Shares) -> bytes:
    return b"".join(v.to_bytes(66, "big") for v in (shares.x, shares.seed, shares.mask_key))


def decode_shares(data: bytes) -> Shares:
    if len(data) != 3 * 66:
        raise SecureAggregationError("a decrypted share of the wrong length")
    x, seed, key = (int.from_bytes(data[i:i + 66], "big") for i in range(0, 198, 66))
    return Shares(x, seed, key)
