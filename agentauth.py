"""Scoped, short-lived, revocable tokens for AI agents.

A user grants an agent a narrow set of scopes; agentauth mints a signed
token (an RFC 9068 JWT access token, HS256 or EdDSA) from that grant; the
API or MCP server the agent calls enforces it with one call::

    auth = AgentAuth(secret=os.environ["AGENTAUTH_SECRET"],
                     issuer="my-app", audience="my-api")
    issued = auth.issue(subject="user_123", agent="agent_research_bot",
                        scopes=["email:read", "calendar:read"], ttl_seconds=600)
    claims = auth.verify(issued.token, required_scopes=["email:read"])
    auth.revoke(agent="agent_research_bot")   # "disconnect this agent"

Also: grants (what each user allowed each agent: ``grant``, ``grants``,
``disconnect``, and a connected-agents page to mount), revocation stores (memory, SQLite, Redis), WSGI/ASGI middleware with
RFC 6750 challenges, an MCP token verifier, delegation chains with RFC 8693
token exchange, and ``python -m agentauth`` for quick checks.

Copy this one file; standard library only; Python >= 3.9.
"""

import binascii
import collections
import contextvars
import functools
import hashlib
import heapq
import hmac
import json
import math
import os
import re
import secrets
import sys
import threading
import time
import types
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

if typing.TYPE_CHECKING:  # names used only in annotations
    import argparse
    import sqlite3

__version__ = "0.1.0"

__all__ = [
    # Errors
    "AgentAuthError",
    "TokenInvalidError",
    "TokenExpiredError",
    "RevokedError",
    "DPoPProofError",
    "DPoPNonceError",
    "MissingScopeError",
    "InvalidGrantError",
    "InvalidConfigError",
    "StoreUnavailableError",
    # JWS layer
    "jws_sign",
    "jws_verify",
    # Keys
    "Ed25519Key",
    "P256Key",
    # Scopes
    "scope_satisfies",
    # Claims and events
    "AgentClaims",
    "IssuedToken",
    "AgentEvent",
    "RevocationEntry",
    "log_events",
    "Grant",
    # Stores
    "RevocationStore",
    "GrantStore",
    "ProofReplayStore",
    "AuthorizationStore",
    "MemoryStore",
    "SqliteStore",
    "RedisStore",
    "PostgresStore",
    # DPoP
    "dpop_proof",
    # The facade
    "AgentAuth",
    # Web middleware and token exchange
    "current_claims",
    "GRANT_TYPE_TOKEN_EXCHANGE",
    "GRANT_TYPE_AUTHORIZATION_CODE",
    "GRANT_TYPE_REFRESH_TOKEN",
    "TOKEN_TYPE_ACCESS_TOKEN",
    # Command line
    "main",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

ALGORITHM = "HS256"
ALGORITHM_EDDSA = "EdDSA"  # RFC 8037 §3.1: Ed25519 signatures in JOSE
ALGORITHM_ED25519 = "Ed25519"  # RFC 9864 §2.2: the fully-specified name of the same signatures
ALGORITHM_ES256 = "ES256"  # RFC 7518 §3.4: ECDSA P-256 SHA-256, raw r || s
TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1
_ACCEPTED_TYPES = frozenset(("at+jwt", "application/at+jwt"))  # compared lower-cased
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key is at least the hash size
DEFAULT_TTL_SECONDS = 900
DEFAULT_MAX_TTL_SECONDS = 86400
DEFAULT_CLOCK_TOLERANCE_SECONDS = 30
DEFAULT_DPOP_ALGORITHMS = ("ES256", "EdDSA", "Ed25519")  # RFC 9449 §4.3 step 5: asymmetric only
DEFAULT_DPOP_WINDOW_SECONDS = 300  # a proof's iat may be this far from now (SEP-1932: ±5 minutes)
DPOP_PROOF_TYPE = "dpop+jwt"  # RFC 9449 §4.2
DEFAULT_MAX_TOKEN_BYTES = 8192
MAX_NAME_CHARS = 256  # subject and agent identifiers
DEFAULT_MAX_CHAIN_LENGTH = 4  # agents in a delegation chain, the root included
DEFAULT_VERIFY_CACHE_SIZE = 1024  # verified tokens remembered per instance (at most 8 KB each)
# -- the authorization server's (authorization_server_wsgi/asgi):
DEFAULT_CODE_TTL_SECONDS = 60  # an authorization code is used at once (OAuth 2.1 §4.1.2: short-lived)
DEFAULT_REFRESH_TOKEN_TTL_SECONDS = 30 * 86400  # a refresh token unused this long dies
DEFAULT_REFRESH_REUSE_GRACE_SECONDS = 30  # a rotated refresh token still works this long (concurrent refreshes)
DEFAULT_UNUSED_CLIENT_TTL_SECONDS = 86400  # a registration that never got a token is forgotten after a day
DEFAULT_MAX_REGISTRATIONS = 10000  # registrations waiting for their first token, per authorization server
DEFAULT_CLIENT_TTL_SECONDS = 90 * 86400  # a used registration, this long after its last token
_JTI_BYTES = 16  # 128 bits of randomness (RFC 7519 §4.1.7: collision-resistant)
_HEADER_CACHE_SIZE = 16  # distinct valid header segments remembered per instance
_REVOCATION_KINDS = ("jti", "agent", "subject")
#: Secrets that look long enough but are published examples: jwt.io's
#: samples and the ones this project's docs once showed. Compared lower-cased.
_KNOWN_EXAMPLE_SECRETS = frozenset((
    b"your-256-bit-secret",
    b"a-string-secret-at-least-256-bits-long",
    b"an-example-secret-of-at-least-32-bytes",
    b"agentauth-test-secret-0123456789-abcdefgh",
    b"integration-secret-with-at-least-32-bytes",
))
#: Words that mark a placeholder when a secret is made of plain words and numbers only.
_PLACEHOLDER_WORDS = frozenset((
    "secret", "example", "sample", "test", "testing", "demo", "dummy", "changeme",
    "password", "passwd", "placeholder", "insecure", "mysecret",
))
_SECRET_WORD_SEPARATORS = re.compile(rb"[-_. :/+]+")
_Refusal = Tuple[int, List[Tuple[str, str]], bytes]  # an HTTP refusal: status, headers, body
#: Keys derived from the signing key start their input with this: a NUL byte
#: never occurs in a JWS signing input (base64url and "."), so no derived key
#: is ever a token's signature.
_DERIVE_PREFIX = b"agentauth derived key\x00"

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class AgentAuthError(Exception):
    """Base class of every error agentauth raises on purpose.

    ``code`` is stable and safe to show to a client; the message is for
    server logs and never contains a token, a key or a signature.
    """

    code = "agentauth_error"


class TokenInvalidError(AgentAuthError):
    """The token is malformed, forged, or its claims do not hold."""

    code = "token_invalid"


class TokenExpiredError(TokenInvalidError):
    """The token's ``exp`` has passed (beyond the clock tolerance).

    ``expired_at`` is the token's ``exp``.
    """

    code = "token_expired"

    def __init__(self, message: str, *, expired_at: float) -> None:
        super().__init__(message)
        self.expired_at = expired_at


class RevokedError(TokenInvalidError):
    """The token was revoked, by itself, by its jti, or by agent/subject.

    ``jti`` names the refused token.
    """

    code = "token_revoked"

    def __init__(self, message: str, *, jti: str) -> None:
        super().__init__(message)
        self.jti = jti


class DPoPProofError(TokenInvalidError):
    """The request's DPoP proof (RFC 9449) is missing, malformed, forged, stale,
    replayed, or for another request, token or key.

    Middleware answers 401 ``invalid_dpop_proof`` with a ``DPoP`` challenge.
    """

    code = "invalid_dpop_proof"


class DPoPNonceError(DPoPProofError):
    """The server wants a fresh nonce in the proof (RFC 9449 §8).

    ``nonce`` is the one to use: middleware sends it in ``DPoP-Nonce``.
    """

    code = "use_dpop_nonce"

    def __init__(self, message: str, *, nonce: str) -> None:
        super().__init__(message)
        self.nonce = nonce


class MissingScopeError(AgentAuthError):
    """The token is valid but its grant does not cover a required scope.

    ``missing`` lists the required scopes the grant does not satisfy, for
    server logs; ``granted`` the token's own scopes (for a step-up
    challenge: the union to ask for). The message names no scope, so an
    agent cannot read off what to ask for.
    """

    code = "insufficient_scope"

    def __init__(self, *, missing: Tuple[str, ...], granted: Tuple[str, ...] = ()) -> None:
        super().__init__("the token's grant does not cover the required scopes")
        self.missing = missing
        self.granted = granted


class InvalidGrantError(AgentAuthError):
    """``issue()`` or ``delegate()`` was asked for a grant it must not mint.

    ``oauth_error`` is the RFC 6749 §5.2 error the token exchange endpoint
    answers with: "invalid_scope" for a scope problem, "invalid_grant" when
    ``require_grant`` finds no recorded grant, else "invalid_request".
    """

    code = "invalid_grant"

    def __init__(self, message: str, *, oauth_error: str = "invalid_request") -> None:
        super().__init__(message)
        self.oauth_error = oauth_error


class InvalidConfigError(AgentAuthError):
    """An ``AgentAuth`` or store was configured wrongly."""

    code = "invalid_config"


class StoreUnavailableError(AgentAuthError):
    """The revocation store could not answer; verify fails closed."""

    code = "store_unavailable"


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------

#: The whole compact JWS checked in one C-level match: three non-empty
#: base64url segments, no padding, no stray character (RFC 7515 §2, §7.1).
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
#: The last character of a segment whose length is 2 or 3 mod 4 carries unused
#: bits, which RFC 4648 §3.5 requires to be zero: only these characters do.
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_RFC6749_SCOPE = r"[\x21\x23-\x5b\x5d-\x7e]+"  # RFC 6749 §3.3 scope-token
_SCOPE_TOKEN = re.compile(_RFC6749_SCOPE)
_SCOPE_STRING = re.compile(rf"{_RFC6749_SCOPE}(?: {_RFC6749_SCOPE})*")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LOCATION = re.compile(r"[\x21-\x7e]+")  # RFC 3986 §2: a URI is printable ASCII, no space


def _b64encode(data: bytes) -> str:
    """Encode base64url without padding (RFC 7515 §2)."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def _b64decode(segment: str) -> bytes:
    """Decode one base64url segment already known to hold only its alphabet.

    Raises:
        ValueError: the length or the unused trailing bits are not canonical.
    """
    rest = len(segment) % 4
    if rest:
        if rest == 1 or segment[-1] not in _CANONICAL_LAST[rest]:
            raise ValueError("segment is not canonical base64url")
        segment += "=" * (4 - rest)
    return binascii.a2b_base64(segment.encode("ascii").translate(_FROM_URLSAFE))


def _reject_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: One decoder and one encoder for the whole module: json.loads/dumps with
#: keyword arguments would build a new one per call on the hot path.
_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
_JSON_SCAN = _JSON_DECODER.scan_once  # type: ignore[attr-defined]  # CPython sets it; typeshed omits it
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _json_object(data: bytes, what: str) -> Dict[str, Any]:
    """Parse strict JSON (no duplicate keys, no NaN/Infinity) into a dict.

    Raises:
        TokenInvalidError: anything but one JSON object.
    """
    try:
        text = data.decode("utf-8")
        try:
            obj, end = _JSON_SCAN(text, 0)  # the C scanner, without decode()'s Python layers
        except StopIteration:
            end = -1
        if end != len(text):  # surrounding white space, trailing data, or an error
            obj = _JSON_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise TokenInvalidError(f"token {what} is not valid JSON") from exc
    if type(obj) is not dict:
        raise TokenInvalidError(f"token {what} is not a JSON object")
    return obj


def _as_key(secret: Union[str, bytes], what: str) -> bytes:
    """Return the key bytes of a str (UTF-8) or bytes secret, at least 32 bytes."""
    if isinstance(secret, str):
        try:
            secret = secret.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidConfigError(f"{what} must be valid Unicode text") from exc
    if not isinstance(secret, bytes):
        raise InvalidConfigError(f"{what} must be str or bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidConfigError(
            f"{what} must be at least {MIN_SECRET_BYTES} bytes; make one with: python -m agentauth keygen"
        )
    weakness = _secret_weakness(secret)
    if weakness is not None:
        raise InvalidConfigError(
            f"{what} is easy to guess ({weakness}); make a random one with: python -m agentauth keygen"
        )
    return secret


def _secret_weakness(secret: bytes) -> Optional[str]:
    """Say why a long-enough secret is still guessable, or return None.

    An HS256 key is only as strong as the dictionary that cannot find it:
    32 bytes of "1234567890..." or a doc's example fall to a short word list.
    The rules catch published examples, short repeated patterns, runs such
    as "abcdef..." and passphrases made of placeholder words; a secret from
    ``python -m agentauth keygen`` or ``secrets.token_urlsafe(32)`` passes.
    """
    lowered = secret.lower()
    if lowered in _KNOWN_EXAMPLE_SECRETS:
        return "a published example secret"
    if len(set(secret)) < 8:
        return "fewer than 8 distinct characters"
    for period in range(1, len(secret) // 2 + 1):
        if secret[period:] == secret[:-period]:
            return "a repeated pattern"
    steps: Dict[int, int] = {}
    for before, after in zip(secret, secret[1:]):
        steps[after - before] = steps.get(after - before, 0) + 1
    if 2 * max(steps.values()) >= len(secret) - 1:
        return "mostly a run such as 'abcd' or '1234'"
    words = [word for word in _SECRET_WORD_SEPARATORS.split(lowered) if word]
    if all(word.isalpha() or word.isdigit() for word in words) and any(
        word.decode("ascii", "replace") in _PLACEHOLDER_WORDS for word in words
    ):
        return "placeholder words such as 'secret' or 'example'"
    return None


# ---------------------------------------------------------------------------
# JWS layer
# ---------------------------------------------------------------------------


def _split(token: Any, max_bytes: int) -> Tuple[str, str, str]:
    """Split a compact JWS into its three segments, refusing anything else."""
    if type(token) is not str:
        raise TokenInvalidError("token must be a string")
    if len(token) > max_bytes:  # before any parsing
        raise TokenInvalidError("token is longer than the size limit")
    if _COMPACT_JWS.fullmatch(token) is None:
        raise TokenInvalidError(_malformed_token_message(token))
    head, body, sig = token.split(".")
    return head, body, sig


def _malformed_token_message(token: str) -> str:
    """Say what is wrong with a string that is not a compact JWS, for the server's log."""
    if token[:7].lower() == "bearer " or token.lower() == "bearer":
        return "token starts with 'Bearer ': pass the token alone, without the Authorization scheme"
    if token != token.strip():
        return "token has white space around it: pass the token alone, stripped"
    return "token is not three base64url segments"


_HS256_ONLY = frozenset((ALGORITHM,))
_EDDSA_NAMES = frozenset((ALGORITHM_EDDSA, ALGORITHM_ED25519))  # RFC 9864 §2.2: one algorithm, two names


def _parse_header(head: str, algorithms: typing.AbstractSet[str] = _HS256_ONLY) -> Dict[str, Any]:
    """Decode and check a protected header: the signature layer's rules."""
    try:
        raw = _b64decode(head)
    except ValueError as exc:
        raise TokenInvalidError("token header is not canonical base64url") from exc
    header = _json_object(raw, "header")
    # RFC 8725 §3.1: the algorithm is pinned by the keys, never chosen by the
    # token; anything else ("none", "hs256", RS256...) is refused.
    alg = header.get("alg")
    if type(alg) is not str or alg not in algorithms:
        raise TokenInvalidError("token algorithm is not allowed")
    # RFC 7515 §4.1.11: we understand no extension, so any "crit" is refused.
    if "crit" in header:
        raise TokenInvalidError("token header has a critical extension")
    return header


def _decode_payload(body: str) -> bytes:
    try:
        return _b64decode(body)
    except ValueError as exc:
        raise TokenInvalidError("token payload is not canonical base64url") from exc


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"key must be bytes of at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2)")


def jws_sign(payload: bytes, key: bytes, header: Mapping[str, Any]) -> str:
    """Sign ``payload`` as a compact JWS with HS256 (RFC 7515 §7.1).

    ``header`` is merged into ``{"alg": "HS256"}``; it may not name another
    algorithm.

    Raises:
        ValueError: the key is shorter than 32 bytes or the header names
            another algorithm.
    """
    _check_key(key)
    if header.get("alg", ALGORITHM) != ALGORITHM:
        raise ValueError("jws_sign signs HS256 only")
    head = _b64encode(_JSON_ENCODER.encode({"alg": ALGORITHM, **header}).encode("utf-8"))
    signing_input = f"{head}.{_b64encode(payload)}"
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64encode(mac)}"


def jws_verify(token: str, key: bytes) -> Tuple[Dict[str, Any], bytes]:
    """Check a compact HS256 JWS and return its ``(header, payload)``.

    The structure, the header (``alg`` exactly "HS256", no ``crit``) and the
    signature are checked; the payload is returned as bytes, unread.

    Raises:
        TokenInvalidError: for any malformed or forged input.
        ValueError: the key is shorter than 32 bytes.

    Security: this is the signature layer only. It checks no claim: use
    ``AgentAuth.verify`` for tokens.
    """
    _check_key(key)
    head, body, sig = _split(token, DEFAULT_MAX_TOKEN_BYTES)
    header = _parse_header(head)
    signing_input = token[: len(head) + 1 + len(body)].encode("ascii")
    expected = _b64encode(hmac.new(key, signing_input, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, sig):
        raise TokenInvalidError("token signature does not match")
    return header, _decode_payload(body)


# ---------------------------------------------------------------------------
# Ed25519
# ---------------------------------------------------------------------------

#: Ed25519 (RFC 8032 §5.1), pure standard library.
#:
#: Points are handled as plain ints and tuples rather than objects because
#: attribute access and method calls dominate the cost of field arithmetic in
#: CPython. Internally a point is either extended homogeneous (X, Y, Z, T) with
#: x = X/Z, y = Y/Z, x*y = T/Z (RFC 8032 §5.1.4), or an affine "Niels" triple
#: (y + x, y - x, 2*d*x*y) so that adding it to an extended point costs seven
#: field multiplications.
#:
#: Scalar multiplication uses only fixed-base tables: for a point P, window i
#: (0 <= i < 32) index t holds (t - 128) * 256**i * P. A scalar s < 2**253 is
#: rewritten as s + 0x8080...80, whose 32 little-endian bytes t_i satisfy
#: s = sum((t_i - 128) * 256**i), so [s]P is 32 table additions and no
#: doublings. Signed digits halve the additions needed to build a table.
#:
#: The pure path is NOT constant-time: table indices and big-int operations
#: depend on secret scalars when signing. It is exact (decisions are strict and
#: deterministic), not hardened against timing side channels.

_Niels = Tuple[int, int, int]
_Table = List[List[_Niels]]

#: Field prime, group order and curve constant d = -121665/121666 (RFC 8032 §5.1).
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
#: sqrt(-1) = 2**((p - 1) / 4) mod p, used in decoding (RFC 8032 §5.1.3 step 3).
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
#: Base point B: y = 4/5, x even (RFC 8032 §5.1). Literals keep import cheap.
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_Y_MASK = (1 << 255) - 1
#: Adding 128 * 256**i for every window turns bytes into signed digits.
_DIGIT_BIAS = int.from_bytes(b"\x80" * 32, "little")

#: The canonical encodings of the eight points of order dividing 8 (the whole
#: torsion subgroup, which has order 8). Strict verification refuses them as A
#: and as R, a rule beyond RFC 8032 that libsodium also applies: with a
#: small-order A anyone can forge, and a small-order R lets a key holder make
#: signatures that cofactored and cofactorless verifiers judge differently.
#: Non-canonical encodings of these points fail the canonical-encoding rule
#: anyway, so listing canonical forms is enough.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    )
)


def _ed25519_bytes(data: bytes) -> bytes:
    # Accept any contiguous buffer but hash and compare exact bytes; a
    # bytearray would be unhashable in the caches and sets used below.
    return data if type(data) is bytes else bytes(memoryview(data))


def _ed25519_decode(encoded: bytes) -> Optional[Tuple[int, int]]:
    # Strict point decoding (RFC 8032 §5.1.3). Refuses y >= p and x == 0 with
    # the sign bit set, so every accepted point has exactly one encoding.
    if len(encoded) != 32:
        return None
    p = _P
    y = int.from_bytes(encoded, "little")
    sign = y >> 255
    y &= _Y_MASK
    if y >= p:
        return None
    u = (y * y - 1) % p
    v = (_D * y * y + 1) % p
    # x = u * v**3 * (u * v**7)**((p - 5) / 8), the candidate root of u/v.
    v3 = v * v % p * v % p
    x = u * v3 % p * pow(u * v3 % p * v3 % p * v % p, (p - 5) // 8, p) % p
    vxx = v * x % p * x % p
    if vxx != u:
        if vxx != p - u:
            return None
        x = x * _SQRT_M1 % p
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = p - x
    return x, y


@functools.lru_cache(maxsize=256)
def _ed25519_public_point(public: bytes) -> Optional[Tuple[int, int]]:
    # Memoised per key: decoding costs a modular exponentiation, and a verifier
    # or precheck sees the same few keys over and over.
    if public in _SMALL_ORDER:
        return None
    return _ed25519_decode(public)


def _ed25519_add(X: int, Y: int, Z: int, T: int, qp: int, qm: int, qt: int) -> Tuple[int, int, int, int]:
    # Extended point plus Niels point: RFC 8032 §5.1.4 with Z2 = 1, seven
    # multiplications. The formulas are complete (also for doubling). The
    # verify loop inlines this same body: the call would cost it about 5%.
    p = _P
    a = (Y - X) * qm % p
    b = (Y + X) * qp % p
    c = T * qt % p
    dd = Z + Z
    e = b - a
    f = dd - c
    g = dd + c
    h = b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _ed25519_table(x: int, y: int) -> _Table:
    # Window i, index t holds (t - 128) * 256**i * (x, y) as a Niels triple.
    p = _P
    d2 = _D2
    table: _Table = []
    for _ in range(32):
        qp = (y + x) % p
        qm = (y - x) % p
        qt = d2 * x % p * y % p
        X, Y, Z, T = x, y, 1, x * y % p
        ext = [(X, Y, Z)]
        # 2Q..128Q by mixed addition (RFC 8032 §5.1.4 with Z2 = 1); the
        # formulas are complete, so adding Q to itself is fine.
        for _ in range(127):
            X, Y, Z, T = _ed25519_add(X, Y, Z, T, qp, qm, qt)
            ext.append((X, Y, Z))
        # 256Q = 2 * 128Q by the doubling formulas of RFC 8032 §5.1.4; it is
        # the next window's Q.
        a = X * X % p
        b = Y * Y % p
        c = 2 * Z * Z % p
        h = a + b
        e = (h - (X + Y) * (X + Y)) % p
        g = a - b
        f = c + g
        ext.append((e * f % p, g * h % p, f * g % p))
        # Montgomery's trick: one inversion normalises the whole window.
        prefix = []
        acc = 1
        for pt in ext:
            prefix.append(acc)
            acc = acc * pt[2] % p
        inv = pow(acc, -1, p)
        affine: List[Tuple[int, int]] = [(0, 0)] * 129
        for j in range(128, -1, -1):
            X, Y, Z = ext[j]
            zi = inv * prefix[j] % p
            inv = inv * Z % p
            affine[j] = (X * zi % p, Y * zi % p)
        window: List[_Niels] = [(1, 1, 0)] * 256
        for j in range(128):
            ax, ay = affine[j]
            yp = (ay + ax) % p
            ym = (ay - ax) % p
            t2 = d2 * ax % p * ay % p
            if j < 127:
                window[129 + j] = (yp, ym, t2)
            # Negation maps (y + x, y - x, 2dxy) to (y - x, y + x, -2dxy).
            window[127 - j] = (ym, yp, (p - t2) % p)
        table.append(window)
        x, y = affine[128]
    return table


@functools.lru_cache(maxsize=None)
def _ed25519_base_table() -> _Table:
    # Built on first use (32 windows of 256 entries), never at import time.
    return _ed25519_table(_BX, _BY)


def _ed25519_mul_encode(scalar: int, table: _Table) -> bytes:
    # [scalar]P from P's table, then the encoding of RFC 8032 §5.1.2.
    # scalar must be below 2**253; callers reduce modulo L first.
    p = _P
    X, Y, Z, T = 0, 1, 1, 0
    for window, t in zip(table, (scalar + _DIGIT_BIAS).to_bytes(32, "little")):
        X, Y, Z, T = _ed25519_add(X, Y, Z, T, *window[t])
    zi = pow(Z, -1, p)
    x = X * zi % p
    return ((Y * zi % p) | ((x & 1) << 255)).to_bytes(32, "little")


def _ed25519_expand(seed: bytes) -> Tuple[int, bytes]:
    # RFC 8032 §5.1.5: hash the seed, prune the low half into the scalar s,
    # keep the high half as the nonce prefix.
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed must be 32 bytes")
    digest = hashlib.sha512(seed).digest()
    s = int.from_bytes(digest[:32], "little")
    s = (s & ((1 << 254) - 8)) | (1 << 254)
    # B has prime order L, so s mod L gives the same point and signature and
    # fits the 253-bit limit of the signed-digit tables.
    return s % _L, digest[32:]


def _ed25519_public_key(seed: bytes) -> bytes:
    scalar, _ = _ed25519_expand(_ed25519_bytes(seed))
    return _ed25519_mul_encode(scalar, _ed25519_base_table())


def _ed25519_split(signature: bytes) -> Optional[Tuple[bytes, int, int]]:
    # The signature rules shared by the pure verifier and the precheck, so the
    # two paths cannot drift apart. Returns (R, y of R, S) or None.
    if len(signature) != 64:
        return None
    r = signature[:32]
    s = int.from_bytes(signature[32:], "little")
    # S must be below L (RFC 8032 §5.1.7 step 1); otherwise S + L is a second
    # valid signature for the same message. It also keeps S within the
    # 253-bit range of the signed-digit tables.
    if s >= _L or r in _SMALL_ORDER:
        return None
    y = int.from_bytes(r, "little")
    sign = y >> 255
    y &= _Y_MASK
    # Canonical R: y < p, and no sign bit when x == 0, which holds exactly
    # when y is 1 or p - 1 (RFC 8032 §5.1.3 steps 1 and 4).
    if y >= _P or (sign and (y == 1 or y == _P - 1)):
        return None
    return r, y, s


def _ed25519_precheck(public: bytes, signature: bytes) -> bool:
    # Every strictness rule of _Ed25519Verifier.verify except the group
    # equation. R being on the curve is left to the equation on both paths:
    # this module and OpenSSL both compare the canonical encoding of
    # [S]B - [k]A with R, and that encoding is always of a curve point, so a
    # separate check (a square root, about 90 us) would never change a
    # decision. A caller may run this, then the cryptography package's
    # Ed25519 verify, and reach the same decisions as the pure verifier.
    try:
        public = _ed25519_bytes(public)
        signature = _ed25519_bytes(signature)
    except TypeError:
        return False
    return _ed25519_split(signature) is not None and _ed25519_public_point(public) is not None


class _Ed25519Signer:
    """Deterministic Ed25519 signing (RFC 8032 §5.1.6) from a 32-byte seed."""

    __slots__ = ("public", "_scalar", "_prefix", "_table")

    def __init__(self, seed: bytes) -> None:
        self._scalar, self._prefix = _ed25519_expand(_ed25519_bytes(seed))
        self._table = _ed25519_base_table()
        self.public: bytes = _ed25519_mul_encode(self._scalar, self._table)

    def sign(self, message: bytes) -> bytes:
        # Not constant-time (see the module comment at the top of this block).
        sha512 = hashlib.sha512
        r = int.from_bytes(sha512(self._prefix + message).digest(), "little") % _L
        big_r = _ed25519_mul_encode(r, self._table)
        k = int.from_bytes(sha512(big_r + self.public + message).digest(), "little") % _L
        return big_r + ((r + k * self._scalar) % _L).to_bytes(32, "little")


class _KeyTables:
    """The precomputed tables of the public keys verified most, at most ``size`` of them.

    A key earns a table on its second verify, so a flood of one-off keys
    (DPoP proofs from new agents) builds none. When the cache is full, the
    least recently used table gives way only to a key used more often than
    its own; otherwise the newcomer is verified without a table, and the old
    key's count is halved, so a key gone quiet ages out. More busy keys than
    tables therefore cost some of them the table-less path, never a rebuild
    per verify. Thread-safe; a table is built outside the lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._tables: Dict[Any, Tuple[Any, Any]] = {}  # point -> (verifier, table), in LRU order
        self._lock = threading.Lock()

    def get(self, point: Any, verifier: Any, build: Callable[[], Any]) -> Any:
        """Return the table of ``point`` (whose ``verifier`` counts its ``uses``), building it if earned; else None."""
        with self._lock:
            entry = self._tables.pop(point, None)
            if entry is not None:
                self._tables[point] = entry  # now the most recently used
                return entry[1]
            if verifier.uses < 2 or self.size < 1:
                return None
            if len(self._tables) >= self.size:
                oldest = next(iter(self._tables.values()))[0]
                if oldest.uses >= verifier.uses:
                    oldest.uses //= 2
                    return None
        table = build()
        with self._lock:
            while len(self._tables) >= self.size:
                del self._tables[next(iter(self._tables))]
            self._tables[point] = (verifier, table)
        return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


_ED25519_TABLES = _KeyTables(8)  # about 1.6 MB each


def _ed25519_double(X: int, Y: int, Z: int) -> Tuple[int, int, int, int]:
    # Doubling in extended coordinates (RFC 8032 §5.1.4), T not needed.
    p = _P
    a = X * X % p
    b = Y * Y % p
    c = 2 * Z * Z % p
    h = a + b
    e = (h - (X + Y) * (X + Y)) % p
    g = a - b
    f = c + g
    return e * f % p, g * h % p, f * g % p, e * h % p


def _ed25519_mul_window(scalar: int, x: int, y: int) -> Tuple[int, int, int, int]:
    # [scalar](x, y) by a width-5 sliding window: about 252 doublings and 50
    # additions of Niels odd multiples; for keys not worth a table. The
    # formulas are complete, so no case needs special handling.
    p = _P
    d2 = _D2
    X, Y, Z, T = _ed25519_double(x, y, 1)
    zi = pow(Z, -1, p)
    dx, dy = X * zi % p, Y * zi % p
    double = ((dy + dx) % p, (dy - dx) % p, d2 * dx % p * dy % p)
    odd = [(x, y, 1, x * y % p)]
    for _ in range(15):
        odd.append(_ed25519_add(*odd[-1], *double))
    prefix, acc = [], 1
    for point in odd:
        prefix.append(acc)
        acc = acc * point[2] % p
    inv = pow(acc, -1, p)
    niels: List[_Niels] = [(1, 1, 0)] * len(odd)
    for j in range(len(odd) - 1, -1, -1):
        X, Y, Z, _T = odd[j]
        zi = inv * prefix[j] % p
        inv = inv * Z % p
        ax, ay = X * zi % p, Y * zi % p
        niels[j] = ((ay + ax) % p, (ay - ax) % p, d2 * ax % p * ay % p)
    X, Y, Z, T = 0, 1, 1, 0
    i = scalar.bit_length() - 1
    while i >= 0:
        if not (scalar >> i) & 1:
            X, Y, Z, T = _ed25519_double(X, Y, Z)
            i -= 1
            continue
        low = max(i - 4, 0)
        while not (scalar >> low) & 1:
            low += 1
        for _ in range(i - low + 1):
            X, Y, Z, T = _ed25519_double(X, Y, Z)
        X, Y, Z, T = _ed25519_add(X, Y, Z, T, *niels[((scalar >> low) & ((1 << (i - low + 1)) - 1)) >> 1])
        i = low - 1
    return X, Y, Z, T


class _Ed25519Verifier:
    """Strict cofactorless Ed25519 verification against one public key.

    ``uses`` counts its verifies: a key used again earns a table of -A
    (``_ED25519_TABLES``); a key seen once is multiplied without one.
    """

    __slots__ = ("public", "uses", "_neg_x", "_y", "_b_table")

    def __init__(self, public: bytes) -> None:
        public = _ed25519_bytes(public)
        point = _ed25519_public_point(public)
        if point is None:
            raise ValueError(
                "not a valid Ed25519 public key: it must be the 32-byte canonical "
                "encoding of a curve point that is not of small order (RFC 8032 §5.1.3)"
            )
        x, y = point
        self.public: bytes = public
        self.uses = 0
        # -A, so one pass computes [S]B + [k](-A).
        self._neg_x, self._y = (_P - x) % _P, y
        self._b_table = _ed25519_base_table()

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            signature = _ed25519_bytes(signature)
            parts = _ed25519_split(signature)
            if parts is None:
                return False
            r, ry, s = parts
            # k = SHA-512(R || A || M) reduced mod L (RFC 8032 §5.1.7 step 2).
            # Reducing matches OpenSSL and libsodium. It only changes decisions
            # for mixed-order keys (prime-order point plus torsion), which the
            # rules above accept.
            digest = hashlib.sha512(r + self.public + message).digest()
        except TypeError:
            return False
        k = int.from_bytes(digest, "little") % _L
        p = _P
        self.uses += 1
        a_table = _ED25519_TABLES.get(self.public, self, self._build_table)
        if a_table is None:
            X, Y, Z, T = _ed25519_mul_window(k, self._neg_x, self._y)
            for window, t in zip(self._b_table, (s + _DIGIT_BIAS).to_bytes(32, "little")):
                X, Y, Z, T = _ed25519_add(X, Y, Z, T, *window[t])
            return self._equals_r(X, Y, Z, r, ry)
        X, Y, Z, T = 0, 1, 1, 0
        # [S]B + [k](-A): 64 mixed additions (RFC 8032 §5.1.4), no doublings;
        # the body of _ed25519_add, inlined: this is the hot loop.
        for bw, aw, bt, at in zip(
            self._b_table,
            a_table,
            (s + _DIGIT_BIAS).to_bytes(32, "little"),
            (k + _DIGIT_BIAS).to_bytes(32, "little"),
        ):
            qp, qm, qt = bw[bt]
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            c = T * qt % p
            dd = Z + Z
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            T = e * h % p
            qp, qm, qt = aw[at]
            a = (Y - X) * qm % p
            b = (Y + X) * qp % p
            c = T * qt % p
            dd = Z + Z
            e = b - a
            f = dd - c
            g = dd + c
            h = b + a
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            T = e * h % p
        return self._equals_r(X, Y, Z, r, ry)

    def _build_table(self) -> _Table:
        return _ed25519_table(self._neg_x, self._y)

    @staticmethod
    def _equals_r(X: int, Y: int, Z: int, r: bytes, ry: int) -> bool:
        # Cofactorless check [S]B - [k]A == R, which RFC 8032 §5.1.7 step 3
        # permits instead of the cofactored one and which OpenSSL uses. R is
        # canonical, so this equals comparing encodings (§5.1.2): y
        # projectively first, refusing most forgeries without an inversion,
        # then the sign of x.
        p = _P
        if (Y - ry * Z) % p:
            return False
        x = X * pow(Z, -1, p) % p
        return x & 1 == r[31] >> 7


def _ed25519_public_ok(public: bytes) -> bool:
    """Tell whether 32 bytes encode a usable Ed25519 public key (canonical, on the curve, not small-order)."""
    return _ed25519_public_point(public) is not None


# ---------------------------------------------------------------------------
# P-256
# ---------------------------------------------------------------------------

#: ECDSA over NIST P-256 with SHA-256 (FIPS 186-5 §6.4, SEC 1 §4.1), pure
#: standard library: what JOSE calls ES256 (RFC 7518 §3.4).
#:
#: Points are plain ints and tuples, as for Ed25519. Internally a point is
#: Jacobian (X, Y, Z) with x = X/Z**2, y = Y/Z**3 and Z == 0 for the point at
#: infinity, or affine (x, y) in tables.
#:
#: Scalar multiplication by a fixed point P uses a table: window i
#: (0 <= i < 33) index t holds (t - 128) * 256**i * P (None for t == 128, the
#: identity). A scalar below 2**256 plus 0x8080...80 (33 bytes) gives the
#: signed digits t_i - 128, so [s]P is at most 33 mixed additions and no
#: doubling. G's table is built on first use; a public key's table is built
#: the second time the key verifies, and kept in a bounded cache (about 0.7 MB
#: each). A key seen once is multiplied by a width-5 sliding window instead.
#:
#: The pure path is NOT constant-time: signing leaks timing that depends on
#: the nonce and the private key. Verification handles public data only.

_P256Table = List[List[Optional[Tuple[int, int]]]]

#: Curve parameters (FIPS 186-5 / SEC 2 §2.4.2): y**2 = x**3 - 3x + b over GF(p), order n, cofactor 1.
_P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
_P256_GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
_P256_BIAS = int.from_bytes(b"\x80" * 33, "little")  # turns 33 bytes into signed digits
_P256_KEY_TABLES = 16  # public keys whose table is kept (LRU), about 0.7 MB each
_P256_KEYS_SEEN = 1024  # public keys whose use count is kept (LRU), to tell a known key


def _p256_on_curve(x: int, y: int) -> bool:
    p = _P256_P
    return 0 <= x < p and 0 <= y < p and (y * y - (x * x * x - 3 * x + _P256_B)) % p == 0


def _p256_double(X: int, Y: int, Z: int) -> Tuple[int, int, int]:
    # Jacobian doubling with a = -3 ("dbl-2001-b", 3M + 5S); [2]O = O, and a
    # point with y == 0 does not exist on P-256 (odd order).
    p = _P256_P
    if Z == 0:
        return 0, 1, 0
    delta = Z * Z % p
    gamma = Y * Y % p
    beta = X * gamma % p
    alpha = 3 * (X - delta) * (X + delta) % p
    X3 = (alpha * alpha - 8 * beta) % p
    Z3 = ((Y + Z) * (Y + Z) - gamma - delta) % p
    Y3 = (alpha * (4 * beta - X3) - 8 * gamma * gamma) % p
    return X3, Y3, Z3


def _p256_add(X: int, Y: int, Z: int, x2: int, y2: int) -> Tuple[int, int, int]:
    # Jacobian plus affine ("madd-2004-hmv", 8M + 3S), with the exceptional
    # cases handled: either operand the identity, P + P, and P + (-P).
    p = _P256_P
    if Z == 0:
        return x2, y2, 1
    zz = Z * Z % p
    h = (x2 * zz - X) % p
    r = (y2 * zz % p * Z - Y) % p
    if h == 0:
        if r == 0:
            return _p256_double(X, Y, Z)
        return 0, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = X * hh % p
    X3 = (r * r - hhh - 2 * v) % p
    return X3, (r * (v - X3) - Y * hhh) % p, Z * h % p


def _p256_add_jacobian(X1: int, Y1: int, Z1: int, X2: int, Y2: int, Z2: int) -> Tuple[int, int, int]:
    # General Jacobian addition ("add-2007-bl" without its shortcuts), exceptional cases handled.
    p = _P256_P
    if Z1 == 0:
        return X2, Y2, Z2
    if Z2 == 0:
        return X1, Y1, Z1
    z1z1 = Z1 * Z1 % p
    z2z2 = Z2 * Z2 % p
    u1 = X1 * z2z2 % p
    u2 = X2 * z1z1 % p
    s1 = Y1 * Z2 % p * z2z2 % p
    s2 = Y2 * Z1 % p * z1z1 % p
    h = (u2 - u1) % p
    r = (s2 - s1) % p
    if h == 0:
        if r == 0:
            return _p256_double(X1, Y1, Z1)
        return 0, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    X3 = (r * r - hhh - 2 * v) % p
    return X3, (r * (v - X3) - s1 * hhh) % p, Z1 * Z2 % p * h % p


def _p256_normalize(points: List[Tuple[int, int, int]]) -> List[Optional[Tuple[int, int]]]:
    # Jacobian to affine with one inversion for the whole list (Montgomery's
    # trick); the identity becomes None.
    p = _P256_P
    prefix = []
    acc = 1
    for _X, _Y, Z in points:
        prefix.append(acc)
        if Z:
            acc = acc * Z % p
    inv = pow(acc, -1, p)
    out: List[Optional[Tuple[int, int]]] = [None] * len(points)
    for j in range(len(points) - 1, -1, -1):
        X, Y, Z = points[j]
        if not Z:
            continue
        zi = inv * prefix[j] % p
        inv = inv * Z % p
        zi2 = zi * zi % p
        out[j] = (X * zi2 % p, Y * zi2 % p * zi % p)
    return out


def _p256_table(x: int, y: int) -> _P256Table:
    # Window i, index t holds (t - 128) * 256**i * (x, y), affine; None at t == 128.
    #
    # Built in affine coordinates, batch by batch, with one inversion per
    # batch (Montgomery's trick): first the 33 window bases 256**i * P (by
    # Jacobian doublings), then in every window at once the multiples
    # m + 1 .. 2m from 1 .. m, for m = 1, 2, 4, ... 64. Each new point is
    # j*Q + m*Q (a doubling when j == m); as the group order is a prime far
    # above 256, no sum meets the identity or an unplanned doubling.
    p = _P256_P
    bases = [(x, y, 1)]
    for _ in range(32):
        X, Y, Z = bases[-1]
        for _ in range(8):
            X, Y, Z = _p256_double(X, Y, Z)
        bases.append((X, Y, Z))
    windows = [[point] for point in typing.cast(List[Tuple[int, int]], _p256_normalize(bases))]
    m = 1
    while m < 128:
        pairs = [(multiples[j], multiples[m - 1]) for multiples in windows for j in range(m)]
        # lambda = (y2 - y1) / (x2 - x1), or (3x**2 - 3) / 2y for a doubling (a = -3).
        numerators, denominators = [], []
        for (x1, y1), (x2, y2) in pairs:
            if x1 == x2:
                numerators.append(3 * (x1 * x1 - 1))
                denominators.append(2 * y1)
            else:
                numerators.append(y2 - y1)
                denominators.append(x2 - x1)
        prefix, acc = [], 1
        for d in denominators:
            prefix.append(acc)
            acc = acc * d % p
        inv = pow(acc, -1, p)
        sums: List[Tuple[int, int]] = [(0, 0)] * len(pairs)
        for k in range(len(pairs) - 1, -1, -1):
            lam = numerators[k] * (inv * prefix[k] % p) % p
            inv = inv * denominators[k] % p
            (x1, y1), (x2, _y2) = pairs[k]
            x3 = (lam * lam - x1 - x2) % p
            sums[k] = (x3, (lam * (x1 - x3) - y1) % p)
        for i, multiples in enumerate(windows):
            multiples.extend(sums[i * m : (i + 1) * m])
        m *= 2
    table: _P256Table = []
    for multiples in windows:  # multiples[j] is (j + 1) * 256**i * P
        window: List[Optional[Tuple[int, int]]] = [None] * 256
        for j, (ax, ay) in enumerate(multiples):
            if j < 127:  # +128 is not a digit
                window[129 + j] = (ax, ay)
            window[127 - j] = (ax, (p - ay) % p)
        table.append(window)
    return table


@functools.lru_cache(maxsize=None)
def _p256_base_table() -> _P256Table:
    # Built on first use (33 windows of 256 entries), never at import time.
    return _p256_table(_P256_GX, _P256_GY)


def _p256_mul_table(scalar: int, table: _P256Table, X: int = 0, Y: int = 1, Z: int = 0) -> Tuple[int, int, int]:
    # (X, Y, Z) + [scalar]P from P's table; scalar must be below 2**256.
    for window, t in zip(table, (scalar + _P256_BIAS).to_bytes(33, "little")):
        point = window[t]
        if point is not None:
            X, Y, Z = _p256_add(X, Y, Z, *point)
    return X, Y, Z


def _p256_mul2_tables(u1: int, table1: _P256Table, u2: int, table2: _P256Table) -> Tuple[int, int, int]:
    # [u1]P1 + [u2]P2 from both tables in one pass: the verify hot loop, with
    # the body of _p256_add inlined (the call would cost it about 15%); its
    # exceptional cases (the identity, a doubling) go to _p256_add itself.
    p = _P256_P
    X, Y, Z = 0, 1, 0
    for w1, w2, t1, t2 in zip(
        table1, table2, (u1 + _P256_BIAS).to_bytes(33, "little"), (u2 + _P256_BIAS).to_bytes(33, "little")
    ):
        for point in (w1[t1], w2[t2]):
            if point is None:
                continue
            x2, y2 = point
            if Z:
                zz = Z * Z % p
                h = (x2 * zz - X) % p
                if h:
                    r = (y2 * zz % p * Z - Y) % p
                    hh = h * h % p
                    hhh = h * hh % p
                    v = X * hh % p
                    X = (r * r - hhh - 2 * v) % p
                    Y = (r * (v - X) - Y * hhh) % p
                    Z = Z * h % p
                    continue
            X, Y, Z = _p256_add(X, Y, Z, x2, y2)
    return X, Y, Z


def _p256_mul_window(scalar: int, x: int, y: int) -> Tuple[int, int, int]:
    # [scalar](x, y) by a width-5 sliding window: 255 doublings and about 50
    # additions, after 16 odd multiples; for keys not worth a table.
    dbl = _p256_double(x, y, 1)
    odd = [(x, y, 1)]
    for _ in range(15):
        odd.append(_p256_add_jacobian(*odd[-1], *dbl))
    affine = _p256_normalize(odd)
    X, Y, Z = 0, 1, 0
    i = scalar.bit_length() - 1
    while i >= 0:
        if not (scalar >> i) & 1:
            X, Y, Z = _p256_double(X, Y, Z)
            i -= 1
            continue
        low = max(i - 4, 0)
        while not (scalar >> low) & 1:
            low += 1
        digit = (scalar >> low) & ((1 << (i - low + 1)) - 1)
        for _ in range(i - low + 1):
            X, Y, Z = _p256_double(X, Y, Z)
        point = affine[digit >> 1]
        if point is not None:
            X, Y, Z = _p256_add(X, Y, Z, *point)
        i = low - 1
    return X, Y, Z


def _p256_affine(X: int, Y: int, Z: int) -> Optional[Tuple[int, int]]:
    if Z == 0:
        return None
    p = _P256_P
    zi = pow(Z, -1, p)
    zi2 = zi * zi % p
    return X * zi2 % p, Y * zi2 % p * zi % p


def _p256_split(signature: bytes) -> Optional[Tuple[int, int]]:
    # RFC 7518 §3.4: exactly 64 bytes, r then s, big-endian; FIPS 186-5
    # §6.4.2 step 1: 0 < r, s < n. Shared by both backends.
    if len(signature) != 64:
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < _P256_N and 0 < s < _P256_N):
        return None
    return r, s


class _P256Verifier:
    """ECDSA P-256 SHA-256 verification against one public point (FIPS 186-5 §6.4.2)."""

    __slots__ = ("x", "y", "uses")

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y
        self.uses = 0

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            parts = _p256_split(_ed25519_bytes(signature))
            digest = hashlib.sha256(message).digest()
        except TypeError:
            return False
        if parts is None:
            return False
        r, s = parts
        n = _P256_N
        w = pow(s, -1, n)
        u1 = int.from_bytes(digest, "big") * w % n
        u2 = r * w % n
        self.uses += 1
        table = _P256_TABLES.get((self.x, self.y), self, lambda: _p256_table(self.x, self.y))
        if table is None:
            X, Y, Z = _p256_mul_window(u2, self.x, self.y)
            X, Y, Z = _p256_mul_table(u1, _p256_base_table(), X, Y, Z)
        else:
            X, Y, Z = _p256_mul2_tables(u1, _p256_base_table(), u2, table)
        if Z == 0:  # R is the point at infinity (step 5)
            return False
        # x(R) mod n == r, without an inversion: x(R) = X / Z**2 is below p,
        # so x(R) mod n is r exactly when x(R) is r or r + n (p > n).
        p = _P256_P
        zz = Z * Z % p
        if (r * zz - X) % p == 0:
            return True
        return r + n < p and ((r + n) * zz - X) % p == 0


@functools.lru_cache(maxsize=_P256_KEYS_SEEN)
def _p256_verifier(x: int, y: int) -> _P256Verifier:
    """One verifier per public point, shared by every key object of it: it counts the point's uses."""
    return _P256Verifier(x, y)


_P256_TABLES = _KeyTables(_P256_KEY_TABLES)  # about 0.7 MB each


class _P256Signer:
    """ECDSA P-256 SHA-256 signing with a random nonce (FIPS 186-5 §6.4.1)."""

    __slots__ = ("_d",)

    def __init__(self, d: int) -> None:
        self._d = d

    def sign(self, message: bytes) -> bytes:
        # Not constant-time (see the comment at the top of this block).
        n = _P256_N
        e = int.from_bytes(hashlib.sha256(message).digest(), "big")
        while True:
            k = secrets.randbelow(n - 1) + 1
            point = _p256_affine(*_p256_mul_table(k, _p256_base_table()))
            if point is None:
                continue
            r = point[0] % n
            s = pow(k, -1, n) * (e + r * self._d) % n
            if r and s:
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _p256_public_point(d: int) -> Tuple[int, int]:
    return typing.cast(Tuple[int, int], _p256_affine(*_p256_mul_table(d, _p256_base_table())))


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


class _HmacKey:
    """One HS256 key, prepared once: ``hmac.copy()`` skips the key schedule."""

    __slots__ = ("kid", "alg", "_mac")
    algs = _HS256_ONLY  # the algorithm names this key verifies

    def __init__(self, secret: bytes, kid: Optional[str]) -> None:
        self.kid = kid
        self.alg = ALGORITHM  # the key is bound to its algorithm
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def sign(self, signing_input: bytes) -> str:
        mac = self._mac.copy()
        mac.update(signing_input)
        return _b64encode(mac.digest())

    def verify(self, signing_input: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(signing_input), signature)

    def derive(self, label: bytes) -> bytes:
        """HMAC-SHA256 of the secret over ``_DERIVE_PREFIX + label``; never a JWS signature (no NUL in those)."""
        mac = self._mac.copy()
        mac.update(_DERIVE_PREFIX + label)
        return mac.digest()

    def __repr__(self) -> str:
        return f"<_HmacKey kid={self.kid!r}>"


#: RFC 8410: DER of an Ed25519 SubjectPublicKeyInfo (§4) and of a version-1
#: PKCS#8 OneAsymmetricKey (§7), each before its 32 key bytes.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END \1-----")


@functools.lru_cache(maxsize=None)
def _crypto_ed25519() -> Any:
    """Return the ``cryptography`` package's Ed25519 module if it has what we use, else None.

    Checked once, on the first Ed25519 key, never at import time. A
    ``cryptography`` older than 40 (Debian 12's python3-cryptography is 38)
    lacks ``public_bytes_raw``: such a version is left alone and the pure
    path does the work, rather than every EdDSA operation crashing.
    """
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        return None
    if not isinstance(getattr(exceptions, "InvalidSignature", None), type):  # the verifier catches it
        return None
    needed = (
        (ed25519.Ed25519PrivateKey, "from_private_bytes"),
        (ed25519.Ed25519PublicKey, "from_public_bytes"),
        (ed25519.Ed25519PublicKey, "public_bytes_raw"),
    )
    if not all(callable(getattr(cls, name, None)) for cls, name in needed):
        return None
    return ed25519


class Ed25519Key:
    """An Ed25519 key (RFC 8032): private (signs and verifies) or public only (verifies).

    Build one with ``generate()``, ``from_seed()``, ``from_public_bytes()``,
    ``from_pem()`` (PKCS#8 or SubjectPublicKeyInfo, as ``openssl genpkey
    -algorithm ed25519`` writes them) or ``from_jwk()`` (RFC 8037).

    The ``cryptography`` package does the arithmetic when it is importable
    (``backend == "cryptography"``); otherwise this module's own
    implementation does (``"pure"``). Both apply the same strict checks.

    Security: the pure-Python signer is not constant-time; on a host where
    an attacker can time signing, install ``cryptography``. Verification
    handles only public data. A key's repr never shows private material.

    Raises:
        InvalidConfigError: malformed, wrong-length or weak (small-order) key material.
    """

    __slots__ = ("public_bytes", "backend", "_seed", "_signer", "_verifier")

    def __init__(self, seed: Optional[bytes], public_bytes: bytes) -> None:
        """Use the ``from_*`` constructors; this one trusts its arguments."""
        self._seed = seed
        self.public_bytes = public_bytes
        self.backend = "pure" if _crypto_ed25519() is None else "cryptography"
        self._signer: Any = None
        self._verifier: Any = None

    @classmethod
    def generate(cls) -> "Ed25519Key":
        """Return a new random private key."""
        return cls.from_seed(secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> "Ed25519Key":
        """Return the private key of a 32-byte seed (RFC 8032 §5.1.5)."""
        if type(seed) is not bytes or len(seed) != 32:
            raise InvalidConfigError("an Ed25519 seed is 32 bytes")
        crypto = _crypto_ed25519()
        if crypto is None:
            signer = _Ed25519Signer(seed)
            public = signer.public
        else:
            signer = crypto.Ed25519PrivateKey.from_private_bytes(seed)
            public = signer.public_key().public_bytes_raw()
        key = cls(seed, public)
        key._signer = signer
        return key

    @classmethod
    def from_public_bytes(cls, public: bytes) -> "Ed25519Key":
        """Return the public key of its 32-byte encoding (RFC 8032 §5.1.2).

        Raises:
            InvalidConfigError: not 32 bytes, not a canonical encoding of a
                curve point, or a point of small order (which would accept forgeries).
        """
        if type(public) is not bytes or len(public) != 32 or not _ed25519_public_ok(public):
            raise InvalidConfigError("not a valid Ed25519 public key")
        return cls(None, public)

    @classmethod
    def from_pem(cls, text: Union[str, bytes]) -> "Ed25519Key":
        """Read a PEM PKCS#8 private key or SubjectPublicKeyInfo public key (RFC 8410)."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        blocks = list(_PEM.finditer(text)) if isinstance(text, str) else []
        if len(blocks) != 1:
            raise InvalidConfigError("expected exactly one PEM block")
        match = blocks[0]
        try:
            der = binascii.a2b_base64(match.group(2).encode("ascii"))
        except binascii.Error as exc:
            raise InvalidConfigError("the PEM block is not base64") from exc
        if match.group(1) == "PRIVATE KEY" and len(der) == 48 and der.startswith(_PKCS8_PREFIX):
            return cls.from_seed(der[16:])
        if match.group(1) == "PUBLIC KEY" and len(der) == 44 and der.startswith(_SPKI_PREFIX):
            return cls.from_public_bytes(der[12:])
        raise InvalidConfigError("not an Ed25519 PKCS#8 private key or SubjectPublicKeyInfo public key")

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> "Ed25519Key":
        """Read an RFC 8037 OKP JWK: private when it has "d", public otherwise."""
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise InvalidConfigError('not an Ed25519 JWK (kty "OKP", crv "Ed25519")')
        try:
            public = _b64decode_checked(jwk.get("x"))
            private = None if "d" not in jwk else _b64decode_checked(jwk.get("d"))
        except ValueError as exc:
            raise InvalidConfigError("the JWK's x or d is not base64url") from exc
        if private is None:
            return cls.from_public_bytes(public)
        key = cls.from_seed(private)
        if not hmac.compare_digest(key.public_bytes, public):
            raise InvalidConfigError("the JWK's x does not belong to its d")
        return key

    @property
    def is_private(self) -> bool:
        """True when this key can sign."""
        return self._seed is not None

    def public_key(self) -> "Ed25519Key":
        """Return this key without its private part."""
        return Ed25519Key(None, self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``.

        Raises:
            InvalidConfigError: a public key cannot sign.
        """
        if self._signer is None:
            raise InvalidConfigError("a public Ed25519 key cannot sign")
        return bytes(self._signer.sign(message))

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Tell whether ``signature`` is a valid, canonical signature of ``message``.

        Strict on both backends (RFC 8032 §5.1.7 plus): S < L, canonical and
        not small-order R, the cofactorless equation. Never raises.
        """
        verifier = self._verifier
        if verifier is None:
            verifier = self._verifier = self._make_verifier()
        return verifier(message, signature)

    def _make_verifier(self) -> Callable[[bytes, bytes], bool]:
        crypto = _crypto_ed25519()
        public = self.public_bytes
        if crypto is None:
            return _pure_verifier(public).verify
        crypto_key = crypto.Ed25519PublicKey.from_public_bytes(public)
        from cryptography.exceptions import InvalidSignature

        def verify(message: bytes, signature: bytes) -> bool:
            # The same strictness as the pure path first: OpenSSL alone
            # accepts small-order R.
            if not _ed25519_precheck(public, signature):
                return False
            try:
                crypto_key.verify(signature, message)
            except (InvalidSignature, TypeError, ValueError):  # never raises, like the pure path
                return False
            return True

        return verify

    def private_pem(self) -> str:
        """Return the private key as PEM PKCS#8 (RFC 8410 §7), as ``openssl`` writes it."""
        if self._seed is None:
            raise InvalidConfigError("a public Ed25519 key has no private part")
        return _pem("PRIVATE KEY", _PKCS8_PREFIX + self._seed)

    def public_pem(self) -> str:
        """Return the public key as PEM SubjectPublicKeyInfo (RFC 8410 §4)."""
        return _pem("PUBLIC KEY", _SPKI_PREFIX + self.public_bytes)

    def public_jwk(self, kid: Optional[str] = None, *, alg: str = ALGORITHM_EDDSA) -> Dict[str, Any]:
        """Return the public key as an RFC 8037 JWK for a JWKS (``use`` sig, ``alg`` EdDSA).

        ``alg="Ed25519"`` names the algorithm as RFC 9864 §2.2 does; older
        readers (PyJWT) know only "EdDSA".
        """
        if alg not in _EDDSA_NAMES:
            raise InvalidConfigError('alg must be "EdDSA" or "Ed25519"')
        jwk: Dict[str, Any] = {"kty": "OKP", "crv": "Ed25519", "x": _b64encode(self.public_bytes)}
        if kid is not None:
            jwk["kid"] = kid
        jwk.update(use="sig", alg=alg)
        return jwk

    def private_jwk(self, kid: Optional[str] = None) -> Dict[str, Any]:
        """Return the private key as an RFC 8037 JWK (with "d"): keep it secret."""
        if self._seed is None:
            raise InvalidConfigError("a public Ed25519 key has no private part")
        return {**self.public_jwk(kid), "d": _b64encode(self._seed)}

    def thumbprint(self) -> str:
        """Return the RFC 7638 JWK thumbprint: the default kid of this key."""
        canonical = '{"crv":"Ed25519","kty":"OKP","x":"%s"}' % _b64encode(self.public_bytes)
        return _b64encode(hashlib.sha256(canonical.encode("ascii")).digest())

    def __repr__(self) -> str:
        kind = "private" if self._seed is not None else "public"
        return f"Ed25519Key({kind}, x={_b64encode(self.public_bytes)!r}, backend={self.backend!r})"


@functools.lru_cache(maxsize=1024)
def _pure_verifier(public: bytes) -> "_Ed25519Verifier":
    """One verifier per public key, shared by every Ed25519Key of it (a JWKS
    refresh makes new key objects, not new counts); its table (about 25 ms
    and 1.6 MB to build) lives in ``_ED25519_TABLES``."""
    return _Ed25519Verifier(public)


def _b64decode_checked(value: Any) -> bytes:
    """Decode a base64url JWK member, refusing non-strings and stray characters."""
    if type(value) is not str or not value or _B64URL.fullmatch(value) is None:
        raise ValueError("not base64url")
    return _b64decode(value)


def _pem(label: str, der: bytes) -> str:
    body = binascii.b2a_base64(der, newline=False).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"


#: SEC 1 / RFC 5480 DER for P-256 keys: a SubjectPublicKeyInfo before its
#: 65-byte uncompressed point, a PKCS#8 (RFC 5208, as ``openssl genpkey``
#: writes it) and a SEC 1 ``EC PRIVATE KEY`` before the 32-byte private
#: scalar, each followed by the public point after _P256_PUBLIC_TAG.
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_P256_PKCS8_PREFIX = bytes.fromhex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420")
_P256_SEC1_PREFIX = bytes.fromhex("30770201010420")
_P256_SEC1_PARAMS = bytes.fromhex("a00a06082a8648ce3d030107")
_P256_PUBLIC_TAG = bytes.fromhex("a144034200")


@functools.lru_cache(maxsize=None)
def _crypto_ec() -> Any:
    """Return the ``cryptography`` package's EC modules if importable, else None.

    Checked once, on the first P-256 key, never at import time.
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        return None
    return types.SimpleNamespace(
        ec=ec, utils=utils, algorithm=ec.ECDSA(hashes.SHA256()), InvalidSignature=InvalidSignature
    )


class P256Key:
    """An ECDSA P-256 key (ES256, RFC 7518 §3.4): private (signs and verifies) or public only.

    Build one with ``generate()``, ``from_private_value()``, ``from_public_point()``,
    ``from_pem()`` (PKCS#8, SEC 1 ``EC PRIVATE KEY`` or SubjectPublicKeyInfo,
    as ``openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256``
    writes them) or ``from_jwk()`` (RFC 7518 §6.2). Signatures are JOSE's
    raw 64 bytes ``r || s``, never DER.

    The ``cryptography`` package does the arithmetic when it is importable
    (``backend == "cryptography"``); otherwise this module's own
    implementation does (``"pure"``). Both apply the same strict checks: the
    public point on the curve, 0 < r, s < n, exactly 64 bytes. ECDSA itself
    is malleable: ``(r, n - s)`` is a second valid signature of the same
    message, so never use signature bytes as an identifier.

    Security: the pure-Python signer is not constant-time; on a host where
    an attacker can time signing, install ``cryptography``. A key's repr
    never shows private material.

    Raises:
        InvalidConfigError: malformed key material, a point not on the curve,
            or a private value out of range.
    """

    __slots__ = ("x", "y", "backend", "_d", "_signer", "_verifier")

    def __init__(self, d: Optional[int], x: int, y: int) -> None:
        """Use the ``from_*`` constructors; this one trusts its arguments."""
        self._d = d
        self.x, self.y = x, y
        self.backend = "pure" if _crypto_ec() is None else "cryptography"
        self._signer: Any = None
        self._verifier: Any = None

    @classmethod
    def generate(cls) -> "P256Key":
        """Return a new random private key."""
        return cls.from_private_value(secrets.randbelow(_P256_N - 1) + 1)

    @classmethod
    def from_private_value(cls, d: int) -> "P256Key":
        """Return the private key of the scalar ``d`` (1 <= d < n)."""
        if type(d) is not int or not 0 < d < _P256_N:
            raise InvalidConfigError("a P-256 private value is an integer between 1 and n - 1")
        crypto = _crypto_ec()
        if crypto is None:
            x, y = _p256_public_point(d)
            signer: Any = _P256Signer(d)
        else:
            signer = crypto.ec.derive_private_key(d, crypto.ec.SECP256R1())
            numbers = signer.public_key().public_numbers()
            x, y = numbers.x, numbers.y
        key = cls(d, x, y)
        key._signer = signer
        return key

    @classmethod
    def from_public_point(cls, x: int, y: int) -> "P256Key":
        """Return the public key of the affine point (x, y).

        Raises:
            InvalidConfigError: the point is not on P-256 (an invalid-curve
                attack key), or a coordinate is out of range.
        """
        if type(x) is not int or type(y) is not int or not _p256_on_curve(x, y):
            raise InvalidConfigError("not a valid P-256 public key: the point is not on the curve")
        return cls(None, x, y)

    @classmethod
    def from_pem(cls, text: Union[str, bytes]) -> "P256Key":
        """Read a PEM PKCS#8 or SEC 1 private key, or a SubjectPublicKeyInfo public key."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        blocks = list(_PEM.finditer(text)) if isinstance(text, str) else []
        if len(blocks) != 1:
            raise InvalidConfigError("expected exactly one PEM block")
        label, body = blocks[0].group(1), blocks[0].group(2)
        try:
            der = binascii.a2b_base64(body.encode("ascii"))
        except binascii.Error as exc:
            raise InvalidConfigError("the PEM block is not base64") from exc
        if label == "PUBLIC KEY" and len(der) == 91 and der.startswith(_P256_SPKI_PREFIX + b"\x04"):
            return cls.from_public_point(int.from_bytes(der[27:59], "big"), int.from_bytes(der[59:], "big"))
        if label == "PRIVATE KEY" and len(der) == 138 and der.startswith(_P256_PKCS8_PREFIX):
            d, rest = der[36:68], der[68:]
        elif label == "EC PRIVATE KEY" and len(der) == 121 and der.startswith(_P256_SEC1_PREFIX):
            d, rest = der[7:39], der[39:]
            if not rest.startswith(_P256_SEC1_PARAMS):
                raise InvalidConfigError("not a P-256 SEC 1 private key")
            rest = rest[len(_P256_SEC1_PARAMS) :]
        else:
            raise InvalidConfigError("not a P-256 PKCS#8 or SEC 1 private key or SubjectPublicKeyInfo public key")
        if not rest.startswith(_P256_PUBLIC_TAG + b"\x04") or len(rest) != 70:
            raise InvalidConfigError("the private key does not carry its public point")
        key = cls.from_private_value(int.from_bytes(d, "big"))
        if (key.x, key.y) != (int.from_bytes(rest[6:38], "big"), int.from_bytes(rest[38:], "big")):
            raise InvalidConfigError("the PEM's public point does not belong to its private value")
        return key

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> "P256Key":
        """Read an RFC 7518 §6.2 EC JWK on P-256: private when it has "d", public otherwise."""
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise InvalidConfigError('not a P-256 JWK (kty "EC", crv "P-256")')
        try:
            x, y = _b64decode_checked(jwk.get("x")), _b64decode_checked(jwk.get("y"))
            d = None if "d" not in jwk else _b64decode_checked(jwk.get("d"))
        except ValueError as exc:
            raise InvalidConfigError("the JWK's x, y or d is not base64url") from exc
        # RFC 7518 §6.2.1.2, §6.2.2.1: each member is the full 32 bytes.
        if len(x) != 32 or len(y) != 32 or (d is not None and len(d) != 32):
            raise InvalidConfigError("the JWK's x, y and d must be 32 bytes each")
        public = cls.from_public_point(int.from_bytes(x, "big"), int.from_bytes(y, "big"))
        if d is None:
            return public
        key = cls.from_private_value(int.from_bytes(d, "big"))
        if (key.x, key.y) != (public.x, public.y):
            raise InvalidConfigError("the JWK's x and y do not belong to its d")
        return key

    @property
    def is_private(self) -> bool:
        """True when this key can sign."""
        return self._d is not None

    def public_key(self) -> "P256Key":
        """Return this key without its private part."""
        return P256Key(None, self.x, self.y)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte ES256 signature ``r || s`` of ``message`` (random nonce).

        Raises:
            InvalidConfigError: a public key cannot sign.
        """
        if self._signer is None:
            raise InvalidConfigError("a public P-256 key cannot sign")
        if isinstance(self._signer, _P256Signer):
            return self._signer.sign(message)
        crypto = _crypto_ec()
        r, s = crypto.utils.decode_dss_signature(self._signer.sign(message, crypto.algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Tell whether ``signature`` (64 bytes, ``r || s``) is a valid ES256 signature of ``message``.

        Strict on both backends: exactly 64 bytes, 0 < r, s < n. Never raises.
        """
        verifier = self._verifier
        if verifier is None:
            verifier = self._verifier = self._make_verifier()
        return verifier(message, signature)

    def _make_verifier(self) -> Callable[[bytes, bytes], bool]:
        crypto = _crypto_ec()
        if crypto is None:
            return _p256_verifier(self.x, self.y).verify
        public = crypto.ec.EllipticCurvePublicNumbers(self.x, self.y, crypto.ec.SECP256R1()).public_key()
        encode, algorithm, invalid = crypto.utils.encode_dss_signature, crypto.algorithm, crypto.InvalidSignature

        def verify(message: bytes, signature: bytes) -> bool:
            try:
                parts = _p256_split(_ed25519_bytes(signature))
                if parts is None:  # the same range checks as the pure path, before DER
                    return False
                public.verify(encode(*parts), message, algorithm)
            except (invalid, TypeError, ValueError):  # never raises, like the pure path
                return False
            return True

        return verify

    def _coordinates(self) -> Tuple[str, str]:
        return _b64encode(self.x.to_bytes(32, "big")), _b64encode(self.y.to_bytes(32, "big"))

    def private_pem(self) -> str:
        """Return the private key as PEM PKCS#8 (RFC 5915 inside RFC 5208), as ``openssl`` writes it."""
        if self._d is None:
            raise InvalidConfigError("a public P-256 key has no private part")
        point = b"\x04" + self.x.to_bytes(32, "big") + self.y.to_bytes(32, "big")
        return _pem("PRIVATE KEY", _P256_PKCS8_PREFIX + self._d.to_bytes(32, "big") + _P256_PUBLIC_TAG + point)

    def public_pem(self) -> str:
        """Return the public key as PEM SubjectPublicKeyInfo (RFC 5480)."""
        point = b"\x04" + self.x.to_bytes(32, "big") + self.y.to_bytes(32, "big")
        return _pem("PUBLIC KEY", _P256_SPKI_PREFIX + point)

    def public_jwk(self, kid: Optional[str] = None) -> Dict[str, Any]:
        """Return the public key as an RFC 7518 §6.2 JWK (``use`` sig, ``alg`` ES256)."""
        x, y = self._coordinates()
        jwk: Dict[str, Any] = {"kty": "EC", "crv": "P-256", "x": x, "y": y}
        if kid is not None:
            jwk["kid"] = kid
        jwk.update(use="sig", alg=ALGORITHM_ES256)
        return jwk

    def private_jwk(self, kid: Optional[str] = None) -> Dict[str, Any]:
        """Return the private key as an RFC 7518 §6.2 JWK (with "d"): keep it secret."""
        if self._d is None:
            raise InvalidConfigError("a public P-256 key has no private part")
        return {**self.public_jwk(kid), "d": _b64encode(self._d.to_bytes(32, "big"))}

    def thumbprint(self) -> str:
        """Return the RFC 7638 JWK thumbprint (crv, kty, x, y; sorted, no white space)."""
        canonical = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % self._coordinates()
        return _b64encode(hashlib.sha256(canonical.encode("ascii")).digest())

    def __repr__(self) -> str:
        kind = "private" if self._d is not None else "public"
        x, y = self._coordinates()
        return f"P256Key({kind}, x={x!r}, y={y!r}, backend={self.backend!r})"


class _EdDSAKey:
    """An Ed25519 key bound to the EdDSA algorithm (RFC 8037 §3.1) and a kid.

    It verifies tokens that name the algorithm "EdDSA" or, as RFC 9864 §2.2
    does, "Ed25519"; ``alg`` is the name it signs with.
    """

    __slots__ = ("kid", "alg", "key")
    algs = _EDDSA_NAMES

    def __init__(self, key: Ed25519Key, kid: Optional[str], alg: str = ALGORITHM_EDDSA) -> None:
        self.kid = kid
        self.alg = alg  # the key is bound to its algorithm
        self.key = key

    def sign(self, signing_input: bytes) -> str:
        return _b64encode(self.key.sign(signing_input))

    def derive(self, label: bytes) -> bytes:
        """HMAC-SHA256 of the private seed over ``_DERIVE_PREFIX + label`` (signing hashes the seed with SHA-512)."""
        return hmac.new(typing.cast(bytes, self.key._seed), _DERIVE_PREFIX + label, hashlib.sha256).digest()

    def verify(self, signing_input: bytes, signature: str) -> bool:
        if len(signature) != 86:  # 64 bytes, unpadded base64url
            return False
        try:
            raw = _b64decode(signature)
        except ValueError:
            return False
        return self.key.verify(signing_input, raw)

    def __repr__(self) -> str:
        return f"<_EdDSAKey kid={self.kid!r}>"


class _ES256Key:
    """A P-256 key bound to the ES256 algorithm (RFC 7518 §3.4) and a kid."""

    __slots__ = ("kid", "alg", "key")
    algs = frozenset((ALGORITHM_ES256,))

    def __init__(self, key: P256Key, kid: Optional[str]) -> None:
        self.kid = kid
        self.alg = ALGORITHM_ES256  # the key is bound to its algorithm
        self.key = key

    def sign(self, signing_input: bytes) -> str:
        return _b64encode(self.key.sign(signing_input))

    def derive(self, label: bytes) -> bytes:
        """HMAC-SHA256 of the private value over ``_DERIVE_PREFIX + label`` (ECDSA never MACs it)."""
        d = typing.cast(int, self.key._d).to_bytes(32, "big")
        return hmac.new(d, _DERIVE_PREFIX + label, hashlib.sha256).digest()

    def verify(self, signing_input: bytes, signature: str) -> bool:
        if len(signature) != 86:  # 64 bytes r || s, unpadded base64url (never DER)
            return False
        try:
            raw = _b64decode(signature)
        except ValueError:
            return False
        return self.key.verify(signing_input, raw)

    def __repr__(self) -> str:
        return f"<_ES256Key kid={self.kid!r}>"


_PublicKey = Union[_EdDSAKey, _ES256Key]  # what a JWK set can hold
_TokenKey = Union[_HmacKey, _EdDSAKey, _ES256Key]  # what signs or verifies tokens


def _jwk_usable(jwk: Mapping[str, Any], kty: str, crv: str, algs: typing.AbstractSet[str], default_alg: str) -> bool:
    """Whether a JWK is a signature key of this type that a verifier may use (RFC 7517 §4.2-4.3)."""
    return (
        jwk.get("kty") == kty
        and jwk.get("crv") == crv
        and jwk.get("use", "sig") == "sig"
        and jwk.get("alg", default_alg) in algs
        and ("key_ops" not in jwk or (type(jwk["key_ops"]) is list and "verify" in jwk["key_ops"]))
    )


def _parse_jwks(document: Any) -> Dict[str, _PublicKey]:
    """Return the EdDSA and ES256 verification keys of a JWK set, by kid (RFC 7517 §5).

    Keys of another type, curve, ``use``, ``alg`` or ``key_ops`` are ignored:
    never a symmetric key, which would let a published "public" key mint.
    A kid used twice makes the whole set ambiguous, and a usable key with
    its private part, or off its curve, shows a broken publisher: either
    refuses the whole set.

    Raises:
        ValueError: not a key set, a duplicate kid, private key material, or
            an unusable Ed25519 or P-256 key.
    """
    if not isinstance(document, Mapping) or type(document.get("keys")) is not list:
        raise ValueError('a JWK set is an object with a "keys" array')
    keys: Dict[str, _PublicKey] = {}
    kids = set()
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping):
            raise ValueError("every JWK is an object")
        kid = jwk.get("kid")
        if type(kid) is str:
            if kid in kids:
                raise ValueError("a kid appears twice in the key set")
            kids.add(kid)
        eddsa = _jwk_usable(jwk, "OKP", "Ed25519", _EDDSA_NAMES, ALGORITHM_EDDSA)
        es256 = _jwk_usable(jwk, "EC", "P-256", _ES256Key.algs, ALGORITHM_ES256)
        if not (eddsa or es256):
            continue
        if type(kid) is not str or not kid:
            raise ValueError("a signature key in the set has no kid")
        if "d" in jwk:  # a published set with a private key is an issuer's mistake: use none of it
            raise ValueError(f"key {kid!r} carries private key material")
        try:
            if eddsa:
                public = Ed25519Key.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": jwk.get("x")})
                keys[kid] = _EdDSAKey(public, kid, jwk.get("alg", ALGORITHM_EDDSA))
            else:
                point = P256Key.from_jwk({"kty": "EC", "crv": "P-256", "x": jwk.get("x"), "y": jwk.get("y")})
                keys[kid] = _ES256Key(point, kid)
        except InvalidConfigError as exc:
            raise ValueError(f"key {kid!r}: {exc}") from exc
    return keys


class _JwksSource:
    """A JWK set fetched from a URL, cached, refreshed at most so often.

    The set is refreshed when ``cache_seconds`` have passed, and once when a
    token names an unknown kid, but never more than once per
    ``min_refresh_seconds``: an attacker spraying random kids cannot make the
    verifier hammer the issuer. A failed refresh keeps the last good set.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: int,
        min_refresh_seconds: int,
        timeout_seconds: float,
        max_bytes: int,
    ) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url) if type(url) is str else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise InvalidConfigError("jwks_url must be an https URL")
        if "@" in parts.netloc or "\\" in parts.netloc or _CONTROL_CHARS.search(url):
            # urlsplit and urllib could disagree on the host of such a URL.
            raise InvalidConfigError("jwks_url must not carry credentials or unusual characters")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise InvalidConfigError("jwks_url must use https (plain http only to a loopback address)")
        self.url = url
        self.cache_seconds = _positive_int(cache_seconds, "jwks_cache_seconds")
        self.min_refresh_seconds = _positive_int(min_refresh_seconds, "jwks_min_refresh_seconds")
        if type(timeout_seconds) not in (int, float) or not timeout_seconds > 0:
            raise InvalidConfigError("jwks_timeout_seconds must be a positive number")
        self.timeout_seconds = float(timeout_seconds)
        self.max_bytes = _positive_int(max_bytes, "jwks_max_bytes")
        self.keys: Dict[str, _PublicKey] = {}
        self.fresh_until = -math.inf  # when the set must be fetched again
        self._last_attempt = -math.inf
        self._fetched = False
        self._lock = threading.Lock()
        self._fetcher = _UrlFetch(timeout_seconds=self.timeout_seconds, max_bytes=self.max_bytes, what="the key set")

    def refresh(self, now: float, *, forced: bool) -> bool:
        """Fetch the set if due (or ``forced`` by an unknown kid and allowed); tell whether it changed.

        Once a set is held, a verify never waits for another thread's fetch:
        it goes on with the held set.

        Raises:
            StoreUnavailableError: the set was never fetched successfully.
        """
        if not self._lock.acquire(blocking=not self._fetched):
            return False  # another thread is fetching; the held set serves meanwhile
        try:
            if now < self._last_attempt + self.min_refresh_seconds or (not forced and now < self.fresh_until):
                if not self._fetched:  # too soon to ask again, and nothing to verify with
                    raise StoreUnavailableError("the issuer's key set could not be fetched")
                return False  # another thread refreshed, or too soon to ask again
            self._last_attempt = now
            try:
                keys = _parse_jwks(self._fetch())
                if not keys:  # as verifier(jwks=...) refuses one at startup
                    raise ValueError("the key set holds no usable EdDSA or ES256 key")
            except Exception as exc:  # network, HTTP, size, JSON or key errors alike
                import logging

                logging.getLogger("agentauth").warning("JWKS refresh from %s failed: %s", self.url, exc)
                self.fresh_until = now + self.min_refresh_seconds
                if not self._fetched:
                    raise StoreUnavailableError("the issuer's key set could not be fetched") from exc
                return False  # keep the last good set
            self.keys, self._fetched = keys, True
            self.fresh_until = now + self.cache_seconds
            return True
        finally:
            self._lock.release()

    def _fetch(self) -> Any:
        """Fetch and decode the set (``_UrlFetch``: one deadline, no redirects, a size cap).

        Raises:
            ValueError: the fetch failed, took too long, or is not JSON.
        """
        _headers, body = self._fetcher.get(self.url)
        return _JSON_DECODER.decode(body.decode("utf-8"))


class _UrlFetch:
    """GET one URL: one deadline for the whole fetch, no redirects, at most ``max_bytes``.

    Shared by the JWKS source and the authorization server's client metadata
    documents. With ``allow_private=False`` the connection is refused when
    the address it reached (after name resolution, so a DNS answer cannot
    smuggle one in) is loopback, private, link-local or otherwise not global.
    """

    def __init__(self, *, timeout_seconds: float, max_bytes: int, what: str, allow_private: bool = True) -> None:
        self.timeout_seconds = timeout_seconds
        self.max_bytes = max_bytes
        self.what = what
        self.allow_private = allow_private
        self._helper: Optional[threading.Thread] = None  # the thread of the last fetch

    def get(self, url: str) -> Tuple[Mapping[str, str], bytes]:
        """Return the response's headers (lower-case names) and body, all within ``timeout_seconds``.

        A socket timeout bounds each read only: a server trickling its status
        line or headers a byte at a time could hold a caller for minutes. So
        the fetch runs in a helper thread that the caller waits for at most
        ``timeout_seconds``; at the deadline the connection is shut down, which
        ends the helper too. Name resolution (DNS) cannot be interrupted: the
        caller still returns at the deadline, and no new fetch starts until
        that helper has ended.

        Raises:
            ValueError: the fetch failed or took too long (any error of the helper is re-raised).
        """
        deadline = time.monotonic() + self.timeout_seconds
        helper = self._helper
        if helper is not None:  # one helper at a time; a shut-down one ends at once
            helper.join(self.timeout_seconds)
            if helper.is_alive():
                raise ValueError(f"the previous fetch of {self.what} has not ended yet")
        result: Dict[str, Any] = {}
        connections: List[Any] = []

        def run() -> None:
            try:
                result["response"] = self._get_now(url, connections)
            except BaseException as exc:  # handed to the waiting caller
                result["error"] = exc

        helper = self._helper = threading.Thread(target=run, name="agentauth-fetch", daemon=True)
        helper.start()
        helper.join(max(deadline - time.monotonic(), 0.0))
        if helper.is_alive():
            import socket

            for sock in list(connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the helper's blocked read
                except OSError:
                    pass
            raise ValueError(f"{self.what} took longer than the fetch's deadline")
        if "error" in result:
            raise result["error"]
        return typing.cast(Tuple[Mapping[str, str], bytes], result["response"])

    def _get_now(self, url: str, connections: List[Any]) -> Tuple[Mapping[str, str], bytes]:
        """The fetch itself; each connected socket is added to ``connections``, then checked."""
        import http.client
        import urllib.error
        import urllib.request

        import socket

        allow_private = self.allow_private

        def create_connection(*args: Any, **kwargs: Any) -> Any:
            # Each socket is known the moment it is connected (so the deadline
            # can shut it down, TLS handshake included) and checked before a
            # byte is sent on it.
            sock = socket.create_connection(*args, **kwargs)
            connections.append(sock)
            if not allow_private and not _is_public_address(sock.getpeername()[0]):
                sock.close()
                # SSRF: the client's URL must not reach this host's or its network's services.
                raise ValueError("the URL leads to a private or loopback address")
            return sock

        class Http(http.client.HTTPConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = create_connection

        class Https(http.client.HTTPSConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = create_connection

        class HttpHandler(urllib.request.HTTPHandler):
            def http_open(self, req: Any) -> Any:
                return self.do_open(Http, req)

        class HttpsHandler(urllib.request.HTTPSHandler):
            def https_open(self, req: Any) -> Any:
                return self.do_open(Https, req, context=self._context)  # type: ignore[attr-defined]

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            # A redirect could lead past the https-only rule: refuse them all.
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        handlers: List[Any] = [NoRedirect, HttpHandler, HttpsHandler]
        if url.startswith("http:") or not allow_private:
            # Plain http is allowed only because loopback traffic stays on
            # this host: never hand it to an $http_proxy elsewhere. And the
            # address check means something only on a direct connection: a
            # proxy would reach a private address on our behalf.
            handlers.append(urllib.request.ProxyHandler({}))
        opener = urllib.request.build_opener(*handlers)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        body = b""
        try:
            with opener.open(request, timeout=self.timeout_seconds) as response:
                if response.status != 200:
                    raise ValueError(f"{self.what} answered HTTP {response.status}")
                headers = {name.lower(): value for name, value in response.headers.items()}
                while len(body) <= self.max_bytes:
                    chunk = response.read1(self.max_bytes + 1 - len(body))
                    if not chunk:
                        break
                    body += chunk
        except urllib.error.HTTPError as exc:
            exc.close()  # free the socket now, not at garbage collection
            raise ValueError(f"{self.what} answered HTTP {exc.code}") from None
        if len(body) > self.max_bytes:
            raise ValueError(f"{self.what} is larger than the fetch's size limit")
        return headers, body


def _is_public_address(address: str) -> bool:
    """Whether an IP address is a global one (not loopback, private, link-local, reserved...)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that IPv4 address:
        # check the embedded one. IPv4-mapped (::ffff:0:0/96), 6to4
        # (2002::/16, RFC 3056) and the NAT64 well-known prefix (64:ff9b::/96,
        # RFC 6052) are unwrapped; the deprecated IPv4-compatible form
        # (::/96), local-use NAT64 (64:ff9b:1::/48, RFC 8215: any mapping)
        # and Teredo are refused outright.
        value = int(ip)
        if value >> 32 == 0 or value >> 80 == 0x64FF9B0001 or ip.teredo is not None:
            return False
        if value >> 32 == 0x64FF9B << 64:
            return _is_public_address(str(ipaddress.IPv4Address(value & 0xFFFFFFFF)))
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _is_public_address(str(embedded))
    return ip.is_global and not ip.is_multicast


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------


def scope_satisfies(granted: Iterable[str], required: str) -> bool:
    """Tell whether a grant covers one required scope.

    Granted ``*`` covers anything; granted ``email:*`` covers any scope that
    starts with ``email:``; otherwise the scopes must be equal.
    """
    for scope in granted:
        if scope == required or scope == "*":
            return True
        if scope[-1] == "*" and required.startswith(scope[:-1]):
            return True
    return False


def _check_wildcard(scope: str) -> bool:
    """A ``*`` may stand alone or as the whole last part after a ``:``."""
    star = scope.find("*")
    return star < 0 or scope == "*" or (star == len(scope) - 1 and scope.endswith(":*"))


def _grant_scopes(scopes: Any) -> Tuple[str, ...]:
    """Validate the scopes of a grant; return them deduplicated, in order."""
    if isinstance(scopes, (str, bytes)) or not hasattr(scopes, "__iter__"):
        raise InvalidGrantError("scopes must be a list of strings", oauth_error="invalid_scope")
    result: Dict[str, None] = {}
    for scope in scopes:
        if type(scope) is not str:
            raise InvalidGrantError("every scope must be a string", oauth_error="invalid_scope")
        if _SCOPE_TOKEN.fullmatch(scope) is None:
            raise InvalidGrantError(
                "a scope is blank or malformed (printable ASCII, no space, quote or backslash)",
                oauth_error="invalid_scope",
            )
        if "*" in scope and not _check_wildcard(scope):
            raise InvalidGrantError("'*' may only be a whole scope or end one after ':'", oauth_error="invalid_scope")
        result[scope] = None
    if not result:
        raise InvalidGrantError("a grant needs at least one scope", oauth_error="invalid_scope")
    return tuple(result)


def _required_scopes(required: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(required, str):
        raise TypeError("required_scopes must be a list of scopes, not a string")
    result = tuple(required)
    for scope in result:
        if type(scope) is not str or _SCOPE_TOKEN.fullmatch(scope) is None:
            raise ValueError("required scopes must be valid scope strings")
    return result


def _configured_scopes(scopes: Iterable[str], what: str) -> Tuple[str, ...]:
    """Scopes given by the server's own configuration: errors are InvalidConfigError."""
    try:
        return _required_scopes(scopes)
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{what}: {exc}") from exc


# ---------------------------------------------------------------------------
# Claims and events
# ---------------------------------------------------------------------------


class AgentClaims(NamedTuple):
    """The verified claims of a token.

    ``agent`` is the wire claim ``client_id`` (RFC 9068 §2.2); ``scopes`` is
    the grant, in grant order; ``aud`` is as sent, a str or a tuple; ``raw``
    is every claim of the payload, read-only. ``chain`` names who delegated
    to whom, root agent first and this token's agent last (one agent for a
    token that was not delegated); ``chain_jtis`` are the jtis of the
    ancestor tokens, root first, which revocation checks too, and
    ``chain_iats`` their iats, root first (empty for a token delegated by a
    version that did not record them): an ancestor agent's revocation is
    compared with the iat of the token that agent held.
    """

    sub: str
    agent: str
    scopes: Tuple[str, ...]
    jti: str
    iat: float
    exp: float
    iss: str
    aud: Union[str, Tuple[str, ...]]
    raw: Mapping[str, Any]
    chain: Tuple[str, ...] = ()
    chain_jtis: Tuple[str, ...] = ()
    chain_iats: Tuple[float, ...] = ()

    def has_scope(self, scope: str) -> bool:
        """Tell whether this grant covers ``scope`` (wildcard-aware)."""
        return scope_satisfies(self.scopes, scope)


class IssuedToken(NamedTuple):
    """A freshly minted token, its ``jti`` and its ``expires_at`` (unix seconds)."""

    token: str
    jti: str
    expires_at: int

    def __repr__(self) -> str:  # a token is a bearer credential: keep it out of logs
        return f"IssuedToken(token='<redacted>', jti={self.jti!r}, expires_at={self.expires_at!r})"


class AgentEvent(NamedTuple):
    """What ``on_event`` receives: 'issued', 'delegated', 'verified', 'denied', 'revoked', 'granted' or 'disconnected'.

    ``error`` is the error code of a 'denied' verify, else None; fields the
    event cannot know (the jti of a forged token) are None. A 'delegated'
    event names the child (``jti``, ``agent``, ``scopes``) and its parent
    (``parent_jti``, ``parent_agent``). 'granted' carries the grant's scopes
    as stored; 'granted' and 'disconnected' have no jti.
    """

    type: str
    time: float
    jti: Optional[str]
    subject: Optional[str]
    agent: Optional[str]
    scopes: Tuple[str, ...]
    error: Optional[str] = None
    parent_jti: Optional[str] = None
    parent_agent: Optional[str] = None


class _EventLog:
    """The ``on_event`` hook ``log_events()`` returns: one JSON object per event."""

    __slots__ = ("_logger", "_verified")

    def __init__(self, logger: Any, verified: bool) -> None:
        self._logger = logger
        self._verified = verified

    def __call__(self, event: AgentEvent) -> None:
        if event.type == "verified" and not self._verified:
            return
        # Every field of an event is a name, a code or a time: never a token,
        # a key or a signature, so the whole event can be written out.
        record = event._asdict()
        record["scopes"] = list(event.scopes)
        self._logger.info(_JSON_ENCODER.encode(record))

    def __repr__(self) -> str:
        return f"log_events(verified={self._verified!r})"


def log_events(*, verified: bool = True) -> Callable[[AgentEvent], None]:
    """Return an ``on_event`` hook that writes each event to the ``agentauth.audit`` logger.

    Each event is one line of JSON at level INFO, its fields by name
    (``{"type":"issued","time":1700000000.0,"jti":"...","subject":...}``);
    Python's ``logging`` handlers take it from there (a file, rotation,
    syslog, a log shipper). ``verified=False`` leaves out successful
    verifies, the busiest event on a server; refusals ('denied') are kept.

    Raises:
        InvalidConfigError: ``verified`` is not a bool.

    Security: events hold names, scopes, jtis and error codes only, never a
    token or a key.
    """
    import logging

    if type(verified) is not bool:
        raise InvalidConfigError("verified must be True or False")
    return _EventLog(logging.getLogger("agentauth.audit"), verified)


class RevocationEntry(NamedTuple):
    """One revocation: the criteria it matches and how long it is kept.

    Exactly one of the forms: ``jti`` alone, or ``agent`` and/or ``subject``.
    """

    jti: Optional[str]
    agent: Optional[str]
    subject: Optional[str]
    revoked_at: int
    expires_at: int


class Grant(NamedTuple):
    """What a user (``subject``) allowed an agent: the record behind "connected agents".

    ``grant_id`` is random and opaque; ``agent_name`` is display text (None:
    show the agent id); times are unix seconds; ``last_used_at`` is None
    until a token of this grant is verified.
    """

    grant_id: str
    subject: str
    agent: str
    agent_name: Optional[str]
    scopes: Tuple[str, ...]
    created_at: int
    updated_at: int
    last_used_at: Optional[int] = None

    def _merged_with(self, new: "Grant", replace: bool) -> Tuple["Grant", bool]:
        """Return this stored grant updated by ``new``, and whether it narrowed.

        The union of scopes (or exactly the new ones with ``replace``); the id,
        creation and last use are kept. Every store merges with this, so the
        rule has one home.
        """
        scopes = new.scopes if replace else tuple(dict.fromkeys(self.scopes + new.scopes))
        merged = self._replace(
            agent_name=self.agent_name if new.agent_name is None else new.agent_name,
            scopes=scopes,
            updated_at=new.updated_at,
        )
        return merged, not all(scope_satisfies(scopes, old) for old in self.scopes)


def _grant_order(grant: Grant) -> Tuple[bool, int, int, str]:
    """Sort key of a user's grants: most recently used first, then never-used ones, newest first."""
    return grant.last_used_at is None, -(grant.last_used_at or 0), -grant.updated_at, grant.agent


_REQUIRED_CLAIMS = ("sub", "client_id", "jti", "scope", "exp", "iat")
_MAX_TIME = 2**53  # seconds; beyond any date, and exact as a float


def _number(claims: Mapping[str, Any], name: str, required: bool = True) -> Optional[float]:
    value = claims.get(name)
    if value is None and not required and name not in claims:
        return None
    # type() rather than isinstance(): a JSON true is not a number of seconds.
    # The bound keeps int-float arithmetic from overflowing (no time is that far).
    if (type(value) is int or (type(value) is float and math.isfinite(value))) and -_MAX_TIME < value < _MAX_TIME:
        return value
    raise TokenInvalidError(f"token claim {name!r} is missing or not a finite number")


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if type(value) is not str or not value:
        raise TokenInvalidError(f"token claim {name!r} is missing or not a non-empty string")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str:
        raise InvalidGrantError(f"{what} must be a string")
    if not value or len(value) > MAX_NAME_CHARS:
        raise InvalidGrantError(f"{what} must be 1 to {MAX_NAME_CHARS} characters")
    if _CONTROL_CHARS.search(value):
        raise InvalidGrantError(f"{what} must not contain control characters")
    if not value.isascii():
        try:
            value.encode("utf-8")  # a lone surrogate could never be stored or revoked
        except UnicodeEncodeError as exc:
            raise InvalidGrantError(f"{what} must be valid Unicode text") from exc
    return value


_Chain = Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[float, ...]]  # agents, ancestor jtis, ancestor iats


def _parse_chain(act: Any, agent: str, max_length: int) -> _Chain:
    """Read a delegation chain from an RFC 8693 ``act`` claim, current actor outermost.

    The outermost actor is the token's own agent; every inner one carries the
    jti and the iat of the token it held (the iat may be missing, in tokens
    delegated before it was recorded: then no ancestor iat is returned).
    Returns (agents, ancestor jtis, ancestor iats), root first.

    Raises:
        TokenInvalidError: a malformed chain, or one longer than ``max_length``.
    """
    agents: List[str] = []
    jtis: List[str] = []
    iats: List[float] = []
    level = act
    while level is not None:
        if type(level) is not dict or len(agents) >= max_length:
            raise TokenInvalidError("token delegation chain is malformed or too long")
        actor, jti = level.get("sub"), level.get("jti")
        if type(actor) is not str or not actor or (agents and (type(jti) is not str or not jti)):
            raise TokenInvalidError("token delegation chain is malformed")
        agents.append(actor)
        if agents[1:]:
            jtis.append(jti)  # type: ignore[arg-type]  # a str: checked above once agents was non-empty
            if "iat" in level:
                iats.append(typing.cast(float, _number(level, "iat")))
        level = level.get("act")
    if agents[0] != agent or len(agents) < 2:
        raise TokenInvalidError("token delegation chain does not match its agent")
    if len(iats) != len(jtis):  # all or none: a chain is minted by one version at a time
        iats = []
    return tuple(reversed(agents)), tuple(reversed(jtis)), tuple(reversed(iats))


# ---------------------------------------------------------------------------
# Stores: revocations and grants
# ---------------------------------------------------------------------------


class RevocationStore(typing.Protocol):
    """Where revocations live. Implement these two methods for your own store.

    ``criteria`` maps one or more of "jti", "agent", "subject" to a string:
    ``{"jti": j}`` alone, or ``agent`` and/or ``subject`` (ANDed). A jti entry
    refuses that token whatever its ``iat``; an agent/subject entry refuses
    tokens whose ``iat`` (whole seconds) is at or before ``revoked_at``.
    Delegation extends both to the chain: a jti entry also refuses every
    token whose ``claims.chain_jtis`` holds it, and an agent entry (alone or
    with the subject) every token whose ``claims.chain`` names that agent,
    comparing ``revoked_at`` with the iat of the token that agent held
    (``claims.chain_iats``; the root's for a subject entry).
    Entries may be dropped once ``expires_at`` has passed: ``revoke``
    purges then, taking ``revoked_at`` as the current time; a store needs no
    clock of its own. A store that cannot answer raises
    ``StoreUnavailableError`` (any other exception is treated the same).
    """

    def revoke(self, criteria: Mapping[str, str], *, revoked_at: int, expires_at: int) -> None:
        """Record a revocation durably before returning."""

    def is_revoked(self, claims: AgentClaims) -> bool:
        """Tell whether any entry refuses the token with these claims."""


class GrantStore(typing.Protocol):
    """Where grants live, beside the revocations, in the same store object.

    Implement these five methods for your own store (MemoryStore and
    SqliteStore do). There is one grant per (subject, agent). A write that
    narrows or removes a grant also records, in the same transaction, the
    revocation ``{"agent": agent, "subject": subject}`` at ``revoked_at``
    (merged like any ``revoke``), so the tokens minted under the wider grant
    stop verifying at once and no reader ever sees one change without the
    other. A store that cannot answer, or did not write, raises
    ``StoreUnavailableError``.
    """

    def save_grant(self, grant: Grant, *, replace: bool, revoked_at: int, expires_at: int) -> Grant:
        """Record consent and return the stored grant.

        With no grant yet for (subject, agent), store ``grant`` as given;
        else merge it into the stored one with ``Grant._merged_with`` (union
        of scopes, or exactly the new ones with ``replace``; id, creation and
        last use kept) and, when that narrowed it, record the revocation.
        """

    def get_grant(self, subject: str, agent: str) -> Optional[Grant]:
        """Return the grant of (subject, agent), or None."""

    def list_grants(self, subject: str) -> List[Grant]:
        """Return the subject's grants: most recently used first, then never-used ones, newest first."""

    def delete_grant(self, subject: str, agent: str, *, revoked_at: int, expires_at: int) -> bool:
        """Delete the grant and record the revocation; with no grant, change nothing and return False."""

    def touch_grant(self, subject: str, agent: str, used_at: int) -> None:
        """Set ``last_used_at`` to ``used_at`` unless it is later already; no grant: do nothing."""


_GRANT_METHODS = ("save_grant", "get_grant", "list_grants", "delete_grant", "touch_grant")


class ProofReplayStore(typing.Protocol):
    """The DPoP replay cache (RFC 9449 §11.1), beside the revocations, in the same store object.

    Implement this one method for your own store (MemoryStore, SqliteStore
    and RedisStore do). ``key`` is an opaque string of at most 64 ASCII
    characters that agentauth derives from the proof's key and ``jti``
    (never from its signature, which ECDSA lets anyone re-sign). The check
    and the write are one atomic step, so two servers racing with the same
    proof cannot both accept it. A key may be forgotten once ``expires_at``
    has passed (the proof's ``iat`` is outside the window by then); the
    store purges, taking ``now`` as the current time, and stays bounded. A
    store that cannot answer or is full raises ``StoreUnavailableError``:
    verify then fails closed.
    """

    def record_proof(self, key: str, *, now: int, expires_at: int) -> bool:
        """Remember ``key`` until ``expires_at``; True if it was new, False if already recorded (a replay)."""


_MAX_PROOFS = 1_000_000  # proofs a MemoryStore remembers at once (about 150 MB); more fail closed


class AuthorizationStore(typing.Protocol):
    """Where the authorization server keeps its clients, codes and refresh tokens.

    Three methods over small records: a record is a JSON text filed under a
    ``kind`` ("client", "code", "refresh", "client_document") and a ``key``
    (for codes and refresh tokens, the SHA-256 of the secret, never the
    secret). A record whose ``expires_at`` is at or before ``now`` does not
    exist; a store may drop it then (``put_record`` purges). ``use_record``
    is the one atomic operation the server relies on: two processes
    presenting the same code at once must not both see a first use.
    MemoryStore, SqliteStore and PostgresStore implement it; a store that cannot answer, or
    did not write, raises ``StoreUnavailableError``.
    """

    def put_record(self, kind: str, key: str, value: str, *, expires_at: int, now: int) -> None:
        """Store (or replace, forgetting any use) the record; purge expired ones."""

    def get_record(self, kind: str, key: str, *, now: int) -> Optional[str]:
        """Return the record's value, or None (absent or expired)."""

    def use_record(self, kind: str, key: str, *, now: int) -> Optional[Tuple[str, Optional[int]]]:
        """Mark the record used, atomically, and return (its value, when it was first used before).

        The first use records ``now`` and returns None as the earlier use;
        every later use returns that first time and changes nothing. An
        absent or expired record returns None.
        """


_RECORD_METHODS = ("put_record", "get_record", "use_record")


def _entry_key(criteria: Mapping[str, str]) -> Tuple[str, RevocationEntry]:
    """Return the lookup key of one criteria mapping, and its entry's criteria.

    Every built-in store that keys by string uses these (``_key_string``).

    Raises:
        ValueError: no criteria, an unknown or empty one, or jti mixed with others.
    """
    if not criteria or any(k not in _REVOCATION_KINDS for k in criteria):
        raise ValueError("criteria must name jti, agent and/or subject")
    for value in criteria.values():
        if type(value) is not str or not value:
            raise ValueError("every criterion must be a non-empty string")
    jti, agent, subject = (criteria.get(k) for k in _REVOCATION_KINDS)
    if jti is not None and len(criteria) != 1:
        raise ValueError("a jti revocation takes no other criterion")
    return _key_string((jti, agent, subject)), RevocationEntry(jti, agent, subject, 0, 0)


def _key_string(key: "_CriteriaKey") -> str:
    """The string form of a criteria key: a fixed prefix per form, the pair length-prefixed."""
    jti, agent, subject = key
    if jti is not None:
        return "jti:" + jti
    if agent is not None and subject is not None:
        return f"agent+subject:{len(agent)}:{agent}{subject}"
    if agent is not None:
        return "agent:" + agent
    return "subject:" + typing.cast(str, subject)


_CriteriaKey = Tuple[Optional[str], Optional[str], Optional[str]]  # (jti, agent, subject)


def _lookup(claims: AgentClaims) -> Tuple[Tuple[str, ...], List[Tuple[_CriteriaKey, int]]]:
    """Return what can refuse a token: its own and its ancestors' jtis, and
    the criteria keys of every agent in its chain and of its subject, each
    with the iat an entry must reach to refuse it.

    One list, so every store answers with one lookup however long the chain.
    An ancestor agent's keys go with the iat of the token that agent held,
    the subject's with the root token's: a descendant minted after a
    revocation, by a host that had not seen it yet, is still refused.
    """
    subject = claims.sub
    # Whole seconds, rounded down: a token minted in the second of a
    # revocation is refused (fail closed). An ancestor's iat is never taken
    # as later than the token's own.
    iat = math.floor(claims.iat)
    chain = claims.chain
    if len(chain) < 2:  # not delegated: the common case, its own iat for every key
        agent = claims.agent
        return (claims.jti,), [((None, None, subject), iat), ((None, agent, None), iat), ((None, agent, subject), iat)]
    held = [min(iat, math.floor(t)) for t in claims.chain_iats] if len(claims.chain_iats) == len(chain) - 1 else []
    held.append(iat)
    if len(held) != len(chain):  # ancestors' iats not recorded: the token's own decides for the chain
        held = [iat] * len(chain)
    keys: List[Tuple[_CriteriaKey, int]] = [((None, None, subject), min(held))]
    for agent, agent_iat in zip(chain, held):
        keys.append(((None, agent, None), agent_iat))
        keys.append(((None, agent, subject), agent_iat))
    return (claims.jti, *claims.chain_jtis), keys


class _EntryIndex:
    """Entries by their criteria, and a heap of expiries: what the in-process stores hold.

    The key is the entry's own ``(jti, agent, subject)``, None where absent,
    so a lookup builds no string. Not locked: the owning store serialises
    writes; reads are single dict lookups, which are atomic.
    """

    def __init__(self) -> None:
        self.entries: Dict[_CriteriaKey, RevocationEntry] = {}
        # A heap of (expires_at, n, key): n breaks ties, since keys mix None
        # and str and must never be compared.
        self._expiries: List[Tuple[int, int, _CriteriaKey]] = []
        self._pushes = 0

    def put(self, entry: RevocationEntry) -> None:
        """Add an entry, merged with an older one of the same criteria (the later times win)."""
        key = (entry.jti, entry.agent, entry.subject)
        old = self.entries.get(key)
        if old is not None:
            entry = entry._replace(
                revoked_at=max(entry.revoked_at, old.revoked_at),
                expires_at=max(entry.expires_at, old.expires_at),
            )
        self.entries[key] = entry
        self._pushes += 1
        heapq.heappush(self._expiries, (entry.expires_at, self._pushes, key))

    def purge(self, now: int) -> None:
        """Drop entries whose ``expires_at`` is at or before ``now``."""
        expiries, entries = self._expiries, self.entries
        while expiries and expiries[0][0] <= now:
            expiry, _n, key = heapq.heappop(expiries)
            entry = entries.get(key)
            if entry is not None and entry.expires_at <= expiry:
                del entries[key]

    def matches(self, claims: AgentClaims) -> bool:
        entries = self.entries
        jtis, criteria_keys = _lookup(claims)
        for jti in jtis:
            if (jti, None, None) in entries:
                return True
        for key, iat in criteria_keys:
            entry = entries.get(key)
            if entry is not None and entry.revoked_at >= iat:
                return True
        return False

    def sorted(self, now: Optional[float]) -> List[RevocationEntry]:
        found = [e for e in list(self.entries.values()) if now is None or e.expires_at > now]
        return sorted(found, key=lambda e: e.revoked_at, reverse=True)


class MemoryStore:
    """Revocations and grants in this process's memory: for one process and for tests.

    Thread-safe; lookups are O(1) however many entries; expired entries are
    purged on every ``revoke`` so memory stays bounded by live revocations.
    The DPoP replay cache holds at most ``max_proofs`` live proofs (each is
    kept for the proof window, ten minutes by default); beyond that, verify
    of a DPoP proof fails closed (503) until some expire.

    Raises:
        InvalidConfigError: ``max_proofs`` is not a positive whole number.
    """

    def __init__(self, *, max_proofs: int = _MAX_PROOFS) -> None:
        self._index = _EntryIndex()
        self._grants: Dict[Tuple[str, str], Grant] = {}  # by (subject, agent)
        self._records: Dict[Tuple[str, str], List[Any]] = {}  # (kind, key) -> [value, expires_at, used_at]
        self._record_expiries: List[Tuple[int, Tuple[str, str]]] = []  # a heap: (expires_at, (kind, key))
        self._lock = threading.Lock()
        self.max_proofs = _positive_int(max_proofs, "max_proofs")
        self._proofs: Dict[str, int] = {}  # replay key -> expires_at
        self._proof_expiries: List[Tuple[int, str]] = []  # a heap of (expires_at, key)

    def __repr__(self) -> str:
        return f"<MemoryStore entries={len(self._index.entries)} grants={len(self._grants)}>"

    def revoke(self, criteria: Mapping[str, str], *, revoked_at: int, expires_at: int) -> None:
        """Record a revocation; purge entries expired at ``revoked_at``."""
        _key, entry = _entry_key(criteria)
        with self._lock:
            self._revoke_locked(entry, revoked_at, expires_at)

    def _revoke_locked(self, entry: RevocationEntry, revoked_at: int, expires_at: int) -> None:
        self._index.purge(revoked_at)
        self._index.put(entry._replace(revoked_at=revoked_at, expires_at=expires_at))

    def record_proof(self, key: str, *, now: int, expires_at: int) -> bool:
        """Remember a DPoP proof (``ProofReplayStore``); False for a replay.

        Purges expired proofs first; with ``max_proofs`` live proofs held,
        refuses to forget one early and raises ``StoreUnavailableError``.
        """
        proofs, expiries = self._proofs, self._proof_expiries
        with self._lock:
            while expiries and expiries[0][0] <= now:
                _expiry, old = heapq.heappop(expiries)
                if proofs.get(old, now + 1) <= now:
                    del proofs[old]
            known = proofs.get(key)
            if known is not None and known > now:
                return False
            if len(proofs) >= self.max_proofs:
                raise StoreUnavailableError("the DPoP replay cache is full")
            proofs[key] = expires_at
            heapq.heappush(expiries, (expires_at, key))
            return True

    def save_grant(self, grant: Grant, *, replace: bool, revoked_at: int, expires_at: int) -> Grant:
        """Record consent (``GrantStore``); a narrowing revokes the older tokens under the same lock."""
        key = (grant.subject, grant.agent)
        with self._lock:
            old = self._grants.get(key)
            if old is not None:
                grant, narrowed = old._merged_with(grant, replace)
                if narrowed:
                    self._revoke_locked(RevocationEntry(None, grant.agent, grant.subject, 0, 0), revoked_at, expires_at)
            self._grants[key] = grant
        return grant

    def get_grant(self, subject: str, agent: str) -> Optional[Grant]:
        """Return the grant of (subject, agent), or None."""
        return self._grants.get((subject, agent))

    def list_grants(self, subject: str) -> List[Grant]:
        """Return the subject's grants, most recently used first."""
        with self._lock:
            found = [g for g in self._grants.values() if g.subject == subject]
        return sorted(found, key=_grant_order)

    def delete_grant(self, subject: str, agent: str, *, revoked_at: int, expires_at: int) -> bool:
        """Delete the grant and revoke its tokens under one lock; False when there was none."""
        with self._lock:
            if self._grants.pop((subject, agent), None) is None:
                return False
            self._revoke_locked(RevocationEntry(None, agent, subject, 0, 0), revoked_at, expires_at)
        return True

    def touch_grant(self, subject: str, agent: str, used_at: int) -> None:
        """Record a use of the grant, if it exists."""
        key = (subject, agent)
        with self._lock:
            grant = self._grants.get(key)
            if grant is not None and (grant.last_used_at or 0) < used_at:
                self._grants[key] = grant._replace(last_used_at=used_at)

    def put_record(self, kind: str, key: str, value: str, *, expires_at: int, now: int) -> None:
        """Store an authorization server record (``AuthorizationStore``); purge expired ones."""
        with self._lock:
            records, expiries = self._records, self._record_expiries
            while expiries and expiries[0][0] <= now:  # O(log n) per expired record, not a scan
                _expiry, name = heapq.heappop(expiries)
                record = records.get(name)
                if record is not None and record[1] <= now:  # not replaced by a longer-lived one since
                    del records[name]
            records[(kind, key)] = [value, expires_at, None]
            heapq.heappush(expiries, (expires_at, (kind, key)))

    def get_record(self, kind: str, key: str, *, now: int) -> Optional[str]:
        """Return a live record's value, or None."""
        record = self._records.get((kind, key))
        return None if record is None or record[1] <= now else typing.cast(str, record[0])

    def use_record(self, kind: str, key: str, *, now: int) -> Optional[Tuple[str, Optional[int]]]:
        """Mark a live record used under the lock; return (value, the first use before this one)."""
        with self._lock:
            record = self._records.get((kind, key))
            if record is None or record[1] <= now:
                return None
            first_use = record[2]
            if first_use is None:
                record[2] = now
            return record[0], first_use

    def is_revoked(self, claims: AgentClaims) -> bool:
        """Tell whether an entry refuses these claims."""
        return self._index.matches(claims)

    def entries(self, *, now: Optional[float] = None) -> List[RevocationEntry]:
        """List entries, newest first; with ``now``, only those still live."""
        with self._lock:
            return self._index.sorted(now)


#: 1: revocations; 2: + grants; 3: + DPoP proofs; 4: + authorization server records
#: (an older file gains the tables in place)
_SQLITE_SCHEMA_VERSION = 4
_SQLITE_SCHEMA = (
    # seq grows with every write and is never reused (AUTOINCREMENT), so a
    # reader can load just the rows written since it last looked.
    """CREATE TABLE IF NOT EXISTS agentauth_revocations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        jti TEXT,
        agent TEXT,
        subject TEXT,
        revoked_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS agentauth_revocations_expires
        ON agentauth_revocations (expires_at)""",
    # scopes: space-delimited, as in a token's scope claim.
    """CREATE TABLE IF NOT EXISTS agentauth_grants (
        subject TEXT NOT NULL,
        agent TEXT NOT NULL,
        grant_id TEXT NOT NULL UNIQUE,
        agent_name TEXT,
        scopes TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_used_at INTEGER,
        PRIMARY KEY (subject, agent)
    )""",
    # The DPoP replay cache (ProofReplayStore): one row per proof, until expires_at.
    """CREATE TABLE IF NOT EXISTS agentauth_dpop_proofs (
        key TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS agentauth_dpop_proofs_expires
        ON agentauth_dpop_proofs (expires_at)""",
    # The authorization server's clients, codes and refresh tokens (AuthorizationStore).
    """CREATE TABLE IF NOT EXISTS agentauth_records (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        PRIMARY KEY (kind, key)
    )""",
    """CREATE INDEX IF NOT EXISTS agentauth_records_expires
        ON agentauth_records (expires_at)""",
)
_SQLITE_COLUMNS = "seq, key, jti, agent, subject, revoked_at, expires_at"
_GRANT_COLUMNS = "grant_id, subject, agent, agent_name, scopes, created_at, updated_at, last_used_at"


def _grant_row(row: Tuple[Any, ...]) -> Grant:
    return Grant(*row[:4], tuple(row[4].split(" ")), *row[5:])  # type: ignore[call-arg]


class SqliteStore:
    """Revocations and grants in a SQLite file: survives restarts, shared by the processes of one host.

    The file is in WAL mode with a busy timeout, and every revocation is a
    durable commit (``synchronous=FULL``) before ``revoke`` returns. Each
    thread (and each process, after a fork) has its own connection.

    Lookups do not query the table: the store keeps the live entries in
    memory, and each ``is_revoked`` asks SQLite only whether any other
    connection has committed since (``PRAGMA data_version``, answered from
    the WAL index without reading the table); if so, it loads just the new
    rows first. So a revocation made in one process is seen by the next
    verify in every other, at the cost of one cheap statement per verify.

    Use a file of its own: the schema version lives in ``PRAGMA user_version``.

    Raises:
        StoreUnavailableError: the file cannot be opened or read.
        InvalidConfigError: the file holds a newer schema than this version knows.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, timeout_seconds: float = 5.0) -> None:
        if type(timeout_seconds) not in (int, float) or not timeout_seconds > 0:
            raise InvalidConfigError("timeout_seconds must be a positive number")
        self.path = os.fspath(path)
        self._timeout = float(timeout_seconds)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the index and _last_seq
        self._index = _EntryIndex()
        self._last_seq = 0
        self._connection()  # fail at construction, not at the first request

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    def _connection(self) -> "sqlite3.Cursor":
        """Return this thread's cursor, connecting first if needed."""
        local = self._local
        pid = os.getpid()
        try:
            if local.pid == pid:  # a connection must not cross a fork
                return local.cursor
        except AttributeError:  # this thread's first call
            pass
        import sqlite3

        try:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                self._ensure_schema(conn)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the revocation database: {exc}") from exc
        local.pid, local.cursor, local.version = pid, conn.cursor(), None
        return local.cursor

    @staticmethod
    def _ensure_schema(conn: "sqlite3.Connection") -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == _SQLITE_SCHEMA_VERSION:
            return
        if version > _SQLITE_SCHEMA_VERSION:
            raise InvalidConfigError(
                f"the revocation database has schema version {version}; "
                f"this agentauth knows {_SQLITE_SCHEMA_VERSION}"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SQLITE_SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SQLITE_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _load_new_rows(self, cursor: "sqlite3.Cursor") -> None:
        """Merge the rows written since the last load into the index."""
        with self._lock:
            rows = cursor.execute(
                f"SELECT {_SQLITE_COLUMNS} FROM agentauth_revocations WHERE seq > ? ORDER BY seq",
                (self._last_seq,),
            ).fetchall()
            if not rows:
                return
            for row in rows:
                self._index.put(RevocationEntry(*row[2:]))
            self._last_seq = rows[-1][0]
            # A revocation's time is a lower bound of the host's clock now.
            self._index.purge(max(row[5] for row in rows))

    def _transaction(self, work: Callable[["sqlite3.Cursor"], Any], failure: str) -> Any:
        """Run ``work(cursor)`` in one durable write transaction and return what it returns.

        Raises:
            StoreUnavailableError: SQLite failed; nothing was written.
        """
        import sqlite3

        cursor = self._connection()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                result = work(cursor)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"{failure}: {exc}") from exc
        return result

    @staticmethod
    def _write_revocation(cursor: "sqlite3.Cursor", key: str, entry: RevocationEntry) -> RevocationEntry:
        """Inside a transaction: purge expired rows, merge and write one entry; return it as written."""
        revoked_at, expires_at = entry.revoked_at, entry.expires_at
        cursor.execute("DELETE FROM agentauth_revocations WHERE expires_at <= ?", (revoked_at,))
        old = cursor.execute("SELECT revoked_at, expires_at FROM agentauth_revocations WHERE key = ?", (key,)).fetchone()
        if old is not None:
            revoked_at, expires_at = max(revoked_at, old[0]), max(expires_at, old[1])
            cursor.execute("DELETE FROM agentauth_revocations WHERE key = ?", (key,))
        # A fresh row, so that its new seq tells every reader to load it.
        cursor.execute(
            "INSERT INTO agentauth_revocations (key, jti, agent, subject, revoked_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, entry.jti, entry.agent, entry.subject, revoked_at, expires_at),
        )
        return entry._replace(revoked_at=revoked_at, expires_at=expires_at)

    def _remember(self, entry: RevocationEntry) -> None:
        # Our own commit does not change this connection's data_version, so
        # the index takes the entry directly; other threads load it.
        with self._lock:
            self._index.purge(entry.revoked_at)
            self._index.put(entry)

    def revoke(self, criteria: Mapping[str, str], *, revoked_at: int, expires_at: int) -> None:
        """Record a revocation in one durable transaction; purge expired rows."""
        key, entry = _entry_key(criteria)
        entry = entry._replace(revoked_at=revoked_at, expires_at=expires_at)
        self._remember(
            self._transaction(lambda cursor: self._write_revocation(cursor, key, entry), "the revocation was not recorded")
        )

    def save_grant(self, grant: Grant, *, replace: bool, revoked_at: int, expires_at: int) -> Grant:
        """Record consent (``GrantStore``) in one transaction, with the revocation a narrowing makes."""

        def work(cursor: "sqlite3.Cursor") -> Tuple[Grant, Optional[RevocationEntry]]:
            row = cursor.execute(
                f"SELECT {_GRANT_COLUMNS} FROM agentauth_grants WHERE subject = ? AND agent = ?",
                (grant.subject, grant.agent),
            ).fetchone()
            stored, narrowed, written = grant, False, None
            if row is not None:
                stored, narrowed = _grant_row(row)._merged_with(grant, replace)
            cursor.execute(
                f"INSERT OR REPLACE INTO agentauth_grants ({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*stored[:4], " ".join(stored.scopes), *stored[5:]),
            )
            if narrowed:
                criteria = {"agent": grant.agent, "subject": grant.subject}
                key, entry = _entry_key(criteria)
                written = self._write_revocation(cursor, key, entry._replace(revoked_at=revoked_at, expires_at=expires_at))
            return stored, written

        stored, written = self._transaction(work, "the grant was not recorded")
        if written is not None:
            self._remember(written)
        return typing.cast(Grant, stored)

    def get_grant(self, subject: str, agent: str) -> Optional[Grant]:
        """Return the grant of (subject, agent), or None."""
        row = self._read(
            f"SELECT {_GRANT_COLUMNS} FROM agentauth_grants WHERE subject = ? AND agent = ?", (subject, agent)
        )
        return _grant_row(row[0]) if row else None

    def list_grants(self, subject: str) -> List[Grant]:
        """Return the subject's grants, most recently used first."""
        rows = self._read(f"SELECT {_GRANT_COLUMNS} FROM agentauth_grants WHERE subject = ?", (subject,))
        return sorted(map(_grant_row, rows), key=_grant_order)

    def delete_grant(self, subject: str, agent: str, *, revoked_at: int, expires_at: int) -> bool:
        """Delete the grant and revoke its tokens in one transaction; False when there was none."""

        def work(cursor: "sqlite3.Cursor") -> Optional[RevocationEntry]:
            cursor.execute("DELETE FROM agentauth_grants WHERE subject = ? AND agent = ?", (subject, agent))
            if cursor.rowcount == 0:
                return None
            key, entry = _entry_key({"agent": agent, "subject": subject})
            return self._write_revocation(cursor, key, entry._replace(revoked_at=revoked_at, expires_at=expires_at))

        written = self._transaction(work, "the grant was not removed")
        if written is None:
            return False
        self._remember(written)
        return True

    def touch_grant(self, subject: str, agent: str, used_at: int) -> None:
        """Record a use of the grant, if it exists (one statement, waiting at most 100 ms for a lock)."""
        import sqlite3

        cursor = self._connection()
        try:
            # Called from verify: a busy file must not hold a request for the
            # whole timeout over a display-only timestamp.
            cursor.execute("PRAGMA busy_timeout = 100")
            try:
                cursor.execute(
                    "UPDATE agentauth_grants SET last_used_at = ? WHERE subject = ? AND agent = ?"
                    " AND (last_used_at IS NULL OR last_used_at < ?)",
                    (used_at, subject, agent, used_at),
                )
            finally:
                cursor.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the grant's last use was not recorded: {exc}") from exc

    def put_record(self, kind: str, key: str, value: str, *, expires_at: int, now: int) -> None:
        """Store an authorization server record in one durable transaction; purge expired ones."""

        def work(cursor: "sqlite3.Cursor") -> None:
            cursor.execute("DELETE FROM agentauth_records WHERE expires_at <= ?", (now,))
            cursor.execute(
                "INSERT OR REPLACE INTO agentauth_records (kind, key, value, expires_at, used_at)"
                " VALUES (?, ?, ?, ?, NULL)",
                (kind, key, value, expires_at),
            )

        self._transaction(work, "the record was not stored")

    def get_record(self, kind: str, key: str, *, now: int) -> Optional[str]:
        """Return a live record's value, or None."""
        rows = self._read(
            "SELECT value FROM agentauth_records WHERE kind = ? AND key = ? AND expires_at > ?", (kind, key, now)
        )
        return typing.cast(str, rows[0][0]) if rows else None

    def use_record(self, kind: str, key: str, *, now: int) -> Optional[Tuple[str, Optional[int]]]:
        """Mark a live record used in one write transaction (processes serialise on it)."""

        def work(cursor: "sqlite3.Cursor") -> Optional[Tuple[str, Optional[int]]]:
            row = cursor.execute(
                "SELECT value, used_at FROM agentauth_records WHERE kind = ? AND key = ? AND expires_at > ?",
                (kind, key, now),
            ).fetchone()
            if row is None:
                return None
            if row[1] is None:
                cursor.execute("UPDATE agentauth_records SET used_at = ? WHERE kind = ? AND key = ?", (now, kind, key))
            return row[0], row[1]

        return typing.cast(Optional[Tuple[str, Optional[int]]], self._transaction(work, "the record was not used"))

    def _read(self, query: str, params: Tuple[Any, ...]) -> List[Tuple[Any, ...]]:
        import sqlite3

        try:
            return self._connection().execute(query, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the database did not answer: {exc}") from exc

    def is_revoked(self, claims: AgentClaims) -> bool:
        """Tell whether an entry refuses these claims, after loading what others committed."""
        cursor = self._connection()
        local = self._local
        try:
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            if version != local.version:
                self._load_new_rows(cursor)
                local.version = version
        except Exception as exc:  # sqlite3.Error, without importing sqlite3 per call
            raise StoreUnavailableError(f"the revocation database did not answer: {exc}") from exc
        return self._index.matches(claims)

    def record_proof(self, key: str, *, now: int, expires_at: int) -> bool:
        """Remember a DPoP proof (``ProofReplayStore``) in one transaction; False for a replay.

        Shared by every process using the file; expired proofs are purged
        in the same transaction, so the table holds only the live window.
        """
        cursor = self._connection()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute("DELETE FROM agentauth_dpop_proofs WHERE expires_at <= ?", (now,))
                cursor.execute(
                    "INSERT OR IGNORE INTO agentauth_dpop_proofs (key, expires_at) VALUES (?, ?)", (key, expires_at)
                )
                new = cursor.rowcount == 1
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        except Exception as exc:  # sqlite3.Error, without importing sqlite3 per call
            raise StoreUnavailableError(f"the DPoP replay cache did not answer: {exc}") from exc
        return new

    def entries(self, *, now: Optional[float] = None) -> List[RevocationEntry]:
        """List the file's entries, newest first; with ``now``, only those still live."""
        query = "SELECT jti, agent, subject, revoked_at, expires_at FROM agentauth_revocations"
        params: Tuple[Any, ...] = ()
        if now is not None:
            query += " WHERE expires_at > ?"
            params = (now,)
        return [RevocationEntry(*row) for row in self._read(query + " ORDER BY revoked_at DESC, seq DESC", params)]

    def close(self) -> None:
        """Close this thread's connection."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is not None:
            cursor.connection.close()
            self._local.pid = self._local.cursor = None


#: Atomic merge of one revocation: the later revoked_at and the later expiry
#: win, whatever order concurrent writers arrive in (EXPIRETIME: Redis >= 7.0).
_REDIS_REVOKE = """
local revoked_at, expires_at = tonumber(ARGV[1]), tonumber(ARGV[2])
local old = tonumber(redis.call('GET', KEYS[1]) or '')
if old and old > revoked_at then revoked_at = old end
local old_expiry = redis.call('EXPIRETIME', KEYS[1])
if old_expiry > expires_at then expires_at = old_expiry end
redis.call('SET', KEYS[1], revoked_at, 'EXAT', expires_at)
return 1
"""
#: Remember a DPoP proof unless already there (NX), expiring at ARGV[2]: 1 if new.
_REDIS_RECORD_PROOF = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EXAT', ARGV[2]) then return 1 end
return 0
"""

#: List the entries under a prefix: SCAN (never KEYS, which would block on a
#: big database in one step), then each key's value and expiry.
_REDIS_ENTRIES = """
local cursor, found = '0', {}
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    local value = redis.call('GET', key)
    if value then
      found[#found + 1] = key
      found[#found + 1] = value
      found[#found + 1] = redis.call('EXPIRETIME', key)
    end
  end
until cursor == '0'
return found
"""
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def _parse_key_string(text: str) -> Optional[_CriteriaKey]:
    """Invert ``_key_string``; None for a string it never makes."""
    kind, _, rest = text.partition(":")
    if kind == "jti" and rest:
        return (rest, None, None)
    if kind == "agent" and rest:
        return (None, rest, None)
    if kind == "subject" and rest:
        return (None, None, rest)
    if kind == "agent+subject":
        length, _, pair = rest.partition(":")
        if length.isdigit() and 0 < int(length) < len(pair):
            return (None, pair[: int(length)], pair[int(length) :])
    return None


class RedisStore:
    """Revocations in Redis: the store for more than one host.

    ``client`` is a redis-py client (or anything with its ``mget`` and
    ``eval`` methods); agentauth imports nothing. Each entry is one key,
    ``prefix`` + criteria, holding ``revoked_at`` and expiring at
    ``expires_at`` (``EXAT``), so Redis purges it. ``revoke`` is one atomic
    script; ``is_revoked`` is one ``MGET`` round trip. Needs Redis >= 7.0.
    DPoP proofs (``record_proof``) are keys under ``prefix`` + "dpop:",
    set only if absent and expiring with the proof window.

    Give the client a socket timeout (``redis.Redis(socket_timeout=0.5)``):
    a Redis that is down or slow makes verify raise ``StoreUnavailableError``
    once the client gives up, never treat a token as unrevoked.

    Raises:
        InvalidConfigError: the client lacks ``mget``/``eval``, or the prefix is not a string.
    """

    def __init__(self, client: Any, *, prefix: str = "agentauth:") -> None:
        for method in ("mget", "eval"):
            if not callable(getattr(client, method, None)):
                raise InvalidConfigError(f"client must have a {method}() method (a redis-py client)")
        if type(prefix) is not str:
            raise InvalidConfigError("prefix must be a string")
        self._client = client
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    def revoke(self, criteria: Mapping[str, str], *, revoked_at: int, expires_at: int) -> None:
        """Record a revocation atomically; Redis expires it at ``expires_at``."""
        key, _entry = _entry_key(criteria)
        try:
            self._client.eval(_REDIS_REVOKE, 1, self.prefix + key, revoked_at, expires_at)
        except Exception as exc:  # the client's own error classes, unknown here
            raise StoreUnavailableError(f"the revocation was not recorded: {type(exc).__name__}") from exc

    def is_revoked(self, claims: AgentClaims) -> bool:
        """Tell whether a key refuses these claims: one MGET, however long the chain."""
        jtis, criteria_keys = _lookup(claims)
        prefix = self.prefix
        keys = [prefix + _key_string((jti, None, None)) for jti in jtis]
        keys += [prefix + _key_string(key) for key, _iat in criteria_keys]
        try:
            values = self._client.mget(keys)
        except Exception as exc:
            raise StoreUnavailableError(f"redis did not answer: {type(exc).__name__}") from exc
        if len(values) != len(keys):  # never read a short answer as "not revoked"
            raise StoreUnavailableError("redis answered MGET with the wrong number of values")
        if any(value is not None for value in values[: len(jtis)]):
            return True
        return any(
            value is not None and int(value) >= iat for value, (_key, iat) in zip(values[len(jtis) :], criteria_keys)
        )

    def entries(self, *, now: Optional[float] = None) -> List[RevocationEntry]:
        """List the entries under this prefix, newest first (Redis keeps only live ones).

        One script walks the prefix with SCAN; it holds Redis while it runs,
        so keep it for administration (the ``revocations`` command), not requests.

        Raises:
            StoreUnavailableError: redis did not answer.
        """
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + "*"
        try:
            found = self._client.eval(_REDIS_ENTRIES, 0, pattern)
        except Exception as exc:
            raise StoreUnavailableError(f"redis did not answer: {type(exc).__name__}") from exc
        entries = []
        for index in range(0, len(found) - 2, 3):
            raw_key, value, expires_at = found[index : index + 3]
            name = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else str(raw_key)
            key = _parse_key_string(name[len(self.prefix) :])
            if key is None:  # not ours: some other key that shares the prefix
                continue
            entry = RevocationEntry(*key, int(value), int(expires_at))
            if now is None or entry.expires_at > now:
                entries.append(entry)
        entries.sort(key=lambda entry: entry.revoked_at, reverse=True)
        return entries

    def record_proof(self, key: str, *, now: int, expires_at: int) -> bool:
        """Remember a DPoP proof (``ProofReplayStore``): one atomic ``SET NX EXAT``; False for a replay.

        Redis expires the key at ``expires_at``. Security: run this Redis with
        ``maxmemory-policy noeviction`` (or give the proofs a Redis of their
        own): an evicting policy lets a client that floods proofs evict live
        revocations and replay entries; with ``noeviction`` a full Redis
        refuses writes and verify fails closed.
        """
        try:
            answer = self._client.eval(_REDIS_RECORD_PROOF, 1, self.prefix + "dpop:" + key, now, expires_at)
        except Exception as exc:
            raise StoreUnavailableError(f"the DPoP replay cache was not updated: {type(exc).__name__}") from exc
        if answer not in (0, 1):
            raise StoreUnavailableError("redis answered the replay check with something else than 0 or 1")
        return answer == 1


# ---------------------------------------------------------------------------
# PostgreSQL store
# ---------------------------------------------------------------------------

#: Safe unquoted, leaves room in a channel name; "pg_" names are reserved to PostgreSQL.
_POSTGRES_SCHEMA_NAME = re.compile(r"(?!pg_)[a-z_][a-z0-9_]{0,47}\Z")
_POSTGRES_DRIVERS = ("psycopg", "psycopg2")
_POSTGRES_PURGE_ROWS = 1000  # expired rows deleted per write at most, so no call does unbounded work
_POSTGRES_LOCK_CLASS = 0x61676175  # first key of the advisory lock that serialises migrations
_POSTGRES_MAX_RETRY_SECONDS = 1.0  # the listener retries a lost connection at least this often


def _postgres_migrations(schema: str) -> List[Tuple[str, ...]]:
    """Return the statements that bring a schema from version n to n + 1, by n.

    Version 1 holds revocations; version 2 adds grants; version 3 the DPoP
    replay cache; version 4 the authorization server's records. A schema at
    an older version is migrated in place: only the missing steps run, in
    one transaction.

    ``seq`` orders the revocations by commit: every writer locks the table
    before taking a number and keeps the lock until it commits, so a reader
    that has seen row n has seen every row before it, and catching up is
    "rows with seq > the last one seen".
    """
    s = f'"{schema}"'
    return [
        (  # 0 -> 1: revocations
            f"CREATE TABLE {s}.agentauth_schema (version integer NOT NULL)",
            f"CREATE SEQUENCE {s}.agentauth_revocations_seq",
            f"""CREATE TABLE {s}.agentauth_revocations (
                key text PRIMARY KEY,
                seq bigint NOT NULL UNIQUE,
                jti text,
                agent text,
                subject text,
                revoked_at bigint NOT NULL,
                expires_at bigint NOT NULL
            )""",
            f"CREATE INDEX agentauth_revocations_expires ON {s}.agentauth_revocations (expires_at)",
        ),
        (  # 1 -> 2: grants; scopes space-delimited, as in a token's scope claim
            f"""CREATE TABLE {s}.agentauth_grants (
                subject text NOT NULL,
                agent text NOT NULL,
                grant_id text NOT NULL UNIQUE,
                agent_name text,
                scopes text NOT NULL,
                created_at bigint NOT NULL,
                updated_at bigint NOT NULL,
                last_used_at bigint,
                PRIMARY KEY (subject, agent)
            )""",
        ),
        (  # 2 -> 3: the DPoP replay cache (ProofReplayStore), one row per proof until expires_at
            f"CREATE TABLE {s}.agentauth_dpop_proofs (key text PRIMARY KEY, expires_at bigint NOT NULL)",
            f"CREATE INDEX agentauth_dpop_proofs_expires ON {s}.agentauth_dpop_proofs (expires_at)",
        ),
        (  # 3 -> 4: the authorization server's clients, codes and refresh tokens (AuthorizationStore)
            f"""CREATE TABLE {s}.agentauth_records (
                kind text NOT NULL,
                key text NOT NULL,
                value text NOT NULL,
                expires_at bigint NOT NULL,
                used_at bigint,
                PRIMARY KEY (kind, key)
            )""",
            f"CREATE INDEX agentauth_records_expires ON {s}.agentauth_records (expires_at)",
        ),
    ]


def _postgres_driver(conn: Any) -> str:
    """Name the driver of a connection object ("psycopg" or "psycopg2"); agentauth imports neither.

    Raises:
        InvalidConfigError: the object is not a connection of either driver.
    """
    for cls in type(conn).__mro__:
        package = getattr(cls, "__module__", "").partition(".")[0]
        if package in _POSTGRES_DRIVERS:
            return package
    raise InvalidConfigError("connect must return a psycopg (3) or psycopg2 connection")


def _postgres_row(row: Any) -> Tuple[Any, ...]:
    """A result row as a tuple, whatever row factory the caller's connections use."""
    return tuple(row.values()) if isinstance(row, Mapping) else tuple(row)


def _postgres_forked(ref: Callable[[], Optional["PostgresStore"]]) -> None:
    """In a forked child: make the store's next verify start a listener of the child's own."""
    store = ref()
    if store is not None:
        store._listening = False


def _postgres_close(conn: Any) -> None:
    """Close a connection, ignoring the errors of one that is already broken."""
    try:
        conn.close()
    except Exception:  # a dead connection may fail to close; it is dropped either way
        pass


_POSTGRES_REOPENS = 5  # times one lookup reopens a store that other threads keep closing


class PostgresStore:
    """Revocations, grants, DPoP proofs and authorization records in PostgreSQL: the store for several hosts.

    ``connect`` is a function that returns a new connection of psycopg 3 or
    psycopg2 (``lambda: psycopg.connect(url)``); agentauth imports neither.
    The store opens two connections per process: one for writes and one that
    LISTENs. Tables are created on first use in ``schema`` (created if
    missing), versioned in its ``agentauth_schema`` table, and migrated in
    place under an advisory lock, so hosts that start together do not race.

    Verify costs no database round trip: the store keeps the live entries in
    memory. A background thread LISTENs for the notification every ``revoke``
    sends when it commits and then loads the rows written since the last one
    it saw (by sequence number); it does the same at least every
    ``max_staleness_seconds / 5`` as a heartbeat, and after every reconnect.
    A revocation committed on one host is therefore refused by the others
    as soon as the notification arrives (milliseconds). Grants are read
    from the database on every call; a write that narrows or removes one
    records its revocation in the same transaction (``GrantStore``). The
    DPoP replay cache (``ProofReplayStore``) is one statement per proof;
    the authorization server's records (``AuthorizationStore``) are read
    and used in the database, a code or refresh token under a row lock.

    Security: fail closed. When the listening connection has not caught up
    with the database for ``max_staleness_seconds`` (measured with
    ``monotonic``), ``is_revoked`` raises ``StoreUnavailableError`` until it
    has. ``revoke`` commits before returning and raises
    ``StoreUnavailableError`` on failure; each write waits at most
    ``timeout_seconds`` for locks and statements. Give the connections a
    ``connect_timeout`` (and TCP keepalives) so that a lost server is noticed.
    The listening connection needs a real session: not a transaction-mode
    pooler such as PgBouncer's ``pool_mode=transaction``.

    Thread-safe. After ``os.fork`` the child opens connections of its own on
    first use. ``close()`` releases the connections; a later call opens them again.

    Raises:
        InvalidConfigError: a bad argument, a connection of another driver,
            or a schema newer than this version knows.
        StoreUnavailableError: the database cannot be reached or set up.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        schema: str = "agentauth",
        max_staleness_seconds: float = 5.0,
        timeout_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(connect):
            raise InvalidConfigError("connect must be a function that returns a new database connection")
        if type(schema) is not str or not _POSTGRES_SCHEMA_NAME.match(schema):
            raise InvalidConfigError(
                "schema must be 1-48 lower-case letters, digits or underscores, not starting with a digit or pg_"
            )
        for name, value in (("max_staleness_seconds", max_staleness_seconds), ("timeout_seconds", timeout_seconds)):
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise InvalidConfigError(f"{name} must be a positive number")
        if not callable(monotonic):
            raise InvalidConfigError("monotonic must be a function returning seconds")
        self.schema = schema
        self.max_staleness_seconds = float(max_staleness_seconds)
        self._connect = connect
        self._timeout_ms = str(max(1, int(timeout_seconds * 1000)))
        self._monotonic = monotonic
        self._table = f'"{schema}".agentauth_revocations'
        self._channel = f"agentauth_{schema}"
        self._heartbeat = min(self.max_staleness_seconds / 5, _POSTGRES_MAX_RETRY_SECONDS)
        self._index = _EntryIndex()
        self._lock = threading.Lock()  # guards the index and _last_seq
        self._write_lock = threading.Lock()  # one write transaction at a time on the write connection
        self._start_lock = threading.Lock()  # starts and stops the listener
        self._last_seq = 0
        self._stale_at = -math.inf  # monotonic time from which verify refuses: last catch-up's start + bound
        self._writer: Any = None
        self._writer_pid = 0
        self._listener: Optional[Tuple[threading.Thread, threading.Event, Any, threading.Event]] = None
        self._listener_owner = 0  # the process that started the listener
        self._listening = False  # verify found the listener started in this process (reset by close and fork)
        self._inherited: List[Any] = []  # a parent's connections: never used, never closed (see _forget_parent)
        if hasattr(os, "register_at_fork"):  # so that verify need not compare process ids
            import weakref

            os.register_at_fork(after_in_child=functools.partial(_postgres_forked, weakref.ref(self)))
        self._ensure_schema()
        self._start_listener()

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    # -- connections

    def _open(self, *, autocommit: bool) -> Any:
        conn = self._connect()
        try:
            _postgres_driver(conn)
            conn.autocommit = autocommit
        except BaseException:
            _postgres_close(conn)
            raise
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's connections and listener without touching them.

        Closing them would end the parent's sessions (the child shares their
        sockets), and so would letting them be garbage-collected, so they are kept.
        """
        self._inherited.append((self._writer, self._listener))
        self._writer, self._listener = None, None
        self._lock, self._write_lock, self._start_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._stale_at = -math.inf

    def _transaction(self, work: Callable[[Any], Any], failure: str, *, timeout_ms: Optional[str] = None) -> Any:
        """Run ``work(cursor)`` in one transaction on this process's write connection; commit.

        A failure before the commit leaves nothing written, so it is retried
        once on a new connection when the old one may have gone stale; a
        failed commit is not retried (it may or may not have been written).

        ``timeout_ms`` (default: the store's) bounds the wait for the
        connection, for locks and for each statement.

        Raises:
            StoreUnavailableError: not committed (``failure`` says what).
        """
        if self._writer_pid != os.getpid() and self._writer is not None:
            self._forget_parent()
        timeout_ms = timeout_ms or self._timeout_ms
        if not self._write_lock.acquire(timeout=int(timeout_ms) / 1000):
            raise StoreUnavailableError(f"{failure}: the store is busy")
        try:
            for attempt in (1, 2):
                reused = self._writer is not None
                try:
                    if not reused:
                        self._writer, self._writer_pid = self._open(autocommit=False), os.getpid()
                    cursor = self._writer.cursor()
                    cursor.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                                   (timeout_ms, timeout_ms))
                    result = work(cursor)
                except InvalidConfigError:
                    self._drop_writer()
                    raise
                except Exception as exc:  # the driver's own error classes, unknown here
                    self._drop_writer()
                    if reused and attempt == 1:
                        continue
                    raise StoreUnavailableError(f"{failure}: {type(exc).__name__}") from exc
                try:
                    self._writer.commit()
                except Exception as exc:
                    self._drop_writer()
                    raise StoreUnavailableError(f"{failure}: {type(exc).__name__}") from exc
                return result
        finally:
            self._write_lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop_writer(self) -> None:
        if self._writer is not None:
            _postgres_close(self._writer)  # rolls back whatever was not committed
            self._writer = None

    def _ensure_schema(self) -> None:
        """Create or migrate the tables, one host at a time, on a connection of its own.

        Raises:
            InvalidConfigError: the schema is newer than this version knows.
            StoreUnavailableError: the database cannot be reached or changed.
        """
        migrations = _postgres_migrations(self.schema)
        lock = (_POSTGRES_LOCK_CLASS, int.from_bytes(hashlib.sha256(self.schema.encode()).digest()[:4], "big", signed=True))
        try:
            conn = self._open(autocommit=True)
        except InvalidConfigError:
            raise
        except Exception as exc:  # the driver's own error classes, unknown here
            raise StoreUnavailableError(f"cannot reach the database: {type(exc).__name__}") from exc
        try:
            cursor = conn.cursor()
            if self._schema_version(cursor) == len(migrations):
                return
            cursor.execute("SELECT set_config('lock_timeout', %s, false)", (self._timeout_ms,))
            # A session lock, then a new transaction: one that starts after the
            # lock is granted sees the tables another host has just created.
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", lock)
            try:
                cursor.execute("BEGIN")
                version = self._schema_version(cursor)
                if version > len(migrations):
                    raise InvalidConfigError(
                        f"the database schema {self.schema!r} has version {version}; this agentauth knows {len(migrations)}"
                    )
                cursor.execute("SELECT to_regnamespace(%s) IS NULL", (self.schema,))
                if _postgres_row(cursor.fetchone())[0]:
                    cursor.execute(f'CREATE SCHEMA "{self.schema}"')
                for statements in migrations[version:]:
                    for statement in statements:
                        cursor.execute(statement)
                cursor.execute(f'DELETE FROM "{self.schema}".agentauth_schema')
                cursor.execute(f'INSERT INTO "{self.schema}".agentauth_schema (version) VALUES (%s)', (len(migrations),))
                cursor.execute("COMMIT")
            finally:
                if not conn.closed:
                    cursor.execute("ROLLBACK")  # after COMMIT: a warning, no error
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", lock)
        except InvalidConfigError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(f"cannot set up the tables: {type(exc).__name__}") from exc
        finally:
            _postgres_close(conn)

    def _schema_version(self, cursor: Any) -> int:
        """The schema's version: 0 when it has no agentauth tables yet."""
        cursor.execute("SELECT to_regclass(%s) IS NULL", (f'"{self.schema}".agentauth_schema',))
        if _postgres_row(cursor.fetchone())[0]:
            return 0
        cursor.execute(f'SELECT max(version) FROM "{self.schema}".agentauth_schema')
        return int(_postgres_row(cursor.fetchone())[0] or 0)

    # -- the listener

    def _start_listener(self) -> None:
        """Start this process's listener thread unless running; wait (up to the staleness bound) for its first catch-up."""
        import socket

        pid = os.getpid()
        with self._start_lock:
            if self._listener is not None and self._listener_owner != pid:
                self._forget_parent()
            if self._listener is None:
                stop, caught_up = threading.Event(), threading.Event()
                wake = socket.socketpair()  # close() writes to one end to stop the listener at once
                thread = threading.Thread(
                    target=self._listen, args=(stop, caught_up, wake), name="agentauth-postgres-listener", daemon=True
                )
                self._listener, self._listener_owner = (thread, stop, wake, caught_up), pid
                thread.start()
            listener = self._listener
        listener[3].wait(self.max_staleness_seconds)
        with self._start_lock:
            if self._listener is listener:  # not closed meanwhile
                self._listening = True  # verify no longer comes here in this process

    def _listen(self, stop: threading.Event, caught_up: threading.Event, wake: Any) -> None:
        """Listen, catch up, and reconnect with a growing delay whenever the connection fails."""
        import select

        delay = 0.05
        failing = False
        notified = [False]

        def on_notify(_notification: Any) -> None:  # psycopg 3 calls this while it reads results
            notified[0] = True

        while not stop.is_set():
            conn = None
            try:
                conn = self._open(autocommit=True)
                psycopg2 = _postgres_driver(conn) == "psycopg2"
                if not psycopg2:
                    conn.add_notify_handler(on_notify)
                cursor = conn.cursor()
                # LISTEN before the catch-up query: a commit after it is
                # notified, one before it is in the query's answer.
                cursor.execute(f'LISTEN "{self._channel}"')
                # Every (re)connect reloads every live row: a restore or a
                # failover reuses sequence numbers this process has seen.
                full = True
                while not stop.is_set():
                    notified[0] = False
                    if psycopg2:
                        del conn.notifies[:]
                    self._catch_up(cursor, full=full)
                    full = False
                    caught_up.set()
                    delay, failing = 0.05, False
                    if notified[0] or (psycopg2 and conn.notifies):
                        continue  # a commit was announced during the query: it may be newer than its answer
                    select.select([conn.fileno(), wake[0]], [], [], self._heartbeat)
            except Exception as exc:  # the driver's errors, unknown here; verify fails closed meanwhile
                if not failing:
                    import logging

                    logging.getLogger("agentauth").warning(
                        "PostgresStore lost its notification connection (%s); retrying", type(exc).__name__
                    )
                failing = True
            finally:
                if conn is not None:
                    _postgres_close(conn)
            stop.wait(delay)
            delay = min(delay * 2, self._heartbeat)
        for end in wake:
            end.close()

    def _catch_up(self, cursor: Any, *, full: bool = False) -> None:
        """Load the rows committed since the last one seen (``full``: every row); mark the index fresh.

        The sequence is read first: when it is behind the last row seen, the
        database went back in time (a restore, a recreated schema) and new
        rows may carry numbers already seen, so every row is loaded again.
        Entries already held are kept either way (fail closed).
        """
        started = self._monotonic()
        cursor.execute(f'SELECT last_value, is_called FROM "{self.schema}".agentauth_revocations_seq')
        last_value, is_called = cursor.fetchone()
        since = 0 if full or (last_value if is_called else 0) < self._last_seq else self._last_seq
        cursor.execute(
            f"SELECT seq, jti, agent, subject, revoked_at, expires_at FROM {self._table} WHERE seq > %s ORDER BY seq",
            (since,),
        )
        rows = [_postgres_row(row) for row in cursor.fetchall()]
        with self._lock:
            if since == 0:
                self._last_seq = 0
            if rows:
                for row in rows:
                    self._index.put(RevocationEntry(*row[1:]))
                self._last_seq = rows[-1][0]
                # A revocation's time is a lower bound of the writing host's clock now.
                self._index.purge(max(row[4] for row in rows))
            self._stale_at = max(self._stale_at, started + self.max_staleness_seconds)

    # -- the revocation store

    def _record_revocation(self, cursor: Any, criteria: Mapping[str, str], revoked_at: int, expires_at: int) -> RevocationEntry:
        """Write one revocation in the caller's transaction; return the merged entry.

        Locks the table first (see ``_postgres_migrations``), purges a bounded
        batch of expired rows, and notifies the listeners on commit.
        """
        key, entry = _entry_key(criteria)
        table = self._table
        cursor.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        cursor.execute(
            f"DELETE FROM {table} WHERE seq IN"
            f" (SELECT seq FROM {table} WHERE expires_at <= %s ORDER BY expires_at LIMIT {_POSTGRES_PURGE_ROWS})",
            (revoked_at,),
        )
        # A new seq for a merged row too, so that every reader loads it again.
        cursor.execute(
            f"INSERT INTO {table} AS r (key, seq, jti, agent, subject, revoked_at, expires_at)"
            f" VALUES (%s, nextval('\"{self.schema}\".agentauth_revocations_seq'), %s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO UPDATE SET seq = EXCLUDED.seq,"
            " revoked_at = GREATEST(r.revoked_at, EXCLUDED.revoked_at),"
            " expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at)"
            " RETURNING revoked_at, expires_at",
            (key, entry.jti, entry.agent, entry.subject, revoked_at, expires_at),
        )
        merged_revoked_at, merged_expires_at = _postgres_row(cursor.fetchone())
        cursor.execute("SELECT pg_notify(%s, '')", (self._channel,))
        return entry._replace(revoked_at=merged_revoked_at, expires_at=merged_expires_at)

    def _remember(self, entry: RevocationEntry, now: int) -> None:
        """Put an entry this process committed into the index (the listener loads it again, harmlessly)."""
        with self._lock:
            self._index.purge(now)
            self._index.put(entry)

    def revoke(self, criteria: Mapping[str, str], *, revoked_at: int, expires_at: int) -> None:
        """Record a revocation in one committed transaction; purge a batch of expired rows.

        Raises:
            ValueError: bad criteria (nothing is written).
            StoreUnavailableError: the revocation was not committed.
        """
        _entry_key(criteria)  # bad criteria are the caller's error, before any database work
        entry = self._transaction(
            lambda cursor: self._record_revocation(cursor, criteria, revoked_at, expires_at),
            "the revocation was not recorded",
        )
        self._remember(entry, revoked_at)

    def is_revoked(self, claims: AgentClaims) -> bool:
        """Tell whether an entry refuses these claims, from memory.

        Raises:
            StoreUnavailableError: the listener has not caught up with the
                database for ``max_staleness_seconds``.
        """
        for _attempt in range(_POSTGRES_REOPENS):
            if not self._listening:  # closed, or a forked child's first call
                self._start_listener()
            if self._monotonic() <= self._stale_at:
                return self._index.matches(claims)
            if self._listening:  # the listener runs and has fallen behind: fail closed
                break
            # Another thread closed the store between the two checks: open it again.
        raise StoreUnavailableError("the revocation store has not caught up with the database")

    # -- the DPoP replay cache: shared by every host, so a proof is accepted once across all of them

    def record_proof(self, key: str, *, now: int, expires_at: int) -> bool:
        """Remember a DPoP proof (``ProofReplayStore``) in one transaction; False for a replay.

        One ``INSERT ... ON CONFLICT``: of two hosts racing with the same
        proof, one inserts and the other waits for its commit and sees a
        replay. A row already expired is taken over; a bounded batch of
        expired rows is purged in the same transaction.

        Raises:
            StoreUnavailableError: the database did not answer (verify fails closed).
        """
        proofs = f'"{self.schema}".agentauth_dpop_proofs'

        def work(cursor: Any) -> bool:
            cursor.execute(
                f"DELETE FROM {proofs} WHERE key IN"
                f" (SELECT key FROM {proofs} WHERE expires_at <= %s ORDER BY expires_at LIMIT {_POSTGRES_PURGE_ROWS})",
                (now,),
            )
            cursor.execute(
                f"INSERT INTO {proofs} AS p (key, expires_at) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE p.expires_at <= %s"
                " RETURNING key",
                (key, expires_at, now),
            )
            return cursor.fetchone() is not None

        return typing.cast(bool, self._transaction(work, "the DPoP replay cache did not answer"))

    # -- the authorization server's records (AuthorizationStore): clients, codes, refresh tokens

    def put_record(self, kind: str, key: str, value: str, *, expires_at: int, now: int) -> None:
        """Store (or replace, forgetting any use) a record in one transaction; purge a batch of expired ones.

        Raises:
            StoreUnavailableError: nothing was written.
        """
        records = f'"{self.schema}".agentauth_records'

        def work(cursor: Any) -> None:
            cursor.execute(
                f"DELETE FROM {records} WHERE (kind, key) IN (SELECT kind, key FROM {records}"
                f" WHERE expires_at <= %s ORDER BY expires_at LIMIT {_POSTGRES_PURGE_ROWS})",
                (now,),
            )
            cursor.execute(
                f"INSERT INTO {records} (kind, key, value, expires_at, used_at) VALUES (%s, %s, %s, %s, NULL)"
                " ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at,"
                " used_at = NULL",
                (kind, key, value, expires_at),
            )

        self._transaction(work, "the record was not stored")

    def get_record(self, kind: str, key: str, *, now: int) -> Optional[str]:
        """Return a live record's value, or None.

        Raises:
            StoreUnavailableError: the database did not answer.
        """
        rows = self._read(
            f'SELECT value FROM "{self.schema}".agentauth_records WHERE kind = %s AND key = %s AND expires_at > %s',
            (kind, key, now),
        )
        return typing.cast(str, rows[0][0]) if rows else None

    def use_record(self, kind: str, key: str, *, now: int) -> Optional[Tuple[str, Optional[int]]]:
        """Mark a live record used, atomically across hosts; return (its value, its earlier first use).

        The row is locked (``FOR UPDATE``): of two hosts redeeming one code,
        the second waits for the first to commit and then sees its use.

        Raises:
            StoreUnavailableError: the database did not answer; nothing was marked.
        """
        records = f'"{self.schema}".agentauth_records'

        def work(cursor: Any) -> Optional[Tuple[str, Optional[int]]]:
            cursor.execute(
                f"SELECT value, used_at FROM {records} WHERE kind = %s AND key = %s AND expires_at > %s FOR UPDATE",
                (kind, key, now),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            value, used_at = _postgres_row(row)
            if used_at is None:
                cursor.execute(f"UPDATE {records} SET used_at = %s WHERE kind = %s AND key = %s", (now, kind, key))
            return value, used_at

        return typing.cast(Optional[Tuple[str, Optional[int]]], self._transaction(work, "the record was not used"))

    # -- the grant store: read from the database on every call, so every host sees the same grants

    def save_grant(self, grant: Grant, *, replace: bool, revoked_at: int, expires_at: int) -> Grant:
        """Record consent (``GrantStore``) in one transaction, with the revocation a narrowing makes.

        Two hosts granting at once are serialised by the grant's row lock: the
        first insert wins, the other merges into it.

        Raises:
            StoreUnavailableError: nothing was written.
        """
        grants = f'"{self.schema}".agentauth_grants'
        row = (*grant[:4], " ".join(grant.scopes), *grant[5:])

        def work(cursor: Any) -> Tuple[Grant, Optional[RevocationEntry]]:
            cursor.execute(
                f"INSERT INTO {grants} ({_GRANT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (subject, agent) DO NOTHING RETURNING grant_id",
                row,
            )
            if cursor.fetchone() is not None:
                return grant, None
            cursor.execute(
                f"SELECT {_GRANT_COLUMNS} FROM {grants} WHERE subject = %s AND agent = %s FOR UPDATE",
                (grant.subject, grant.agent),
            )
            stored, narrowed = _grant_row(_postgres_row(cursor.fetchone()))._merged_with(grant, replace)
            cursor.execute(
                f"UPDATE {grants} SET agent_name = %s, scopes = %s, updated_at = %s WHERE subject = %s AND agent = %s",
                (stored.agent_name, " ".join(stored.scopes), stored.updated_at, grant.subject, grant.agent),
            )
            written = None
            if narrowed:
                criteria = {"agent": grant.agent, "subject": grant.subject}
                written = self._record_revocation(cursor, criteria, revoked_at, expires_at)
            return stored, written

        stored, written = self._transaction(work, "the grant was not recorded")
        if written is not None:
            self._remember(written, revoked_at)
        return typing.cast(Grant, stored)

    def get_grant(self, subject: str, agent: str) -> Optional[Grant]:
        """Return the grant of (subject, agent), or None.

        Raises:
            StoreUnavailableError: the database did not answer.
        """
        rows = self._read(
            f'SELECT {_GRANT_COLUMNS} FROM "{self.schema}".agentauth_grants WHERE subject = %s AND agent = %s',
            (subject, agent),
        )
        return _grant_row(rows[0]) if rows else None

    def list_grants(self, subject: str) -> List[Grant]:
        """Return the subject's grants, most recently used first.

        Raises:
            StoreUnavailableError: the database did not answer.
        """
        rows = self._read(f'SELECT {_GRANT_COLUMNS} FROM "{self.schema}".agentauth_grants WHERE subject = %s', (subject,))
        return sorted(map(_grant_row, rows), key=_grant_order)

    def delete_grant(self, subject: str, agent: str, *, revoked_at: int, expires_at: int) -> bool:
        """Delete the grant and revoke its tokens in one transaction; False when there was none.

        Raises:
            StoreUnavailableError: nothing was changed.
        """

        def work(cursor: Any) -> Optional[RevocationEntry]:
            cursor.execute(
                f'DELETE FROM "{self.schema}".agentauth_grants WHERE subject = %s AND agent = %s RETURNING grant_id',
                (subject, agent),
            )
            if cursor.fetchone() is None:
                return None
            return self._record_revocation(cursor, {"agent": agent, "subject": subject}, revoked_at, expires_at)

        written = self._transaction(work, "the grant was not removed")
        if written is None:
            return False
        self._remember(written, revoked_at)
        return True

    def touch_grant(self, subject: str, agent: str, used_at: int) -> None:
        """Record a use of the grant, if it exists: one statement, waiting at most 100 ms.

        Called from verify: a busy database must not hold a request for the
        whole timeout over a display-only timestamp.

        Raises:
            StoreUnavailableError: not recorded.
        """

        def work(cursor: Any) -> None:
            cursor.execute(
                f'UPDATE "{self.schema}".agentauth_grants SET last_used_at = %s WHERE subject = %s AND agent = %s'
                " AND (last_used_at IS NULL OR last_used_at < %s)",
                (used_at, subject, agent, used_at),
            )

        self._transaction(work, "the grant's last use was not recorded", timeout_ms="100")

    def _read(self, query: str, params: Tuple[Any, ...]) -> List[Tuple[Any, ...]]:
        def work(cursor: Any) -> List[Tuple[Any, ...]]:
            cursor.execute(query, params)
            return [_postgres_row(row) for row in cursor.fetchall()]

        return typing.cast(List[Tuple[Any, ...]], self._transaction(work, "the database did not answer"))

    def entries(self, *, now: Optional[float] = None) -> List[RevocationEntry]:
        """List the table's entries, newest first; with ``now``, only those still live.

        Raises:
            StoreUnavailableError: the database did not answer.
        """
        query = f"SELECT jti, agent, subject, revoked_at, expires_at FROM {self._table}"
        params: Tuple[Any, ...] = ()
        if now is not None:
            query += " WHERE expires_at > %s"
            params = (now,)

        def work(cursor: Any) -> List[RevocationEntry]:
            cursor.execute(query + " ORDER BY revoked_at DESC, seq DESC", params)
            return [RevocationEntry(*_postgres_row(row)) for row in cursor.fetchall()]

        return typing.cast(List[RevocationEntry], self._transaction(work, "the revocation database did not answer"))

    def close(self) -> None:
        """Stop the listener and close this process's connections; a later call opens them again."""
        with self._start_lock:
            listener, self._listener = self._listener, None
            self._listening = False
            if listener is not None and self._listener_owner != os.getpid():
                self._inherited.append(listener)  # a parent's: see _forget_parent
            elif listener is not None:
                thread, stop, wake, caught_up = listener
                stop.set()
                caught_up.set()  # a lookup waiting for this listener's first catch-up stops waiting
                try:
                    wake[1].send(b"x")
                except OSError:  # the listener already closed it
                    pass
                if thread is not threading.current_thread():
                    thread.join(timeout=10)
            self._stale_at = -math.inf
        with self._write_lock:
            if self._writer_pid == os.getpid():
                self._drop_writer()


# ---------------------------------------------------------------------------
# Grants
# ---------------------------------------------------------------------------

MAX_AGENT_NAME_CHARS = 100  # an agent's display name on the consent and agents pages
LAST_USED_INTERVAL_SECONDS = 60  # a grant's last_used_at is written at most this often
_LAST_USED_TRACKED = 10000  # grants whose last write time one instance remembers


def _agent_name(value: Any) -> Optional[str]:
    """Validate an agent's display name: None, or 1 to 100 characters of text."""
    if value is None:
        return None
    if type(value) is not str or not 0 < len(value) <= MAX_AGENT_NAME_CHARS:
        raise InvalidGrantError(f"agent_name must be a string of 1 to {MAX_AGENT_NAME_CHARS} characters")
    _name(value, "agent_name")  # no control characters, no lone surrogates
    return value


def _grant_store(store: Any) -> "GrantStore":
    """Return ``store`` as a grant store, or refuse a store that cannot hold grants."""
    if not all(callable(getattr(store, method, None)) for method in _GRANT_METHODS):
        raise InvalidConfigError(
            f"{type(store).__name__} cannot hold grants: use MemoryStore, SqliteStore or PostgresStore"
            " (or your own store with the GrantStore methods)"
        )
    return typing.cast(GrantStore, store)


def _store_call(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a store method; any failure but the store's own is StoreUnavailableError (fail closed)."""
    try:
        return call(*args, **kwargs)
    except StoreUnavailableError:
        raise
    except Exception as exc:
        raise StoreUnavailableError("the store failed") from exc


class _LastUsed:
    """Record that a grant was used, at most once a minute per grant, never failing the caller.

    Remembers when it last wrote each (subject, agent) in this process, in
    write order, for at most ``_LAST_USED_TRACKED`` grants. When full, it
    forgets the entries older than the interval (they throttle nothing any
    more); if every entry is recent, the new grant's use is not written now
    but once room frees up, within about a minute. So memory and writes stay
    bounded however many grants are in use: last use is a display value.
    """

    def __init__(self, store: "GrantStore") -> None:
        self._store = store
        self._written: "collections.OrderedDict[Tuple[str, str], float]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, claims: AgentClaims, now: float) -> None:
        # The grant is the user's consent to the root agent; a delegated
        # token uses its root's grant.
        key = (claims.sub, claims.chain[0] if claims.chain else claims.agent)
        last = self._written.get(key)
        if last is not None and now - last < LAST_USED_INTERVAL_SECONDS:
            return
        with self._lock:
            written = self._written
            written.pop(key, None)
            if len(written) >= _LAST_USED_TRACKED:
                stale = now - LAST_USED_INTERVAL_SECONDS
                while written and next(iter(written.values())) <= stale:
                    written.popitem(last=False)
                if len(written) >= _LAST_USED_TRACKED:  # every entry is recent: write this one later
                    return
            written[key] = now
        try:
            self._store.touch_grant(key[0], key[1], math.floor(now))
        except Exception as exc:  # a display-only timestamp never fails a verify
            import logging

            logging.getLogger("agentauth").warning("could not record a grant's last use: %s", type(exc).__name__)

    def forget(self, subject: str, agent: str) -> None:
        """Let the next use of a new or removed grant be written at once."""
        with self._lock:
            self._written.pop((subject, agent), None)


# ---------------------------------------------------------------------------
# DPoP
# ---------------------------------------------------------------------------

#: RFC 9449: a DPoP proof is a JWT signed by the client's key, whose public
#: half rides in its header; a bound token names that key by its RFC 7638
#: thumbprint (``cnf.jkt``). The server checks every rule of §4.3, binds the
#: proof to the request and the token, and remembers each proof's ``jti``
#: for as long as its ``iat`` is acceptable (§11.1).

#: What kind of key each proof algorithm needs in the "jwk" header: (kty, crv).
_DPOP_KEY_TYPES = {ALGORITHM_ES256: ("EC", "P-256"), ALGORITHM_EDDSA: ("OKP", "Ed25519"), ALGORITHM_ED25519: ("OKP", "Ed25519")}
#: JWK members that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
_PRIVATE_JWK_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth", "k"))
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")  # an RFC 7638 SHA-256 thumbprint, base64url
_DPOP_OPTIONS = ("require_dpop", "dpop_algorithms", "dpop_window_seconds", "dpop_nonce")
_MAX_PROOF_BYTES = 2048  # a proof with a P-256 key is about 600 bytes
_MAX_PROOF_JTI_CHARS = 256
_DPOP_NONCE_SECONDS = 120  # a nonce slot; a nonce is good in its slot and the next
_DPOP_NONCE = re.compile(r"[A-Za-z0-9_-]{32}")
_HTTP_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §9.1: a token
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def _access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url of the SHA-256 of the token's ASCII bytes."""
    return _b64encode(hashlib.sha256(token.encode("ascii")).digest())


def _normalize_percent(match: "re.Match[str]") -> str:
    # RFC 3986 §6.2.2.1-2: upper-case hex digits, and decode unreserved characters.
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _htu(url: Any) -> Optional[str]:
    """Normalise an absolute http(s) URL for the ``htu`` comparison, or None if it is not one.

    RFC 9449 §4.3 step 9 and RFC 3986 §6.2.2-6.2.3: query and fragment
    dropped, scheme and host lower-cased, the default port removed, an empty
    path made "/", percent-encoding normalised, dot segments removed.
    """
    return _normalized_url(url) if type(url) is str else None


@functools.lru_cache(maxsize=256)
def _normalized_url(url: str) -> Optional[str]:
    # Memoised: a server sees the same few URLs in every proof and request,
    # and urlsplit costs more than the rest of the comparison.
    from urllib.parse import urlsplit

    if _CONTROL_CHARS.search(url) or " " in url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host or "@" in parts.netloc:
        return None
    if port is None or port == {"http": 80, "https": 443}[scheme]:
        authority = host if ":" not in host else f"[{host}]"
    else:
        authority = f"{host if ':' not in host else f'[{host}]'}:{port}"
    path = _PERCENT.sub(_normalize_percent, parts.path) or "/"
    segments: List[str] = []
    for segment in path.split("/")[1:]:  # RFC 3986 §5.2.4, for an absolute path
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    if path.endswith(("/.", "/..")):
        segments.append("")
    return f"{scheme}://{authority}/" + "/".join(segments)


@functools.lru_cache(maxsize=1024)
def _proof_key(kty: str, crv: str, x: Any, y: Any) -> Tuple[Union[Ed25519Key, P256Key], str]:
    """The public key of a proof's "jwk" header and its RFC 7638 thumbprint, cached.

    Keyed by the members that define the key, so an agent's next proof costs
    no parsing, no curve check and, on the cryptography backend, no new key object.

    Raises:
        InvalidConfigError: not a usable public key (off the curve, small order, malformed).
    """
    key: Union[Ed25519Key, P256Key]
    if kty == "EC":
        key = P256Key.from_jwk({"kty": kty, "crv": crv, "x": x, "y": y})
    else:
        key = Ed25519Key.from_jwk({"kty": kty, "crv": crv, "x": x})
    return key, key.thumbprint()


def dpop_proof(
    key: Union[Ed25519Key, P256Key],
    method: str,
    url: str,
    access_token: Optional[str] = None,
    nonce: Optional[str] = None,
    *,
    alg: Optional[str] = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """Return a DPoP proof (RFC 9449 §4.2) for one HTTP request, signed by the agent's ``key``.

    Send it in the ``DPoP`` header with ``Authorization: DPoP <access_token>``.
    ``url`` is the request's URL; its query and fragment are left out of
    ``htu``. With ``access_token``, the proof carries its hash (``ath``);
    with ``nonce``, the server's ``DPoP-Nonce``. An Ed25519 key signs as
    "EdDSA" unless ``alg="Ed25519"`` (RFC 9864); a P256Key as "ES256".
    Each proof has a fresh random ``jti``, ``iat`` from ``clock``.

    Raises:
        InvalidConfigError: a public key, a bad method, a URL that is not
            absolute http(s), or an ``alg`` that does not fit the key.

    Security: a proof is good for one request only, for a few minutes; the
    private key never leaves the agent.
    """
    allowed: Tuple[str, ...]
    if isinstance(key, P256Key):
        default_alg, allowed = ALGORITHM_ES256, (ALGORITHM_ES256,)
    elif isinstance(key, Ed25519Key):
        default_alg, allowed = ALGORITHM_EDDSA, tuple(sorted(_EDDSA_NAMES))
    else:
        raise InvalidConfigError("key must be a private Ed25519Key or P256Key")
    if not key.is_private:
        raise InvalidConfigError("a DPoP proof is signed with the agent's private key")
    alg = default_alg if alg is None else alg
    if alg not in allowed:
        raise InvalidConfigError(f"alg of this key must be one of {', '.join(allowed)}")
    if type(method) is not str or _HTTP_METHOD.fullmatch(method) is None:
        raise InvalidConfigError("method must be an HTTP method such as GET")
    if _htu(url) is None:
        raise InvalidConfigError("url must be an absolute http(s) URL")
    jwk = {k: v for k, v in key.public_jwk().items() if k in ("kty", "crv", "x", "y")}
    header = {"typ": DPOP_PROOF_TYPE, "alg": alg, "jwk": jwk}
    claims: Dict[str, Any] = {
        "jti": secrets.token_urlsafe(_JTI_BYTES),
        "htm": method,
        "htu": url.split("#", 1)[0].split("?", 1)[0],  # RFC 9449 §4.2: without query and fragment
        "iat": math.floor(clock()),
    }
    if access_token is not None:
        if type(access_token) is not str or not access_token.isascii():
            raise InvalidConfigError("access_token must be the token string")
        claims["ath"] = _access_token_hash(access_token)
    if nonce is not None:
        if type(nonce) is not str or not nonce:
            raise InvalidConfigError("nonce must be the server's DPoP-Nonce value")
        claims["nonce"] = nonce
    head = _b64encode(_JSON_ENCODER.encode(header).encode("ascii"))
    body = _b64encode(_JSON_ENCODER.encode(claims).encode("utf-8"))
    signing_input = f"{head}.{body}"
    return f"{signing_input}.{_b64encode(key.sign(signing_input.encode('ascii')))}"


class _DPoPNonces:
    """Stateless server nonces (RFC 9449 §8): an HMAC of a time slot, nothing stored.

    A nonce names its slot of ``_DPOP_NONCE_SECONDS``; it is good in that
    slot and the next, so it rotates without any state, and every process
    that shares the key accepts the others' nonces.
    """

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def _nonce(self, slot: int) -> str:
        mac = self._mac.copy()
        mac.update(slot.to_bytes(8, "big"))
        return _b64encode(slot.to_bytes(8, "big") + mac.digest()[:16])

    def issue(self, now: float) -> str:
        """Return the nonce of the current slot."""
        return self._nonce(math.floor(now) // _DPOP_NONCE_SECONDS)

    def check(self, nonce: Any, now: float) -> bool:
        """Tell whether ``nonce`` is this key's, of the current or the previous slot."""
        if type(nonce) is not str or _DPOP_NONCE.fullmatch(nonce) is None:
            return False
        slot = int.from_bytes(_b64decode(nonce)[:8], "big")
        current = math.floor(now) // _DPOP_NONCE_SECONDS
        return current - 1 <= slot <= current and hmac.compare_digest(self._nonce(slot), nonce)


class _DPoPPolicy:
    """How an AgentAuth checks DPoP proofs: algorithms, window, nonces (RFC 9449 §4.3)."""

    def __init__(self, *, algorithms: Iterable[str], window_seconds: int, require: bool, nonces: Optional[_DPoPNonces]) -> None:
        if isinstance(algorithms, str):
            raise InvalidConfigError("dpop_algorithms must be a list of algorithm names")
        chosen = tuple(algorithms)
        if not chosen or any(alg not in _DPOP_KEY_TYPES for alg in chosen):
            # RFC 9449 §4.3 step 5: never "none" or a MAC.
            raise InvalidConfigError(f"dpop_algorithms must name some of {', '.join(_DPOP_KEY_TYPES)}")
        self.algorithms = frozenset(chosen)
        self.algs_param = " ".join(alg for alg in _DPOP_KEY_TYPES if alg in self.algorithms)  # for WWW-Authenticate
        self.window_seconds = _positive_int(window_seconds, "dpop_window_seconds")
        if type(require) is not bool:
            raise InvalidConfigError("require_dpop must be True or False")
        self.require = require
        self.nonces = nonces

    def check(
        self, proof: Any, method: str, url: str, token: Optional[str], now: float, jkt: Optional[str] = None
    ) -> Tuple[str, str, int]:
        """Check one proof against the request and the token (RFC 9449 §4.3 steps 1-12).

        ``token`` is the access token the proof comes with; None at a token
        endpoint, where ``ath`` is not checked (§4.3 step 12). ``jkt`` is the
        thumbprint the token is bound to: a proof of another key is refused
        before its signature costs anything.

        Returns (the proof key's thumbprint, the replay-cache key, when that
        entry may be forgotten); the caller records the replay key.

        Raises:
            DPoPProofError: any rule broken.
            DPoPNonceError: nonces are on and the proof's is missing or stale.
        """
        # Step 1-2: one well-formed JWT.
        if type(proof) is not str or len(proof) > _MAX_PROOF_BYTES or _COMPACT_JWS.fullmatch(proof) is None:
            raise DPoPProofError("the DPoP proof is not one compact JWS")
        head, body, sig = proof.split(".")
        try:
            # Step 5: the algorithm is allow-listed (never "none" or a MAC); no "crit".
            header = _parse_header(head, self.algorithms)
        except TokenInvalidError as exc:
            raise DPoPProofError("the DPoP proof header is not acceptable") from exc
        # Step 4: typ is dpop+jwt (a media type: case-insensitive).
        typ = header.get("typ")
        if type(typ) is not str or typ.lower() != DPOP_PROOF_TYPE:
            raise DPoPProofError("the DPoP proof type is not dpop+jwt")
        # Step 7: the jwk header is a public key of the algorithm's type.
        jwk = header.get("jwk")
        if type(jwk) is not dict or not _PRIVATE_JWK_MEMBERS.isdisjoint(jwk):
            raise DPoPProofError("the DPoP proof key is missing or carries private material")
        kty, crv = _DPOP_KEY_TYPES[header["alg"]]
        if jwk.get("kty") != kty or jwk.get("crv") != crv:
            raise DPoPProofError("the DPoP proof key does not fit its algorithm")
        try:
            key, proof_jkt = _proof_key(kty, crv, jwk.get("x"), jwk.get("y") if kty == "EC" else None)
        except (InvalidConfigError, TypeError) as exc:  # TypeError: an unhashable member
            raise DPoPProofError("the DPoP proof key is not a valid public key") from exc
        if jkt is not None and not hmac.compare_digest(jkt, proof_jkt):  # §4.3 step 12 / §6.1
            raise DPoPProofError("the DPoP proof is signed by another key than the token is bound to")
        # Step 6: the signature, with that key.
        try:
            raw = _b64decode(sig)
        except ValueError as exc:
            raise DPoPProofError("the DPoP proof signature is not canonical base64url") from exc
        if not key.verify(proof[: len(head) + 1 + len(body)].encode("ascii"), raw):
            raise DPoPProofError("the DPoP proof signature does not match its key")
        try:
            claims = _json_object(_decode_payload(body), "payload")
        except TokenInvalidError as exc:
            raise DPoPProofError("the DPoP proof payload is not a JSON object") from exc
        jti, htm, htu, ath = (claims.get(name) for name in ("jti", "htm", "htu", "ath"))
        iat: Any = claims.get("iat")
        # Step 3: the required claims, with their types.
        if type(jti) is not str or not jti or len(jti) > _MAX_PROOF_JTI_CHARS:
            raise DPoPProofError("the DPoP proof jti is missing or malformed")
        if type(htm) is not str or type(htu) is not str or (token is not None and type(ath) is not str):
            raise DPoPProofError("the DPoP proof lacks htm, htu or ath")
        # The bound first: a huge int must be refused, not overflow a float (NaN and inf fail it too).
        if type(iat) not in (int, float) or not -_MAX_TIME < iat < _MAX_TIME:
            raise DPoPProofError("the DPoP proof iat is missing or not a number")
        # Step 8-9: bound to this request.
        if htm != method:
            raise DPoPProofError("the DPoP proof is for another HTTP method")
        normalized = _htu(htu)
        if normalized is None or normalized != _htu(url):
            raise DPoPProofError("the DPoP proof is for another URL")
        # Step 11: fresh (a window around now, RFC 9449 §11.1).
        if abs(iat - now) > self.window_seconds:
            raise DPoPProofError("the DPoP proof iat is outside the accepted window")
        # Step 12: bound to this token.
        if token is not None and not hmac.compare_digest(typing.cast(str, ath), _access_token_hash(token)):
            raise DPoPProofError("the DPoP proof is for another access token")
        # Step 10: the server's nonce, when it asks for one.
        if self.nonces is not None and not self.nonces.check(claims.get("nonce"), now):
            raise DPoPNonceError("the DPoP proof lacks a fresh server nonce", nonce=self.nonces.issue(now))
        # The replay key: the proof key and jti, never the signature, which an
        # ECDSA holder (or anyone, as (r, n - s)) can change without a new jti.
        replay_key = _b64encode(hashlib.sha256(f"{proof_jkt}.{jti}".encode("utf-8")).digest())
        return proof_jkt, replay_key, math.ceil(iat) + self.window_seconds + 1


def _token_jkt(claims: AgentClaims) -> Optional[str]:
    """The thumbprint a token is bound to (``cnf.jkt``, RFC 9449 §6.1), or None if unbound.

    Raises:
        TokenInvalidError: a ``cnf`` claim this module cannot enforce: never treated as unbound.
    """
    if "cnf" not in claims.raw:
        return None
    cnf = claims.raw["cnf"]
    jkt = cnf.get("jkt") if type(cnf) is dict and len(cnf) == 1 else None
    if type(jkt) is not str or _JKT.fullmatch(jkt) is None:
        raise TokenInvalidError("token confirmation claim is not a DPoP key thumbprint")
    return jkt


def _check_jkt(value: Any, what: str = "dpop_jkt") -> str:
    """A thumbprint given to issue()/delegate(): 43 base64url characters (SHA-256)."""
    if type(value) is not str or _JKT.fullmatch(value) is None:
        raise InvalidGrantError(f"{what} must be an RFC 7638 SHA-256 key thumbprint (key.thumbprint())")
    return value


# ---------------------------------------------------------------------------
# AgentAuth
# ---------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if type(value) is not int or value <= 0:
        raise InvalidConfigError(f"{name} must be a positive whole number")
    return value


def _criterion(value: Any, kind: str) -> str:
    if type(value) is not str:
        raise TypeError(f"{kind} must be a string")
    if not value:
        raise ValueError(f"{kind} must not be empty")
    if kind == "jti" and (_CONTROL_CHARS.search(value) or any(c.isspace() for c in value)):
        # Nothing agentauth mints holds these: a sentence passed by mistake
        # would otherwise be recorded as a revocation that matches nothing.
        raise ValueError("a jti holds no white space or control characters: is this a token or a jti?")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{kind} must be valid Unicode text") from exc
    return value


class AgentAuth:
    """Issue, verify, delegate and revoke scoped agent tokens (RFC 9068 claims).

    Sign with an HS256 ``secret``, or an Ed25519 (EdDSA) or P-256 (ES256)
    ``signing_key`` (its kid defaults to the key's RFC 7638 thumbprint). ``AgentAuth.verifier()``
    builds an instance that holds public keys only. Every argument is
    keyword-only and checked here, so a misconfiguration fails at startup,
    never per request.

    Raises:
        InvalidConfigError: neither or both of secret and signing_key, a
            secret shorter than 32 bytes or easy to guess (a published
            example, a repeated pattern, a run like "1234..."), an empty issuer or audience, a
            non-positive or inconsistent duration, a rotation key without a kid,
            an ``alg`` that does not fit the key, a negative ``verify_cache_size``.

    ``alg`` names the algorithm in the tokens' header: "HS256" for a secret;
    "EdDSA" (the default) or "Ed25519" (RFC 9864 §2.2) for an Ed25519 key.
    Verification accepts both names for Ed25519 keys whatever ``alg`` says.

    Security: an HS256 secret both mints and verifies; give it only to
    services that may mint, or use EdDSA and give verifiers the JWKS. Keep
    old keys in ``previous_secrets`` / ``previous_keys`` (by kid) while tokens
    signed with them may still be alive.
    """

    def __init__(
        self,
        *,
        secret: Union[str, bytes, None] = None,
        signing_key: Union[Ed25519Key, P256Key, None] = None,
        issuer: str,
        audience: str,
        default_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
        kid: Optional[str] = None,
        previous_secrets: Optional[Mapping[str, Union[str, bytes]]] = None,
        previous_keys: Optional[Mapping[str, Union[Ed25519Key, P256Key]]] = None,
        clock_tolerance_seconds: int = DEFAULT_CLOCK_TOLERANCE_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH,
        check_revocation: bool = True,
        store: Optional[RevocationStore] = None,
        require_grant: bool = False,
        on_event: Optional[Callable[[AgentEvent], Any]] = None,
        verify_cache_size: int = DEFAULT_VERIFY_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
        alg: Optional[str] = None,
        require_dpop: bool = False,
        dpop_algorithms: Iterable[str] = DEFAULT_DPOP_ALGORITHMS,
        dpop_window_seconds: int = DEFAULT_DPOP_WINDOW_SECONDS,
        dpop_nonce: Union[bool, str, bytes] = False,
    ) -> None:
        self._configure(
            issuer=issuer,
            audience=audience,
            default_ttl_seconds=default_ttl_seconds,
            max_ttl_seconds=max_ttl_seconds,
            clock_tolerance_seconds=clock_tolerance_seconds,
            max_token_bytes=max_token_bytes,
            max_chain_length=max_chain_length,
            check_revocation=check_revocation,
            store=store,
            on_event=on_event,
            verify_cache_size=verify_cache_size,
            clock=clock,
        )
        if type(require_grant) is not bool:
            raise InvalidConfigError("require_grant must be True or False")
        if require_grant:
            _grant_store(self.store)  # a store that cannot hold grants could never allow an issue
        self.require_grant = require_grant
        if (secret is None) == (signing_key is None):
            raise InvalidConfigError("give exactly one of secret (HS256) or signing_key (EdDSA or ES256)")
        if kid is not None and (type(kid) is not str or not kid):
            raise InvalidConfigError("kid must be a non-empty string")
        signing: _TokenKey
        if isinstance(signing_key, P256Key):
            if not signing_key.is_private:
                raise InvalidConfigError("signing_key must be a private key")
            if alg not in (None, ALGORITHM_ES256):
                raise InvalidConfigError('alg of a P256Key signing_key can only be "ES256"')
            kid = signing_key.thumbprint() if kid is None else kid  # RFC 7638: a stable default kid
            signing = _ES256Key(signing_key, kid)
        elif secret is not None:
            if alg not in (None, ALGORITHM):
                raise InvalidConfigError('alg of a secret can only be "HS256"')
            signing = _HmacKey(_as_key(secret, "secret"), kid)
        else:
            if not isinstance(signing_key, Ed25519Key) or not signing_key.is_private:
                raise InvalidConfigError("signing_key must be a private Ed25519Key or P256Key")
            kid = signing_key.thumbprint() if kid is None else kid  # RFC 7638: a stable default kid
            # "EdDSA" by default: PyJWT and other readers do not know RFC 9864's "Ed25519" yet.
            if alg is not None and alg not in _EDDSA_NAMES:
                raise InvalidConfigError('alg of an Ed25519 signing_key must be "EdDSA" or "Ed25519"')
            signing = _EdDSAKey(signing_key, kid, ALGORITHM_EDDSA if alg is None else alg)
        self.kid = kid
        keys: Dict[str, _TokenKey] = {} if kid is None else {kid: signing}
        for label, previous in (("previous_secrets", previous_secrets), ("previous_keys", previous_keys)):
            if previous is not None and not isinstance(previous, Mapping):
                raise InvalidConfigError(f"{label} must be a mapping of kid to key")
            for old_kid, old in (previous or {}).items():
                if kid is None:
                    raise InvalidConfigError(f"{label} needs kid to be set, so tokens name their key")
                if type(old_kid) is not str or not old_kid or old_kid in keys:
                    raise InvalidConfigError(f"{label} keys must be distinct non-empty kids other than kid")
                if label == "previous_secrets":
                    secret_value = typing.cast(Union[str, bytes], old)  # the loop mixes both mappings' values
                    keys[old_kid] = _HmacKey(_as_key(secret_value, f"previous secret {old_kid!r}"), old_kid)
                elif isinstance(old, Ed25519Key):
                    keys[old_kid] = _EdDSAKey(old.public_key(), old_kid)  # verify only
                elif isinstance(old, P256Key):
                    keys[old_kid] = _ES256Key(old.public_key(), old_kid)  # verify only
                else:
                    raise InvalidConfigError("previous_keys values must be Ed25519Key or P256Key objects")
        self._signing_key: Optional[_TokenKey] = signing
        self._set_keys(keys)
        self._configure_dpop(require_dpop, dpop_algorithms, dpop_window_seconds, dpop_nonce)
        header = {"alg": signing.alg, "typ": TOKEN_TYPE}
        if kid is not None:
            header["kid"] = kid
        self._header_segment = _b64encode(_JSON_ENCODER.encode(header).encode("ascii"))

    @classmethod
    def verifier(
        cls,
        *,
        issuer: str,
        audience: str,
        jwks: Optional[Mapping[str, Any]] = None,
        jwks_url: Optional[str] = None,
        jwks_cache_seconds: int = 300,
        jwks_min_refresh_seconds: int = 30,
        jwks_timeout_seconds: float = 5.0,
        jwks_max_bytes: int = 65536,
        **options: Any,
    ) -> "AgentAuth":
        """Return an instance that verifies EdDSA tokens with public keys only, and can mint nothing.

        The keys come from a JWK set, given (``jwks``) or fetched (``jwks_url``:
        https, or http to a loopback address; cached ``jwks_cache_seconds``;
        refetched once when a token names an unknown kid, at most once per
        ``jwks_min_refresh_seconds``; the last good set kept when a refresh
        fails; at most ``jwks_max_bytes``; the whole fetch, headers included,
        within ``jwks_timeout_seconds``).
        Tokens must name their key (``kid``). ``options`` are the constructor's
        keyword arguments that apply to verifying: ``clock``,
        ``clock_tolerance_seconds``, ``store``, ``check_revocation``,
        ``on_event``, ``max_ttl_seconds``, ``max_token_bytes``, ``max_chain_length``,
        ``verify_cache_size``,
        and the DPoP ones (``require_dpop``, ``dpop_algorithms``,
        ``dpop_window_seconds``, ``dpop_nonce``).

        Raises:
            InvalidConfigError: neither or both of jwks and jwks_url, a bad key
                set or URL, or an option that does not apply to a verifier.
            StoreUnavailableError: (from verify) the key set was never fetched.
        """
        allowed = {"clock", "clock_tolerance_seconds", "store", "check_revocation", "on_event",
                   "max_ttl_seconds", "max_token_bytes", "max_chain_length", "verify_cache_size",
                   *_DPOP_OPTIONS}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidConfigError(f"not a verifier option: {', '.join(unknown)}")
        if (jwks is None) == (jwks_url is None):
            raise InvalidConfigError("give exactly one of jwks or jwks_url")
        self = cls.__new__(cls)
        dpop = {name: options.pop(name) for name in _DPOP_OPTIONS if name in options}
        # A verifier mints nothing: its default ttl only has to fit max_ttl_seconds.
        max_ttl = options.get("max_ttl_seconds", DEFAULT_MAX_TTL_SECONDS)
        ttl = min(DEFAULT_TTL_SECONDS, max_ttl) if type(max_ttl) is int else DEFAULT_TTL_SECONDS
        self._configure(issuer=issuer, audience=audience, default_ttl_seconds=ttl, **options)
        self.require_grant = False  # a verifier mints nothing
        self.kid = None
        self._signing_key = None
        if jwks is not None:
            try:
                keys = _parse_jwks(jwks)
            except ValueError as exc:
                raise InvalidConfigError(f"jwks: {exc}") from exc
            if not keys:
                raise InvalidConfigError("jwks holds no usable EdDSA or ES256 key: this verifier could accept nothing")
            self._set_keys(keys)
        else:
            self._jwks = _JwksSource(
                typing.cast(str, jwks_url),
                cache_seconds=jwks_cache_seconds,
                min_refresh_seconds=jwks_min_refresh_seconds,
                timeout_seconds=jwks_timeout_seconds,
                max_bytes=jwks_max_bytes,
            )
            self._set_keys({})
        self._configure_dpop(**dpop)
        return self

    def _configure_dpop(
        self,
        require_dpop: bool = False,
        dpop_algorithms: Iterable[str] = DEFAULT_DPOP_ALGORITHMS,
        dpop_window_seconds: int = DEFAULT_DPOP_WINDOW_SECONDS,
        dpop_nonce: Union[bool, str, bytes] = False,
    ) -> None:
        """Check and keep the DPoP settings (RFC 9449): shared by the constructor and ``verifier``."""
        if require_dpop is True and not callable(getattr(self.store, "record_proof", None)):
            raise InvalidConfigError("require_dpop needs a store with a DPoP replay cache (record_proof)")
        nonces = None
        if dpop_nonce is True:
            # Derived from the signing key, so every process of an issuer
            # agrees; a verifier has none and draws a key of its own.
            key = self._derived_key(b"dpop-nonce") if self._signing_key is not None else secrets.token_bytes(32)
            nonces = _DPoPNonces(key)
        elif dpop_nonce is not False:
            if not isinstance(dpop_nonce, (str, bytes)):
                raise InvalidConfigError("dpop_nonce must be True, False, or a shared nonce secret")
            nonces = _DPoPNonces(_as_key(dpop_nonce, "dpop_nonce"))
        self._dpop = _DPoPPolicy(
            algorithms=dpop_algorithms, window_seconds=dpop_window_seconds, require=require_dpop, nonces=nonces
        )

    def _configure(
        self,
        *,
        issuer: str,
        audience: str,
        default_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
        clock_tolerance_seconds: int = DEFAULT_CLOCK_TOLERANCE_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH,
        check_revocation: bool = True,
        store: Optional[RevocationStore] = None,
        on_event: Optional[Callable[[AgentEvent], Any]] = None,
        verify_cache_size: int = DEFAULT_VERIFY_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Check and keep everything but the keys: shared by the constructor and ``verifier``."""
        for value, name in ((issuer, "issuer"), (audience, "audience")):
            if type(value) is not str or not value:
                raise InvalidConfigError(f"{name} must be a non-empty string")
        self.issuer = issuer
        self.audience = audience
        self.default_ttl_seconds = _positive_int(default_ttl_seconds, "default_ttl_seconds")
        self.max_ttl_seconds = _positive_int(max_ttl_seconds, "max_ttl_seconds")
        if default_ttl_seconds > max_ttl_seconds:
            raise InvalidConfigError("default_ttl_seconds must not exceed max_ttl_seconds")
        if type(clock_tolerance_seconds) is not int or clock_tolerance_seconds < 0:
            raise InvalidConfigError("clock_tolerance_seconds must be a whole number >= 0")
        self.clock_tolerance_seconds = clock_tolerance_seconds
        self.max_token_bytes = _positive_int(max_token_bytes, "max_token_bytes")
        self.max_chain_length = _positive_int(max_chain_length, "max_chain_length")
        if type(check_revocation) is not bool:
            raise InvalidConfigError("check_revocation must be True or False")
        self.check_revocation = check_revocation
        if type(verify_cache_size) is not int or verify_cache_size < 0:
            raise InvalidConfigError("verify_cache_size must be a whole number >= 0 (0 turns the cache off)")
        self.verify_cache_size = verify_cache_size
        if not callable(clock):
            raise InvalidConfigError("clock must be callable")
        if on_event is not None and not callable(on_event):
            raise InvalidConfigError("on_event must be callable")
        self._clock = clock
        self._on_event = on_event
        self.store: RevocationStore = MemoryStore() if store is None else store
        for method in ("revoke", "is_revoked"):
            if not callable(getattr(self.store, method, None)):
                raise InvalidConfigError(f"store must have a {method}() method")
        try:
            self._last_used: Optional[_LastUsed] = _LastUsed(_grant_store(self.store))
        except InvalidConfigError:  # a store without grants: nothing to record
            self._last_used = None
        self._jwks: Optional[_JwksSource] = None
        #: The scopes require() puts on each function, by name: asgi(step_up=True) checks MCP tool calls with them.
        self._required_by_name: Dict[str, Tuple[str, ...]] = {}

    def _set_keys(self, keys: Mapping[str, _TokenKey]) -> None:
        """Hold these verification keys (by kid); accept exactly their algorithms."""
        self._keys = dict(keys)
        algorithms = {alg for key in self._keys.values() for alg in key.algs}
        if self._signing_key is not None:
            algorithms.update(self._signing_key.algs)
        if self._jwks is not None:  # a fetched key set brings EdDSA and ES256 keys only
            algorithms.update(_EDDSA_NAMES)
            algorithms.add(ALGORITHM_ES256)
        self._algorithms = frozenset(algorithms)
        self._header_cache: Dict[str, _TokenKey] = {}
        # New keys, new caches: a token verified with a key that is gone
        # (rotated out, dropped from a refreshed JWKS) must be checked again.
        self._verify_cache: Dict[str, Tuple[AgentClaims, Optional[float]]] = {}

    def jwks(self) -> Dict[str, Any]:
        """Return the public JWK set to publish: the EdDSA and ES256 keys held, the signing key first.

        Holds public keys only; HS256 secrets are never published.

        Raises:
            InvalidConfigError: this instance holds no EdDSA or ES256 key.
        """
        public = [
            key.key.public_jwk(kid, alg=key.alg) if isinstance(key, _EdDSAKey) else key.key.public_jwk(kid)
            for kid, key in self._keys.items()
            if isinstance(key, (_EdDSAKey, _ES256Key))
        ]
        if not public:
            raise InvalidConfigError("this instance holds no EdDSA or ES256 key to publish")
        return {"keys": public}

    def _may_block(self) -> bool:
        """Whether verify may wait on I/O: a store other than MemoryStore, or a JWKS URL."""
        return (self.check_revocation and type(self.store) is not MemoryStore) or self._jwks is not None

    def __repr__(self) -> str:
        return f"AgentAuth(issuer={self.issuer!r}, audience={self.audience!r}, kid={self.kid!r})"

    # -- issue ---------------------------------------------------------------

    def issue(
        self,
        *,
        subject: str,
        agent: str,
        scopes: Iterable[str],
        ttl_seconds: Optional[int] = None,
        dpop_jkt: Optional[str] = None,
    ) -> IssuedToken:
        """Mint a token granting ``agent`` the ``scopes``, acting for ``subject``.

        With ``dpop_jkt`` (the agent key's ``thumbprint()``), the token is
        bound to that key (RFC 9449 §6.1, ``cnf.jkt``): verify then refuses
        it without a valid DPoP proof signed by the key.

        With ``require_grant=True``, the scopes must be covered (wildcards
        included) by the grant recorded with ``grant()`` for this subject and agent.

        Raises:
            InvalidGrantError: an empty or malformed scope list, a subject or
                agent that is empty, longer than 256 characters or holds
                control characters, a ttl <= 0 or above ``max_ttl_seconds``,
                a token that would exceed ``max_token_bytes``, or (with
                ``require_grant``) no grant or a scope outside it, or a
                ``dpop_jkt`` that is not a SHA-256 thumbprint.
            StoreUnavailableError: (with ``require_grant``) the store could not answer.
        """
        self._require_signing_key()
        _name(subject, "subject")
        _name(agent, "agent")
        granted = _grant_scopes(scopes)
        jkt = None if dpop_jkt is None else _check_jkt(dpop_jkt)
        if ttl_seconds is None:
            ttl_seconds = self.default_ttl_seconds
        if type(ttl_seconds) is not int:
            raise InvalidGrantError("ttl_seconds must be a whole number of seconds")
        if not 0 < ttl_seconds <= self.max_ttl_seconds:
            raise InvalidGrantError(f"ttl_seconds must be between 1 and max_ttl_seconds ({self.max_ttl_seconds})")
        # The time is read before the grant: a narrowing committed after that
        # read has a revoked_at at or after this iat, so it refuses this token.
        clock_now = self._clock()
        now = math.floor(clock_now)
        if self.require_grant:
            self._check_recorded_grant(subject, agent, granted)
        issued = self._mint(subject, agent, granted, now, now + ttl_seconds, None, jkt)
        if self._on_event is not None:
            self._emit(AgentEvent("issued", clock_now, issued.jti, subject, agent, granted))
        return issued

    def _check_recorded_grant(self, subject: str, agent: str, scopes: Tuple[str, ...]) -> None:
        recorded = _store_call(_grant_store(self.store).get_grant, subject, agent)
        if recorded is None:
            raise InvalidGrantError(
                "require_grant is on and this subject has not granted this agent anything: record consent with grant() first",
                oauth_error="invalid_grant",
            )
        if not all(scope_satisfies(recorded.scopes, scope) for scope in scopes):
            raise InvalidGrantError(
                "require_grant is on and a requested scope is outside the subject's grant to this agent",
                oauth_error="invalid_scope",
            )

    def _mint(
        self,
        subject: str,
        agent: str,
        scopes: Tuple[str, ...],
        now: int,
        exp: int,
        act: Optional[Dict[str, Any]],
        jkt: Optional[str] = None,
    ) -> IssuedToken:
        jti = secrets.token_urlsafe(_JTI_BYTES)
        claims: Dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "client_id": agent,  # RFC 9068 §2.2: the agent is the OAuth client
            "scope": " ".join(scopes),  # RFC 9068 §2.2.3: space-delimited
            "jti": jti,
            "iat": now,
            "exp": exp,
        }
        if act is not None:
            claims["act"] = act  # RFC 8693 §4.1: who acts, for whom
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}  # RFC 9449 §6.1: bound to the key with this thumbprint
        signing_input = f"{self._header_segment}.{_b64encode(_JSON_ENCODER.encode(claims).encode('ascii'))}"
        key = typing.cast(_TokenKey, self._signing_key)
        token = f"{signing_input}.{key.sign(signing_input.encode('ascii'))}"
        if len(token) > self.max_token_bytes:
            raise InvalidGrantError("the token would be longer than max_token_bytes")
        return IssuedToken(token, jti, exp)

    def _require_signing_key(self) -> _TokenKey:
        if self._signing_key is None:
            raise InvalidConfigError("this instance only verifies: it holds no signing key")
        return self._signing_key

    def _derived_key(self, label: bytes) -> bytes:
        """Return a 32-byte key for ``label`` (e.g. a page's CSRF tokens), derived from the signing key.

        Each label gets its own key, unrelated to any token signature, so a
        value MACed with it can never pass for a token, nor one label's for another's.

        Raises:
            InvalidConfigError: this instance holds no signing key.
        """
        return self._require_signing_key().derive(label)

    # -- delegate ------------------------------------------------------------

    def delegate(
        self,
        parent_token: str,
        *,
        agent: str,
        scopes: Iterable[str],
        ttl_seconds: Optional[int] = None,
        dpop_jkt: Optional[str] = None,
    ) -> IssuedToken:
        """Mint a narrower token for a sub-agent from a token its holder presents (RFC 8693).

        With ``dpop_jkt`` (the sub-agent key's ``thumbprint()``), the child
        is bound to that key (RFC 9449 §6.1). A DPoP-bound parent only
        delegates to a bound child, so a bound token never turns into a
        bearer token. Security: delegate() checks no proof for the parent:
        verify the parent's request (its proof) first, as the token exchange
        endpoint does.

        The parent is fully verified first (signature, claims, expiry, and the
        revocation store, whatever ``check_revocation`` says). The child acts
        for the same subject, holds only scopes the parent's grant covers
        (``email:read`` under ``email:*``; never ``email:*`` under
        ``email:read``, never ``*`` unless the parent has it), and expires no
        later than the parent. Its ``act`` claim nests the chain, the current
        agent outermost, each ancestor with its token's jti, so that revoking
        any ancestor token, or any agent in the chain, revokes it too.

        Raises:
            TokenInvalidError, TokenExpiredError, RevokedError: the parent token is refused.
            StoreUnavailableError: the store could not confirm the parent is not revoked.
            InvalidGrantError: a malformed agent or scope, a scope the parent
                does not hold, a chain longer than ``max_chain_length``, a bad
                ttl, a parent about to expire, a token over ``max_token_bytes``,
                a malformed ``dpop_jkt``, or none for a DPoP-bound parent.
        """
        signing = self._require_signing_key()
        now_float = self._clock()
        parent = self._check(parent_token, now_float)
        jkt = None if dpop_jkt is None else _check_jkt(dpop_jkt)
        if jkt is None and _token_jkt(parent) is not None:
            raise InvalidGrantError("a DPoP-bound parent token delegates only to a bound child: pass dpop_jkt")
        # A parent signed by a key of another algorithm (an HS256 secret kept
        # while moving to EdDSA) must not become an EdDSA token: every holder
        # of that secret could otherwise mint one for anyone.
        if _parse_header(parent_token.split(".", 1)[0], self._algorithms)["alg"] not in signing.algs:
            raise InvalidGrantError("the parent token is not signed with this issuer's algorithm")
        self._check_revocation(parent)
        _name(agent, "agent")
        granted = _grant_scopes(scopes)
        if not all(scope_satisfies(parent.scopes, scope) for scope in granted):
            raise InvalidGrantError("a requested scope is not covered by the parent token's grant", oauth_error="invalid_scope")
        if len(parent.chain) >= self.max_chain_length:
            raise InvalidGrantError(f"the delegation chain would exceed max_chain_length ({self.max_chain_length})")
        if ttl_seconds is None:
            ttl_seconds = self.default_ttl_seconds
        if type(ttl_seconds) is not int or not 0 < ttl_seconds <= self.max_ttl_seconds:
            raise InvalidGrantError(f"ttl_seconds must be a whole number between 1 and max_ttl_seconds ({self.max_ttl_seconds})")
        now = math.floor(now_float)
        exp = min(now + ttl_seconds, math.floor(parent.exp))  # never outlives its parent
        if exp <= now:
            raise InvalidGrantError("the parent token expires too soon to delegate")
        # Each ancestor level names the token its agent held, by jti and iat,
        # so revocation can refuse the whole chain (RFC 8693 §4.1 leaves
        # nested actors informational; these members only ever refuse more).
        ancestors: Dict[str, Any] = {"sub": parent.agent, "jti": parent.jti, "iat": math.floor(parent.iat)}
        parent_act = parent.raw.get("act")
        if parent_act is not None and "act" in parent_act:
            ancestors["act"] = parent_act["act"]
        issued = self._mint(parent.sub, agent, granted, now, exp, {"sub": agent, "act": ancestors}, jkt)
        if self._on_event is not None:
            self._emit(
                AgentEvent("delegated", now_float, issued.jti, parent.sub, agent, granted, None, parent.jti, parent.agent)
            )
        return issued

    # -- verify --------------------------------------------------------------

    def verify(
        self,
        token: str,
        required_scopes: Iterable[str] = (),
        *,
        check_revocation: Optional[bool] = None,
        dpop_proof: Optional[str] = None,
        method: Optional[str] = None,
        url: Optional[str] = None,
    ) -> AgentClaims:
        """Verify ``token`` and return its claims; refuse with a typed error.

        Checks, in order: size, structure, header (alg, crit, typ, kid), the
        signature, then the claims (types, iss, aud, exp, iat, nbf, lifetime,
        scope syntax), then the DPoP proof, then the revocation store, then
        the proof's replay, then ``required_scopes``. A token verified before
        (up to ``verify_cache_size`` of them, by the whole token) skips the
        signature and the parsing; its time claims and every later check run
        again, and a key-bound (``cnf``) token is never remembered.

        DPoP (RFC 9449): a token bound to a key (``cnf.jkt``, from
        ``issue(dpop_jkt=...)``) needs ``dpop_proof``, the request's ``DPoP``
        header, with the request's ``method`` and ``url``; every rule of
        §4.3 is checked (see docs/dpop.md), and the proof's ``jti`` is
        recorded in the store so the proof works once. A proof with an
        unbound token is refused; an unbound token without a proof is a
        bearer token unless ``require_dpop=True``.

        Raises:
            TokenInvalidError: malformed, forged, or with claims that do not hold.
            TokenExpiredError: expired beyond the clock tolerance.
            RevokedError: revoked.
            MissingScopeError: valid, but the grant does not cover a required scope.
            DPoPProofError: the DPoP proof is missing, invalid, replayed, or
                for another request, token or key.
            DPoPNonceError: nonces are on (``dpop_nonce``) and the proof
                lacks a fresh one; ``exc.nonce`` is the one to send.
            StoreUnavailableError: the store could not answer (fail closed).
            TypeError, ValueError: ``required_scopes`` is not a list of scopes,
                or a proof without ``method`` and ``url``.

        Security: the signature is checked before anything in the payload is
        read; the key is chosen by ``kid`` among this instance's keys only.
        """
        claims = None
        now = self._clock()
        try:
            claims = self._check(token, now)
            replay = self._check_dpop(token, claims, dpop_proof, method, url, now)
            if check_revocation if check_revocation is not None else self.check_revocation:
                self._check_revocation(claims)
            if replay is not None:
                self._record_proof(replay[0], replay[1], now)
            if required_scopes:
                missing = tuple(s for s in _required_scopes(required_scopes) if not scope_satisfies(claims.scopes, s))
                if missing:
                    raise MissingScopeError(missing=missing, granted=claims.scopes)
        except AgentAuthError as exc:
            if self._on_event is not None:
                self._emit_denied(claims, exc)
            raise
        if self._last_used is not None:
            self._last_used.record(claims, now)
        if self._on_event is not None:
            self._emit(AgentEvent("verified", self._clock(), claims.jti, claims.sub, claims.agent, claims.scopes))
        return claims

    def _check_dpop(
        self, token: str, claims: AgentClaims, proof: Optional[str], method: Optional[str], url: Optional[str], now: float
    ) -> Optional[Tuple[str, int]]:
        """Apply RFC 9449 §4.3 and §7.1; return the proof's (replay key, expiry) to record, or None."""
        jkt = _token_jkt(claims)
        if proof is None:
            if jkt is not None:  # §7.1: a bound token is never a bearer token
                raise DPoPProofError("the token is DPoP-bound: a proof is required")
            if self._dpop.require:
                raise DPoPProofError("this server accepts DPoP-bound tokens only")
            return None
        if type(method) is not str or type(url) is not str:
            raise TypeError("verify() with a dpop_proof needs the request's method and url")
        if jkt is None:
            raise TokenInvalidError("a DPoP proof came with a token that is not DPoP-bound")
        _proof_jkt, replay_key, expires_at = self._dpop.check(proof, method, url, token, now, jkt)
        # Kept beyond the window by the clock tolerance: a store that expires
        # entries by its own clock (Redis) must not forget a proof that a host
        # whose clock lags can still accept.
        return replay_key, expires_at + self.clock_tolerance_seconds

    def _record_proof(self, key: str, expires_at: int, now: float) -> None:
        """Record a proof in the store's replay cache; refuse a replay (RFC 9449 §11.1)."""
        record = getattr(self.store, "record_proof", None)
        if record is None:
            raise StoreUnavailableError("the store keeps no DPoP replay cache (ProofReplayStore.record_proof)")
        try:
            new = record(key, now=math.floor(now), expires_at=expires_at)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # any failure of a custom store fails closed
            raise StoreUnavailableError("the DPoP replay cache failed") from exc
        if new is not True:
            if new is False:
                raise DPoPProofError("the DPoP proof was used before")
            raise StoreUnavailableError("the DPoP replay cache did not answer True or False")

    def _key_for(self, head: str, now: float) -> _TokenKey:
        """Check a header segment and choose its key."""
        header = _parse_header(head, self._algorithms)
        typ = header.get("typ")
        # RFC 9068 §2.1 / RFC 8725 §3.11: only access tokens, never an ID token.
        if type(typ) is not str or typ.lower() not in _ACCEPTED_TYPES:
            raise TokenInvalidError("token type is not at+jwt")
        kid = header.get("kid")
        if "kid" not in header:
            key = self._signing_key  # no kid: the current key only (a verifier has none)
        elif type(kid) is not str:
            key = None
        else:
            key = self._keys.get(kid)
            if key is None and self._jwks is not None and self._jwks.refresh(now, forced=True):
                self._set_keys(self._jwks.keys)  # the issuer may have rotated
                key = self._keys.get(kid)
        if key is None:
            raise TokenInvalidError("token key id is unknown")
        # RFC 8725 §2.1: a key verifies only its own algorithm (no HS256
        # token checked with an Ed25519 public key, nor the reverse).
        if header["alg"] not in key.algs:
            raise TokenInvalidError("token algorithm does not match its key")
        return key

    def _check(self, token: Any, now: float) -> AgentClaims:
        """Signature and claims: everything but revocation and scopes.

        A token whose signature and claims held is remembered, keyed by the
        whole token, so that verifying it again skips the signature and the
        parsing; its time claims (exp, iat, nbf) are checked again on every
        call, and everything after this (revocation, required scopes, events,
        last use, a proof of possession) runs every time as it lies outside.
        A token bound to a key (a ``cnf`` claim, RFC 9449 DPoP) is never
        remembered, so no later check of its proof can be skipped by a hit.
        """
        jwks = self._jwks
        if jwks is not None and now >= jwks.fresh_until and jwks.refresh(now, forced=False):
            self._set_keys(jwks.keys)  # drops the verify cache
        verified = self._verify_cache  # this key set's cache, even if a refresh swaps them
        if type(token) is str:
            hit = verified.get(token)
            if hit is not None:
                remembered, remembered_nbf = hit
                self._check_times(remembered.exp, remembered.iat, remembered_nbf, now)
                return remembered
        head, body, sig = _split(token, self.max_token_bytes)
        cache = self._header_cache  # this key set's cache, even if a refresh swaps them
        key = cache.get(head)
        cached = key is not None
        if key is None:
            key = self._key_for(head, now)
        if not key.verify(token[: len(head) + 1 + len(body)].encode("ascii"), sig):
            raise TokenInvalidError("token signature does not match")
        # Only headers of correctly signed tokens are remembered, so unsigned
        # junk cannot crowd them out.
        if not cached and len(cache) < _HEADER_CACHE_SIZE:
            cache[head] = key
        claims = _json_object(_decode_payload(body), "payload")

        if claims.get("iss") != self.issuer:
            raise TokenInvalidError("token issuer is not accepted")
        aud = claims.get("aud")
        if type(aud) is list and aud and all(type(a) is str for a in aud):
            aud = tuple(aud)
            if self.audience not in aud:
                raise TokenInvalidError(f"token audience is not accepted (this instance expects {self.audience!r})")
        elif aud != self.audience or type(aud) is not str:
            raise TokenInvalidError(f"token audience is not accepted (this instance expects {self.audience!r})")
        # Declared as the checks just below leave them (mypy cannot follow the
        # chained type() test); bare annotations compile to nothing.
        sub: str
        agent: str
        jti: str
        scope: str
        exp: float
        iat: float
        sub, agent, jti, scope, exp, iat = map(claims.get, _REQUIRED_CLAIMS)  # type: ignore[assignment]
        # One combined test for the common case; the slow path names the culprit.
        if not (sub and agent and jti and scope and type(sub) is type(agent) is type(jti) is type(scope) is str):
            for name in _REQUIRED_CLAIMS[:4]:
                _string(claims, name)
        if type(exp) is not int or type(iat) is not int:
            exp, iat = _number(claims, "exp"), _number(claims, "iat")  # type: ignore[assignment]  # required: not None
        nbf = _number(claims, "nbf", required=False) if "nbf" in claims else None

        self._check_times(exp, iat, nbf, now)
        # A token may not outlive what this instance could mint, so that
        # revocation entries kept max_ttl_seconds always outlive it.
        if exp - iat > self.max_ttl_seconds:
            raise TokenInvalidError("token lifetime exceeds max_ttl_seconds")
        if _SCOPE_STRING.fullmatch(scope) is None:
            raise TokenInvalidError("token scope is malformed")
        scopes = tuple(scope.split(" "))
        if "*" in scope and not all(_check_wildcard(s) for s in scopes):
            raise TokenInvalidError("token scope has a malformed wildcard")
        act = claims.get("act")
        chain: _Chain = ((agent,), (), ()) if act is None else _parse_chain(act, agent, self.max_chain_length)
        result = AgentClaims(sub, agent, scopes, jti, iat, exp, self.issuer, aud, types.MappingProxyType(claims), *chain)
        if self.verify_cache_size and "cnf" not in claims:
            if len(verified) >= self.verify_cache_size:
                try:  # the oldest entry goes (dicts keep insertion order)
                    del verified[next(iter(verified))]
                except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                    pass
            verified[token] = (result, nbf)
        return result

    def _check_times(self, exp: float, iat: float, nbf: Optional[float], now: float) -> None:
        """The claims that depend on the time: checked on every verify, cached or not."""
        tolerance = self.clock_tolerance_seconds
        if exp <= now - tolerance:
            raise TokenExpiredError("token has expired", expired_at=exp)
        if iat > now + tolerance:
            raise TokenInvalidError("token is issued in the future")
        if nbf is not None and nbf > now + tolerance:
            raise TokenInvalidError("token is not valid yet")

    def _check_revocation(self, claims: AgentClaims) -> None:
        try:
            revoked = self.store.is_revoked(claims)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # any failure of a custom store fails closed
            raise StoreUnavailableError("the revocation store failed") from exc
        if revoked is not False:
            if revoked is True:
                raise RevokedError("token has been revoked", jti=claims.jti)
            raise StoreUnavailableError("the revocation store did not answer True or False")

    # -- revoke --------------------------------------------------------------

    def revoke(
        self,
        token_or_jti: Optional[str] = None,
        *,
        jti: Optional[str] = None,
        agent: Optional[str] = None,
        subject: Optional[str] = None,
    ) -> Optional[RevocationEntry]:
        """Revoke one token (by the token or its jti), or every token of an agent and/or subject.

        A string with a "." is taken as a token, any other as a jti (the
        jtis agentauth mints have none; pass ``jti=`` for one that does).
        A token is checked first (a forged string must not revoke someone
        else's jti); its entry is kept until its own ``exp`` plus the clock
        tolerance, and an already expired token is a no-op (returns None).
        A bare jti, and agent/subject criteria (ANDed), are kept
        ``max_ttl_seconds`` plus the tolerance, so they outlive every token
        this configuration can mint. Criteria refuse tokens issued at or
        before this second; tokens minted from the next second on work.

        Returns the recorded entry, or None for an expired token.

        Raises:
            TokenInvalidError: the token is malformed, forged or not ours.
            ValueError: no criteria, an empty one, or a token or jti mixed with others.
            TypeError: a jti, agent or subject that is not a string.
            StoreUnavailableError: the store failed; for the built-in stores, nothing was recorded.
        """
        now = self._clock()
        revoked_at = math.floor(now)
        keep = self._revocation_lifetime()
        if sum(x is not None for x in (token_or_jti, jti)) + (agent is not None or subject is not None) > 1:
            raise ValueError("pass one of: a token, a jti, or agent/subject criteria")
        if token_or_jti is not None:
            if type(token_or_jti) is not str:
                raise TokenInvalidError("token must be a string")
            if "." not in token_or_jti:
                jti = token_or_jti
        if jti is not None:
            criteria = {"jti": _criterion(jti, "jti")}
            expires_at = revoked_at + keep
        elif token_or_jti is not None:
            try:
                claims = self._check(token_or_jti, now)
            except TokenExpiredError:
                return None  # it is refused anyway
            criteria = {"jti": claims.jti}
            expires_at = math.ceil(claims.exp) + self.clock_tolerance_seconds
        else:
            criteria = {kind: _criterion(value, kind) for kind, value in (("agent", agent), ("subject", subject)) if value is not None}
            if not criteria:
                raise ValueError("revoke() needs a token, a jti, an agent or a subject")
            expires_at = revoked_at + keep
        _store_call(self.store.revoke, criteria, revoked_at=revoked_at, expires_at=expires_at)
        entry = RevocationEntry(criteria.get("jti"), criteria.get("agent"), criteria.get("subject"), revoked_at, expires_at)
        if self._on_event is not None:
            self._emit(AgentEvent("revoked", now, entry.jti, entry.subject, entry.agent, ()))
        return entry

    # -- grants --------------------------------------------------------------

    def grant(
        self,
        *,
        subject: str,
        agent: str,
        scopes: Iterable[str],
        agent_name: Optional[str] = None,
        replace: bool = False,
    ) -> Grant:
        """Record that ``subject`` allows ``agent`` the ``scopes``; return the grant as stored.

        One grant per subject and agent: granting again widens it (the union
        of scopes; id and ``created_at`` kept), ``replace=True`` sets exactly
        these scopes. A narrowing takes effect at once: every token of this
        agent for this subject minted up to this second stops verifying,
        delegated ones included, and the agent must get a new token.

        Raises:
            InvalidGrantError: a malformed subject, agent, scope or agent_name
                (the rules of ``issue()``; a name is 1 to 100 characters).
            InvalidConfigError: the store cannot hold grants (RedisStore).
            StoreUnavailableError: the store failed; nothing was recorded.
        """
        store = _grant_store(self.store)
        _name(subject, "subject")
        _name(agent, "agent")
        scopes = _grant_scopes(scopes)
        agent_name = _agent_name(agent_name)
        if type(replace) is not bool:
            raise TypeError("replace must be True or False")
        clock_now = self._clock()
        now = math.floor(clock_now)
        new = Grant(secrets.token_urlsafe(_JTI_BYTES), subject, agent, agent_name, scopes, now, now, None)
        stored: Grant = _store_call(
            store.save_grant, new, replace=replace, revoked_at=now, expires_at=now + self._revocation_lifetime()
        )
        if self._last_used is not None:
            self._last_used.forget(subject, agent)
        if self._on_event is not None:
            self._emit(AgentEvent("granted", clock_now, None, subject, agent, stored.scopes))
        return stored

    def grants(self, *, subject: str) -> List[Grant]:
        """Return the agents ``subject`` has connected: their grants, most recently used first.

        Raises:
            InvalidGrantError: a malformed subject.
            InvalidConfigError: the store cannot hold grants.
            StoreUnavailableError: the store could not answer.
        """
        store = _grant_store(self.store)
        return list(_store_call(store.list_grants, _name(subject, "subject")))

    def disconnect(self, *, subject: str, agent: str) -> bool:
        """Remove ``subject``'s grant to ``agent`` and refuse every token of it from the next verify on.

        Delegated descendants are refused too, on every store; a later
        ``grant()`` works again for tokens minted from the next second on
        (the cutoff of ``revoke(agent=, subject=)``). Returns False, and
        changes nothing, when there was no grant (never connected, or
        disconnected already).

        Raises:
            InvalidGrantError: a malformed subject or agent.
            InvalidConfigError: the store cannot hold grants.
            StoreUnavailableError: the store failed; nothing was removed.
        """
        store = _grant_store(self.store)
        _name(subject, "subject")
        _name(agent, "agent")
        clock_now = self._clock()
        now = math.floor(clock_now)
        removed = _store_call(
            store.delete_grant, subject, agent, revoked_at=now, expires_at=now + self._revocation_lifetime()
        )
        if removed is not True and removed is not False:
            raise StoreUnavailableError("the grant store did not answer True or False")
        if self._last_used is not None:
            self._last_used.forget(subject, agent)
        if removed and self._on_event is not None:
            self._emit(AgentEvent("disconnected", clock_now, None, subject, agent, ()))
        return removed

    def _revocation_lifetime(self) -> int:
        """Seconds an agent/subject revocation is kept: longer than any token this instance accepts."""
        return self.max_ttl_seconds + self.clock_tolerance_seconds

    # -- web -----------------------------------------------------------------

    def wsgi(
        self,
        app: Callable[..., Iterable[bytes]],
        required_scopes: Iterable[str] = (),
        resource_metadata_url: Optional[str] = None,
        resource_metadata: Optional[Mapping[str, Any]] = None,
        *,
        realm: Optional[str] = None,
        expose_errors: bool = False,
        public_url: Optional[str] = None,
        step_up: bool = False,
    ) -> Callable[..., Iterable[bytes]]:
        """Wrap a WSGI app: every request needs a valid bearer token.

        The token comes from exactly one ``Authorization: Bearer`` header
        (never the query string), or ``Authorization: DPoP`` with exactly
        one ``DPoP`` proof header (RFC 9449 §7.1), checked against the
        request's method and URL. Behind a proxy, give ``public_url``: the
        URL clients use for what this server receives as "/" (scheme, host,
        port, any path prefix the proxy strips); the request's Host header
        is not used then. The app sees the claims in
        ``environ["agentauth.claims"]`` and through ``current_claims()``.
        _Refusals follow RFC 6750 §3 (see ``error_response``). With
        ``resource_metadata`` (from ``protected_resource_metadata()``), the
        middleware serves that document without a token at the path of
        ``resource_metadata_url``, by default the RFC 9728 well-known path of
        the resource, and every challenge points to it.

        DPoP refusals are 401 with ``WWW-Authenticate: DPoP ... algs="..."``:
        ``invalid_dpop_proof``, or ``use_dpop_nonce`` with a ``DPoP-Nonce``
        header when the instance has ``dpop_nonce`` on.

        Raises:
            InvalidConfigError: a malformed scope, realm, URL or metadata.

        ``step_up=True`` (off by default) makes a 403 ``insufficient_scope``
        carry ``scope="..."``: the token's scopes and the ones this request
        needs, so that an MCP client re-authorizes for the union (the MCP
        spec's scope challenge) instead of failing.

        Security: ``expose_errors=True`` tells clients which check failed and
        which scopes were missing; leave it off in production. ``step_up``
        tells a token's holder which scopes a request needs, and nothing else:
        turn it on when your clients can ask the user for more (MCP clients do).
        """
        protection = _Protection(
            self, required_scopes, resource_metadata_url, resource_metadata, realm, expose_errors, public_url, step_up
        )
        return _WsgiMiddleware(protection, app)

    def asgi(
        self,
        app: Callable[..., Any],
        required_scopes: Iterable[str] = (),
        resource_metadata_url: Optional[str] = None,
        resource_metadata: Optional[Mapping[str, Any]] = None,
        *,
        realm: Optional[str] = None,
        expose_errors: bool = False,
        public_url: Optional[str] = None,
        step_up: bool = False,
    ) -> Callable[..., Any]:
        """Wrap an ASGI 3 app (HTTP and WebSocket); the same rules as ``wsgi``, DPoP included.

        The app sees the claims in ``scope["state"]["agentauth.claims"]``
        (Starlette: ``request.state``) and through ``current_claims()``. A
        refused WebSocket is closed before it is accepted. Verify runs on the
        event loop only when it cannot block (``MemoryStore`` or
        ``check_revocation=False``: pure CPU, about 10 µs); with any other
        store it runs in the loop's default thread pool.

        In front of an MCP server that uses ``auth.mcp()``, this middleware
        is what checks DPoP: the app behind sees a Bearer header for the
        verified token, which ``auth.mcp()`` accepts for that request only.

        With ``step_up=True``, an MCP ``tools/call`` for a tool whose function
        is decorated with ``require(...)`` is checked here, before the MCP
        server runs it: a token without the tool's scopes gets the HTTP 403
        ``insufficient_scope`` with ``scope="..."`` that MCP clients answer by
        re-authorizing (the tool's name must be its function's name).
        """
        protection = _Protection(
            self, required_scopes, resource_metadata_url, resource_metadata, realm, expose_errors, public_url, step_up
        )
        return _AsgiMiddleware(protection, app)

    def protect(
        self,
        app: Any,
        required_scopes: Iterable[str] = (),
        resource_metadata_url: Optional[str] = None,
        resource_metadata: Optional[Mapping[str, Any]] = None,
        *,
        realm: Optional[str] = None,
        expose_errors: bool = False,
        public_url: Optional[str] = None,
        step_up: bool = False,
    ) -> Any:
        """Protect a Flask, Starlette or FastAPI app in one call, and return it.

        Adds the middleware (``wsgi`` or ``asgi``, the same arguments) and an
        error handler, so that a refusal raised in a view (``require``)
        reaches the client as the middleware's RFC 6750 answer, never as a
        500 with a logged traceback. The app is recognised by its methods
        (``register_error_handler`` and ``wsgi_app``; ``add_exception_handler``
        and ``add_middleware``): agentauth imports no framework.

        Raises:
            InvalidConfigError: an app of another kind (wrap it with ``wsgi``
                or ``asgi``; for Django use ``django()``), or what ``wsgi`` refuses.

        With ``step_up=True`` (as for ``wsgi``), a ``require`` refusal raised in
        a view carries ``scope="..."`` too.
        """
        protection = _Protection(
            self, required_scopes, resource_metadata_url, resource_metadata, realm, expose_errors, public_url, step_up
        )
        return _protect_app(protection, app)

    def django(
        self,
        required_scopes: Iterable[str] = (),
        resource_metadata_url: Optional[str] = None,
        resource_metadata: Optional[Mapping[str, Any]] = None,
        *,
        realm: Optional[str] = None,
        expose_errors: bool = False,
        public_url: Optional[str] = None,
        step_up: bool = False,
    ) -> Callable[[Callable[..., Any]], Any]:
        """Return a Django middleware: name it in ``settings.MIDDLEWARE``.

        ``agentauth_middleware = auth.django()`` in a module of yours, then
        ``"yourapp.auth.agentauth_middleware"`` in ``MIDDLEWARE``. It verifies
        the bearer or DPoP token of every request as ``wsgi`` does (the claims in
        ``request.META["agentauth.claims"]`` and ``current_claims()``), and
        answers a refusal raised in a view (``require``) with the same RFC
        6750 response. Django is imported only when a response is built.

        Raises:
            InvalidConfigError: what ``wsgi`` refuses.
        """
        protection = _Protection(
            self, required_scopes, resource_metadata_url, resource_metadata, realm, expose_errors, public_url, step_up
        )

        def middleware(get_response: Callable[..., Any]) -> Any:
            return _DjangoMiddleware(protection, get_response)

        return middleware

    def require(self, *scopes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a route or MCP tool (sync or async) so it runs only if the token grants ``scopes``.

        The scopes are checked, wildcard-aware, against the request's
        claims: those the middleware verified, or inside an MCP tool the
        bearer token of the current request, verified again. The claims must
        be this instance's (issuer, audience) and unexpired. The wrapped
        function keeps its signature (frameworks and the MCP SDK read it).
        Inside an MCP tool every refusal is also the server's ``ToolError``,
        an error result that names no scope.

        Raises:
            InvalidConfigError: no scope, or a malformed one (at decoration time).
            MissingScopeError: the grant does not cover the scopes (the
                function does not run; the message names no scope).
            TokenInvalidError: no verified token in this context, or one of
                another issuer or audience (fail closed).
            TokenExpiredError, RevokedError, StoreUnavailableError: the token
                expired, or (in an MCP tool) was revoked or could not be checked.
        """
        for scope in scopes:
            if not isinstance(scope, str) and isinstance(scope, Iterable):
                raise InvalidConfigError("require() takes scopes as separate arguments: require('a', 'b'), not a list")
            if isinstance(scope, str) and len(scope.split()) > 1:
                raise InvalidConfigError("require() takes one scope per argument: require('a', 'b'), not 'a b'")
        required = _configured_scopes(scopes, "require()")
        if not required:
            raise InvalidConfigError("require() needs at least one scope")

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            import inspect

            self._required_by_name[getattr(func, "__name__", "")] = required

            # Inside an MCP tool the request's bearer token is verified again
            # (signature, expiry, revocation), so a token revoked during a
            # long MCP session stops working at its next tool call. A refusal
            # is also the loaded MCP servers' ToolError (and still its own
            # class for every other handler): a tool behind auth.asgi alone,
            # which no request context marks as one, then answers an error
            # result rather than logging a traceback.
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    _, claims, bearer = _request_token()
                    try:
                        if claims is None and bearer is not None:
                            claims = await _verify_async(self, bearer, ())
                        _check_grant(self, claims, required)
                    except AgentAuthError as exc:
                        raise _as_tool_error(exc)
                    return await func(*args, **kwargs)

                return async_wrapper

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                _, claims, bearer = _request_token()
                try:
                    if claims is None and bearer is not None:
                        claims = self.verify(bearer)
                    _check_grant(self, claims, required)
                except AgentAuthError as exc:
                    raise _as_tool_error(exc)
                return func(*args, **kwargs)

            return wrapper

        return decorate

    def error_response(
        self,
        exc: AgentAuthError,
        *,
        resource_metadata_url: Optional[str] = None,
        realm: Optional[str] = None,
        expose_errors: bool = False,
        step_up: bool = False,
    ) -> _Refusal:
        """Return ``(status, headers, body)`` for a refusal, as the middleware sends it.

        For a framework's error handler, so that ``require`` refusals raised
        inside a view get the same RFC 6750 answer: 401 with
        ``WWW-Authenticate: Bearer realm=..., error="invalid_token"``, 403
        ``insufficient_scope``, 503 when the store is down. ``step_up=True``:
        a 403 names the scopes to ask for (see ``wsgi``).

        Raises:
            TypeError: ``step_up`` is not True or False.
        """
        if type(step_up) is not bool:
            raise TypeError("step_up must be True or False")
        return _refusal(
            exc,
            realm=_header_safe(self.audience if realm is None else realm, "realm"),
            resource_metadata_url=resource_metadata_url,
            expose_errors=expose_errors,
            step_up=step_up,
        )

    def protected_resource_metadata(
        self,
        *,
        resource: str,
        authorization_servers: Iterable[str] = (),
        scopes_supported: Iterable[str] = (),
        resource_name: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Return the RFC 9728 protected resource metadata document, as a dict.

        Give it to ``wsgi``/``asgi`` as ``resource_metadata`` to serve it.
        It lists the DPoP proof algorithms this instance accepts
        (``dpop_signing_alg_values_supported``) and, with
        ``require_dpop=True``, ``dpop_bound_access_tokens_required: true``.

        Raises:
            InvalidConfigError: ``resource`` is not an absolute URL.
        """
        from urllib.parse import urlsplit

        parts = urlsplit(resource) if type(resource) is str else None
        if parts is None or not parts.scheme or not parts.netloc or parts.fragment:
            raise InvalidConfigError("resource must be an absolute URL without a fragment (RFC 9728 §2)")
        document: Dict[str, Any] = {"resource": resource}
        servers = list(authorization_servers)
        if servers:
            document["authorization_servers"] = servers
        supported = list(_configured_scopes(scopes_supported, "scopes_supported"))
        if supported:
            document["scopes_supported"] = supported
        document["bearer_methods_supported"] = ["header"]  # never the query string
        # RFC 9728 §2: what DPoP this resource takes (RFC 9449).
        document["dpop_signing_alg_values_supported"] = self._dpop.algs_param.split(" ")
        if self._dpop.require:
            document["dpop_bound_access_tokens_required"] = True
        if resource_name is not None:
            document["resource_name"] = resource_name
        return document

    def token_exchange_wsgi(self, *, public_url: Optional[str] = None) -> Callable[..., Iterable[bytes]]:
        """Return a WSGI app: an RFC 8693 token exchange endpoint for agents.

        An agent that holds only its token POSTs (form-encoded)
        ``grant_type=urn:ietf:params:oauth:grant-type:token-exchange``,
        ``subject_token`` (its token), ``subject_token_type=
        urn:ietf:params:oauth:token-type:access_token``, ``actor`` (the
        sub-agent's id) and optionally ``scope`` (default: the subject
        token's), and gets back ``delegate()``'s token as RFC 8693 §2.2 JSON
        (``access_token``, ``issued_token_type``, ``token_type: "Bearer"``,
        ``expires_in``, ``scope``), or an RFC 6749 §5.2 error: 400
        ``invalid_request`` (also for a refused subject token, RFC 8693
        §2.2.2), ``invalid_scope``, ``unsupported_grant_type``; 503 when the
        store is down. With a ``DPoP`` proof (RFC 9449 §5) the new token is
        bound to its key and ``token_type`` is "DPoP"; a refused proof is
        400 ``invalid_dpop_proof`` (or ``use_dpop_nonce``).

        Security: whoever holds a token can delegate from it; mount this
        behind TLS like any token endpoint.

        Raises:
            InvalidConfigError: this instance holds no signing key.
        """
        self._require_signing_key()
        return _ExchangeWsgi(self, _public_url(public_url))

    def token_exchange_asgi(self, *, public_url: Optional[str] = None) -> Callable[..., Any]:
        """Return an ASGI app: the same token exchange endpoint as ``token_exchange_wsgi``.

        Raises:
            InvalidConfigError: this instance holds no signing key.
        """
        self._require_signing_key()
        return _ExchangeAsgi(self, _public_url(public_url))

    # -- pages ---------------------------------------------------------------

    def agents_page_wsgi(
        self,
        *,
        authenticate: Callable[..., Optional[str]],
        scope_descriptions: Optional[Mapping[str, str]] = None,
        login_url: Optional[str] = None,
    ) -> Callable[..., Iterable[bytes]]:
        """Return a WSGI app: the page where a signed-in user sees their connected agents and disconnects one.

        Mount it at one path (e.g. ``/account/agents``). ``authenticate(request)``
        is your login: it gets a read-only request (``.method``, ``.path``,
        ``.query``, ``.headers`` with lower-case names, ``.cookies``,
        ``.environ``) and returns the signed-in user's subject, or None. No
        user: 303 to ``login_url`` with ``next=`` this page, or 401 without
        one. GET shows one row per grant (``grants()``): the agent's name and
        id, each scope with its description from ``scope_descriptions`` (the
        scope itself when none), since when, last used, and a Disconnect
        button; ``?format=json`` or ``Accept: application/json`` gives the
        same list as JSON. POST disconnects one agent of the signed-in user
        (``disconnect()``) and answers 303 back to the page.

        Raises:
            InvalidConfigError: this instance holds no signing key (the CSRF
                tokens need one), the store cannot hold grants, authenticate
                is not callable (or is a coroutine function), a malformed
                scope description or login_url.

        Security: every form carries a CSRF token bound to the signed-in
        user and valid for an hour; a POST without a valid one is 403 and
        changes nothing. Every response is ``no-store``, unframeable, without
        script, and escapes every value. ``authenticate`` decides who the
        user is: it must check a session the way the rest of your app does.
        """
        return _AgentsPageWsgi(_AgentsPage(self, authenticate, scope_descriptions, login_url, asgi=False))

    def agents_page_asgi(
        self,
        *,
        authenticate: Callable[..., Any],
        scope_descriptions: Optional[Mapping[str, str]] = None,
        login_url: Optional[str] = None,
    ) -> Callable[..., Any]:
        """Return an ASGI app: the same connected-agents page as ``agents_page_wsgi``.

        ``authenticate`` may be a coroutine function; it gets the request with
        ``.scope`` instead of ``.environ``. A plain function runs in the
        loop's default thread pool, as do store calls that may block (any
        store but ``MemoryStore``).

        Raises:
            InvalidConfigError: as ``agents_page_wsgi`` (a coroutine function is fine here).
        """
        return _AgentsPageAsgi(_AgentsPage(self, authenticate, scope_descriptions, login_url, asgi=True))

    # -- authorization server --------------------------------------------------

    def authorization_server_wsgi(
        self,
        *,
        authenticate: Callable[..., Any],
        scope_descriptions: Mapping[str, str],
        login_url: Optional[str] = None,
        default_scopes: Optional[Iterable[str]] = None,
        code_ttl_seconds: int = DEFAULT_CODE_TTL_SECONDS,
        refresh_token_ttl_seconds: int = DEFAULT_REFRESH_TOKEN_TTL_SECONDS,
        refresh_reuse_grace_seconds: int = DEFAULT_REFRESH_REUSE_GRACE_SECONDS,
        unused_client_ttl_seconds: int = DEFAULT_UNUSED_CLIENT_TTL_SECONDS,
        client_ttl_seconds: int = DEFAULT_CLIENT_TTL_SECONDS,
        max_registrations: int = DEFAULT_MAX_REGISTRATIONS,
        allow_private_client_documents: bool = False,
        agents_page_path: Optional[str] = None,
    ) -> Callable[..., Iterable[bytes]]:
        """Return a WSGI app: an OAuth 2.1 authorization server any MCP client can use.

        Mount it at the origin of ``issuer`` (an https URL). It serves RFC
        8414 metadata at ``/.well-known/oauth-authorization-server``, the
        authorization endpoint with its consent page (``/authorize``), the
        token endpoint (``/token``: authorization_code with PKCE S256,
        rotating refresh tokens, RFC 8693 token exchange), RFC 7591
        registration (``/register``) and RFC 7009 revocation (``/revoke``);
        clients may also name themselves by a client ID metadata document
        (an https URL). The tokens it mints are this instance's tokens, with
        ``client_id`` = the agent; consent is recorded with ``grant()``. A
        token request with a DPoP proof (RFC 9449 §5, ``htu`` the metadata's
        ``token_endpoint``) gets an access token and a refresh token bound
        to the proof's key (``token_type: "DPoP"``); a bound refresh token is
        redeemed only with a proof of that key.

        Arguments: ``authenticate(request)`` returns the
        signed-in subject or None (your login, as for the agents page);
        ``scope_descriptions`` maps every scope the server grants to the
        text the consent page shows; ``login_url`` (users who are not signed
        in go there with ``next=``; without it they get a 401 page);
        ``default_scopes`` (asked for when a request names none, RFC 6749
        §3.3; default: every described scope); ``code_ttl_seconds`` (60),
        ``refresh_token_ttl_seconds`` (30 days), ``refresh_reuse_grace_seconds``
        (30), ``unused_client_ttl_seconds`` (1 day), ``client_ttl_seconds``
        (90 days), ``max_registrations`` (10000: RFC 7591 registrations that
        have not yet got a token, counted by this app; beyond, ``/register``
        answers 503), ``allow_private_client_documents`` (False: a metadata
        document is never fetched from a loopback or private address; True
        only for development and tests), ``agents_page_path`` (e.g.
        ``"/account/agents"``: the connected-agents page, ``agents_page_wsgi``
        with the same login and descriptions, served at that path too).

        Raises:
            InvalidConfigError: an issuer that is not an https URL, a store
                without the grant and record methods, no signing key, a bad option.

        Security: the consent page is the user's only defence against an
        agent that lies about its name; it shows the agent's id and the host
        it returns to. Serve it over TLS only.
        """
        if _is_coroutine_function(authenticate):
            raise InvalidConfigError("under WSGI, authenticate must be a plain function (async works under ASGI)")
        return _AuthorizationServerWsgi(_AuthorizationServer(
            self,
            authenticate=authenticate,
            scope_descriptions=scope_descriptions,
            login_url=login_url,
            default_scopes=default_scopes,
            code_ttl_seconds=code_ttl_seconds,
            refresh_token_ttl_seconds=refresh_token_ttl_seconds,
            refresh_reuse_grace_seconds=refresh_reuse_grace_seconds,
            unused_client_ttl_seconds=unused_client_ttl_seconds,
            client_ttl_seconds=client_ttl_seconds,
            max_registrations=max_registrations,
            allow_private_client_documents=allow_private_client_documents,
            agents_page_path=agents_page_path,
        ))

    def authorization_server_asgi(
        self,
        *,
        authenticate: Callable[..., Any],
        scope_descriptions: Mapping[str, str],
        login_url: Optional[str] = None,
        default_scopes: Optional[Iterable[str]] = None,
        code_ttl_seconds: int = DEFAULT_CODE_TTL_SECONDS,
        refresh_token_ttl_seconds: int = DEFAULT_REFRESH_TOKEN_TTL_SECONDS,
        refresh_reuse_grace_seconds: int = DEFAULT_REFRESH_REUSE_GRACE_SECONDS,
        unused_client_ttl_seconds: int = DEFAULT_UNUSED_CLIENT_TTL_SECONDS,
        client_ttl_seconds: int = DEFAULT_CLIENT_TTL_SECONDS,
        max_registrations: int = DEFAULT_MAX_REGISTRATIONS,
        allow_private_client_documents: bool = False,
        agents_page_path: Optional[str] = None,
    ) -> Callable[..., Any]:
        """Return an ASGI app: the same authorization server as ``authorization_server_wsgi``.

        ``authenticate`` may be a coroutine function. The endpoints run in
        the loop's default thread pool (the store and a client document's
        fetch may block).
        """
        return _AuthorizationServerAsgi(_AuthorizationServer(
            self,
            authenticate=authenticate,
            scope_descriptions=scope_descriptions,
            login_url=login_url,
            default_scopes=default_scopes,
            code_ttl_seconds=code_ttl_seconds,
            refresh_token_ttl_seconds=refresh_token_ttl_seconds,
            refresh_reuse_grace_seconds=refresh_reuse_grace_seconds,
            unused_client_ttl_seconds=unused_client_ttl_seconds,
            client_ttl_seconds=client_ttl_seconds,
            max_registrations=max_registrations,
            allow_private_client_documents=allow_private_client_documents,
            agents_page_path=agents_page_path,
        ))

    # -- MCP -----------------------------------------------------------------

    def mcp(self) -> Any:
        """Return a verifier for the official ``mcp`` SDK's ``token_verifier=``.

        ``MCPServer(..., token_verifier=auth.mcp(), auth=AuthSettings(...))``
        (mcp 2.x; ``FastMCP`` in mcp 1.x). Valid tokens become the SDK's
        ``AccessToken`` with ``client_id`` = the agent, ``scopes``,
        ``expires_at``, ``subject``, ``claims`` and ``resource`` = the
        audience (so ``validate_token_resource=True`` works when the audience
        is the resource URL); forged, expired and revoked tokens become None.
        Tools use ``auth.require(...)`` for wildcard-aware per-tool scopes.

        Raises:
            InvalidConfigError: the ``mcp`` package is not installed.
        """
        try:
            from mcp.server.auth.provider import AccessToken
        except ImportError as exc:
            raise InvalidConfigError("auth.mcp() needs the MCP SDK: pip install mcp") from exc
        return _McpTokenVerifier(self, AccessToken)

    def fastmcp(
        self,
        *,
        base_url: Optional[str] = None,
        required_scopes: Optional[Iterable[str]] = None,
        resource_base_url: Optional[str] = None,
    ) -> Any:
        """Return a FastMCP (the ``fastmcp`` package) ``TokenVerifier`` for ``FastMCP(auth=...)``.

        The keyword arguments are FastMCP's own ``TokenVerifier`` ones.

        Raises:
            InvalidConfigError: the ``fastmcp`` package is not installed.
        """
        try:
            verifier_class = _fastmcp_verifier_class()
        except ImportError as exc:
            raise InvalidConfigError("auth.fastmcp() needs FastMCP: pip install fastmcp") from exc
        scopes = None if required_scopes is None else list(_configured_scopes(required_scopes, "required_scopes"))
        return verifier_class(self, base_url=base_url, required_scopes=scopes, resource_base_url=resource_base_url)

    # -- events --------------------------------------------------------------

    def _emit(self, event: AgentEvent) -> None:
        try:
            typing.cast(Callable[[AgentEvent], Any], self._on_event)(event)
        except Exception:  # a hook never changes the outcome
            import logging

            logging.getLogger("agentauth").exception("on_event hook raised on a %r event", event.type)

    def _emit_denied(self, claims: Optional[AgentClaims], exc: AgentAuthError) -> None:
        """Emit 'denied'; the token's names only once its signature and claims held."""
        if claims is None:
            event = AgentEvent("denied", self._clock(), None, None, None, (), exc.code)
        else:
            event = AgentEvent("denied", self._clock(), claims.jti, claims.sub, claims.agent, claims.scopes, exc.code)
        self._emit(event)


# ---------------------------------------------------------------------------
# Web middleware
# ---------------------------------------------------------------------------

_CURRENT_CLAIMS: "contextvars.ContextVar[Optional[AgentClaims]]" = contextvars.ContextVar(
    "agentauth_claims", default=None
)
#: The token the ASGI middleware verified for the request being served, and its claims.
_VERIFIED_TOKEN: "contextvars.ContextVar[Optional[Tuple[str, AgentClaims]]]" = contextvars.ContextVar(
    "agentauth_verified_token", default=None
)
_METADATA_WELL_KNOWN = "/.well-known/oauth-protected-resource"  # RFC 9728 §3
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
#: What a client is told, per refusal, unless the server opts in to details.
_GENERIC_DESCRIPTIONS = {
    "unauthorized": "a bearer token is required",
    "invalid_request": "send exactly one bearer token, in the Authorization header",
    "invalid_token": "the access token is invalid, expired or revoked",
    "insufficient_scope": "the access token does not grant this request",
    "temporarily_unavailable": "authorization is temporarily unavailable; retry later",
    "invalid_dpop_proof": "the DPoP proof is missing or invalid",
    "use_dpop_nonce": "send a DPoP proof with the nonce in the DPoP-Nonce header",
    "server_error": "the server could not authorize the request",
}

_AUTH_SCHEME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 §2.1 b64token


class _NoBearerToken(AgentAuthError):
    """No ``Authorization: Bearer`` header: RFC 6750 §3.1 says no error code."""

    code = "unauthorized"


class _MalformedAuthorization(AgentAuthError):
    """More than one Authorization header, or a malformed bearer value."""

    code = "invalid_request"


def current_claims() -> Optional[AgentClaims]:
    """Return the claims of the request being served, or None outside one.

    Set by the WSGI and ASGI middleware (a context variable: concurrent
    requests never see each other's claims) and, inside an MCP tool, read
    from the current request's access token when ``auth.mcp()`` verified it.
    """
    in_mcp, claims, token = _mcp_current()
    if not in_mcp and claims is None:
        claims = _CURRENT_CLAIMS.get()
    return claims if claims is not None else _claims_of_access_token(token)


def _request_token() -> Tuple[bool, Optional[AgentClaims], Optional[str]]:
    """Return (inside an MCP tool?, claims a middleware verified, else the bearer token to verify)."""
    in_mcp, claims, token = _mcp_current()
    if not in_mcp:
        claims = _CURRENT_CLAIMS.get()
        in_mcp = claims is None and token is not None
    return in_mcp, claims, None if claims is not None else getattr(token, "token", None)


def _check_grant(auth: "AgentAuth", claims: Optional[AgentClaims], required: Tuple[str, ...]) -> None:
    """Refuse unless ``claims`` are ``auth``'s, unexpired, and grant every required scope.

    Claims a middleware set are checked again here: they must come from this
    instance's issuer and audience, and a WebSocket outlives its token.
    """
    if claims is None:
        raise TokenInvalidError("no verified token in this context")
    audience = claims.aud if type(claims.aud) is tuple else (claims.aud,)
    if claims.iss != auth.issuer or auth.audience not in audience:
        raise TokenInvalidError("the request's token was not minted for this AgentAuth")
    if claims.exp <= auth._clock() - auth.clock_tolerance_seconds:
        raise TokenExpiredError("token has expired", expired_at=claims.exp)
    missing = tuple(s for s in required if not scope_satisfies(claims.scopes, s))
    if missing:
        raise MissingScopeError(missing=missing, granted=claims.scopes)


def _credentials(values: List[str]) -> Tuple[bool, str]:
    """Return (DPoP scheme?, token) of the request's Authorization headers.

    The schemes are ``Bearer`` (RFC 6750 §2.1) and ``DPoP`` (RFC 9449 §7.1),
    with the same token syntax.

    Raises:
        _NoBearerToken: no header, or another scheme.
        _MalformedAuthorization: several headers, or not exactly one token.
    """
    if not values:
        raise _NoBearerToken("no Authorization header")
    # Several headers (a WSGI server joins them with commas) are ambiguous.
    if len(values) > 1 or "," in values[0]:
        raise _MalformedAuthorization("more than one Authorization header")
    # RFC 9110 §5.5: only spaces and tabs (OWS) surround a field value; any
    # other white space (NBSP, NEL, a control character) is not trimmed away.
    value = values[0].strip(" \t")
    scheme, _, token = value.partition(" ")
    if _AUTH_SCHEME.fullmatch(scheme) is None:
        raise _MalformedAuthorization("the Authorization header is malformed")
    scheme = scheme.lower()  # RFC 9110 §11.1: case-insensitive
    if scheme not in ("bearer", "dpop"):
        raise _NoBearerToken("the Authorization scheme is not Bearer or DPoP")
    # RFC 6750 §2.1: "Bearer" 1*SP b64token, nothing else (and so for "DPoP").
    token = token.lstrip(" ")
    if _B64TOKEN.fullmatch(token) is None:
        raise _MalformedAuthorization("the bearer value is not one token")
    return scheme == "dpop", token


def _dpop_header(values: List[str]) -> str:
    """Return the one ``DPoP`` header's proof (RFC 9449 §4.3 steps 1-2).

    Raises:
        DPoPProofError: none, several, or a list in one (joined by commas).
    """
    if len(values) != 1 or "," in values[0]:
        raise DPoPProofError("send exactly one DPoP header with the DPoP scheme")
    return values[0].strip(" \t")


def _request_url(public_url: Optional[str], scheme: str, host: Optional[str], path: str) -> str:
    """The URL a client used for this request, for the DPoP ``htu`` check.

    ``path`` is the percent-encoded path within the app. Behind a proxy the
    host and scheme the app sees are not the client's: ``public_url`` (the
    app's root as clients reach it) replaces them, so nothing of it comes
    from request headers then.
    """
    if public_url is not None:
        return public_url + path
    return f"{scheme}://{host or 'localhost'}{path}"


def _quote(value: str) -> str:
    """Quote an auth-param value (RFC 9110 §5.6.4)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header_safe(value: str, name: str) -> str:
    if type(value) is not str or _CONTROL_CHARS.search(value):
        raise InvalidConfigError(f"{name} must be a string without control characters")
    return value


def _refusal(
    exc: AgentAuthError,
    *,
    realm: str,
    resource_metadata_url: Optional[str],
    expose_errors: bool,
    dpop_algs: Optional[str] = None,
    step_up: bool = False,
) -> _Refusal:
    """Map a refusal to its HTTP status, headers and JSON body: the one place that does.

    RFC 6750 §3: 401 ``invalid_token`` (or no error code when no token was
    sent), 403 ``insufficient_scope``, 400 ``invalid_request``; 503 when the
    revocation store is down. Unless ``expose_errors``, the description is
    generic: it never says which check failed or which scope was missing.

    With ``dpop_algs`` (the request spoke DPoP, or the server requires it),
    the challenge is RFC 9449 §7.1's ``DPoP`` one with ``algs``; a bad proof
    is 401 ``invalid_dpop_proof``, and a missing nonce 401
    ``use_dpop_nonce`` with the nonce in ``DPoP-Nonce`` (§9).

    With ``step_up`` (the MCP spec's scope challenge, RFC 6750 §3), a 403
    ``insufficient_scope`` names in ``scope`` what to ask for: the token's
    scopes and the missing ones, so that re-authorizing loses nothing.
    """
    challenge = True
    if isinstance(exc, DPoPProofError):
        dpop_algs = dpop_algs or " ".join(DEFAULT_DPOP_ALGORITHMS)
        status, error = 401, exc.code
    elif isinstance(exc, _NoBearerToken):
        status, error = 401, "unauthorized"
    elif isinstance(exc, _MalformedAuthorization):
        status, error = 400, "invalid_request"
    elif isinstance(exc, TokenInvalidError):
        status, error = 401, "invalid_token"
    elif isinstance(exc, MissingScopeError):
        status, error = 403, "insufficient_scope"
    elif isinstance(exc, StoreUnavailableError):
        status, error, challenge = 503, "temporarily_unavailable", False
    else:  # an InvalidGrantError or InvalidConfigError raised inside the app
        status, error, challenge = 500, "server_error", False
    description = f"{exc.code}: {exc}" if expose_errors else _GENERIC_DESCRIPTIONS[error]
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    if challenge:
        params = [f"realm={_quote(realm)}"]
        if error != "unauthorized":
            params.append(f"error={_quote(error)}")
            if expose_errors:
                params.append(f"error_description={_quote(description)}")
                if isinstance(exc, MissingScopeError) and not step_up:
                    params.append(f"scope={_quote(' '.join(exc.missing))}")
            if isinstance(exc, MissingScopeError) and step_up:
                params.append(f"scope={_quote(' '.join(dict.fromkeys(exc.granted + exc.missing)))}")
        if resource_metadata_url is not None:
            params.append(f"resource_metadata={_quote(resource_metadata_url)}")  # RFC 9728 §5.1
        if dpop_algs is None:
            headers.append(("WWW-Authenticate", "Bearer " + ", ".join(params)))
        else:
            params.append(f"algs={_quote(dpop_algs)}")  # RFC 9449 §7.1
            headers.append(("WWW-Authenticate", "DPoP " + ", ".join(params)))
            if isinstance(exc, DPoPNonceError):
                headers.append(("DPoP-Nonce", exc.nonce))
    if status == 503:
        headers.append(("Retry-After", "1"))
    body = _JSON_ENCODER.encode({"error": error, "error_description": description}).encode("utf-8")
    return status, headers, body


class _Protection:
    """What both middlewares share: the settings, the metadata route, the refusals."""

    def __init__(
        self,
        auth: "AgentAuth",
        required_scopes: Iterable[str],
        resource_metadata_url: Optional[str],
        resource_metadata: Optional[Mapping[str, Any]],
        realm: Optional[str],
        expose_errors: bool,
        public_url: Optional[str] = None,
        step_up: bool = False,
    ) -> None:
        if type(step_up) is not bool:
            raise InvalidConfigError("step_up must be True or False")
        self.step_up = step_up
        self.auth = auth
        self.public_url = _public_url(public_url)
        self.required_scopes = _configured_scopes(required_scopes, "required_scopes")
        self.realm = _header_safe(auth.audience if realm is None else realm, "realm")
        self.expose_errors = bool(expose_errors)
        self.metadata_path: Optional[str] = None
        self.metadata_body = b""
        if resource_metadata is not None:
            from urllib.parse import urlsplit

            resource = resource_metadata.get("resource") if isinstance(resource_metadata, Mapping) else None
            if type(resource) is not str or not resource:
                raise InvalidConfigError("resource_metadata needs a 'resource' (use protected_resource_metadata())")
            if resource_metadata_url is None:  # RFC 9728 §3.1: well-known path before the resource's path
                parts = urlsplit(resource)
                resource_metadata_url = (
                    f"{parts.scheme}://{parts.netloc}{_METADATA_WELL_KNOWN}{parts.path.rstrip('/')}"
                )
            self.metadata_path = urlsplit(resource_metadata_url).path
            self.metadata_body = _JSON_ENCODER.encode(dict(resource_metadata)).encode("utf-8")
        self.resource_metadata_url = (
            None if resource_metadata_url is None else _header_safe(resource_metadata_url, "resource_metadata_url")
        )

    def refuse(self, exc: AgentAuthError, dpop: bool = False) -> _Refusal:
        """The refusal of ``exc``; a DPoP challenge when the request spoke DPoP or the server requires it."""
        policy = self.auth._dpop
        return _refusal(
            exc,
            realm=self.realm,
            resource_metadata_url=self.resource_metadata_url,
            expose_errors=self.expose_errors,
            dpop_algs=policy.algs_param if dpop or policy.require else None,
            step_up=self.step_up,
        )

    def credentials(self, authorization: List[str], dpop: List[str]) -> Tuple[bool, str, Optional[str]]:
        """Return (DPoP scheme?, token, proof) of a request's headers.

        ``Authorization: DPoP`` needs exactly one ``DPoP`` header (RFC 9449
        §7.1); with ``Bearer`` any ``DPoP`` header is ignored, and a bound
        token is then refused by verify (§7.2: never a bearer token).
        """
        is_dpop, token = _credentials(authorization)
        return is_dpop, token, _dpop_header(dpop) if is_dpop else None

    def verify_environ(self, environ: Mapping[str, Any]) -> Tuple[bool, Union[AgentClaims, AgentAuthError]]:
        """Verify a WSGI (or Django ``META``) request: (DPoP scheme?, its claims or the refusal)."""
        header = environ.get("HTTP_AUTHORIZATION")
        proof_header = environ.get("HTTP_DPOP")  # several DPoP headers arrive joined by commas
        dpop = False
        try:
            dpop, token, proof = self.credentials(
                [] if header is None else [header], [] if proof_header is None else [proof_header]
            )
            if proof is None:
                return dpop, self.auth.verify(token, self.required_scopes)
            url = _wsgi_url(environ, self.public_url)
            method = environ.get("REQUEST_METHOD", "GET")
            return dpop, self.auth.verify(token, self.required_scopes, dpop_proof=proof, method=method, url=url)
        except AgentAuthError as exc:
            return dpop, exc

    def metadata(self, method: str) -> _Refusal:
        """Serve the RFC 9728 document: public, cacheable, no token needed."""
        if method not in ("GET", "HEAD"):
            return 405, [("Allow", "GET, HEAD"), ("Content-Type", "application/json")], b'{"error":"method_not_allowed"}'
        headers = [
            ("Content-Type", "application/json"),
            ("Cache-Control", "public, max-age=3600"),
            ("Access-Control-Allow-Origin", "*"),  # public metadata, read by browser-based clients
        ]
        return 200, headers, self.metadata_body if method == "GET" else b""


def _public_url(value: Optional[str]) -> Optional[str]:
    """Check a configured ``public_url``: an absolute http(s) URL, no query or fragment; no trailing slash."""
    if value is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(value) if type(value) is str else None
    if parts is None or _htu(value) is None or parts.query or parts.fragment or "#" in value or "?" in value:
        raise InvalidConfigError("public_url must be an absolute http(s) URL without query or fragment")
    return value.rstrip("/")


_PATH_SAFE = "/:@!$&'()*+,;="  # RFC 3986 §3.3 pchar beside unreserved: left as they are


def _wsgi_url(environ: Mapping[str, Any], public_url: Optional[str]) -> str:
    """The request's URL (no query) as the client sent it, for DPoP (PEP 3333 §URL reconstruction)."""
    from urllib.parse import quote

    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    try:
        encoded = quote(path.encode("latin-1"), safe=_PATH_SAFE) or "/"  # PEP 3333: bytes as latin-1
    except UnicodeEncodeError:
        encoded = quote(path, safe=_PATH_SAFE) or "/"
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST")
    if not host:
        host = environ.get("SERVER_NAME", "localhost")
        port = str(environ.get("SERVER_PORT", ""))
        if port and port != {"http": "80", "https": "443"}.get(scheme):
            host += ":" + port
    return _request_url(public_url, scheme, host, encoded)


def _asgi_url(scope: Mapping[str, Any], public_url: Optional[str]) -> str:
    """The request's URL (no query) as the client sent it, for DPoP (ASGI: raw_path when the server gives it)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        path = raw.decode("latin-1").split("?", 1)[0]
    else:
        from urllib.parse import quote

        path = quote(scope.get("root_path", "") + scope.get("path", "/"), safe=_PATH_SAFE) or "/"
    host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"), None)
    server = scope.get("server")
    if not host and server:
        host = f"{server[0]}:{server[1]}" if server[1] is not None else server[0]
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    return _request_url(public_url, scheme, host, path)


class _WsgiMiddleware:
    """Plain WSGI (PEP 3333): verify the bearer token, then call the app."""

    def __init__(self, protection: _Protection, app: Callable[..., Iterable[bytes]]) -> None:
        self._protection = protection
        self._app = app

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        protection = self._protection
        if protection.metadata_path is not None and (
            environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") == protection.metadata_path
        ):
            return self._respond(protection.metadata(environ.get("REQUEST_METHOD", "GET")), start_response)
        dpop, claims = protection.verify_environ(environ)
        if not isinstance(claims, AgentClaims):
            return self._respond(protection.refuse(claims, dpop), start_response)
        environ["agentauth.claims"] = claims
        # A copied context: the claims are visible to the app, also while
        # its response streams, and gone after.
        context = contextvars.copy_context()
        context.run(_CURRENT_CLAIMS.set, claims)
        return _ContextIterable(context, context.run(self._app, environ, start_response))

    @staticmethod
    def _respond(refusal: _Refusal, start_response: Callable[..., Any]) -> List[bytes]:
        status, headers, body = refusal
        start_response(f"{status} {_STATUS_TEXT[status]}", headers + [("Content-Length", str(len(body)))])
        return [body]


class _ContextIterable:
    """A WSGI response iterated, and closed, inside the request's context."""

    def __init__(self, context: contextvars.Context, iterable: Iterable[bytes]) -> None:
        self._context = context
        self._iterable = iterable

    def __iter__(self) -> typing.Iterator[bytes]:
        run = self._context.run
        iterator = run(iter, self._iterable)
        while True:
            try:
                yield run(next, iterator)
            except StopIteration:
                return

    def close(self) -> None:
        close = getattr(self._iterable, "close", None)
        if close is not None:
            self._context.run(close)


class _AsgiMiddleware:
    """ASGI 3: verify the bearer token of HTTP and WebSocket scopes, then call the app."""

    def __init__(self, protection: _Protection, app: Callable[..., Any]) -> None:
        self._protection = protection
        self._app = app

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):  # lifespan and others pass through
            await self._app(scope, receive, send)
            return
        protection = self._protection
        if kind == "http" and scope["path"] == protection.metadata_path:
            await self._respond(protection.metadata(scope["method"]), send)
            return
        values = [value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"authorization"]
        proofs = [value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"dpop"]
        dpop = False
        try:
            dpop, token, proof = protection.credentials(values, proofs)
            if proof is None:
                claims = await _verify_async(protection.auth, token, protection.required_scopes)
            else:
                method = scope.get("method", "GET")  # a WebSocket opens with GET (RFC 6455 §4.1)
                url = _asgi_url(scope, protection.public_url)
                claims = await _verify_async(protection.auth, token, protection.required_scopes, proof, method, url)
        except AgentAuthError as exc:
            if kind == "websocket":  # close before accept: the server answers 403
                await send({"type": "websocket.close", "code": 1008})
            else:
                await self._respond(protection.refuse(exc, dpop), send)
            return
        if protection.step_up and kind == "http" and scope.get("method") == "POST":
            receive, refused = await _step_up_check(protection, claims, receive)
            if refused is not None:
                await self._respond(protection.refuse(refused, dpop), send)
                return
        scope.setdefault("state", {})["agentauth.claims"] = claims  # Starlette's request.state
        if dpop:
            # The app behind (the MCP SDK's own bearer check with auth.mcp())
            # sees a Bearer header; auth.mcp() answers for this token from
            # the claims verified here, proof included, in this request only.
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"authorization", b"dpop")]
            scope = dict(scope, headers=headers + [(b"authorization", b"Bearer " + token.encode("ascii"))])
        reset = _CURRENT_CLAIMS.set(claims)
        verified = _VERIFIED_TOKEN.set((token, claims))
        try:
            await self._app(scope, receive, send)
        finally:
            _VERIFIED_TOKEN.reset(verified)
            _CURRENT_CLAIMS.reset(reset)

    @staticmethod
    async def _respond(refusal: _Refusal, send: Callable[..., Any]) -> None:
        status, headers, body = refusal
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        raw.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


_MAX_STEP_UP_BODY_BYTES = 1 << 20  # a JSON-RPC request read to find the tool it calls; larger ones pass unread


async def _step_up_check(
    protection: _Protection, claims: AgentClaims, receive: Callable[..., Any]
) -> Tuple[Callable[..., Any], Optional[MissingScopeError]]:
    """Read an MCP ``tools/call`` ahead of the app; refuse it when the tool's ``require`` scopes are not granted.

    Returns a ``receive`` that hands the app the same body, and the refusal
    (or None). Anything that is not a JSON-RPC ``tools/call`` of a known tool
    passes untouched: the tool's own ``require`` still judges it.
    """
    messages: List[Dict[str, Any]] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if message.get("type") != "http.request" or not message.get("more_body") or size > _MAX_STEP_UP_BODY_BYTES:
            break

    async def replay() -> Dict[str, Any]:
        return messages.pop(0) if messages else await receive()

    if size > _MAX_STEP_UP_BODY_BYTES or messages[-1].get("more_body"):
        return replay, None
    try:
        request = json.loads(b"".join(m.get("body", b"") for m in messages))
    except ValueError:
        return replay, None
    if type(request) is not dict or request.get("method") != "tools/call" or type(request.get("params")) is not dict:
        return replay, None
    required = protection.auth._required_by_name.get(request["params"].get("name"))  # type: ignore[arg-type]
    missing = tuple(s for s in required or () if not scope_satisfies(claims.scopes, s))
    return replay, MissingScopeError(missing=missing, granted=claims.scopes) if missing else None


#: What a view's refusal can be: the classes protect() and django() answer for.
_REFUSALS = (TokenInvalidError, MissingScopeError, StoreUnavailableError)


class _AsgiRefusal:
    """A refusal as an ASGI app: what a Starlette exception handler may return."""

    def __init__(self, refusal: _Refusal) -> None:
        self._refusal = refusal

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await _AsgiMiddleware._respond(self._refusal, send)


def _protect_app(protection: _Protection, app: Any) -> Any:
    """Add the middleware and a refusal handler to a Flask or Starlette/FastAPI app."""
    if callable(getattr(app, "register_error_handler", None)) and callable(getattr(app, "wsgi_app", None)):  # Flask

        def flask_refused(exc: AgentAuthError) -> Tuple[bytes, int, List[Tuple[str, str]]]:
            status, headers, body = protection.refuse(exc)
            return body, status, headers

        for refusal in _REFUSALS:
            app.register_error_handler(refusal, flask_refused)
        app.wsgi_app = _WsgiMiddleware(protection, app.wsgi_app)
        return app
    if callable(getattr(app, "add_exception_handler", None)) and callable(getattr(app, "add_middleware", None)):

        async def asgi_refused(request: Any, exc: AgentAuthError) -> _AsgiRefusal:
            return _AsgiRefusal(protection.refuse(exc))

        def middleware(app: Callable[..., Any]) -> _AsgiMiddleware:
            return _AsgiMiddleware(protection, app)

        for refusal in _REFUSALS:
            app.add_exception_handler(refusal, asgi_refused)
        app.add_middleware(middleware)
        return app
    raise InvalidConfigError(
        "protect() knows Flask, Starlette and FastAPI apps: wrap another app with auth.wsgi() or auth.asgi(),"
        " and use auth.django() for Django"
    )


class _DjangoMiddleware:
    """Django: verify the bearer token, call the view, answer a refusal it raises."""

    sync_capable = True
    async_capable = False

    def __init__(self, protection: _Protection, get_response: Callable[..., Any]) -> None:
        self._protection = protection
        self._get_response = get_response

    def __call__(self, request: Any) -> Any:
        protection = self._protection
        if protection.metadata_path is not None and request.path == protection.metadata_path:
            return self._response(protection.metadata(request.method))
        dpop, claims = protection.verify_environ(request.META)
        if not isinstance(claims, AgentClaims):
            return self._response(protection.refuse(claims, dpop))
        request.META["agentauth.claims"] = claims
        reset = _CURRENT_CLAIMS.set(claims)
        try:
            return self._get_response(request)
        finally:
            _CURRENT_CLAIMS.reset(reset)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """Django's hook for a view's exception: a refusal gets its answer, anything else goes on."""
        if isinstance(exception, _REFUSALS):
            return self._response(self._protection.refuse(exception))
        return None

    @staticmethod
    def _response(refusal: _Refusal) -> Any:
        from django.http import HttpResponse  # type: ignore[import-not-found, import-untyped, unused-ignore]

        status, headers, body = refusal
        response = HttpResponse(body, status=status)
        for name, value in headers:
            response[name] = value
        return response


_MAX_FORM_BYTES = 65536  # a form posted to an endpoint or a page: a few KiB at most


class _MalformedRequest(Exception):
    """A request body that cannot be read as a form: each endpoint answers it with its own 400."""


def _content_length(value: Optional[str]) -> int:
    try:
        length = int(value or 0)
    except ValueError:
        length = -1
    if not 0 <= length <= _MAX_FORM_BYTES:
        raise _MalformedRequest("the body is missing or too large")
    return length


def _wsgi_body(environ: Mapping[str, Any]) -> bytes:
    """Read a WSGI request body of at most ``_MAX_FORM_BYTES`` (its Content-Length says how much)."""
    length = _content_length(environ.get("CONTENT_LENGTH"))
    return environ["wsgi.input"].read(length) if length else b""


async def _asgi_body(receive: Callable[..., Any]) -> bytes:
    """Read an ASGI request body of at most ``_MAX_FORM_BYTES``, however many messages carry it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > _MAX_FORM_BYTES:
            raise _MalformedRequest("the body is missing or too large")
        if not message.get("more_body"):
            return body


def _fields(text: str, what: str) -> Dict[str, List[str]]:
    """Parse ``name=value&...`` (a form body or a query string) strictly: every value of every name.

    Raises:
        _MalformedRequest: bad percent-encoding, not UTF-8, a pair without "=".
    """
    from urllib.parse import parse_qs

    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _MalformedRequest(f"the {what} is malformed") from exc


def _form_fields(content_type: str, body: bytes) -> Dict[str, List[str]]:
    """Parse an ``application/x-www-form-urlencoded`` body strictly: every value of every name.

    Raises:
        _MalformedRequest: another media type, bad percent-encoding, not UTF-8.
    """
    if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise _MalformedRequest("the body must be application/x-www-form-urlencoded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _MalformedRequest("the form is not UTF-8") from exc
    return _fields(text, "form")


# ---------------------------------------------------------------------------
# Token exchange
# ---------------------------------------------------------------------------

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # RFC 8693 §2.1
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # RFC 8693 §3
_EXCHANGE_PARAMS = ("grant_type", "subject_token", "subject_token_type", "actor", "scope", "requested_token_type")


class _OAuthError(Exception):
    """One RFC 6749 §5.2 refusal of a token, registration or revocation endpoint.

    ``error`` is the code, the message the description sent to the client,
    ``status`` the HTTP status; ``extra`` adds headers (a DPoP nonce).
    """

    def __init__(self, error: str, description: str, status: int = 400, extra: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(description)
        self.error, self.status, self.extra = error, status, extra

    def json(self) -> _Refusal:
        """The RFC 6749 §5.2 JSON answer."""
        extra = {405: (("Allow", "POST"),), 503: (("Retry-After", "1"),)}.get(self.status, self.extra)
        return _exchange_answer(self.status, {"error": self.error, "error_description": str(self)}, extra)


def _exchange_answer(status: int, document: Mapping[str, Any], extra: Tuple[Tuple[str, str], ...] = ()) -> _Refusal:
    # RFC 6749 §5.1: token responses are never cached.
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Pragma", "no-cache"), *extra]
    return status, headers, _JSON_ENCODER.encode(dict(document)).encode("utf-8")


def _single_params(
    fields: Mapping[str, List[str]], names: Iterable[str], keep_empty: Iterable[str] = ()
) -> Dict[str, str]:
    """The named parameters, each at most once; an empty value counts as absent unless its name is in ``keep_empty``.

    Raises:
        _OAuthError: a parameter is repeated (RFC 6749 §3.1, §3.2).
    """
    params = {}
    for name in names:
        values = fields.get(name, [])
        if len(values) > 1:
            raise _OAuthError("invalid_request", f"{name} is repeated")
        if values and (values[0] or name in keep_empty):
            params[name] = values[0]
    return params


def _exchange_form(method: str, content_type: str, body: bytes) -> Dict[str, str]:
    """Parse the form of a token exchange request, refusing anything ambiguous."""
    if method != "POST":
        raise _OAuthError("invalid_request", "use POST", 405)
    try:
        fields = _form_fields(content_type, body)
    except _MalformedRequest as exc:
        raise _OAuthError("invalid_request", str(exc)) from exc
    # An empty scope asks for nothing, which is no grant (RFC 6749 §3.3): it is kept, and refused.
    return _single_params(fields, _EXCHANGE_PARAMS, keep_empty=("scope",))


def _token_request_proof(auth: "AgentAuth", proofs: Tuple[str, ...], url: str, bound_jkt: Optional[str] = None
                         ) -> Optional[str]:
    """Check a token request's DPoP proof (RFC 9449 §5); return the key to bind to, or None.

    Every token endpoint of this module (token exchange, the authorization
    server's grants) calls this one function. ``proofs`` are the request's
    ``DPoP`` headers, ``url`` the endpoint's URL as clients reach it. No
    proof: None, unless ``bound_jkt`` (what the request presents is bound
    to that key and never redeemed without it). A proof: exactly one header,
    checked (``htm`` POST, ``htu`` the endpoint, no ``ath`` at a token
    endpoint, §4.3), signed by ``bound_jkt``'s key when given, and recorded
    against replay for its window plus the clock tolerance, as verify() does.

    Raises:
        DPoPProofError, DPoPNonceError, StoreUnavailableError.
    """
    if not proofs:
        if bound_jkt is not None:
            raise DPoPProofError("a DPoP-bound token is redeemed only with a proof of its key")
        return None
    now = auth._clock()
    jkt, replay_key, expires_at = auth._dpop.check(_dpop_header(list(proofs)), "POST", url, None, now, bound_jkt)
    auth._record_proof(replay_key, expires_at + auth.clock_tolerance_seconds, now)
    return jkt


def _dpop_refusal(exc: DPoPProofError) -> _OAuthError:
    """RFC 9449 §5 and §8: a token endpoint refuses a proof with 400, the DPoP error code, and a fresh nonce if asked."""
    nonce = (("DPoP-Nonce", exc.nonce),) if isinstance(exc, DPoPNonceError) else ()
    return _OAuthError(exc.code, _GENERIC_DESCRIPTIONS[exc.code], extra=nonce)


def _exchange(auth: "AgentAuth", form: Mapping[str, str], proofs: Tuple[str, ...] = (), url: str = "") -> _Refusal:
    """Answer one RFC 8693 token exchange: a narrower token for the agent named in ``actor``.

    With a DPoP proof (``proofs``: the request's ``DPoP`` headers; ``url``:
    the endpoint's URL), the new token is bound to the proof's key and its
    ``token_type`` is "DPoP" (RFC 9449 §5).
    """
    try:
        if "grant_type" not in form:
            raise _OAuthError("invalid_request", "grant_type is required")
        if form["grant_type"] != GRANT_TYPE_TOKEN_EXCHANGE:
            raise _OAuthError("unsupported_grant_type", "grant_type must be token-exchange")
        for name in ("subject_token", "subject_token_type", "actor"):
            if name not in form:
                raise _OAuthError("invalid_request", f"{name} is required")
        for name in ("subject_token_type", "requested_token_type"):
            if form.get(name, TOKEN_TYPE_ACCESS_TOKEN) != TOKEN_TYPE_ACCESS_TOKEN:
                raise _OAuthError("invalid_request", f"{name} must be {TOKEN_TYPE_ACCESS_TOKEN}")
        try:
            if "scope" in form:
                scopes: Iterable[str] = form["scope"].split(" ")
            else:  # RFC 8693 §2.1: no scope asks for what the subject token holds
                scopes = auth._check(form["subject_token"], auth._clock()).scopes
            # A bound subject token is never exchanged without a proof of its key.
            parent_jkt = _token_jkt(auth._check(form["subject_token"], auth._clock()))
            jkt = _token_request_proof(auth, proofs, url, parent_jkt)
            issued = auth.delegate(form["subject_token"], agent=form["actor"], scopes=scopes, dpop_jkt=jkt)
        except DPoPProofError as exc:
            raise _dpop_refusal(exc) from exc
        except StoreUnavailableError as exc:
            raise _OAuthError("temporarily_unavailable", "authorization is temporarily unavailable", 503) from exc
        except TokenInvalidError as exc:
            # RFC 8693 §2.2.2: an invalid subject_token MUST get invalid_request.
            raise _OAuthError("invalid_request", "the subject token is invalid, expired or revoked") from exc
        except InvalidGrantError as exc:
            raise _OAuthError(exc.oauth_error, str(exc)) from exc
    except _OAuthError as refusal:
        return refusal.json()
    return _exchange_answer(200, {
        "access_token": issued.token,
        "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        "token_type": "Bearer" if jkt is None else "DPoP",  # RFC 9449 §5
        "expires_in": max(0, issued.expires_at - math.floor(auth._clock())),
        "scope": " ".join(dict.fromkeys(scopes)),  # as delegate() granted them: deduplicated, in order
    })


class _ExchangeWsgi:
    def __init__(self, auth: "AgentAuth", public_url: Optional[str]) -> None:
        self._auth = auth
        self._public_url = public_url

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            try:
                body = _wsgi_body(environ)
            except _MalformedRequest as exc:
                raise _OAuthError("invalid_request", str(exc)) from exc
            form = _exchange_form(environ.get("REQUEST_METHOD", "GET"), environ.get("CONTENT_TYPE", ""), body)
            proofs = () if environ.get("HTTP_DPOP") is None else (environ["HTTP_DPOP"],)
            answer = _exchange(self._auth, form, proofs, _wsgi_url(environ, self._public_url))
        except _OAuthError as refusal:
            answer = refusal.json()
        return _WsgiMiddleware._respond(answer, start_response)


class _ExchangeAsgi:
    def __init__(self, auth: "AgentAuth", public_url: Optional[str]) -> None:
        self._auth = auth
        self._public_url = public_url

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"), "")
        try:
            try:
                body = await _asgi_body(receive)
            except _MalformedRequest as exc:
                raise _OAuthError("invalid_request", str(exc)) from exc
            form = _exchange_form(scope["method"], content_type, body)
        except _OAuthError as refusal:
            answer = refusal.json()
        else:
            auth = self._auth
            proofs = tuple(v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"dpop")
            url = _asgi_url(scope, self._public_url)
            if not auth._may_block() and type(auth.store) is MemoryStore:  # delegate always checks the store
                answer = _exchange(auth, form, proofs, url)
            else:  # delegate checks the store: keep its I/O off the event loop
                import asyncio

                answer = await asyncio.get_running_loop().run_in_executor(None, _exchange, auth, form, proofs, url)
        await _AsgiMiddleware._respond(answer, send)


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------

#: How long a rendered page's forms work: their CSRF tokens expire then.
_CSRF_TTL_SECONDS = 3600
_CSRF_TOKEN = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{43})")  # "<expires_at>.<base64url HMAC-SHA256>"
#: The one stylesheet of every page, inline and allowed by its hash (CSP
#: Level 3 hash-source): readable from 375 px wide up, light and dark.
_PAGE_STYLE = (
    ":root{color-scheme:light dark;--bg:#fff;--fg:#1f1f1f;--muted:#5e5e5e;--line:#d0d0d0;--card:#fafafa;"
    "--danger:#b3261e}"
    "@media (prefers-color-scheme:dark){:root{--bg:#121212;--fg:#e6e6e6;--muted:#a8a8a8;--line:#3a3a3a;"
    "--card:#1c1c1c;--danger:#ffb4ab}}"
    "*{box-sizing:border-box}"
    "body{margin:0;background:var(--bg);color:var(--fg);"
    "font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}"
    "main{max-width:46rem;margin:0 auto;padding:1rem}"
    "h1{font-size:1.5rem;margin:.5rem 0 1rem}"
    "p{margin:0 0 1rem}"
    ".grants{list-style:none;margin:0;padding:0}"
    ".grant{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:1rem;"
    "margin:0 0 1rem;overflow-wrap:anywhere}"
    ".grant h2{font-size:1.125rem;margin:0}"
    ".agent,.meta{color:var(--muted);font-size:.875rem;margin:0}"
    ".scopes{margin:.75rem 0;padding-left:1.25rem}"
    ".scopes code{color:var(--muted);font-size:.8125rem}"
    "form{margin:.75rem 0 0}"
    "button{font:inherit;color:var(--danger);background:transparent;border:1px solid var(--danger);"
    "border-radius:.375rem;min-height:2.75rem;padding:.5rem 1rem;cursor:pointer}"
    "button:focus-visible{outline:2px solid var(--fg);outline-offset:2px}"
)
_PAGE_STYLE_HASH = binascii.b2a_base64(hashlib.sha256(_PAGE_STYLE.encode("utf-8")).digest(), newline=False).decode()
#: Security headers of every page response, whatever its status (CSP Level 3,
#: RFC 7034, RFC 9111 §5.2.2.5, Referrer Policy, Fetch's nosniff).
_PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        f"default-src 'none'; style-src 'sha256-{_PAGE_STYLE_HASH}'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
)
_PAGE_DOCUMENT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>{title}</h1>
{content}
</main>
</body>
</html>
"""
_MESSAGE_TEMPLATE = "<p>{message}</p>"


class _Markup(str):
    """HTML already rendered by ``_fill``: the one kind of value it does not escape."""


def _fill(template: str, **fields: Any) -> _Markup:
    """Fill a template's named fields, HTML-escaping every value that is not ``_Markup``."""
    import html

    return _Markup(template.format_map({
        name: value if type(value) is _Markup else html.escape(str(value), quote=True)
        for name, value in fields.items()
    }))


def _page_response(
    status: int, content_type: str, body: bytes, extra: Iterable[Tuple[str, str]] = ()
) -> _Refusal:
    """Every page response goes out through here, so each carries the security headers."""
    return status, [("Content-Type", content_type), *_PAGE_HEADERS, *extra], body


def _render(status: int, title: str, template: str, **fields: Any) -> _Refusal:
    """Render ``template`` (escaping every value) into the page document, with the security headers."""
    document = _fill(_PAGE_DOCUMENT, title=title, style=_Markup(_PAGE_STYLE), content=_fill(template, **fields))
    return _page_response(status, "text/html; charset=utf-8", document.encode("utf-8"))


def _render_message(status: int, title: str, message: str, extra: Iterable[Tuple[str, str]] = ()) -> _Refusal:
    status, headers, body = _render(status, title, _MESSAGE_TEMPLATE, message=message)
    return status, headers + list(extra), body


def _page_json(status: int, document: Mapping[str, Any]) -> _Refusal:
    return _page_response(status, "application/json", _JSON_ENCODER.encode(dict(document)).encode("utf-8"))


def _page_redirect(location: str) -> _Refusal:
    """303 See Other (RFC 9110 §15.4.4): the browser follows it with a GET, never re-posting the form.

    Security: a Location that is not printable ASCII without spaces (a CR or
    LF would end the header and start another) is never sent: a page says so.
    Every redirect goes through here, so this is the backstop for checks made earlier.
    """
    if _LOCATION.fullmatch(location) is None:
        return _render_message(400, "This request cannot be answered", "The address to go back to is malformed.")
    return _page_response(303, "text/plain; charset=utf-8", b"See Other", (("Location", location),))


class _PageRequest(NamedTuple):
    """One HTTP request as a page sees it: read-only, the same under WSGI and ASGI.

    ``path`` is the full decoded path (mount point included), ``query`` the
    raw query string, ``headers`` maps lower-case names to values (repeated
    headers joined by ", "), ``cookies`` maps names to values (the first of a
    repeated name), ``body`` is the form a POST sent (at most 64 KiB).
    ``environ`` (WSGI) or ``scope`` (ASGI) is the server's own, as given; the
    other is None.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    body: bytes
    environ: Optional[Dict[str, Any]]
    scope: Optional[Dict[str, Any]]


def _cookies(header: str) -> Mapping[str, str]:
    """Parse a Cookie header (RFC 6265 §5.4): ``name=value`` pairs split by ";"; the first of a name wins."""
    cookies: Dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':  # RFC 6265 §4.1.1: a quoted cookie-value
            value = value[1:-1]
        cookies.setdefault(name, value)
    return types.MappingProxyType(cookies)


def _wsgi_request(environ: Dict[str, Any], body: bytes) -> _PageRequest:
    headers: Dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = value
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    # PEP 3333: paths arrive as bytes decoded as latin-1; give the text they are.
    raw = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1", "replace")
    return _PageRequest(
        method=environ.get("REQUEST_METHOD", "GET").upper(),
        path=raw.decode("utf-8", "replace") or "/",
        query=environ.get("QUERY_STRING", ""),
        headers=types.MappingProxyType(headers),
        cookies=_cookies(headers.get("cookie", "")),
        body=body,
        environ=environ,
        scope=None,
    )


def _asgi_request(scope: Dict[str, Any], body: bytes) -> _PageRequest:
    headers: Dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        separator = "; " if key == "cookie" else ", "  # RFC 9113 §8.2.3: HTTP/2 splits cookies
        headers[key] = headers[key] + separator + text if key in headers else text
    path, root_path = scope.get("path", "/"), scope.get("root_path", "")
    if root_path and not path.startswith(root_path):  # servers differ on whether path includes root_path
        path = root_path + path
    return _PageRequest(
        method=scope.get("method", "GET").upper(),
        path=path or "/",
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=types.MappingProxyType(headers),
        cookies=_cookies(headers.get("cookie", "")),
        body=body,
        environ=None,
        scope=scope,
    )


class _CsrfTokens:
    """CSRF tokens for a page's forms: bound to the signed-in subject, expiring.

    A token is ``<expires_at>.<HMAC-SHA256(key, expires_at NUL subject)>``
    (base64url), under a key derived from the instance's signing key for
    this use only. No server state: any process with the same key checks it.
    """

    def __init__(self, key: bytes, clock: Callable[[], float], ttl_seconds: int = _CSRF_TTL_SECONDS) -> None:
        self._key = key
        self._clock = clock
        self._ttl_seconds = ttl_seconds

    def _mac(self, subject: str, expires_at: int) -> str:
        message = f"{expires_at}\x00{subject}".encode("utf-8")  # a subject never holds NUL (no control chars)
        return _b64encode(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self, subject: str) -> str:
        """Return a token for ``subject``'s forms, valid ``ttl_seconds`` from now."""
        expires_at = math.floor(self._clock()) + self._ttl_seconds
        return f"{expires_at}.{self._mac(subject, expires_at)}"

    def check(self, subject: str, token: Optional[str]) -> bool:
        """Whether ``token`` was issued for ``subject`` and has not expired (False for anything else)."""
        match = _CSRF_TOKEN.fullmatch(token) if type(token) is str else None
        if match is None:
            return False
        expires_at = int(match.group(1))
        return hmac.compare_digest(self._mac(subject, expires_at), match.group(2)) and self._clock() < expires_at


_AGENTS_TITLE = "Connected agents"
_AGENTS_TEMPLATE = """<p>These agents can act for you, each only within the permissions listed.
Disconnect one and its access ends at once.</p>
<ul class="grants">
{rows}
</ul>"""
_NO_AGENTS_TEMPLATE = "<p>No agent is connected to your account.</p>"
_GRANT_TEMPLATE = """<li class="grant" data-agent="{agent}">
<h2>{name}</h2>
<p class="agent">{agent}</p>
<ul class="scopes">
{scopes}
</ul>
<p class="meta">Connected since {created}<br>Last used: {last_used}</p>
<form method="post" action="{action}">
<input type="hidden" name="csrf_token" value="{csrf_token}">
<input type="hidden" name="agent" value="{agent}">
<button type="submit" aria-label="Disconnect {name}">Disconnect</button>
</form>
</li>"""
_SCOPE_TEMPLATE = "<li>{description} <code>{scope}</code></li>"
_RAW_SCOPE_TEMPLATE = "<li><code>{scope}</code></li>"
_TIME_TEMPLATE = '<time datetime="{iso}">{text}</time>'


def _page_time(timestamp: Optional[int]) -> _Markup:
    """A unix time as a ``<time>`` element in UTC (the server cannot know the reader's zone without script)."""
    if timestamp is None:
        return _Markup("never")
    moment = time.gmtime(timestamp)
    return _fill(
        _TIME_TEMPLATE, iso=time.strftime("%Y-%m-%dT%H:%M:%SZ", moment), text=time.strftime("%Y-%m-%d %H:%M UTC", moment)
    )


def _login_url(value: Any) -> str:
    """Check ``login_url``: a path on this site or an absolute http(s) URL, no fragment, safe in a header."""
    from urllib.parse import urlsplit

    if type(value) is not str or not value or _CONTROL_CHARS.search(value) or " " in value:
        raise InvalidConfigError("login_url must be a URL without spaces or control characters")
    parts = urlsplit(value)
    local = not parts.scheme and not parts.netloc and value.startswith("/") and not value.startswith(("//", "/\\"))
    if parts.fragment or "#" in value or not (local or (parts.scheme in ("http", "https") and parts.netloc)):
        raise InvalidConfigError("login_url must be a path starting with / or an http(s) URL, without a fragment")
    return value


def _is_coroutine_function(func: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


class _AgentsPage:
    """The connected-agents page's settings, checked once, shared by its WSGI and ASGI entry points."""

    def __init__(
        self,
        auth: "AgentAuth",
        authenticate: Callable[[_PageRequest], Any],
        scope_descriptions: Optional[Mapping[str, str]],
        login_url: Optional[str],
        *,
        asgi: bool,
    ) -> None:
        _grant_store(auth.store)  # a store without grants cannot back this page
        if not callable(authenticate):
            raise InvalidConfigError("authenticate must be a function of the request")
        self.async_authenticate = _is_coroutine_function(authenticate)
        if self.async_authenticate and not asgi:
            raise InvalidConfigError("under WSGI, authenticate must be a plain function (async works under ASGI)")
        if scope_descriptions is not None and not isinstance(scope_descriptions, Mapping):
            raise InvalidConfigError("scope_descriptions must map scopes to descriptions")
        descriptions: Dict[str, str] = {}
        for scope, text in (scope_descriptions or {}).items():
            if type(scope) is not str or _SCOPE_TOKEN.fullmatch(scope) is None:
                raise InvalidConfigError("scope_descriptions keys must be scopes")
            if type(text) is not str or not text.strip():
                raise InvalidConfigError("scope_descriptions values must be non-empty strings")
            descriptions[scope] = text
        self.auth = auth
        self.authenticate = authenticate
        self.descriptions = descriptions
        self.login_url = None if login_url is None else _login_url(login_url)
        self.csrf = _CsrfTokens(auth._derived_key(b"pages/agents/csrf"), auth._clock)
        self.blocks = type(auth.store) is not MemoryStore  # store calls may wait on I/O

    def answer(self, request: _PageRequest, subject: Any) -> _Refusal:
        """Answer ``request`` for the user ``authenticate`` returned (None: nobody signed in)."""
        if subject is not None:
            if type(subject) is not str:
                raise TypeError("authenticate must return the subject (a str) or None")
            _name(subject, "the subject authenticate returned")
        return _agents_page(request, _PageState(self, subject))

    def authenticate_and_answer(self, request: _PageRequest) -> _Refusal:
        return self.answer(request, self.authenticate(request))

    def describe(self, grant: Grant) -> Dict[str, Any]:
        """One grant as the page's JSON shows it."""
        return {
            "grant_id": grant.grant_id,
            "agent": grant.agent,
            "agent_name": grant.agent_name,
            "scopes": [{"scope": scope, "description": self.descriptions.get(scope, scope)} for scope in grant.scopes],
            "created_at": grant.created_at,
            "updated_at": grant.updated_at,
            "last_used_at": grant.last_used_at,
        }

    def row(self, grant: Grant, csrf_token: str, action: str) -> _Markup:
        """One grant as the page's HTML shows it: a list item with its Disconnect form."""
        scopes = "\n".join(
            _fill(_SCOPE_TEMPLATE, description=self.descriptions[scope], scope=scope)
            if scope in self.descriptions
            else _fill(_RAW_SCOPE_TEMPLATE, scope=scope)
            for scope in grant.scopes
        )
        return _fill(
            _GRANT_TEMPLATE,
            agent=grant.agent,
            name=grant.agent if grant.agent_name is None else grant.agent_name,
            scopes=_Markup(scopes),
            created=_page_time(grant.created_at),
            last_used=_page_time(grant.last_used_at),
            action=action,
            csrf_token=csrf_token,
        )


class _PageState(NamedTuple):
    """What an endpoint answers with, beside the request: the page's settings and who is signed in."""

    page: _AgentsPage
    subject: Optional[str]


def _page_path(request: _PageRequest) -> str:
    """The page's own URL path, percent-encoded: a safe Location and form action.

    One leading "/" only: a path such as ``//evil.example/x`` would otherwise
    be a network-path reference (RFC 3986 §4.2), sending the form, and its
    CSRF token, to another host.
    """
    from urllib.parse import quote

    return "/" + quote(request.path).lstrip("/")


def _wants_json(request: _PageRequest) -> bool:
    """``?format=json``, or an Accept header that asks for JSON and not HTML.

    Raises:
        _MalformedRequest: an unreadable query or another format.
    """
    from urllib.parse import parse_qs

    try:
        formats = parse_qs(request.query, keep_blank_values=True, errors="strict").get("format", [])
    except (UnicodeDecodeError, ValueError) as exc:
        raise _MalformedRequest("the query is not valid") from exc
    if formats:
        if formats not in (["json"], ["html"]):
            raise _MalformedRequest("format must be json or html")
        return formats == ["json"]
    accepted = {part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")}
    return "application/json" in accepted and "text/html" not in accepted


def _unavailable() -> _Refusal:
    return _render_message(
        503, "Try again", "Your connected agents cannot be shown or changed right now. Try again in a moment.",
        (("Retry-After", "1"),),
    )


def _agents_page(request: _PageRequest, state: _PageState) -> _Refusal:
    """The connected-agents endpoint: GET lists the signed-in user's grants, POST disconnects one."""
    if request.method not in ("GET", "POST"):
        return _render_message(405, "Not allowed", "This page answers GET and POST only.", (("Allow", "GET, POST"),))
    page, subject = state
    if subject is None:
        if page.login_url is None:
            return _render_message(401, "Sign in", "Sign in to see the agents connected to your account.")
        from urllib.parse import urlencode

        separator = "&" if "?" in page.login_url else "?"
        return _page_redirect(page.login_url + separator + urlencode({"next": _page_path(request)}))
    if request.method == "POST":
        return _disconnect_agent(request, state)
    return _list_agents(request, state)


def _list_agents(request: _PageRequest, state: _PageState) -> _Refusal:
    page, subject = state
    try:
        as_json = _wants_json(request)
    except _MalformedRequest:
        return _render_message(400, "Bad request", "Use ?format=json or ?format=html, or no format at all.")
    try:
        grants = page.auth.grants(subject=typing.cast(str, subject))
    except StoreUnavailableError:
        return _unavailable()
    if as_json:
        return _page_json(200, {"subject": subject, "grants": [page.describe(grant) for grant in grants]})
    if not grants:
        return _render(200, _AGENTS_TITLE, _NO_AGENTS_TEMPLATE)
    csrf_token, action = page.csrf.issue(typing.cast(str, subject)), _page_path(request)
    rows = _Markup("\n".join(page.row(grant, csrf_token, action) for grant in grants))
    return _render(200, _AGENTS_TITLE, _AGENTS_TEMPLATE, rows=rows)


def _disconnect_agent(request: _PageRequest, state: _PageState) -> _Refusal:
    page, subject = state
    try:
        fields = _form_fields(request.headers.get("content-type", ""), request.body)
    except _MalformedRequest:
        fields = {}
    tokens = fields.get("csrf_token", [])
    # The CSRF check comes first: nothing of a forged request is acted on.
    if len(tokens) != 1 or not page.csrf.check(typing.cast(str, subject), tokens[0]):
        return _render_message(
            403, "Form expired", "This form has expired or was not made for you. Reload the page and try again."
        )
    agents = fields.get("agent", [])
    try:
        if len(agents) != 1:
            raise InvalidGrantError("send exactly one agent")
        page.auth.disconnect(subject=typing.cast(str, subject), agent=agents[0])  # False: already gone, same answer
    except InvalidGrantError:
        return _render_message(400, "Bad request", "That is not an agent of yours. Reload the page and try again.")
    except StoreUnavailableError:
        return _unavailable()
    return _page_redirect(_page_path(request))  # 303: the browser GETs the page, never re-posts


def _bad_body() -> _Refusal:
    return _render_message(400, "Bad request", "The request body is missing or too large.")


class _AgentsPageWsgi:
    def __init__(self, page: _AgentsPage) -> None:
        self._page = page

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            body = _wsgi_body(environ) if environ.get("REQUEST_METHOD", "GET").upper() == "POST" else b""
        except _MalformedRequest:
            return _WsgiMiddleware._respond(_bad_body(), start_response)
        answer = self._page.authenticate_and_answer(_wsgi_request(environ, body))
        return _WsgiMiddleware._respond(answer, start_response)


class _AgentsPageAsgi:
    def __init__(self, page: _AgentsPage) -> None:
        self._page = page

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        import asyncio

        page = self._page
        try:
            body = await _asgi_body(receive) if scope.get("method", "GET").upper() == "POST" else b""
        except _MalformedRequest:
            await _AsgiMiddleware._respond(_bad_body(), send)
            return
        request = _asgi_request(scope, body)
        loop = asyncio.get_running_loop()
        if page.async_authenticate:
            subject = await page.authenticate(request)
            if page.blocks:  # the store does I/O: keep it off the event loop
                answer = await loop.run_in_executor(None, page.answer, request, subject)
            else:
                answer = page.answer(request, subject)
        else:  # a plain authenticate may do I/O too (a session lookup): it runs off the loop with the rest
            answer = await loop.run_in_executor(None, page.authenticate_and_answer, request)
        await _AsgiMiddleware._respond(answer, send)


# ---------------------------------------------------------------------------
# Authorization server
# ---------------------------------------------------------------------------

GRANT_TYPE_AUTHORIZATION_CODE = "authorization_code"  # RFC 6749 §4.1.3
GRANT_TYPE_REFRESH_TOKEN = "refresh_token"  # RFC 6749 §6
_MAX_REGISTRATION_BYTES = 8192  # an RFC 7591 registration request
_MAX_REDIRECT_URIS = 10
_MAX_REDIRECT_URIS_CHARS = 4096  # all of a client's redirect URIs together
_MAX_URI_CHARS = 2000
_MAX_STATE_CHARS = 1024
_CLIENT_DOCUMENT_MAX_BYTES = 8192  # a client ID metadata document
_CLIENT_DOCUMENT_TIMEOUT_SECONDS = 5.0  # the whole fetch of one, headers and body included
_CLIENT_DOCUMENT_DEFAULT_CACHE_SECONDS = 300  # when its response says nothing about caching
_CLIENT_DOCUMENT_MAX_CACHE_SECONDS = 86400
_CLIENT_DOCUMENT_MAX_FETCHES = 4  # in flight at once per authorization server; more answer 503
_CLIENT_DOCUMENT_FAILURE_SECONDS = 60  # a document that could not be fetched is not fetched again this long
_CLIENT_DOCUMENT_MAX_FAILURES = 10000  # failed URLs remembered at once (the oldest are forgotten first)
_CONSENT_TTL_SECONDS = 600  # how long a consent page's form works
_AUTHORIZE_PARAMS = (
    "response_type", "client_id", "redirect_uri", "state", "scope",
    "code_challenge", "code_challenge_method", "resource", "prompt", "dpop_jkt",
)
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1
_PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # RFC 7636 §4.2: BASE64URL(SHA256(verifier))
#: RFC 8252 §7.1: a private-use scheme is a reverse domain name (com.example.app).
_PRIVATE_USE_SCHEME = re.compile(r"[a-z][a-z0-9+-]*(?:\.[a-z0-9+-]+)+")
_PROMPTS = frozenset(("none", "consent", "login"))  # OpenID Connect Core §3.1.2.1
_CONSENT_TEMPLATE = """<section class="grant">
<h2>{agent_name}</h2>
<p class="agent">{client_id}</p>
<p class="meta">After you answer, this page sends you to <strong>{redirect_host}</strong>.</p>
{warning}<p>It asks to act for you with these permissions. Untick any you do not want to give.</p>
<form method="post" action="{action}">
<ul class="scopes">
{scopes}</ul>
{hidden}<input type="hidden" name="csrf_token" value="{csrf_token}">
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>
</section>
"""
_CONSENT_SCOPE_TEMPLATE = (
    '<li><label><input type="checkbox" name="approved_scope" value="{scope}" checked> '
    "{description} <code>{scope}</code></label></li>\n"
)
_CONSENT_HIDDEN_TEMPLATE = '<input type="hidden" name="{name}" value="{value}">\n'
_CONSENT_LOOPBACK_WARNING = (
    "<p><strong>This agent runs on a computer, not a website:</strong> it returns to localhost. "
    "Allow it only if you started it yourself.</p>\n"
)
_CONSENT_APP_WARNING = (
    "<p><strong>This agent is an app on your device, not a website:</strong> it returns to links that start"
    " with <code>{scheme}</code>, and any app can claim those. Allow it only if you installed it yourself.</p>\n"
)


class _Client(NamedTuple):
    """An agent as the authorization server knows it: registered (RFC 7591) or by its metadata document."""

    client_id: str
    client_name: Optional[str]
    redirect_uris: Tuple[str, ...]
    grant_types: Tuple[str, ...]
    dpop_bound: bool = False  # RFC 9449 §5.2 dpop_bound_access_tokens: never a token request without a proof


class _AuthorizationRequest(NamedTuple):
    """An authorization request that passed every check: what the consent page asks about."""

    client: _Client
    redirect_uri: str
    redirect_uri_given: bool  # the token request must then name the same URI (RFC 6749 §4.1.3)
    state: Optional[str]
    scopes: Tuple[str, ...]
    resource: str
    code_challenge: str
    prompt: Optional[str]
    params: Tuple[Tuple[str, str], ...]  # the request's own parameters, for the consent form
    dpop_jkt: Optional[str] = None  # RFC 9449 §10: the key the code is bound to


def _digest(secret: str) -> str:
    """The key a code or refresh token is filed under: never the secret itself."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _query_fields(query: str) -> Dict[str, List[str]]:
    try:
        return _fields(query, "query string")
    except _MalformedRequest as exc:
        raise _OAuthError("invalid_request", str(exc)) from exc


def _with_params(uri: str, params: Mapping[str, str]) -> str:
    """Add query parameters to a URI that may have a query already (RFC 6749 §3.1.2)."""
    from urllib.parse import urlencode

    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def _check_redirect_uri_syntax(uri: Any) -> str:
    """A redirect URI a client may register: https, http to a loopback host, or a private-use scheme.

    Raises:
        _OAuthError: invalid_redirect_uri (RFC 7591 §3.2.2).
    """
    from urllib.parse import urlsplit

    # RFC 3986 §2: printable ASCII only (a non-ASCII name is sent percent-encoded
    # or in punycode); urlsplit() would silently drop a TAB, CR or LF.
    if type(uri) is not str or not 0 < len(uri) <= _MAX_URI_CHARS or _LOCATION.fullmatch(uri) is None:
        raise _OAuthError("invalid_redirect_uri", "a redirect URI must be a URL of at most 2000 characters")
    try:
        parts = urlsplit(uri)
        host = parts.hostname
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError as exc:
        raise _OAuthError("invalid_redirect_uri", "a redirect URI is malformed") from exc
    if parts.fragment or "#" in uri:  # RFC 6749 §3.1.2: no fragment
        raise _OAuthError("invalid_redirect_uri", "a redirect URI must not have a fragment")
    if parts.scheme in ("https", "http"):
        if not host or "@" in parts.netloc or "\\" in uri:
            raise _OAuthError("invalid_redirect_uri", "a redirect URI must name a host and no credentials")
        if parts.scheme == "http" and not _is_loopback(host):  # RFC 8252 §8.3 / OAuth 2.1 §2.3.1
            raise _OAuthError("invalid_redirect_uri", "a plain http redirect URI must be a loopback address")
        return uri
    if _PRIVATE_USE_SCHEME.fullmatch(parts.scheme) is None:
        raise _OAuthError("invalid_redirect_uri", "a redirect URI must be https, loopback http or a private-use scheme")
    return uri


#: An http URI's host and optional port, then the rest (RFC 3986 §3.2).
_HTTP_AUTHORITY = re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[^\[\]:/?#@]+)(?::([0-9]{1,5}))?(?=[/?]|\Z)")


def _redirect_uri_matches(registered: str, given: str) -> bool:
    """Exact match, except that a loopback http URI matches on any port (RFC 8252 §7.3).

    Security: a loopback URI matches only when it is the registered string
    with just the port added, changed or removed: nothing is normalised.
    ``given`` has passed ``_check_redirect_uri_syntax``.
    """
    if registered == given:
        return True
    a, b = _HTTP_AUTHORITY.match(registered), _HTTP_AUTHORITY.match(given)
    if a is None or b is None:
        return False
    return (
        a.group(1) == b.group(1)
        and _is_loopback(a.group(1).strip("[]"))
        and registered[a.end():] == given[b.end():]
    )


def _check_response_type(params: Mapping[str, str]) -> None:
    if "response_type" not in params:
        raise _OAuthError("invalid_request", "response_type is required")
    if params["response_type"] != "code":  # OAuth 2.1: the code flow only
        raise _OAuthError("unsupported_response_type", "response_type must be code")


def _check_pkce(params: Mapping[str, str]) -> str:
    """Require an S256 code challenge (OAuth 2.1 §4.1.1; RFC 7636 §4.3): never plain, never none."""
    if params.get("code_challenge_method") != "S256":
        raise _OAuthError("invalid_request", "code_challenge_method must be S256")
    challenge = params.get("code_challenge", "")
    if _PKCE_CHALLENGE.fullmatch(challenge) is None:
        raise _OAuthError("invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)")
    return challenge


def _check_state(params: Mapping[str, str]) -> Optional[str]:
    state = params.get("state")
    if state is not None and len(state) > _MAX_STATE_CHARS:
        raise _OAuthError("invalid_request", "state is too long")
    return state


def _check_scope(params: Mapping[str, str], supported: Mapping[str, str], default: Tuple[str, ...]) -> Tuple[str, ...]:
    """The requested scopes, each one the server describes; no scope asks for the defaults (RFC 6749 §3.3)."""
    if "scope" not in params:
        if not default:
            raise _OAuthError("invalid_scope", "scope is required")
        return default
    scopes = tuple(dict.fromkeys(params["scope"].split(" ")))
    if not all(scope in supported for scope in scopes):  # "" (a double space) included
        raise _OAuthError("invalid_scope", "a requested scope is unknown to this server")
    return scopes


def _check_resource(params: Mapping[str, str], audience: str) -> str:
    """RFC 8707: the resource, if named, must be this server's audience (the token's ``aud``)."""
    resource = params.get("resource", audience)
    if resource != audience:
        raise _OAuthError("invalid_target", "this server issues tokens for one resource only")
    return resource


def _check_dpop_jkt(params: Mapping[str, str]) -> Optional[str]:
    """RFC 9449 §10: ``dpop_jkt`` binds the code to a key, named by its RFC 7638 SHA-256 thumbprint."""
    jkt = params.get("dpop_jkt")
    if jkt is not None and _JKT.fullmatch(jkt) is None:
        raise _OAuthError("invalid_request", "dpop_jkt must be a JWK SHA-256 thumbprint")
    return jkt


def _check_prompt(params: Mapping[str, str]) -> Optional[str]:
    prompt = params.get("prompt")
    if prompt is not None and not set(prompt.split(" ")) <= _PROMPTS:
        raise _OAuthError("invalid_request", "prompt must be none, login or consent")
    return prompt


def _check_pkce_verifier(verifier: Optional[str], challenge: str) -> None:
    """RFC 7636 §4.6: BASE64URL(SHA256(code_verifier)) equals the challenge."""
    if verifier is None or _PKCE_VERIFIER.fullmatch(verifier) is None:
        raise _OAuthError("invalid_grant", "code_verifier is missing or malformed")
    computed = _b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
    if not hmac.compare_digest(computed, challenge):
        raise _OAuthError("invalid_grant", "code_verifier does not match the code challenge")


def _cache_seconds(headers: Mapping[str, str]) -> int:
    """How long a fetched document may be reused (RFC 9111 §5.2.2): max-age, capped; none for no-store."""
    directives = [d.strip().lower() for d in headers.get("cache-control", "").split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0
    for directive in directives:
        name, _, value = directive.partition("=")
        if name == "max-age":
            return min(int(value), _CLIENT_DOCUMENT_MAX_CACHE_SECONDS) if value.isdigit() else 0
    return _CLIENT_DOCUMENT_DEFAULT_CACHE_SECONDS


class _Clients:
    """The agents the server knows: RFC 7591 registrations and client ID metadata documents.

    Both live in the instance's store (``AuthorizationStore``). A
    registration that never gets a token is forgotten after
    ``unused_client_ttl_seconds``; each token keeps a used one for
    ``client_ttl_seconds`` more. A metadata document is fetched from its
    https URL and kept as its response's caching headers allow.

    Security: anyone can make the server fetch a URL (an anonymous request
    naming it as ``client_id``). At most ``_CLIENT_DOCUMENT_MAX_FETCHES``
    fetches run at once, each on a fetcher of a fixed pool whose helper
    thread must have ended (a stalled name resolution keeps its fetcher);
    beyond, the request answers 503 at once. A URL whose fetch failed is
    refused without a fetch for ``_CLIENT_DOCUMENT_FAILURE_SECONDS``.
    Registration is anonymous too: at most ``max_registrations`` made by
    this app wait for their first token at once, each with at most
    ``_MAX_REDIRECT_URIS_CHARS`` of redirect URIs; beyond, 503.
    """

    def __init__(
        self,
        auth: "AgentAuth",
        *,
        unused_client_ttl_seconds: int,
        client_ttl_seconds: int,
        allow_private_client_documents: bool,
        max_registrations: int,
    ) -> None:
        self._auth = auth
        self._unused_ttl = unused_client_ttl_seconds
        self._ttl = client_ttl_seconds
        self._allow_private = allow_private_client_documents
        self._max_registrations = max_registrations
        # Registrations made here that have not got a token yet: client_id -> expires_at, oldest first.
        self._unused: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._fetchers = collections.deque(
            _UrlFetch(
                timeout_seconds=_CLIENT_DOCUMENT_TIMEOUT_SECONDS,
                max_bytes=_CLIENT_DOCUMENT_MAX_BYTES,
                what="the client metadata document",
                allow_private=allow_private_client_documents,
            )
            for _ in range(_CLIENT_DOCUMENT_MAX_FETCHES)
        )
        self._failures: "collections.OrderedDict[str, int]" = collections.OrderedDict()  # url -> retry at

    def _store(self) -> "AuthorizationStore":
        return typing.cast(AuthorizationStore, self._auth.store)

    def _now(self) -> int:
        return math.floor(self._auth._clock())

    # -- RFC 7591 --------------------------------------------------------

    def register(self, body: bytes) -> Dict[str, Any]:
        """Register a public client from an RFC 7591 request body; return the registration response.

        Raises:
            _OAuthError: invalid_redirect_uri or invalid_client_metadata (RFC 7591 §3.2.2);
                temporarily_unavailable (503), ``max_registrations`` are waiting for their first token.
        """
        if len(body) > _MAX_REGISTRATION_BYTES:
            raise _OAuthError("invalid_client_metadata", "the registration request is too large")
        try:
            metadata = _json_object(body, "registration request")
        except TokenInvalidError as exc:
            raise _OAuthError("invalid_client_metadata", "the registration request is not a JSON object") from exc
        client = self._client_from(secrets.token_urlsafe(16), metadata)
        now = self._now()
        expires_at = now + self._unused_ttl
        with self._lock:
            unused = self._unused
            while unused and next(iter(unused.values())) <= now:  # oldest first: the clock only moves on
                unused.popitem(last=False)
            if len(unused) >= self._max_registrations:
                raise _OAuthError("temporarily_unavailable", "too many registrations are waiting for a token", 503)
            unused[client.client_id] = expires_at
        try:
            self.save(client, expires_at=expires_at)
        except StoreUnavailableError:
            with self._lock:
                unused.pop(client.client_id, None)
            raise
        response: Dict[str, Any] = {
            "client_id": client.client_id,
            "client_id_issued_at": now,
            "redirect_uris": list(client.redirect_uris),
            "grant_types": list(client.grant_types),
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        if client.client_name is not None:
            response["client_name"] = client.client_name
        if client.dpop_bound:
            response["dpop_bound_access_tokens"] = True
        return response

    @staticmethod
    def _client_from(client_id: str, metadata: Mapping[str, Any]) -> _Client:
        """Check client metadata (a registration or a metadata document) and build the client."""
        uris = metadata.get("redirect_uris")
        if type(uris) is not list or not 0 < len(uris) <= _MAX_REDIRECT_URIS:
            raise _OAuthError("invalid_redirect_uri", f"redirect_uris must list 1 to {_MAX_REDIRECT_URIS} URIs")
        redirect_uris = tuple(_check_redirect_uri_syntax(uri) for uri in uris)
        if sum(len(uri) for uri in redirect_uris) > _MAX_REDIRECT_URIS_CHARS:
            raise _OAuthError("invalid_redirect_uri", f"redirect_uris must total at most {_MAX_REDIRECT_URIS_CHARS} characters")
        if metadata.get("token_endpoint_auth_method", "none") != "none":  # public clients only
            raise _OAuthError("invalid_client_metadata", "token_endpoint_auth_method must be none")
        grant_types = metadata.get("grant_types", [GRANT_TYPE_AUTHORIZATION_CODE])
        if (
            type(grant_types) is not list
            or GRANT_TYPE_AUTHORIZATION_CODE not in grant_types
            or not set(grant_types) <= {GRANT_TYPE_AUTHORIZATION_CODE, GRANT_TYPE_REFRESH_TOKEN}
        ):
            raise _OAuthError("invalid_client_metadata", "grant_types must be authorization_code and refresh_token")
        if metadata.get("response_types", ["code"]) != ["code"]:
            raise _OAuthError("invalid_client_metadata", "response_types must be [\"code\"]")
        try:
            name = _agent_name(metadata.get("client_name"))
        except InvalidGrantError as exc:
            raise _OAuthError("invalid_client_metadata", "client_name must be 1 to 100 characters of text") from exc
        dpop_bound = metadata.get("dpop_bound_access_tokens", False)
        if type(dpop_bound) is not bool:
            raise _OAuthError("invalid_client_metadata", "dpop_bound_access_tokens must be true or false")
        return _Client(client_id, name, redirect_uris, tuple(dict.fromkeys(grant_types)), dpop_bound)

    def save(self, client: _Client, *, expires_at: int) -> None:
        document = {"client_name": client.client_name, "redirect_uris": list(client.redirect_uris),
                    "grant_types": list(client.grant_types), "dpop_bound_access_tokens": client.dpop_bound}
        _store_call(self._store().put_record, "client", client.client_id, _JSON_ENCODER.encode(document),
                    expires_at=expires_at, now=self._now())

    def keep(self, client: _Client) -> None:
        """A token was issued to this client: keep its registration ``client_ttl_seconds`` more."""
        if not client.client_id.startswith("https:") and not client.client_id.startswith("http:"):
            self.save(client, expires_at=self._now() + self._ttl)
            with self._lock:
                self._unused.pop(client.client_id, None)  # used: no longer counts against max_registrations

    # -- lookup ----------------------------------------------------------

    def find(self, client_id: str) -> Optional[_Client]:
        """Return the client, or None when unknown (never registered, expired, or its document refused).

        Raises:
            StoreUnavailableError: the store could not answer.
            _OAuthError: temporarily_unavailable (503), too many client documents are being fetched.
        """
        if client_id.startswith(("https://", "http://")):
            return self._from_document(client_id)
        value = _store_call(self._store().get_record, "client", client_id, now=self._now())
        if value is None:
            return None
        document = _JSON_DECODER.decode(value)
        return _Client(client_id, document["client_name"], tuple(document["redirect_uris"]),
                       tuple(document["grant_types"]), document.get("dpop_bound_access_tokens", False))

    def _document_url_ok(self, url: str) -> bool:
        """The MCP spec's client ID URL: https with a path, no fragment, credentials or dot segments."""
        from urllib.parse import urlsplit

        if len(url) > MAX_NAME_CHARS or _LOCATION.fullmatch(url) is None or "\\" in url:
            return False  # printable ASCII only: an IDN host comes in punycode (no look-alike on the consent page)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a malformed port raises here
        except ValueError:
            return False
        if parts.fragment or "#" in url or "@" in parts.netloc or not parts.hostname:
            return False
        if not parts.path or parts.path == "/" or any(s in (".", "..") for s in parts.path.split("/")):
            return False
        # Plain http only to a loopback host, and only when private addresses are allowed (development).
        return parts.scheme == "https" or (self._allow_private and parts.scheme == "http" and _is_loopback(parts.hostname))

    def _from_document(self, url: str) -> Optional[_Client]:
        if not self._document_url_ok(url):
            return None
        store, now = self._store(), self._now()
        cached = _store_call(store.get_record, "client_document", url, now=now)
        if cached is not None:
            return self._client_from(url, _JSON_DECODER.decode(cached))
        fetcher = self._take_fetcher(url, now)
        if fetcher is None:
            return None
        try:
            headers, body = fetcher.get(url)
            document = _json_object(body, "client metadata document")
            if document.get("client_id") != url:  # the document must name itself
                raise ValueError("the document's client_id is not its URL")
            client = self._client_from(url, document)
        except (ValueError, OSError, TokenInvalidError, _OAuthError) as exc:
            import logging

            logging.getLogger("agentauth").warning("client metadata document %s refused: %s", url, exc)
            with self._lock:
                self._failures[url] = now + _CLIENT_DOCUMENT_FAILURE_SECONDS
                self._failures.move_to_end(url)
                while len(self._failures) > _CLIENT_DOCUMENT_MAX_FAILURES:
                    self._failures.popitem(last=False)
            return None
        finally:
            with self._lock:
                self._fetchers.append(fetcher)
        seconds = _cache_seconds(headers)
        if seconds > 0:
            _store_call(store.put_record, "client_document", url, _JSON_ENCODER.encode(document),
                        expires_at=now + seconds, now=now)
        return client


    def _take_fetcher(self, url: str, now: int) -> Optional[_UrlFetch]:
        """A free fetcher of the pool, or None for a URL that failed lately.

        Raises:
            _OAuthError: temporarily_unavailable (503), every fetcher is busy.
        """
        with self._lock:
            retry_at = self._failures.get(url)
            if retry_at is not None:
                if retry_at > now:
                    return None
                del self._failures[url]
            for _ in range(len(self._fetchers)):
                fetcher = self._fetchers.popleft()
                helper = fetcher._helper
                if helper is None or not helper.is_alive():
                    return fetcher
                self._fetchers.append(fetcher)  # its last fetch's helper is still resolving a name
        raise _OAuthError("temporarily_unavailable", "too many client documents are being fetched", 503)


class _AuthorizationServer:
    """The state every endpoint reads: the AgentAuth, the settings, the clients, the consent CSRF tokens."""

    def __init__(
        self,
        auth: "AgentAuth",
        *,
        authenticate: Callable[..., Any],
        scope_descriptions: Mapping[str, str],
        login_url: Optional[str],
        default_scopes: Optional[Iterable[str]],
        code_ttl_seconds: int,
        refresh_token_ttl_seconds: int,
        refresh_reuse_grace_seconds: int,
        unused_client_ttl_seconds: int,
        client_ttl_seconds: int,
        allow_private_client_documents: bool,
        agents_page_path: Optional[str] = None,
        max_registrations: int = DEFAULT_MAX_REGISTRATIONS,
    ) -> None:
        from urllib.parse import urlsplit

        auth._require_signing_key()
        _grant_store(auth.store)
        if not all(callable(getattr(auth.store, method, None)) for method in _RECORD_METHODS):
            raise InvalidConfigError(
                f"{type(auth.store).__name__} cannot hold an authorization server's records: use MemoryStore,"
                " SqliteStore or PostgresStore (or your own store with the AuthorizationStore methods)"
            )
        parts = urlsplit(auth.issuer)
        # RFC 8414 §2: the issuer is an https URL with no query or fragment; the
        # metadata, the tokens' iss and RFC 9207's iss are this very string.
        if (
            parts.scheme not in ("https", "http")
            or not parts.hostname
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or (parts.scheme == "http" and not _is_loopback(parts.hostname))
        ):
            raise InvalidConfigError(
                "an authorization server's issuer must be an https URL without query or fragment"
                " (plain http only on a loopback host, for development)"
            )
        if not callable(authenticate):
            raise InvalidConfigError("authenticate must be callable: it returns the signed-in subject or None")
        if not isinstance(scope_descriptions, Mapping) or not scope_descriptions:
            raise InvalidConfigError("scope_descriptions must map each scope the server grants to its description")
        for scope, description in scope_descriptions.items():
            if len(_configured_scopes([scope], "scope_descriptions")) != 1 or "*" in scope:
                raise InvalidConfigError("scope_descriptions keys must be plain scopes (no wildcard)")
            if type(description) is not str or not description:
                raise InvalidConfigError("each scope description must be a non-empty string")
        self.scope_descriptions = dict(scope_descriptions)
        defaults = tuple(scope_descriptions) if default_scopes is None else _configured_scopes(default_scopes, "default_scopes")
        if not all(scope in scope_descriptions for scope in defaults):
            raise InvalidConfigError("default_scopes must be keys of scope_descriptions")
        self.default_scopes = defaults
        if login_url is not None:
            _login_url(login_url)  # as the agents page: a path on this site (never "//" or "/\\") or an http(s) URL
        for value, name in (
            (code_ttl_seconds, "code_ttl_seconds"),
            (refresh_token_ttl_seconds, "refresh_token_ttl_seconds"),
            (unused_client_ttl_seconds, "unused_client_ttl_seconds"),
            (client_ttl_seconds, "client_ttl_seconds"),
            (max_registrations, "max_registrations"),
        ):
            _positive_int(value, name)
        if type(refresh_reuse_grace_seconds) is not int or refresh_reuse_grace_seconds < 0:
            raise InvalidConfigError("refresh_reuse_grace_seconds must be a whole number >= 0")
        if type(allow_private_client_documents) is not bool:
            raise InvalidConfigError("allow_private_client_documents must be True or False")
        self.auth = auth
        self.authenticate = authenticate
        self.login_url = login_url
        self.code_ttl_seconds = code_ttl_seconds
        self.refresh_token_ttl_seconds = refresh_token_ttl_seconds
        self.refresh_reuse_grace_seconds = refresh_reuse_grace_seconds
        self.clients = _Clients(
            auth,
            unused_client_ttl_seconds=unused_client_ttl_seconds,
            client_ttl_seconds=client_ttl_seconds,
            allow_private_client_documents=allow_private_client_documents,
            max_registrations=max_registrations,
        )
        self._successor_key = auth._derived_key(b"agentauth refresh token successor")
        self.consent_csrf = _CsrfTokens(auth._derived_key(b"agentauth consent csrf"), auth._clock, _CONSENT_TTL_SECONDS)
        base = auth.issuer.rstrip("/")
        path = parts.path.rstrip("/")
        self.paths = {
            # RFC 8414 §3.1: the well-known segment goes before the issuer's path.
            "/.well-known/oauth-authorization-server" + path: "metadata",
            path + "/authorize": "authorize",
            path + "/token": "token",
            path + "/register": "register",
            path + "/revoke": "revoke",
        }
        self.authorize_path = path + "/authorize"
        if agents_page_path is not None and (
            type(agents_page_path) is not str
            or not agents_page_path.startswith("/")
            or any(c in agents_page_path for c in "?# ")
            or _CONTROL_CHARS.search(agents_page_path)
            or agents_page_path in self.paths
        ):
            raise InvalidConfigError("agents_page_path must be a path of its own, such as /account/agents")
        self.agents_page_path = agents_page_path
        # The URL DPoP proofs name (htu, RFC 9449 §4.3): the issuer's, as clients discover it in
        # the metadata; the issuer is the configured public URL, so no request header plays a part.
        self.token_endpoint = base + "/token"
        self.metadata = {
            "issuer": auth.issuer,
            "authorization_endpoint": base + "/authorize",
            "token_endpoint": self.token_endpoint,
            "registration_endpoint": base + "/register",
            "revocation_endpoint": base + "/revoke",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": [GRANT_TYPE_AUTHORIZATION_CODE, GRANT_TYPE_REFRESH_TOKEN, GRANT_TYPE_TOKEN_EXCHANGE],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": list(self.scope_descriptions),
            "authorization_response_iss_parameter_supported": True,  # RFC 9207
            "client_id_metadata_document_supported": True,
            "dpop_signing_alg_values_supported": auth._dpop.algs_param.split(" "),  # RFC 9449 §5.1
        }

    def now(self) -> int:
        return math.floor(self.auth._clock())

    def store(self) -> "AuthorizationStore":
        return typing.cast(AuthorizationStore, self.auth.store)

    def endpoint(self, request: _PageRequest) -> Optional[str]:
        return self.paths.get(request.path)

    def successor(self, refresh_token: str) -> str:
        """The refresh token that rotates ``refresh_token``: always the same one (HMAC under a derived key).

        Every redemption of one refresh token, the first and any reuse
        inside the grace, answers the same successor: a grant has one chain
        of refresh tokens, in every store, with no read-modify-write to race.
        """
        mac = hmac.new(self._successor_key, refresh_token.encode("utf-8"), hashlib.sha256).digest()
        return _b64encode(mac)


# -- the authorization endpoint and the consent page --------------------------


def _check_authorization_request(
    fields: Mapping[str, List[str]], state: _AuthorizationServer, request: _PageRequest, subject: Optional[str]
) -> Tuple[Optional[_AuthorizationRequest], Optional[_Refusal]]:
    """Validate an authorization request in oauthlib's order.

    Returns (the request, None), or (None, the answer): a page for errors
    found before the client and its redirect URI are known to be good (never
    a redirect: that would make this server an open redirector), and for the
    others ``_authorization_error``'s answer.
    """
    try:
        params = _single_params(fields, _AUTHORIZE_PARAMS)
    except _OAuthError as exc:
        return None, _authorization_page_error(exc)
    client_id = params.get("client_id")
    if client_id is None:
        return None, _authorization_page_error(_OAuthError("invalid_request", "client_id is required"))
    try:
        client = state.clients.find(client_id) if _valid_name(client_id) else None
    except (StoreUnavailableError, _OAuthError):  # _OAuthError: every client document fetcher is busy
        return None, _render_message(503, "Try again later", "Authorization is temporarily unavailable.",
                                     (("Retry-After", "1"),))
    if client is None:
        return None, _authorization_page_error(_OAuthError("invalid_client", "this agent is unknown"))
    given = params.get("redirect_uri")
    if given is not None:
        try:
            _check_redirect_uri_syntax(given)  # the same rules as at registration, before any match
        except _OAuthError:
            return None, _authorization_page_error(_OAuthError("invalid_request", "redirect_uri is malformed"))
    if given is None:
        if len(client.redirect_uris) != 1:  # OAuth 2.1 §4.1.1: required unless exactly one is registered
            return None, _authorization_page_error(_OAuthError("invalid_request", "redirect_uri is required"))
        redirect_uri = client.redirect_uris[0]
    elif any(_redirect_uri_matches(registered, given) for registered in client.redirect_uris):
        redirect_uri = given
    else:
        return None, _authorization_page_error(_OAuthError("invalid_request", "redirect_uri is not registered"))
    # From here on the redirect URI is the client's own: errors go back to it.
    request_state = None  # a state refused is never echoed
    try:
        request_state = _check_state(params)
        _check_response_type(params)
        challenge = _check_pkce(params)
        scopes = _check_scope(params, state.scope_descriptions, state.default_scopes)
        resource = _check_resource(params, state.auth.audience)
        prompt = _check_prompt(params)
        dpop_jkt = _check_dpop_jkt(params)
    except _OAuthError as exc:
        return None, _authorization_error(state, request, subject, redirect_uri, request_state, exc,
                                          "none" in params.get("prompt", "").split(" "))
    return _AuthorizationRequest(
        client, redirect_uri, given is not None, request_state, scopes, resource, challenge, prompt,
        tuple((name, params[name]) for name in _AUTHORIZE_PARAMS if name in params), dpop_jkt,
    ), None


def _valid_name(value: str) -> bool:
    try:
        _name(value, "client_id")
    except InvalidGrantError:
        return False
    return True


def _authorization_page_error(exc: _OAuthError) -> _Refusal:
    return _render_message(400, "This authorization request cannot be answered", f"{exc.error}: {exc}")


def _authorization_redirect(
    state: _AuthorizationServer, redirect_uri: str, request_state: Optional[str], params: Mapping[str, str]
) -> _Refusal:
    """Redirect back to the client with ``params``, its ``state`` and our ``iss`` (RFC 9207 §2)."""
    answer = dict(params)
    if request_state is not None:
        answer["state"] = request_state
    answer["iss"] = state.auth.issuer
    return _page_redirect(_with_params(redirect_uri, answer))


def _authorization_error(state: _AuthorizationServer, request: _PageRequest, subject: Optional[str],
                         redirect_uri: str, request_state: Optional[str], exc: _OAuthError, prompt_none: bool
                         ) -> _Refusal:
    """An error found once the client and its redirect URI are known to be good.

    Security: redirected to the client only for a signed-in user. Any
    client can register a redirect URI, so an anonymous request that answered
    with a redirect would make this server an open redirector (RFC 9700
    §4.11.2): a browser with no user goes to the login page first (the
    request comes back, and its error is redirected then); with
    ``prompt=none``, a POST or no login page, the error is shown on a page.
    """
    if subject is not None:
        return _authorization_redirect(state, redirect_uri, request_state,
                                       {"error": exc.error, "error_description": str(exc)})
    if request.method == "GET" and state.login_url is not None and not prompt_none:
        return _login_answer(state, request)
    return _authorization_page_error(exc)


def _consent_binding(subject: str, request: _AuthorizationRequest) -> str:
    """What a consent form's CSRF token is bound to: the user and this very request."""
    digest = hashlib.sha256(_JSON_ENCODER.encode(request.params).encode("utf-8")).hexdigest()
    return f"{subject}\x00{digest}"  # a subject never holds NUL


def _issue_code(state: _AuthorizationServer, subject: str, request: _AuthorizationRequest,
                scopes: Tuple[str, ...]) -> _Refusal:
    """File a single-use code bound to everything the token request must repeat; redirect with it."""
    code = secrets.token_urlsafe(32)
    now = state.now()
    record = {
        "client_id": request.client.client_id,
        "redirect_uri": request.redirect_uri,
        "redirect_uri_given": request.redirect_uri_given,
        "subject": subject,
        "scopes": list(scopes),
        "resource": request.resource,
        "code_challenge": request.code_challenge,
        "exp": now + state.code_ttl_seconds,
        "family": secrets.token_urlsafe(16),  # the refresh tokens this code will lead to
        "dpop_jkt": request.dpop_jkt,
    }
    # Kept past its expiry while the tokens minted from it live, so a replay is still recognised.
    _store_call(state.store().put_record, "code", _digest(code), _JSON_ENCODER.encode(record),
                expires_at=now + state.code_ttl_seconds + state.auth.default_ttl_seconds, now=now)
    return _authorization_redirect(state, request.redirect_uri, request.state, {"code": code})


def _login_answer(state: _AuthorizationServer, request: _PageRequest) -> _Refusal:
    if state.login_url is None:
        return _render_message(401, "Sign in first", "Sign in, then open this link again.")
    target = request.path + ("?" + request.query if request.query else "")
    return _page_redirect(_with_params(state.login_url, {"next": target}))


def _authorize_endpoint(request: _PageRequest, state: _AuthorizationServer, subject: Optional[str]) -> _Refusal:
    """GET: check the request, then show the consent page (or answer at once). POST: the user's answer."""
    if request.method not in ("GET", "POST"):
        return _render_message(405, "Method not allowed", "Use GET or POST.", (("Allow", "GET, POST"),))
    try:
        if request.method == "GET":
            fields = _query_fields(request.query)
        else:
            fields = _form_fields(request.headers.get("content-type", ""), request.body)
    except (_OAuthError, _MalformedRequest) as exc:
        return _authorization_page_error(_OAuthError("invalid_request", str(exc)))
    authorization, answer = _check_authorization_request(fields, state, request, subject)
    if authorization is None:
        return typing.cast(_Refusal, answer)
    prompts = set((authorization.prompt or "").split(" "))
    if subject is None:
        if "none" in prompts:  # OpenID Connect Core §3.1.2.6, shown: never a redirect with no user
            return _authorization_page_error(_OAuthError("login_required", "sign in first"))
        if request.method == "POST":
            return _render_message(403, "Sign in first", "Your session ended: sign in, then start again.")
        return _login_answer(state, request)
    try:
        if request.method == "POST":
            return _consent_answer(fields, state, subject, authorization)
        grant = _store_call(_grant_store(state.auth.store).get_grant, subject, authorization.client.client_id)
        granted = grant is not None and all(scope_satisfies(grant.scopes, s) for s in authorization.scopes)
        if granted and "consent" not in prompts:  # asked before, and nothing new: no second prompt
            return _issue_code(state, subject, authorization, authorization.scopes)
        if "none" in prompts:
            return _authorization_redirect(state, authorization.redirect_uri, authorization.state,
                                           {"error": "consent_required"})
        return _consent_page(state, subject, authorization)
    except StoreUnavailableError:
        return _authorization_redirect(state, authorization.redirect_uri, authorization.state,
                                       {"error": "temporarily_unavailable"})


def _consent_page(state: _AuthorizationServer, subject: str, authorization: _AuthorizationRequest) -> _Refusal:
    from urllib.parse import urlsplit

    client = authorization.client
    parts = urlsplit(authorization.redirect_uri)
    if parts.scheme in ("https", "http"):
        host = _display_host(parts.hostname or "")
        warning = _Markup(_CONSENT_LOOPBACK_WARNING) if parts.scheme == "http" and _is_loopback(host) else ""
    else:
        # A private-use scheme (RFC 8252 §7.1): the code goes to whichever app
        # claims the scheme; an authority after it (com.evil.app://bank.example)
        # names nothing, so the page names the scheme alone.
        host = parts.scheme + ":"
        warning = _fill(_CONSENT_APP_WARNING, scheme=host)
    scopes = _Markup("".join(
        _fill(_CONSENT_SCOPE_TEMPLATE, scope=scope, description=state.scope_descriptions[scope])
        for scope in authorization.scopes
    ))
    hidden = _Markup("".join(
        _fill(_CONSENT_HIDDEN_TEMPLATE, name=name, value=value) for name, value in authorization.params
    ))
    return _render(
        200,
        "Allow this agent?",
        _CONSENT_TEMPLATE,
        agent_name=client.client_name or client.client_id,
        client_id=client.client_id,
        redirect_host=host,
        warning=warning,
        action=state.authorize_path,
        scopes=scopes,
        hidden=hidden,
        csrf_token=state.consent_csrf.issue(_consent_binding(subject, authorization)),
    )


def _display_host(host: str) -> str:
    """A host as the consent page shows it: ASCII, an internationalised name in its punycode (IDNA) form.

    Security: a look-alike name (Cyrillic "о" for Latin "o") reads as what
    it is, ``xn--...``; a name that has no IDNA form is shown escaped.
    """
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host.encode("ascii", "backslashreplace").decode("ascii")


def _consent_answer(fields: Mapping[str, List[str]], state: _AuthorizationServer, subject: str,
                    authorization: _AuthorizationRequest) -> _Refusal:
    """The consent form's POST: CSRF first (bound to this user and this request), then Allow or Deny."""
    try:
        extra = _single_params(fields, ("csrf_token", "decision"))
    except _OAuthError:
        extra = {}
    if not state.consent_csrf.check(_consent_binding(subject, authorization), extra.get("csrf_token")):
        # Not redirected: a forged form must not even learn whether the client exists.
        return _render_message(403, "This form has expired", "Open the agent's link again to answer.")
    if extra.get("decision") != "allow":
        return _authorization_redirect(state, authorization.redirect_uri, authorization.state,
                                       {"error": "access_denied", "error_description": "the user denied the request"})
    approved = tuple(s for s in authorization.scopes if s in fields.get("approved_scope", []))
    if not approved:
        return _authorization_redirect(state, authorization.redirect_uri, authorization.state,
                                       {"error": "access_denied", "error_description": "the user allowed no scope"})
    state.auth.grant(subject=subject, agent=authorization.client.client_id, scopes=approved,
                     agent_name=authorization.client.client_name)
    return _issue_code(state, subject, authorization, approved)


# -- the token endpoint -------------------------------------------------------


def _token_endpoint(request: _PageRequest, state: _AuthorizationServer) -> _Refusal:
    """RFC 6749 §3.2: authorization_code, refresh_token, and RFC 8693 token exchange."""
    try:
        if request.method != "POST":
            raise _OAuthError("invalid_request", "use POST", 405)
        try:
            fields = _form_fields(request.headers.get("content-type", ""), request.body)
        except _MalformedRequest as exc:
            raise _OAuthError("invalid_request", str(exc)) from exc
        if any(len(values) > 1 for values in fields.values()):  # RFC 6749 §3.2: no parameter repeats
            raise _OAuthError("invalid_request", "a parameter is repeated")
        grant_type = fields.get("grant_type", [""])[0]
        proof = request.headers.get("dpop")  # repeated headers arrive joined by ", ": refused as several
        proofs = () if proof is None else (proof,)
        if grant_type == GRANT_TYPE_TOKEN_EXCHANGE:
            form = _single_params(fields, _EXCHANGE_PARAMS, keep_empty=("scope",))
            return _exchange(state.auth, form, proofs, state.token_endpoint)
        if grant_type not in (GRANT_TYPE_AUTHORIZATION_CODE, GRANT_TYPE_REFRESH_TOKEN):
            if not grant_type:
                raise _OAuthError("invalid_request", "grant_type is required")
            raise _OAuthError("unsupported_grant_type", "grant_type must be authorization_code, refresh_token or token-exchange")
        # RFC 9449 §5: the proof first, so a refused or nonce-less proof spends no code or refresh token.
        try:
            jkt = _token_request_proof(state.auth, proofs, state.token_endpoint)
        except DPoPProofError as exc:
            return _dpop_refusal(exc).json()
        if grant_type == GRANT_TYPE_AUTHORIZATION_CODE:
            return _code_grant(_single_params(fields, ("code", "redirect_uri", "client_id", "code_verifier",
                                                       "resource")), state, jkt)
        params = _single_params(fields, ("refresh_token", "client_id", "resource", "scope"), keep_empty=("scope",))
        return _refresh_grant(params, state, jkt)
    except _OAuthError as exc:
        return exc.json()
    except StoreUnavailableError:
        return _OAuthError("temporarily_unavailable", "authorization is temporarily unavailable", 503).json()


def _token_client(params: Mapping[str, str], state: _AuthorizationServer) -> _Client:
    """A public client names itself with client_id (RFC 6749 §3.2.1); it must be known."""
    client_id = params.get("client_id")
    if client_id is None:
        raise _OAuthError("invalid_request", "client_id is required")
    client = state.clients.find(client_id) if _valid_name(client_id) else None
    if client is None:
        raise _OAuthError("invalid_client", "this client is unknown", 401)
    return client


def _code_grant(params: Mapping[str, str], state: _AuthorizationServer, jkt: Optional[str] = None) -> _Refusal:
    """Redeem a code; ``jkt``, the key of the request's DPoP proof, binds the tokens (RFC 9449 §5)."""
    client = _token_client(params, state)
    _check_proof_required(state, client, jkt)
    if "code" not in params:
        raise _OAuthError("invalid_request", "code is required")
    now = state.now()
    key = _digest(params["code"])
    value = _store_call(state.store().get_record, "code", key, now=now)
    if value is None:
        raise _OAuthError("invalid_grant", "the code is invalid or expired")
    record = _JSON_DECODER.decode(value)
    # The bindings are checked before the code is used: someone who saw the
    # code but is not its client (no PKCE verifier) can neither spend it nor
    # make the client's own redemption look like a replay.
    if record["client_id"] != client.client_id:
        raise _OAuthError("invalid_grant", "the code was issued to another client")
    given = params.get("redirect_uri")
    if (given is not None or record["redirect_uri_given"]) and given != record["redirect_uri"]:
        raise _OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
    _check_pkce_verifier(params.get("code_verifier"), record["code_challenge"])
    if params.get("resource", record["resource"]) != record["resource"]:
        raise _OAuthError("invalid_target", "resource does not match the authorization request")
    code_jkt = record.get("dpop_jkt")
    if code_jkt is not None and (jkt is None or not hmac.compare_digest(code_jkt, jkt)):  # RFC 9449 §10.1
        raise _OAuthError("invalid_grant", "the code is bound to another DPoP key")
    used = _store_call(state.store().use_record, "code", key, now=now)
    if used is None:
        raise _OAuthError("invalid_grant", "the code is invalid or expired")
    if used[1] is not None:
        # The code's own client presented it twice: stolen or replayed. Every token minted from it dies.
        _revoke_tokens_of(state, record["client_id"], record["subject"], record["family"])
        raise _OAuthError("invalid_grant", "the code was used already")
    if record["exp"] <= now:
        raise _OAuthError("invalid_grant", "the code is invalid or expired")
    scopes = tuple(record["scopes"])
    _check_still_granted(state, record["subject"], client.client_id, scopes, None)
    # RFC 9449 §5.8: every client here is public, so its refresh tokens are bound to the proof's key too.
    family = {"family": record["family"], "client_id": client.client_id, "subject": record["subject"],
              "scopes": list(scopes), "resource": record["resource"], "created_at": now, "jkt": jkt}
    return _token_answer(state, client, family, scopes, jkt=jkt)


def _refresh_grant(params: Mapping[str, str], state: _AuthorizationServer, jkt: Optional[str] = None) -> _Refusal:
    """Rotate a refresh token; ``jkt``, the key of the request's DPoP proof, binds the new access token."""
    client = _token_client(params, state)
    _check_proof_required(state, client, jkt)
    if "refresh_token" not in params:
        raise _OAuthError("invalid_request", "refresh_token is required")
    now = state.now()
    _check_refresh_binding(state, params["refresh_token"], jkt, now)
    used = _store_call(state.store().use_record, "refresh", _digest(params["refresh_token"]), now=now)
    if used is None:
        raise _OAuthError("invalid_grant", "the refresh token is invalid or expired")
    value, first_use = used
    family = _JSON_DECODER.decode(value)
    if family["client_id"] != client.client_id:
        raise _OAuthError("invalid_grant", "the refresh token was issued to another client")
    if first_use is not None and now - first_use >= state.refresh_reuse_grace_seconds:
        # A rotated refresh token came back: it was copied. Every token of the grant dies.
        # A grace of 0 allows no reuse at all, not even within the same second.
        _revoke_tokens_of(state, family["client_id"], family["subject"], family["family"])
        raise _OAuthError("invalid_grant", "the refresh token was used already")
    successor = state.successor(params["refresh_token"])
    if first_use is not None and _store_call(state.store().get_record, "refresh", _digest(successor), now=now) is None:
        raise _OAuthError("invalid_grant", "the refresh token was used already")  # its first use is not finished
    if params.get("resource", family["resource"]) != family["resource"]:
        raise _OAuthError("invalid_target", "resource does not match the original grant")
    scopes = tuple(family["scopes"])
    if "scope" in params:  # RFC 6749 §6: may narrow, never widen
        requested = tuple(dict.fromkeys(params["scope"].split(" ")))
        if not all(scope in scopes for scope in requested):
            raise _OAuthError("invalid_scope", "a requested scope is outside the original grant")
        scopes = requested
    _check_still_granted(state, family["subject"], client.client_id, scopes, family)
    # A reuse inside the grace gets the successor the first use got, never a new
    # one: the grant keeps one chain, so the thief's and the client's next
    # refreshes collide and reuse detection fires (RFC 9700 §4.14.2).
    return _token_answer(state, client, family, scopes, successor, first_use is None, jkt)


def _check_proof_required(state: _AuthorizationServer, client: _Client, jkt: Optional[str]) -> None:
    """Refuse a token request without a DPoP proof where only bound tokens will do.

    That is a client registered with ``dpop_bound_access_tokens`` (RFC 9449
    §5.2), and any client of an instance with ``require_dpop=True``, whose
    verify() accepts no bearer token. Checked before anything is spent.
    """
    if jkt is None and (client.dpop_bound or state.auth._dpop.require):
        raise _OAuthError("invalid_dpop_proof", _GENERIC_DESCRIPTIONS["invalid_dpop_proof"])


def _check_refresh_binding(state: _AuthorizationServer, refresh_token: str, jkt: Optional[str], now: int) -> None:
    """RFC 9449 §5.8: a DPoP-bound refresh token is redeemed only with a proof of its key.

    Checked before the token is used: a thief who has the token but not the
    key neither spends it (the client's next refresh would look like a
    reuse and revoke the grant) nor sets off reuse detection. The binding of
    a stored refresh token never changes, so reading it first races nothing.
    """
    value = _store_call(state.store().get_record, "refresh", _digest(refresh_token), now=now)
    bound = None if value is None else _JSON_DECODER.decode(value).get("jkt")
    if bound is not None and (jkt is None or not hmac.compare_digest(bound, jkt)):
        raise _OAuthError("invalid_grant", "the refresh token is bound to another DPoP key")


def _check_still_granted(state: _AuthorizationServer, subject: str, agent: str, scopes: Tuple[str, ...],
                         family: Optional[Mapping[str, Any]]) -> None:
    """The user's grant must still cover the scopes; a refresh token must postdate the grant and any revocation."""
    auth = state.auth
    grant = _store_call(_grant_store(auth.store).get_grant, subject, agent)
    if grant is None or not all(scope_satisfies(grant.scopes, scope) for scope in scopes):
        raise _OAuthError("invalid_grant", "the user's grant no longer covers this request")
    if family is None:
        return
    if grant.created_at > family["created_at"]:  # disconnected, then connected again: a new grant
        raise _OAuthError("invalid_grant", "the refresh token belongs to a grant that was removed")
    # A refresh token family is checked like a token minted when it was: its
    # own jti, the agent and subject revocations (disconnect, narrowing, reuse).
    claims = AgentClaims(subject, agent, scopes, family["family"], family["created_at"], family["created_at"],
                         auth.issuer, auth.audience, types.MappingProxyType({}), (agent,), ())
    try:
        auth._check_revocation(claims)
    except RevokedError as exc:
        raise _OAuthError("invalid_grant", "the refresh token was revoked") from exc


def _revoke_tokens_of(state: _AuthorizationServer, agent: str, subject: str, family: str) -> None:
    """Refuse every token of this agent for this subject minted up to now, and the refresh family.

    Kept as long as a refresh token lives, not just an access token's lifetime.
    """
    now = state.now()
    keep = now + max(state.refresh_token_ttl_seconds, state.auth._revocation_lifetime())
    store = state.auth.store
    _store_call(store.revoke, {"agent": agent, "subject": subject}, revoked_at=now, expires_at=keep)
    _store_call(store.revoke, {"jti": family}, revoked_at=now, expires_at=keep)


def _token_answer(state: _AuthorizationServer, client: _Client, family: Mapping[str, Any],
                  scopes: Tuple[str, ...], refresh_token: Optional[str] = None, file_refresh_token: bool = True,
                  jkt: Optional[str] = None) -> _Refusal:
    """Mint the access token (and a refresh token of the family: ``refresh_token``, or a new one); RFC 6749 §5.1.

    ``file_refresh_token`` False answers a refresh token already filed (a
    reuse inside the grace): filing it again would forget its use. ``jkt``
    binds the access token to a DPoP key (``cnf.jkt``, ``token_type: DPoP``).
    """
    auth = state.auth
    try:
        issued = auth.issue(subject=family["subject"], agent=client.client_id, scopes=scopes, dpop_jkt=jkt)
    except InvalidGrantError as exc:
        raise _OAuthError(exc.oauth_error, str(exc)) from exc
    now = state.now()
    document: Dict[str, Any] = {
        "access_token": issued.token,
        "token_type": "Bearer" if jkt is None else "DPoP",  # RFC 9449 §5
        "expires_in": max(0, issued.expires_at - now),
        "scope": " ".join(scopes),
    }
    if GRANT_TYPE_REFRESH_TOKEN in client.grant_types:
        if refresh_token is None:
            refresh_token = secrets.token_urlsafe(32)
        if file_refresh_token:
            _store_call(state.store().put_record, "refresh", _digest(refresh_token),
                        _JSON_ENCODER.encode(dict(family)), expires_at=now + state.refresh_token_ttl_seconds, now=now)
        document["refresh_token"] = refresh_token
    state.clients.keep(client)
    return _exchange_answer(200, document)


# -- registration, revocation, metadata ---------------------------------------


def _register_endpoint(request: _PageRequest, state: _AuthorizationServer) -> _Refusal:
    """RFC 7591 §3: register a public client from a JSON document."""
    try:
        if request.method != "POST":
            raise _OAuthError("invalid_request", "use POST", 405)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise _OAuthError("invalid_client_metadata", "the registration request must be application/json")
        response = state.clients.register(request.body)
    except _OAuthError as exc:
        return exc.json()
    except StoreUnavailableError:
        return _OAuthError("temporarily_unavailable", "registration is temporarily unavailable", 503).json()
    return _exchange_answer(201, response)


def _revoke_endpoint(request: _PageRequest, state: _AuthorizationServer) -> _Refusal:
    """RFC 7009: revoke an access or refresh token; unknown tokens answer 200 too (§2.2)."""
    try:
        if request.method != "POST":
            raise _OAuthError("invalid_request", "use POST", 405)
        try:
            fields = _form_fields(request.headers.get("content-type", ""), request.body)
        except _MalformedRequest as exc:
            raise _OAuthError("invalid_request", str(exc)) from exc
        params = _single_params(fields, ("token", "token_type_hint", "client_id"))
        if "token" not in params:
            raise _OAuthError("invalid_request", "token is required")
        token, client_id = params["token"], params.get("client_id")
        now = state.now()
        value = _store_call(state.store().get_record, "refresh", _digest(token), now=now)
        if value is not None:
            family = _JSON_DECODER.decode(value)
            if client_id in (None, family["client_id"]):  # a client revokes its own tokens only
                _revoke_tokens_of(state, family["client_id"], family["subject"], family["family"])
        elif "." in token:
            try:
                claims = state.auth._check(token, state.auth._clock())
                if client_id in (None, claims.agent):
                    state.auth.revoke(token)
            except TokenInvalidError:
                pass  # not ours, or refused anyway
    except _OAuthError as exc:
        return exc.json()
    except StoreUnavailableError:
        return _OAuthError("temporarily_unavailable", "revocation is temporarily unavailable", 503).json()
    return _exchange_answer(200, {})


def _metadata_endpoint(request: _PageRequest, state: _AuthorizationServer) -> _Refusal:
    """RFC 8414 §3: the server's metadata, public and cacheable."""
    if request.method not in ("GET", "HEAD"):
        return 405, [("Allow", "GET, HEAD"), ("Content-Type", "application/json")], b'{"error":"method_not_allowed"}'
    headers = [
        ("Content-Type", "application/json"),
        ("Cache-Control", "public, max-age=3600"),
        ("Access-Control-Allow-Origin", "*"),  # public metadata, read by browser-based clients
    ]
    body = _JSON_ENCODER.encode(state.metadata).encode("utf-8")
    return 200, headers, body if request.method == "GET" else b""


def _serve_authorization(request: _PageRequest, state: _AuthorizationServer, subject: Optional[str]) -> _Refusal:
    """Route one request to its endpoint; every endpoint is a function of (request, state)."""
    endpoint = state.endpoint(request)
    if endpoint == "authorize":
        return _authorize_endpoint(request, state, subject)
    if endpoint == "token":
        return _token_endpoint(request, state)
    if endpoint == "register":
        return _register_endpoint(request, state)
    if endpoint == "revoke":
        return _revoke_endpoint(request, state)
    if endpoint == "metadata":
        return _metadata_endpoint(request, state)
    return 404, [("Content-Type", "application/json")], b'{"error":"not_found"}'


def _serve_signed_in(request: _PageRequest, state: _AuthorizationServer) -> _Refusal:
    """Ask ``authenticate`` who is signed in (the authorization endpoint only), then serve the request."""
    subject = _signed_in(state.authenticate(request)) if state.endpoint(request) == "authorize" else None
    return _serve_authorization(request, state, subject)


def _signed_in(value: Any) -> Optional[str]:
    """What ``authenticate`` returned, as a subject: a valid name, or None (not signed in)."""
    return value if type(value) is str and _valid_name(value) else None


class _AuthorizationServerWsgi:
    def __init__(self, state: _AuthorizationServer) -> None:
        self._state = state
        self._agents_page = None if state.agents_page_path is None else state.auth.agents_page_wsgi(
            authenticate=state.authenticate, scope_descriptions=state.scope_descriptions, login_url=state.login_url
        )

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        state = self._state
        if self._agents_page is not None and _wsgi_request(environ, b"").path == state.agents_page_path:
            return self._agents_page(environ, start_response)
        try:
            body = _wsgi_body(environ)
        except _MalformedRequest as exc:
            return _WsgiMiddleware._respond(_OAuthError("invalid_request", str(exc)).json(), start_response)
        return _WsgiMiddleware._respond(_serve_signed_in(_wsgi_request(environ, body), state), start_response)


class _AuthorizationServerAsgi:
    def __init__(self, state: _AuthorizationServer) -> None:
        self._state = state
        self._agents_page = None if state.agents_page_path is None else state.auth.agents_page_asgi(
            authenticate=state.authenticate, scope_descriptions=state.scope_descriptions, login_url=state.login_url
        )

    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        import asyncio

        if scope["type"] != "http":
            return
        state = self._state
        if self._agents_page is not None and _asgi_request(scope, b"").path == state.agents_page_path:
            await self._agents_page(scope, receive, send)
            return
        try:
            body = await _asgi_body(receive)
        except _MalformedRequest as exc:
            await _AsgiMiddleware._respond(_OAuthError("invalid_request", str(exc)).json(), send)
            return
        request = _asgi_request(scope, body)
        loop = asyncio.get_running_loop()
        if state.endpoint(request) == "authorize" and _is_coroutine_function(state.authenticate):
            subject = _signed_in(await state.authenticate(request))
            # The store and a client document's fetch may block: off the event loop.
            answer = await loop.run_in_executor(None, _serve_authorization, request, state, subject)
        else:  # a plain authenticate may block too (a session lookup): with the endpoint, in the pool
            answer = await loop.run_in_executor(None, _serve_signed_in, request, state)
        await _AsgiMiddleware._respond(answer, send)


# ---------------------------------------------------------------------------
# MCP
# ---------------------------------------------------------------------------

#: Where the MCP SDK and FastMCP keep the access token of the request being
#: served; read through sys.modules so that agentauth never imports them.
_MCP_TOKEN_MODULES = ("mcp.server.auth.middleware.auth_context", "fastmcp.server.dependencies")


def _mcp_current() -> Tuple[bool, Optional[AgentClaims], Any]:
    """Return (in an mcp 1.x request?, claims a middleware set on it, the SDK's access token).

    mcp 1.x runs tools in the session's own task, where context variables
    still hold what the request that opened the session set: there the
    current message's HTTP request is the only truthful source. Elsewhere
    the SDK's (or FastMCP's) own accessor answers for the current request.
    """
    server = sys.modules.get("mcp.server.lowlevel.server")
    request_ctx = getattr(server, "request_ctx", None)
    if request_ctx is not None:
        context = request_ctx.get(None)
        scope = getattr(getattr(context, "request", None), "scope", None)
        if isinstance(scope, dict):
            claims = scope.get("state", {}).get("agentauth.claims")
            token = getattr(scope.get("user"), "access_token", None)
            return True, claims if isinstance(claims, AgentClaims) else None, token
    for name in _MCP_TOKEN_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        try:
            token = module.get_access_token()
        except Exception:  # outside a request some versions raise rather than return None
            continue
        if token is not None:
            return False, None, token
    return False, None, None


def _claims_of_access_token(token: Any) -> Optional[AgentClaims]:
    """The claims ``auth.mcp()`` stored in an access token it made; None for any other."""
    if type(token).__name__ != "AgentAccessToken" or type(token).__module__ != __name__:
        return None  # another verifier's token: its claims are not ours to vouch for
    return _claims_from_raw(getattr(token, "claims", None))


#: The tool error classes of the MCP SDK (2.x, 1.x) and of FastMCP.
_MCP_TOOL_ERROR_MODULES = ("mcp.server.mcpserver.exceptions", "mcp.server.fastmcp.exceptions", "fastmcp.exceptions")


def _as_tool_error(exc: AgentAuthError) -> AgentAuthError:
    """The same refusal, also an instance of the loaded MCP servers' ToolError.

    They then answer with an error result (whose text names no scope) and
    log no traceback, as for any expected refusal.
    """
    bases = tuple(
        cls
        for cls in (getattr(sys.modules.get(name), "ToolError", None) for name in _MCP_TOOL_ERROR_MODULES)
        if isinstance(cls, type) and issubclass(cls, Exception)
    )
    if not bases:
        return exc
    error_class: type = type(exc)  # as plain `type`: mypy finds type[AgentAuthError] unhashable (mypy#11470)
    cls = _tool_error_class(error_class, bases)
    refusal = cls.__new__(cls)
    for base in bases:  # their own attributes (FastMCP's log_level), from the message alone
        try:
            base.__init__(refusal, *exc.args)
        except TypeError:
            pass
    refusal.__dict__.update(exc.__dict__)  # the refusal's data: missing, jti, expired_at
    refusal.args = exc.args
    return typing.cast(AgentAuthError, refusal)


@functools.lru_cache(maxsize=None)
def _tool_error_class(error: type, tool_errors: Tuple[type, ...]) -> Any:
    return type(error.__name__, (error, *tool_errors), {"__module__": __name__})


def _claims_from_raw(raw: Any) -> Optional[AgentClaims]:
    """Rebuild AgentClaims from claims that ``auth.mcp()`` verified and stored; None if not ours."""
    if not isinstance(raw, dict):
        return None
    # Declared as the checks just below leave them (mypy cannot narrow on all() or `in`).
    sub: str
    agent: str
    jti: str
    scope: str
    exp: float
    iat: float
    iss: str
    sub, agent, jti, scope, exp, iat = typing.cast(Any, map(raw.get, _REQUIRED_CLAIMS))
    iss, aud = typing.cast(Any, (raw.get("iss"), raw.get("aud")))
    if not all(type(v) is str for v in (sub, agent, jti, scope, iss)) or type(aud) not in (str, list):
        return None
    if type(exp) not in (int, float) or type(iat) not in (int, float):
        return None
    audience = aud if type(aud) is str else tuple(aud)
    try:
        chain: _Chain = ((agent,), (), ()) if raw.get("act") is None else _parse_chain(raw["act"], agent, 1 << 16)
    except TokenInvalidError:
        return None
    return AgentClaims(sub, agent, tuple(scope.split(" ")), jti, iat, exp, iss, audience, types.MappingProxyType(raw), *chain)


async def _verify_async(
    auth: "AgentAuth",
    token: str,
    required: Tuple[str, ...],
    proof: Optional[str] = None,
    method: Optional[str] = None,
    url: Optional[str] = None,
) -> AgentClaims:
    """Verify from async code without ever blocking the event loop on store I/O."""
    verify = functools.partial(auth.verify, token, required, dpop_proof=proof, method=method, url=url)
    if not auth._may_block():
        return verify()  # pure CPU, about 10 µs (a DPoP proof adds its signature check)
    import asyncio

    # A store does I/O (a locked SQLite file waits up to its timeout): run
    # verify in the loop's default thread pool.
    return await asyncio.get_running_loop().run_in_executor(None, verify)


@functools.lru_cache(maxsize=None)
def _agent_access_token_class(access_token_class: type) -> Any:
    """A subclass of the SDK's AccessToken that marks the tokens ``auth.mcp()`` made."""
    return type("AgentAccessToken", (access_token_class,), {"__module__": __name__})


async def _access_token(auth: "AgentAuth", token: str, access_token_class: Any) -> Any:
    """Verify ``token`` and fill the SDK's AccessToken; None when refused.

    A token that ``auth.asgi()`` verified for this same request (a DPoP
    request, its proof checked there) is not verified again: it could not
    be, since the SDK hands over the token alone.
    """
    verified = _VERIFIED_TOKEN.get()
    claims: Optional[AgentClaims] = None
    if verified is not None and hmac.compare_digest(verified[0], token):
        candidate = verified[1]
        audience = candidate.aud if type(candidate.aud) is tuple else (candidate.aud,)
        if candidate.iss == auth.issuer and auth.audience in audience:
            claims = candidate
    if claims is None:
        try:
            claims = await _verify_async(auth, token, ())
        except AgentAuthError:
            return None  # refused, expired, revoked, or the store is down: fail closed
    return _agent_access_token_class(access_token_class)(
        token=token,
        client_id=claims.agent,
        scopes=list(claims.scopes),
        expires_at=math.floor(claims.exp),
        resource=auth.audience,  # verify proved it is (in) aud: validate_token_resource works
        subject=claims.sub,
        claims=dict(claims.raw),
    )


class _McpTokenVerifier:
    """The official ``mcp`` SDK's ``TokenVerifier`` protocol over an AgentAuth."""

    def __init__(self, auth: "AgentAuth", access_token_class: Any) -> None:
        self._auth = auth
        self._access_token_class = access_token_class

    def __repr__(self) -> str:
        return f"<agentauth MCP token verifier for {self._auth!r}>"

    async def verify_token(self, token: str) -> Any:
        """Return the SDK's ``AccessToken`` for a valid token, else None."""
        return await _access_token(self._auth, token, self._access_token_class)


@functools.lru_cache(maxsize=None)
def _fastmcp_verifier_class() -> Any:
    """Subclass FastMCP's TokenVerifier on first use, never at import time."""
    from fastmcp.server.auth import AccessToken, TokenVerifier

    class AgentAuthTokenVerifier(TokenVerifier):  # type: ignore[misc, valid-type]
        """FastMCP's ``TokenVerifier`` over an AgentAuth."""

        def __init__(self, auth: "AgentAuth", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.agentauth = auth

        async def verify_token(self, token: str) -> Any:
            return await _access_token(self.agentauth, token, AccessToken)

    return AgentAuthTokenVerifier


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

#: Exit codes of ``python -m agentauth``; stable, documented in docs/cli.md.
EXIT_OK = 0
EXIT_REFUSED = 1  # the token was refused; its error code is on stderr
EXIT_USAGE = 2  # usage or configuration error, or a refused grant
EXIT_STORE = 3  # the revocation store is unavailable: nothing is reported valid

CLI_DEFAULT_ISSUER = "agentauth"
CLI_DEFAULT_AUDIENCE = "agentauth"

_CLI_EXAMPLES = {
    "demo": "python -m agentauth demo",
    "keygen": "export AGENTAUTH_SECRET=$(python -m agentauth keygen)\n"
    "  python -m agentauth keygen --ed25519 --jwks-file jwks.json > issuer.pem",
    "issue": "python -m agentauth issue --subject user_123 --agent bot --scope email:read --ttl 600",
    "verify": "python -m agentauth verify \"$TOKEN\" --require email:read --db revocations.db",
    "decode": "python -m agentauth decode \"$TOKEN\"",
    "revoke": "python -m agentauth revoke --db revocations.db --agent bot --subject user_123",
    "revocations": "python -m agentauth revocations --db revocations.db   # or --redis-url redis://localhost:6379/0",
    "grants": "python -m agentauth grants --db agentauth.db --subject user_123",
    "disconnect": "python -m agentauth disconnect --db agentauth.db --subject user_123 --agent bot",
    "bench": "python -m agentauth bench --seconds 2",
}


class _CliError(Exception):
    """An expected command-line failure: one line on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _exit_code(exc: AgentAuthError) -> int:
    if isinstance(exc, StoreUnavailableError):
        return EXIT_STORE
    if isinstance(exc, (InvalidGrantError, InvalidConfigError)):
        return EXIT_USAGE
    return EXIT_REFUSED


def _duration(seconds: float) -> str:
    """Format seconds as '9m12s', '2h05m', '3d04h'."""
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _utc(timestamp: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):  # a pasted token may say anything
        return f"{timestamp!r} (not a representable date)"


def _relative(timestamp: float, now: float) -> str:
    delta = timestamp - now
    return f"in {_duration(delta)}" if delta >= 0 else f"{_duration(delta)} ago"


def _read_token(value: str) -> str:
    """Return the token argument, or stdin's first line when it is '-'."""
    if value == "-":
        value = sys.stdin.readline()
    return value.strip()


def _open_store(args: Any, *, create: bool) -> Optional[SqliteStore]:
    """Open ``--db``; main() closes it when the command is done."""
    path = args.db
    if path is None:
        return None
    if not create and not os.path.exists(path):
        # A mistyped path must not silently become an empty revocation list.
        raise _CliError(f"no database at {path!r} (check --db)", EXIT_STORE)
    store = SqliteStore(path)
    args.stores.append(store)
    return store


def _cli_auth(args: Any, store: Optional[SqliteStore] = None) -> AgentAuth:
    """Build the AgentAuth the subcommands share, from the environment and flags.

    The key, in this order: a JWK set named on the command line
    (``--jwks-file``, ``--jwks-url``: verify only), ``--key-file``, the
    ``AGENTAUTH_JWKS`` set (verify and revoke only), ``AGENTAUTH_PRIVATE_KEY``
    (PEM or JWK), else ``AGENTAUTH_SECRET``. Never key material on the
    command line.
    """
    options: Dict[str, Any] = dict(
        issuer=args.issuer,
        audience=args.audience,
        max_ttl_seconds=args.max_ttl,
        store=store,
        check_revocation=store is not None,
    )
    if args.max_ttl < DEFAULT_TTL_SECONDS:  # --ttl still says how long a token lives
        options["default_ttl_seconds"] = args.max_ttl
    jwks_file, jwks_url = getattr(args, "jwks_file", None), getattr(args, "jwks_url", None)
    key_file = getattr(args, "key_file", None)
    verifies_only = hasattr(args, "jwks_file")  # verify and revoke; issue always needs a private key
    if jwks_url or jwks_file:
        options.pop("default_ttl_seconds", None)  # a verifier mints nothing
    if jwks_url:
        return AgentAuth.verifier(jwks_url=jwks_url, **options)
    if jwks_file:
        return AgentAuth.verifier(jwks=_parse_json_arg(_read_file(jwks_file), "the JWK set"), **options)
    key_text = _read_file(key_file) if key_file else None
    if key_text is None and verifies_only and os.environ.get("AGENTAUTH_JWKS"):
        options.pop("default_ttl_seconds", None)
        jwks_text = os.environ["AGENTAUTH_JWKS"]
        if not jwks_text.lstrip().startswith("{"):
            raise _CliError("AGENTAUTH_JWKS holds the JWK set's JSON, not a path: for a file use --jwks-file PATH",
                            EXIT_USAGE)
        return AgentAuth.verifier(jwks=_parse_json_arg(jwks_text, "the JWK set"), **options)
    key_text = key_text or os.environ.get("AGENTAUTH_PRIVATE_KEY")
    if key_text:
        key, jwk_kid = _read_key(key_text)
        kid = args.kid or jwk_kid
        if key.is_private:
            return AgentAuth(signing_key=key, kid=kid, **options)
        if not verifies_only:
            raise _CliError("the key is a public key; issuing needs the private key", EXIT_USAGE)
        # A public key verifies (and revokes by token): a verifier of that one key.
        options.pop("default_ttl_seconds", None)
        return AgentAuth.verifier(jwks={"keys": [key.public_jwk(kid or key.thumbprint())]}, **options)
    secret = os.environ.get("AGENTAUTH_SECRET")
    if not secret:
        raise _CliError(
            "no key: set AGENTAUTH_SECRET (make one with: export AGENTAUTH_SECRET=$(python -m agentauth keygen)),"
            " or give an Ed25519 or P-256 key with --key-file / AGENTAUTH_PRIVATE_KEY",
            EXIT_USAGE,
        )
    return AgentAuth(secret=secret, kid=args.kid or None, **options)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _CliError(f"cannot read {path!r}: {exc.__class__.__name__}", EXIT_USAGE) from exc


def _parse_json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _CliError(f"{what} is not valid JSON", EXIT_USAGE) from exc


def _read_key(text: str) -> Tuple[Union[Ed25519Key, P256Key], Optional[str]]:
    """An Ed25519 or P-256 key (private or public) from PEM or JWK text, and the JWK's kid if it has one.

    Without a kid (PEM) the key's RFC 7638 thumbprint is its kid, as keygen's.
    """
    kid = None
    key: Union[Ed25519Key, P256Key]
    if text.lstrip().startswith("{"):
        jwk = _parse_json_arg(text, "the key")
        key = P256Key.from_jwk(jwk) if isinstance(jwk, dict) and jwk.get("kty") == "EC" else Ed25519Key.from_jwk(jwk)
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
    else:
        try:
            key = Ed25519Key.from_pem(text)
        except InvalidConfigError:
            key = P256Key.from_pem(text)  # its error says what a P-256 PEM should be
    return key, kid


def _cli_scopes(values: Optional[List[str]], flag: str) -> List[str]:
    """The scopes of a repeatable flag; "a b" in one flag gets told how to give two."""
    for value in values or ():
        if len(value.split()) > 1:
            raise _CliError(f"{flag} takes one scope; repeat the flag for more: {flag} a {flag} b", EXIT_USAGE)
    return list(values or ())


def _cmd_keygen(args: Any, out: Any, err: Any) -> int:
    if not args.ed25519:
        print(secrets.token_urlsafe(32), file=out)  # 256 bits; its 43 ASCII bytes are the key
        return EXIT_OK
    key = Ed25519Key.generate()
    if args.kid and not args.jwk:
        # A PEM file cannot carry a kid: issue would stamp the thumbprint.
        raise _CliError("--kid needs --jwk (a PEM key's kid is its thumbprint)", EXIT_USAGE)
    kid = args.kid or key.thumbprint()
    print(json.dumps(key.private_jwk(kid), indent=2) if args.jwk else key.private_pem(), end="" if not args.jwk else "\n", file=out)
    jwks = json.dumps({"keys": [key.public_jwk(kid)]}, indent=2)
    if args.jwks_file:
        try:
            with open(args.jwks_file, "w", encoding="utf-8") as file:
                file.write(jwks + "\n")
        except OSError as exc:
            raise _CliError(f"cannot write {args.jwks_file!r}: {exc.__class__.__name__}", EXIT_USAGE) from exc
    else:
        print(f"public JWKS (publish it; verifiers need nothing else):\n{jwks}", file=err)
    return EXIT_OK


def _cmd_issue(args: Any, out: Any, err: Any) -> int:
    auth = _cli_auth(args)
    scopes = _cli_scopes(args.scope, "--scope")
    issued = auth.issue(subject=args.subject, agent=args.agent, scopes=scopes, ttl_seconds=args.ttl)
    if args.json:
        print(json.dumps({"token": issued.token, "jti": issued.jti, "expires_at": issued.expires_at}), file=out)
    else:
        print(issued.token, file=out)
    return EXIT_OK


def _cmd_verify(args: Any, out: Any, err: Any) -> int:
    try:
        required = _required_scopes(_cli_scopes(args.require, "--require"))
    except ValueError as exc:
        raise _CliError(f"--require: {exc}", EXIT_USAGE) from exc
    store = _open_store(args, create=False)
    auth = _cli_auth(args, store)
    claims = auth.verify(_read_token(args.token), required_scopes=required)
    print(json.dumps(dict(claims.raw), indent=2), file=out)
    print(f"valid for {_duration(claims.exp - auth._clock())}", file=err)
    if store is None:
        print("note: no revocation list was consulted (pass --db to check one)", file=err)
    return EXIT_OK


def _cmd_decode(args: Any, out: Any, err: Any) -> int:
    token = _read_token(args.token)
    head, body, _sig = _split(token, DEFAULT_MAX_TOKEN_BYTES)
    try:
        header = _json_object(_b64decode(head), "header")
        claims = _json_object(_b64decode(body), "payload")
    except ValueError as exc:  # non-canonical base64
        raise TokenInvalidError("token segment is not canonical base64url") from exc
    now = time.time()
    print("UNVERIFIED: the signature and claims were NOT checked; do not trust this output", file=out)
    print("header: " + json.dumps(header, indent=2), file=out)
    print("claims: " + json.dumps(claims, indent=2), file=out)
    for name in ("iat", "nbf", "exp"):
        value: Any = claims.get(name)  # unverified JSON; its type is checked next
        if type(value) in (int, float) and math.isfinite(value):
            when = _relative(value, now)
            if name == "exp" and value <= now:
                when = f"expired {_duration(now - value)} ago"
            print(f"{name}: {_utc(value)} ({when})", file=out)
    return EXIT_OK


def _cmd_revoke(args: Any, out: Any, err: Any) -> int:
    given = [x for x in (args.token, args.jti) if x is not None]
    if len(given) > 1 or (given and (args.agent or args.subject)) or not (given or args.agent or args.subject):
        raise _CliError("give exactly one of: TOKEN, --jti, or --agent/--subject", EXIT_USAGE)
    auth = _cli_auth(args, _open_store(args, create=True))
    try:
        if args.token is not None:
            entry = auth.revoke(_read_token(args.token))
        elif args.jti is not None:
            entry = auth.revoke(jti=args.jti)
        else:
            entry = auth.revoke(agent=args.agent, subject=args.subject)
    except ValueError as exc:
        raise _CliError(str(exc), EXIT_USAGE) from exc
    if entry is None:
        print("the token has already expired; nothing to revoke", file=out)
    else:
        print(f"revoked {_describe(entry)}; kept until {_utc(entry.expires_at)}", file=out)
    return EXIT_OK


def _describe(entry: RevocationEntry) -> str:
    if entry.jti is not None:
        return f"jti={entry.jti}"
    parts = [f"agent={entry.agent}"] if entry.agent is not None else []
    if entry.subject is not None:
        parts.append(f"subject={entry.subject}")
    return " ".join(parts) + " (tokens issued up to then)"


def _redis_store(url: str, prefix: str) -> RedisStore:
    """A RedisStore on ``url``, through redis-py."""
    try:
        import redis
    except ImportError as exc:
        raise _CliError("--redis-url needs redis-py: pip install redis", EXIT_USAGE) from exc
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:
        raise _CliError("--redis-url is not a redis:// URL", EXIT_USAGE) from exc
    return RedisStore(client, prefix=prefix)


def _cmd_revocations(args: Any, out: Any, err: Any) -> int:
    from urllib.parse import urlsplit

    if args.db is not None and args.redis_url is not None:
        raise _CliError("give one of --db PATH or --redis-url URL", EXIT_USAGE)
    if args.redis_url is not None and urlsplit(args.redis_url).password is not None:
        # STYLE rule 7: a password on the command line lands in shell history and ps.
        raise _CliError("--redis-url holds a password: put that URL in AGENTAUTH_REDIS_URL instead", EXIT_USAGE)
    redis_url = args.redis_url or (os.environ.get("AGENTAUTH_REDIS_URL") if args.db is None else None)
    if args.db is None and not redis_url:
        raise _CliError("give one of --db PATH or --redis-url URL (or AGENTAUTH_REDIS_URL)", EXIT_USAGE)
    if redis_url:
        entries = _redis_store(redis_url, args.redis_prefix).entries(now=time.time())
    else:
        store = _open_store(args, create=False)
        entries = typing.cast(SqliteStore, store).entries(now=time.time())
    if args.json:
        print(json.dumps([e._asdict() for e in entries], indent=2), file=out)
        return EXIT_OK
    if not entries:
        print("no live revocations", file=out)
    for entry in entries:
        print(f"{_utc(entry.revoked_at)}  {_describe(entry)}  (kept until {_utc(entry.expires_at)})", file=out)
    return EXIT_OK


def _store_auth(args: Any, store: SqliteStore) -> AgentAuth:
    """An AgentAuth over ``store`` for commands that change grants and mint nothing: no key needed."""
    max_ttl = getattr(args, "max_ttl", DEFAULT_MAX_TTL_SECONDS)
    return AgentAuth(
        secret=secrets.token_bytes(32), issuer=CLI_DEFAULT_ISSUER, audience=CLI_DEFAULT_AUDIENCE, store=store,
        max_ttl_seconds=max_ttl, default_ttl_seconds=min(DEFAULT_TTL_SECONDS, max_ttl) if type(max_ttl) is int else 1,
    )


def _cmd_grants(args: Any, out: Any, err: Any) -> int:
    store = _open_store(args, create=False)
    grants = _store_auth(args, typing.cast(SqliteStore, store)).grants(subject=args.subject)
    if args.json:
        print(json.dumps([dict(g._asdict(), scopes=list(g.scopes)) for g in grants], indent=2), file=out)
        return EXIT_OK
    if not grants:
        print(f"{args.subject} has no connected agents", file=out)
    for g in grants:
        name = "" if g.agent_name is None else f" ({g.agent_name})"
        used = "never used" if g.last_used_at is None else f"last used {_utc(g.last_used_at)}"
        print(f"{g.agent}{name}: {' '.join(g.scopes)}; since {_utc(g.created_at)}, {used}", file=out)
    return EXIT_OK


def _cmd_disconnect(args: Any, out: Any, err: Any) -> int:
    store = _open_store(args, create=False)
    if _store_auth(args, typing.cast(SqliteStore, store)).disconnect(subject=args.subject, agent=args.agent):
        print(f"disconnected {args.agent} from {args.subject}: its tokens are refused from now on", file=out)
    else:
        print(f"{args.agent} was not connected to {args.subject}; nothing changed", file=out)
    return EXIT_OK


def _cmd_demo(args: Any, out: Any, err: Any) -> int:
    import tempfile

    color = out.isatty() and "NO_COLOR" not in os.environ

    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    ok, refused = paint("ok", "32"), paint("refused", "31")
    start = time.time()
    offset = [0]

    def clock() -> float:  # real time, which the demo can skip ahead
        return start + offset[0]

    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(os.path.join(folder, "revocations.db"))
        auth = AgentAuth(
            secret=secrets.token_bytes(32), issuer="demo-app", audience="demo-api", store=store, clock=clock
        )
        subject, agent = "user_123", "agent_research_bot"
        grant = ["email:read", "calendar:read"]

        def call(step: int, route: str, token: str, scope: str) -> None:
            try:
                claims = auth.verify(token, required_scopes=[scope])
            except AgentAuthError as exc:
                print(f"{step}. API      {route} needs {scope}: {refused} ({exc.code})", file=out)
            else:
                print(f"{step}. API      {route} needs {scope}: {ok} (sub={claims.sub}, agent={claims.agent})", file=out)

        print("agentauth demo: a user grants an agent scopes, the API enforces them", file=out)
        print(f"1. grant    {subject} grants {agent}: {' '.join(grant)} for 10m", file=out)
        issued = auth.issue(subject=subject, agent=agent, scopes=grant, ttl_seconds=600)
        print(f"2. issue    token minted: jti={issued.jti}, expires in 10m ({len(issued.token)} bytes, HS256)", file=out)
        call(3, "GET /email", issued.token, "email:read")
        call(4, "POST /email/send", issued.token, "email:send")
        auth.revoke(agent=agent, subject=subject)
        print(f"5. revoke   {subject} disconnects {agent}", file=out)
        call(6, "GET /email", issued.token, "email:read")
        offset[0] += 1  # a grant made from the next second on is not covered
        again = auth.issue(subject=subject, agent=agent, scopes=grant, ttl_seconds=600)
        print(f"7. grant    one second later {subject} grants {agent} again: new jti={again.jti}", file=out)
        call(8, "GET /email", again.token, "email:read")
        store.close()
    return EXIT_OK


def _cmd_bench(args: Any, out: Any, err: Any) -> int:
    import tempfile

    seconds = args.seconds
    if not (math.isfinite(seconds) and seconds > 0):
        raise _CliError("--seconds must be a positive number of seconds", EXIT_USAGE)
    deadline = time.perf_counter() + seconds  # the whole run, preparation included
    now = math.floor(time.time())
    with tempfile.TemporaryDirectory() as folder:
        sqlite_store = SqliteStore(os.path.join(folder, "bench.db"))
        memory_store = MemoryStore()
        print(f"preparing {args.revocations} revocations in each store...", file=err)
        for i in range(args.revocations):
            criteria = {"jti": f"bench-{i}"}
            sqlite_store.revoke(criteria, revoked_at=now, expires_at=now + 3600)
            memory_store.revoke(criteria, revoked_at=now, expires_at=now + 3600)
        secret = secrets.token_bytes(32)

        def make(store: Optional[RevocationStore], cache: int = DEFAULT_VERIFY_CACHE_SIZE) -> AgentAuth:
            return AgentAuth(secret=secret, issuer="bench", audience="bench", kid="k1", store=store,
                             check_revocation=store is not None, verify_cache_size=cache)

        stateless, uncached = make(None), make(None, 0)
        grant: Dict[str, Any] = {
            "subject": "user_123",
            "agent": "agent_research_bot",
            "scopes": ["email:read", "calendar:read"],
        }
        token = stateless.issue(**grant).token
        make_memory, make_sqlite = make(memory_store), make(sqlite_store)
        # Verify with a recorded grant: its last use is written at most once a minute.
        granted = AgentAuth(secret=secret, issuer="bench", audience="bench", kid="k1", store=sqlite_store,
                            check_revocation=False)
        granted.grant(**grant)
        ed_key = Ed25519Key.generate()
        eddsa = AgentAuth(signing_key=ed_key, issuer="bench", audience="bench", check_revocation=False)
        eddsa_uncached = AgentAuth(signing_key=ed_key, issuer="bench", audience="bench", check_revocation=False,
                                   verify_cache_size=0)
        ed_token = eddsa.issue(**grant).token
        for _ in range(2):  # the key earns its table (pure backend) on its second verify, not measured
            eddsa_uncached.verify(ed_token)
        asgi_request = _bench_asgi(make_memory, token)
        es256 = _BenchES256(secret)
        rows: List[Tuple[str, Callable[[], Any]]] = [
            ("issue, HS256", lambda: stateless.issue(**grant)),
            ("verify, HS256, first", lambda: uncached.verify(token, ["email:read"])),
            ("verify, HS256, repeat", lambda: stateless.verify(token, ["email:read"])),
            ("verify + MemoryStore, repeat", lambda: make_memory.verify(token, ["email:read"])),
            ("verify + SqliteStore, repeat", lambda: make_sqlite.verify(token, ["email:read"])),
            ("verify + grant last use", lambda: granted.verify(token, ["email:read"])),
            ("issue, EdDSA", lambda: eddsa.issue(**grant)),
            ("verify, EdDSA, first", lambda: eddsa_uncached.verify(ed_token, ["email:read"])),
            ("verify, EdDSA, repeat", lambda: eddsa.verify(ed_token, ["email:read"])),
            *es256.rows(),
            ("ASGI middleware, per request", asgi_request),
        ]
        postgres = _BenchPostgres(args.revocations, now, err) if os.environ.get("AGENTAUTH_POSTGRES_URL") else None
        if postgres is not None:
            make_postgres, make_postgres_first = make(postgres.store), make(postgres.store, 0)
            rows[5:5] = [
                ("verify + PostgresStore, first", lambda: make_postgres_first.verify(token, ["email:read"])),
                ("verify + PostgresStore, repeat", lambda: make_postgres.verify(token, ["email:read"])),
            ]
        results = []
        for index, (name, op) in enumerate(rows):
            print(f"measuring {name}...", file=err)
            share = (deadline - time.perf_counter()) / (len(rows) - index)
            results.append((name, _measure(op, share)))
        sqlite_store.close()
        latencies: List[float] = []
        if postgres is not None:
            try:
                print("measuring revoke-to-refused across two processes...", file=err)
                latencies = postgres.revoke_to_refused(50)
            finally:
                postgres.close()
    print(
        f"agentauth {__version__}, Python {sys.version.split()[0]}, {args.revocations} revocations in each store,"
        f" Ed25519 backend: {ed_key.backend}, P-256 backend: {es256.key.backend}",
        file=out,
    )
    print(f"{'operation':<30} {'ops/s':>10} {'us/op':>8}", file=out)
    for name, per_op in results:
        print(f"{name:<30} {1 / per_op:>10,.0f} {per_op * 1e6:>8.2f}", file=out)
    if latencies:
        latencies.sort()
        print(
            f"revoke-to-refused, PostgresStore, two processes, {len(latencies)} revocations:"
            f" median {latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms",
            file=out,
        )
    return EXIT_OK


class _BenchES256:
    """The ES256 and DPoP rows of ``bench``: raw verify on each backend, proofs, DPoP-checked verify."""

    URL = "https://api.example/inbox"

    def __init__(self, secret: bytes) -> None:
        self.key = P256Key.generate()
        self.message = b"eyJ0eXAiOiJkcG9wK2p3dCJ9.eyJqdGkiOiJiZW5jaCJ9"
        self.signature = self.key.sign(self.message)
        self.auth = AgentAuth(secret=secret, issuer="bench", audience="bench", kid="k1", check_revocation=False)
        self.token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"],
                                     dpop_jkt=self.key.thumbprint()).token
        # Each proof verifies once: a pool of them, and a fresh replay cache
        # whenever the pool starts over (one MemoryStore, amortised).
        self.proofs = [dpop_proof(self.key, "GET", self.URL, access_token=self.token) for _ in range(1000)]
        self.next = 0
        self.pure = _p256_verifier(self.key.x, self.key.y)
        self.others = [(key, key.sign(self.message)) for key in (P256Key.generate() for _ in range(20))]
        self.next_other = 0
        for _ in range(2):  # G's table and this key's table, outside the measurement
            self.pure.verify(self.message, self.signature)

    def dpop_verify(self) -> AgentClaims:
        if self.next == len(self.proofs):
            self.next, self.auth.store = 0, MemoryStore()
        self.next += 1
        return self.auth.verify(self.token, ["email:read"], dpop_proof=self.proofs[self.next - 1], method="GET",
                                url=self.URL)

    def first_seen(self) -> bool:
        # A verifier of its own, used once: no table is built or found for it.
        key, signature = self.others[self.next_other]
        self.next_other = (self.next_other + 1) % len(self.others)
        return _P256Verifier(key.x, key.y).verify(self.message, signature)

    def rows(self) -> List[Tuple[str, Callable[[], Any]]]:
        rows: List[Tuple[str, Callable[[], Any]]] = [
            ("ES256 verify, pure, known key", lambda: self.pure.verify(self.message, self.signature)),
            ("ES256 verify, pure, new key", self.first_seen),
        ]
        crypto = _crypto_ec()
        if crypto is not None:
            public = crypto.ec.EllipticCurvePublicNumbers(self.key.x, self.key.y, crypto.ec.SECP256R1()).public_key()
            der = crypto.utils.encode_dss_signature(
                int.from_bytes(self.signature[:32], "big"), int.from_bytes(self.signature[32:], "big")
            )
            rows.append(("ES256 verify, cryptography", lambda: public.verify(der, self.message, crypto.algorithm)))
        rows += [
            ("dpop_proof, ES256", lambda: dpop_proof(self.key, "GET", self.URL, access_token=self.token)),
            ("verify + DPoP proof, ES256", self.dpop_verify),
        ]
        return rows


#: The other "host" of the revoke-to-refused benchmark: revokes an agent per
#: line read, and prints the monotonic time (the same clock in every process
#: of one machine) just before each revoke.
_BENCH_REVOKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import agentauth
driver = __import__(sys.argv[2])
store = agentauth.PostgresStore(lambda: driver.connect(os.environ["AGENTAUTH_POSTGRES_URL"]), schema=sys.argv[3])
print("ready", flush=True)
for line in sys.stdin:
    now = int(time.time())
    started = time.monotonic()
    store.revoke({"agent": line.strip()}, revoked_at=now, expires_at=now + 600)
    print(started, flush=True)
store.close()
"""


class _BenchPostgres:
    """The PostgreSQL rows of ``bench``: a throwaway schema holding ``revocations`` live entries.

    The database is ``AGENTAUTH_POSTGRES_URL`` (a libpq connection string;
    never a command-line argument, since it may hold a password); psycopg 3
    is used if installed, else psycopg2.
    """

    def __init__(self, revocations: int, now: int, err: Any) -> None:
        try:
            import psycopg as driver  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            try:
                import psycopg2 as driver  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]
            except ImportError:
                raise _CliError("AGENTAUTH_POSTGRES_URL is set: install psycopg (pip install 'psycopg[binary]')",
                                EXIT_USAGE) from None
        url = os.environ["AGENTAUTH_POSTGRES_URL"]
        self.driver = driver.__name__
        self.schema = "agentauth_bench_" + secrets.token_hex(4)
        self._connect = lambda: driver.connect(url)
        print(f"preparing {revocations} revocations in PostgreSQL (schema {self.schema})...", file=err)
        writer = PostgresStore(self._connect, schema=self.schema)
        writer.revoke({"jti": "bench-first"}, revoked_at=now, expires_at=now + 3600)
        self._sql(
            f'INSERT INTO "{self.schema}".agentauth_revocations (key, seq, jti, revoked_at, expires_at)'
            f" SELECT 'jti:bench-' || g, nextval('\"{self.schema}\".agentauth_revocations_seq'), 'bench-' || g, %s, %s"
            " FROM generate_series(2, %s) g",
            (now, now + 3600, revocations),
        )
        writer.close()
        self.store = PostgresStore(self._connect, schema=self.schema)  # loads them all as it starts
        if len(self.store._index.entries) != revocations:
            raise _CliError("the PostgreSQL store did not load the benchmark's revocations", EXIT_STORE)

    def _sql(self, query: str, params: Tuple[Any, ...] = ()) -> None:
        conn = self._connect()
        try:
            conn.cursor().execute(query, params)
            conn.commit()
        finally:
            conn.close()

    def revoke_to_refused(self, rounds: int) -> List[float]:
        """Seconds from another process's revoke call to this process's first refusal, per round."""
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        child = subprocess.Popen([sys.executable, "-c", _BENCH_REVOKER, here, self.driver, self.schema],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        latencies = []
        try:
            if child.stdout.readline().strip() != "ready":
                raise _CliError("the benchmark's second process did not start", EXIT_STORE)
            for i in range(rounds):
                claims = AgentClaims("user_1", f"bench-agent-{i}", ("s",), f"bench-latency-{i}", time.time(),
                                     time.time() + 600, "bench", "bench", {})
                child.stdin.write(f"bench-agent-{i}\n")
                child.stdin.flush()
                started = float(child.stdout.readline())
                deadline = time.monotonic() + 10
                while not self.store.is_revoked(claims):
                    if time.monotonic() > deadline:
                        raise _CliError("a revocation was not seen within 10 s", EXIT_STORE)
                    time.sleep(0.0002)
                latencies.append(time.monotonic() - started)
        finally:
            child.stdin.close()
            child.wait(timeout=30)
            child.stdout.close()
        return latencies

    def close(self) -> None:
        self.store.close()
        self._sql(f'DROP SCHEMA "{self.schema}" CASCADE')


def _bench_asgi(auth: AgentAuth, token: str) -> Callable[[], None]:
    """One in-process HTTP request through ``auth.asgi``: no server, no event loop.

    With a MemoryStore nothing in the middleware suspends, so the request's
    coroutine runs to its end on its first step.
    """

    async def app(scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        pass

    protected = auth.asgi(app, required_scopes=["email:read"])
    headers = [(b"host", b"api.example"), (b"authorization", f"Bearer {token}".encode("ascii"))]

    def request() -> None:
        scope = {"type": "http", "method": "GET", "path": "/inbox", "headers": headers}
        step = protected(scope, receive, send)
        try:
            step.send(None)
        except StopIteration:
            return
        step.close()
        raise RuntimeError("the ASGI request suspended")

    return request


def _measure(op: Callable[[], Any], seconds: float) -> float:
    """Return the best seconds per call over batches run for about ``seconds``."""
    batch, best = 100, float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        for _ in range(batch):
            op()
        best = min(best, (time.perf_counter() - started) / batch)
        if started >= deadline:
            return best


_COMMANDS = {
    "demo": (_cmd_demo, "run the whole story on a throwaway secret and database"),
    "keygen": (_cmd_keygen, "print a fresh random secret for AGENTAUTH_SECRET, or an Ed25519 key"),
    "issue": (_cmd_issue, "mint a token (secret from AGENTAUTH_SECRET)"),
    "verify": (_cmd_verify, "verify a token and print its claims"),
    "decode": (_cmd_decode, "show a token's header and claims WITHOUT checking them"),
    "revoke": (_cmd_revoke, "revoke a token, a jti, or an agent's and/or subject's tokens"),
    "revocations": (_cmd_revocations, "list the live revocations, newest first"),
    "grants": (_cmd_grants, "list the agents a user has connected (their grants)"),
    "disconnect": (_cmd_disconnect, "remove a user's grant to an agent and refuse its tokens"),
    "bench": (_cmd_bench, "measure issue and verify on this host"),
}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _CliError(f"{name} must be a whole number of seconds", EXIT_USAGE) from None


def _parser() -> "argparse.ArgumentParser":
    import argparse

    parser = argparse.ArgumentParser(
        prog="agentauth",
        description="Scoped, short-lived, revocable tokens for AI agents.",
        epilog="exit codes: 0 ok, 1 token refused, 2 usage or configuration error, 3 revocation store unavailable",
    )
    parser.add_argument("--version", action="version", version=f"agentauth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = {}
    for name, (_func, summary) in _COMMANDS.items():
        sub[name] = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {_CLI_EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    for name in ("issue", "verify", "revoke"):
        group = sub[name].add_argument_group("configuration (the secret comes from AGENTAUTH_SECRET only)")
        group.add_argument("--issuer", default=os.environ.get("AGENTAUTH_ISSUER", CLI_DEFAULT_ISSUER),
                           help=f"iss claim (env AGENTAUTH_ISSUER, default {CLI_DEFAULT_ISSUER!r})")
        group.add_argument("--audience", default=os.environ.get("AGENTAUTH_AUDIENCE", CLI_DEFAULT_AUDIENCE),
                           help=f"aud claim (env AGENTAUTH_AUDIENCE, default {CLI_DEFAULT_AUDIENCE!r})")
        group.add_argument("--kid", default=os.environ.get("AGENTAUTH_KID"), help="key id (env AGENTAUTH_KID)")
        group.add_argument("--max-ttl", type=int, default=_env_int("AGENTAUTH_MAX_TTL", DEFAULT_MAX_TTL_SECONDS),
                           metavar="SECONDS", help="the server's max_ttl_seconds (env AGENTAUTH_MAX_TTL, default %(default)s)")
    sub["issue"].add_argument("--key-file", metavar="PATH",
                              help="Ed25519 or P-256 private key file, PEM or JWK (or env AGENTAUTH_PRIVATE_KEY with the key's text);"
                                   " default: AGENTAUTH_SECRET")
    for name in ("verify", "revoke"):
        sub[name].add_argument("--key-file", metavar="PATH",
                               help="Ed25519 or P-256 key file, private or public, PEM or JWK (or env AGENTAUTH_PRIVATE_KEY);"
                                    " default: AGENTAUTH_SECRET")
    for name in ("verify", "revoke"):
        sub[name].add_argument("--jwks-file", metavar="PATH", help="verify EdDSA or ES256 tokens with this JWK set file (or env AGENTAUTH_JWKS with the set's JSON)")
        sub[name].add_argument("--jwks-url", metavar="URL", help="verify EdDSA or ES256 tokens with the JWK set at this https URL")
    sub["keygen"].add_argument("--ed25519", action="store_true", help="an Ed25519 private key (PEM) instead of an HS256 secret")
    sub["keygen"].add_argument("--jwk", action="store_true", help="with --ed25519: print the private key as a JWK")
    sub["keygen"].add_argument("--kid", help="with --ed25519 --jwk: the key id (default: its RFC 7638 thumbprint)")
    sub["keygen"].add_argument("--jwks-file", metavar="PATH", help="with --ed25519: write the public JWKS here (default: stderr)")
    sub["issue"].add_argument("--subject", required=True, help="the user the agent acts for (sub)")
    sub["issue"].add_argument("--agent", required=True, help="the agent's id (client_id)")
    sub["issue"].add_argument("--scope", action="append", required=True, help="a granted scope; repeat for more")
    sub["issue"].add_argument("--ttl", type=int, metavar="SECONDS",
                              help=f"lifetime (default {DEFAULT_TTL_SECONDS}, or --max-ttl if that is shorter)")
    sub["issue"].add_argument("--json", action="store_true", help="print {token, jti, expires_at}")
    sub["verify"].add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    sub["verify"].add_argument("--require", action="append", metavar="SCOPE", help="a required scope; repeatable")
    sub["verify"].add_argument("--db", help="SQLite revocation database to consult")
    sub["decode"].add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    sub["revoke"].add_argument("token", metavar="TOKEN", nargs="?", help="a token to revoke, or - for stdin")
    sub["revoke"].add_argument("--jti", help="revoke the token with this jti")
    sub["revoke"].add_argument("--agent", help="revoke this agent's tokens issued up to now")
    sub["revoke"].add_argument("--subject", help="revoke this subject's tokens issued up to now (ANDed with --agent)")
    sub["revoke"].add_argument("--db", required=True, help="SQLite revocation database (created if missing)")
    sub["revocations"].add_argument("--db", help="SQLite revocation database")
    sub["revocations"].add_argument("--redis-url", metavar="URL",
                                    help="or a Redis one (redis://host:6379/0; needs redis-py); a URL with a password:"
                                         " env AGENTAUTH_REDIS_URL")
    sub["revocations"].add_argument("--redis-prefix", default="agentauth:", metavar="PREFIX",
                                    help="the RedisStore prefix (default %(default)s)")
    sub["revocations"].add_argument("--json", action="store_true", help="print the entries as JSON")
    for name in ("grants", "disconnect"):
        sub[name].add_argument("--db", required=True, help="SQLite database holding the grants")
        sub[name].add_argument("--subject", required=True, help="the user (sub)")
    sub["grants"].add_argument("--json", action="store_true", help="print the grants as JSON")
    sub["disconnect"].add_argument("--agent", required=True, help="the agent's id (client_id)")
    sub["disconnect"].add_argument("--max-ttl", type=int, default=_env_int("AGENTAUTH_MAX_TTL", DEFAULT_MAX_TTL_SECONDS),
                                   metavar="SECONDS", help="the server's max_ttl_seconds: how long the refusal is kept"
                                   " (env AGENTAUTH_MAX_TTL, default %(default)s)")
    sub["bench"].add_argument("--seconds", type=float, default=2.0,
                              help="the whole run's time, preparation included (default %(default)s)")
    sub["bench"].add_argument("--revocations", type=int, default=10000, metavar="N",
                              help="entries preloaded in each store (default %(default)s)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``python -m agentauth`` command line and return its exit code.

    No traceback reaches the user for an expected failure: each prints one
    line on stderr and returns a documented exit code.
    """
    out, err = sys.stdout, sys.stderr
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error (already printed)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        args.stores = []
        try:
            return _COMMANDS[args.command][0](args, out, err)
        finally:
            for store in args.stores:
                store.close()
    except _CliError as exc:
        print(f"agentauth: {exc}", file=err)
        return exc.exit_code
    except AgentAuthError as exc:
        print(f"agentauth: {exc.code}: {exc}", file=err)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush fails quietly
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
