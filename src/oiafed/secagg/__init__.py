"""Secure aggregation (Bonawitz et al., CCS 2017): the server learns only the sum of a round's
updates. The maths lives here, free of any transport: ``shamir`` (secret sharing), ``crypto``
(X25519, HKDF, AES-CTR PRG, AES-GCM, all from ``cryptography``), ``quantize`` (fixed point in
Z_{2**64}), ``protocol`` (each party's state machine), ``messages`` (their wire form) and
``updates`` (a client update to an input vector and a round's sum back to weights). The gRPC
runtime wires it in (``runtime.secure_aggregation``)."""
