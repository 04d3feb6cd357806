"""Integration tests: agentauth against the real frameworks, SDKs and servers.

Each class runs when its package (or server) is installed and is skipped with
the reason otherwise. `.ci/run` installs them all in a throwaway virtualenv
(and redis-server, PostgreSQL, Chromium with its driver, and the `jose` npm
package) so CI proves every path; the README's own test command needs nothing
installed.
"""

import asyncio
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import unittest.mock
import urllib.error
import urllib.parse
import urllib.request
import warnings
import wsgiref.simple_server

import agentauth
from test_agentauth import (T0, GrantStoreContract, ProofReplayContract, RecordStoreContract, StoreContract, agent_claims,
                            assert_output_matches, doc_blocks, doc_files, new_grant)

SECRET = "Hn4Wq8Zt1Lc6Vb3Xk9Pm2Rd7Fs0Gy5Ju-Ea"  # fixed, not guessable
ISSUER = "integration-issuer"


PACKAGES = {"jwt": "PyJWT", "psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}  # where the import name is not the name pip installs


def installed(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    install = " ".join(PACKAGES.get(m, m) for m in missing)
    return unittest.skipIf(missing, f"needs {', '.join(missing)} (pip install {install})")


def free_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue until uvicorn serves
    return sock


class UvicornThread:
    """Serve an ASGI app on a free loopback port from a background thread."""

    def __init__(self, make_app):
        import uvicorn

        self.sock = free_socket()
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = make_app(self.base)
        started = threading.Event()

        async def signalling(scope, receive, send):
            if scope["type"] == "lifespan":
                async def send_and_signal(message):
                    await send(message)
                    if message["type"] == "lifespan.startup.complete":
                        started.set()

                return await app(scope, receive, send_and_signal)
            return await app(scope, receive, send)

        self.server = uvicorn.Server(uvicorn.Config(signalling, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if not started.wait(timeout=20):
            raise RuntimeError("the test server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def http(method, url, headers=None, body=None):
    """One raw HTTP request; return (status, headers, body)."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


# ---------------------------------------------------------------------------
# Interoperability: PyJWT and the jose npm library
# ---------------------------------------------------------------------------


@installed("jwt")
class PyJwtInteropTests(unittest.TestCase):
    def setUp(self):
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", kid="k1")

    def test_agentauth_token_decodes_with_pyjwt(self):
        import jwt

        issued = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read", "calendar:read"])
        claims = jwt.decode(issued.token, SECRET, algorithms=["HS256"], audience="api", issuer=ISSUER)
        self.assertEqual(claims["client_id"], "bot")
        self.assertEqual(claims["scope"], "email:read calendar:read")
        self.assertEqual(jwt.get_unverified_header(issued.token), {"alg": "HS256", "typ": "at+jwt", "kid": "k1"})

    def test_pyjwt_token_verifies_here(self):
        import jwt

        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "api", "sub": "u", "client_id": "bot", "scope": "email:read",
                  "jti": "pyjwt-1", "iat": now, "exp": now + 300}
        token = jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "at+jwt", "kid": "k1"})
        verified = self.auth.verify(token, ["email:read"])
        self.assertEqual((verified.sub, verified.agent, verified.jti), ("u", "bot", "pyjwt-1"))

    def test_pyjwt_plain_jwt_type_is_refused(self):
        import jwt

        now = int(time.time())
        token = jwt.encode({"iss": ISSUER, "aud": "api", "sub": "u", "client_id": "b", "scope": "s",
                            "jti": "j", "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
        with self.assertRaises(agentauth.TokenInvalidError):
            self.auth.verify(token)


JOSE_DIR = os.environ.get("AGENTAUTH_JOSE_DIR", "")


@unittest.skipUnless(shutil.which("node") and os.path.isdir(os.path.join(JOSE_DIR, "node_modules", "jose")),
                     "needs node and the jose npm package in $AGENTAUTH_JOSE_DIR (npm install jose)")
class JoseInteropTests(unittest.TestCase):
    def node(self, script, **env):
        done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=JOSE_DIR, capture_output=True,
                              text=True, timeout=60, env={**os.environ, **env})
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def test_agentauth_token_verifies_with_jose(self):
        auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api")
        token = auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token
        out = self.node(
            "import {jwtVerify} from 'jose';"
            "const {payload, protectedHeader} = await jwtVerify(process.env.TOKEN,"
            " new TextEncoder().encode(process.env.SECRET), {algorithms: ['HS256'], issuer: process.env.ISS,"
            " audience: 'api', typ: 'at+jwt'});"
            "console.log(JSON.stringify({payload, protectedHeader}));",
            TOKEN=token, SECRET=SECRET, ISS=ISSUER,
        )
        result = json.loads(out)
        self.assertEqual(result["payload"]["sub"], "user_123")
        self.assertEqual(result["protectedHeader"]["typ"], "at+jwt")

    def test_jose_token_verifies_here(self):
        token = self.node(
            "import {SignJWT} from 'jose';"
            "console.log(await new SignJWT({client_id: 'bot', scope: 'email:read calendar:read'})"
            ".setProtectedHeader({alg: 'HS256', typ: 'at+jwt'}).setIssuer(process.env.ISS).setAudience('api')"
            ".setSubject('user_123').setJti('jose-1').setIssuedAt().setExpirationTime('5m')"
            ".sign(new TextEncoder().encode(process.env.SECRET)));",
            SECRET=SECRET, ISS=ISSUER,
        )
        auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api")
        claims = auth.verify(token, ["calendar:read"])
        self.assertEqual((claims.sub, claims.agent, claims.jti), ("user_123", "bot", "jose-1"))


EDDSA_PEERS = ("jwt", "joserfc", "cryptography")


@unittest.skipIf([m for m in EDDSA_PEERS if importlib.util.find_spec(m) is None],
                 "needs PyJWT, joserfc and cryptography (pip install PyJWT joserfc cryptography)")
class EdDSAInteropTests(unittest.TestCase):
    """EdDSA (RFC 8037) tokens and JWKs both ways with PyJWT and joserfc."""

    def setUp(self):
        # joserfc flags "EdDSA" as superseded by RFC 9864's "Ed25519"; RFC 8037's name is the one used here.
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        self.addCleanup(catcher.__exit__, None, None, None)
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        self.key = agentauth.Ed25519Key.generate()
        self.issuer = agentauth.AgentAuth(signing_key=self.key, kid="ed1", issuer=ISSUER, audience="api")
        self.issued = self.issuer.issue(subject="user_123", agent="bot", scopes=["email:read", "calendar:read"])

    def claims(self, **changes):
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "api", "sub": "user_123", "client_id": "bot", "scope": "email:read",
                  "jti": "peer-1", "iat": now, "exp": now + 300}
        claims.update(changes)
        return claims

    def verifier(self, jwks):
        return agentauth.AgentAuth.verifier(jwks=jwks, issuer=ISSUER, audience="api")

    def test_agentauth_token_verifies_in_pyjwt(self):
        import jwt

        public_jwk = self.issuer.jwks()["keys"][0]
        claims = jwt.decode(self.issued.token, jwt.PyJWK(public_jwk).key, algorithms=["EdDSA"], audience="api",
                            issuer=ISSUER)
        self.assertEqual((claims["sub"], claims["client_id"], claims["jti"]), ("user_123", "bot", self.issued.jti))
        self.assertEqual(jwt.get_unverified_header(self.issued.token), {"alg": "EdDSA", "typ": "at+jwt", "kid": "ed1"})
        forged = self.issued.token[:-4] + ("AAAA" if not self.issued.token.endswith("AAAA") else "BBBB")
        with self.assertRaises(jwt.InvalidSignatureError):
            jwt.decode(forged, jwt.PyJWK(public_jwk).key, algorithms=["EdDSA"], audience="api", issuer=ISSUER)

    def test_agentauth_token_verifies_in_joserfc(self):
        from joserfc import jwk, jwt
        from joserfc.errors import BadSignatureError

        key_set = jwk.KeySet.import_key_set(self.issuer.jwks())  # the published JWKS, as joserfc reads it
        for key in (key_set, jwk.OKPKey.import_key(self.issuer.jwks()["keys"][0])):
            with self.subTest(key=type(key).__name__):
                token = jwt.decode(self.issued.token, key, algorithms=["EdDSA"])
                jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER},
                                      aud={"essential": True, "value": "api"}).validate(token.claims)
                self.assertEqual(token.claims["jti"], self.issued.jti)
                self.assertEqual(token.header, {"alg": "EdDSA", "typ": "at+jwt", "kid": "ed1"})
        other = agentauth.AgentAuth(signing_key=agentauth.Ed25519Key.generate(), kid="ed1", issuer=ISSUER, audience="api")
        with self.assertRaises(BadSignatureError):
            jwt.decode(other.issue(subject="u", agent="b", scopes=["s"]).token, key_set, algorithms=["EdDSA"])

    def test_pyjwt_token_verifies_here(self):
        import jwt
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from jwt.algorithms import OKPAlgorithm

        private = Ed25519PrivateKey.generate()
        public_jwk = dict(OKPAlgorithm.to_jwk(private.public_key(), as_dict=True), kid="pyjwt-ed")
        token = jwt.encode(self.claims(), private, algorithm="EdDSA", headers={"typ": "at+jwt", "kid": "pyjwt-ed"})
        verified = self.verifier({"keys": [public_jwk]}).verify(token, ["email:read"])
        self.assertEqual((verified.sub, verified.agent, verified.jti), ("user_123", "bot", "peer-1"))
        plain_jwt = jwt.encode(self.claims(), private, algorithm="EdDSA", headers={"kid": "pyjwt-ed"})  # typ JWT
        with self.assertRaises(agentauth.TokenInvalidError):
            self.verifier({"keys": [public_jwk]}).verify(plain_jwt)

    def test_joserfc_token_verifies_here(self):
        from joserfc import jwk, jwt

        key = jwk.OKPKey.generate_key("Ed25519", parameters={"kid": "joserfc-ed"})
        token = jwt.encode({"alg": "EdDSA", "typ": "at+jwt", "kid": "joserfc-ed"}, self.claims(), key,
                           algorithms=["EdDSA"])
        jwks = jwk.KeySet([key]).as_dict(private=False)
        self.assertNotIn("d", jwks["keys"][0])
        verified = self.verifier(jwks).verify(token, ["email:read"])
        self.assertEqual((verified.sub, verified.agent, verified.jti), ("user_123", "bot", "peer-1"))
        with self.assertRaises(agentauth.TokenInvalidError):  # a key of the set, another kid's token
            self.verifier(jwks).verify(self.issued.token)

    def test_private_jwks_load_both_ways(self):
        import jwt
        from joserfc import jwk
        from joserfc import jwt as jose_jwt

        # agentauth's private JWK signs in PyJWT; the token verifies here.
        private_jwk = self.key.private_jwk("ed1")
        token = jwt.encode(self.claims(), jwt.PyJWK(private_jwk).key, algorithm="EdDSA",
                           headers={"typ": "at+jwt", "kid": "ed1"})
        self.assertEqual(self.verifier(self.issuer.jwks()).verify(token).jti, "peer-1")
        # joserfc's private JWK loads as an Ed25519Key that signs what joserfc verifies.
        theirs = jwk.OKPKey.generate_key("Ed25519")
        ours = agentauth.Ed25519Key.from_jwk(theirs.as_dict(private=True))
        self.assertIs(ours.is_private, True)
        self.assertEqual(ours.public_jwk()["x"], theirs.as_dict(private=False)["x"])
        issuer = agentauth.AgentAuth(signing_key=ours, kid="k", issuer=ISSUER, audience="api")
        decoded = jose_jwt.decode(issuer.issue(subject="u", agent="b", scopes=["s"]).token, theirs, algorithms=["EdDSA"])
        self.assertEqual(decoded.claims["sub"], "u")


DPOP_PEERS = ("jwt", "joserfc", "cryptography")


@unittest.skipIf([m for m in DPOP_PEERS if importlib.util.find_spec(m) is None],
                 "needs PyJWT, joserfc and cryptography (pip install PyJWT joserfc cryptography)")
class DPoPInteropTests(unittest.TestCase):
    """DPoP proofs (RFC 9449) and ES256 both ways with joserfc and cryptography, independent implementations."""

    URL = "https://api.example/inbox"

    def setUp(self):
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        self.addCleanup(catcher.__exit__, None, None, None)
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        self.clock = Clock()
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", clock=self.clock)

    def bound_token(self, jkt):
        return self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"], dpop_jkt=jkt).token

    def proof_claims(self, token, **changes):
        claims = {"jti": secrets.token_urlsafe(16), "htm": "GET", "htu": self.URL, "iat": int(self.clock.now),
                  "ath": agentauth._access_token_hash(token)}
        claims.update(changes)
        return claims

    def test_joserfc_proofs_verify_here(self):
        from joserfc import jwk, jwt

        for kind, key, alg in (("EC", jwk.ECKey.generate_key("P-256"), "ES256"),
                               ("OKP", jwk.OKPKey.generate_key("Ed25519"), "EdDSA"),
                               ("OKP", jwk.OKPKey.generate_key("Ed25519"), "Ed25519")):
            with self.subTest(alg=alg):
                public = key.as_dict(private=False)
                public.pop("kid", None)
                ours = (agentauth.P256Key if kind == "EC" else agentauth.Ed25519Key).from_jwk(public)
                self.assertEqual(ours.thumbprint(), key.thumbprint())  # RFC 7638, computed by each side
                token = self.bound_token(key.thumbprint())
                proof = jwt.encode({"typ": "dpop+jwt", "alg": alg, "jwk": public}, self.proof_claims(token), key,
                                   algorithms=[alg])
                claims = self.auth.verify(token, dpop_proof=proof, method="GET", url=self.URL)
                self.assertEqual(claims.sub, "user_123")
                with self.assertRaises(agentauth.DPoPProofError):  # once only
                    self.auth.verify(token, dpop_proof=proof, method="GET", url=self.URL)
                other = jwt.encode({"typ": "dpop+jwt", "alg": alg, "jwk": public},
                                   self.proof_claims(token, htu="https://api.example/other"), key, algorithms=[alg])
                with self.assertRaises(agentauth.DPoPProofError):
                    self.auth.verify(token, dpop_proof=other, method="GET", url=self.URL)

    def test_our_proofs_verify_in_joserfc(self):
        from joserfc import jwk, jwt

        with unittest.mock.patch.object(agentauth, "_crypto_ec", lambda: None):
            pure = agentauth.P256Key.generate()  # signs in pure Python
        self.assertEqual(pure.backend, "pure")
        for key in (agentauth.P256Key.generate(), pure, agentauth.Ed25519Key.generate()):
            token = self.bound_token(key.thumbprint())
            proof = agentauth.dpop_proof(key, "POST", self.URL + "?page=2", access_token=token, clock=self.clock)
            header = json.loads(agentauth._b64decode(proof.split(".")[0]))
            theirs = jwk.import_key(header["jwk"])
            with self.subTest(key=type(key).__name__):
                self.assertEqual(theirs.thumbprint(), key.thumbprint())
                decoded = jwt.decode(proof, theirs, algorithms=[header["alg"]])
                self.assertEqual(decoded.header["typ"], "dpop+jwt")
                self.assertEqual((decoded.claims["htm"], decoded.claims["htu"]), ("POST", self.URL))
                self.assertEqual(decoded.claims["ath"], agentauth._access_token_hash(token))
                self.assertEqual(decoded.claims["iat"], int(self.clock.now))

    def test_es256_tokens_interoperate_with_pyjwt_and_joserfc(self):
        import jwt as pyjwt
        from joserfc import jwk, jwt

        issuer = agentauth.AgentAuth(signing_key=agentauth.P256Key.generate(), kid="es1", issuer=ISSUER, audience="api")
        issued = issuer.issue(subject="user_123", agent="bot", scopes=["email:read"])
        public_jwk = issuer.jwks()["keys"][0]
        claims = pyjwt.decode(issued.token, pyjwt.PyJWK(public_jwk).key, algorithms=["ES256"], audience="api",
                              issuer=ISSUER)
        self.assertEqual(claims["jti"], issued.jti)
        decoded = jwt.decode(issued.token, jwk.KeySet.import_key_set(issuer.jwks()), algorithms=["ES256"])
        self.assertEqual(decoded.claims["jti"], issued.jti)
        theirs = jwk.ECKey.generate_key("P-256", parameters={"kid": "joserfc-es"})
        now = int(time.time())
        token = jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": "joserfc-es"},
                           {"iss": ISSUER, "aud": "api", "sub": "u", "client_id": "b", "scope": "s", "jti": "j1",
                            "iat": now, "exp": now + 300}, theirs, algorithms=["ES256"])
        verifier = agentauth.AgentAuth.verifier(jwks=jwk.KeySet([theirs]).as_dict(private=False), issuer=ISSUER,
                                                audience="api")
        self.assertEqual(verifier.verify(token).jti, "j1")
        ours = agentauth.P256Key.from_jwk(theirs.as_dict(private=True))
        self.assertIs(ours.is_private, True)
        self.assertEqual(ours.thumbprint(), theirs.thumbprint())

    def test_joserfc_and_cryptography_proofs_bind_at_the_authorization_servers_token_endpoint(self):
        import hashlib
        import wsgiref.util

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils
        from joserfc import jwk, jwt

        auth = agentauth.AgentAuth(secret=SECRET, issuer="https://auth.example", audience="https://mcp.example/mcp",
                                   clock=self.clock, store=agentauth.MemoryStore())
        oauth = auth.authorization_server_wsgi(authenticate=lambda request: request.cookies.get("user"),
                                               scope_descriptions={"email:read": "Read your email"})
        token_url = "https://auth.example/token"  # the metadata's token_endpoint: what a client's proof names

        def call(method, path, body=b"", content_type="application/x-www-form-urlencoded", query="", **headers):
            environ = {}
            wsgiref.util.setup_testing_defaults(environ)
            environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                            "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)),
                            "wsgi.input": io.BytesIO(body), **headers})
            seen = {}
            data = b"".join(oauth(environ, lambda status, headers: seen.update(status=status, headers=dict(headers))))
            return int(seen["status"][:3]), seen["headers"], data

        self.assertEqual(json.loads(call("GET", "/.well-known/oauth-authorization-server")[2])
                         ["dpop_signing_alg_values_supported"], ["ES256", "EdDSA", "Ed25519"])
        registration = {"redirect_uris": ["https://agent.example/cb"], "grant_types": ["authorization_code", "refresh_token"]}
        client_id = json.loads(call("POST", "/register", json.dumps(registration).encode(), "application/json")[2])["client_id"]
        auth.grant(subject="user_123", agent=client_id, scopes=["email:read"])  # consented before: no page
        verifier = secrets.token_urlsafe(48)
        challenge = agentauth._b64encode(hashlib.sha256(verifier.encode()).digest())

        def token_request(fields, proof):
            status, _, data = call("POST", "/token", urllib.parse.urlencode(fields).encode(), HTTP_DPOP=proof)
            return status, json.loads(data)

        def code():
            query = urllib.parse.urlencode({"response_type": "code", "client_id": client_id, "scope": "email:read",
                                            "code_challenge": challenge, "code_challenge_method": "S256"})
            _, headers, _ = call("GET", "/authorize", query=query, HTTP_COOKIE="user=user_123")
            return urllib.parse.parse_qs(urllib.parse.urlsplit(headers["Location"]).query)["code"][0]

        def claims():
            return {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": token_url, "iat": int(self.clock.now)}

        theirs = jwk.ECKey.generate_key("P-256")
        public = theirs.as_dict(private=False)
        public.pop("kid", None)

        def joserfc_proof():
            return jwt.encode({"typ": "dpop+jwt", "alg": "ES256", "jwk": public}, claims(), theirs, algorithms=["ES256"])

        private = ec.generate_private_key(ec.SECP256R1())
        numbers = private.public_key().public_numbers()
        crypto_jwk = {"kty": "EC", "crv": "P-256", "x": agentauth._b64encode(numbers.x.to_bytes(32, "big")),
                      "y": agentauth._b64encode(numbers.y.to_bytes(32, "big"))}

        def cryptography_proof():
            segments = ".".join(agentauth._b64encode(json.dumps(part).encode()) for part in
                                ({"typ": "dpop+jwt", "alg": "ES256", "jwk": crypto_jwk}, claims()))
            r, s = utils.decode_dss_signature(private.sign(segments.encode("ascii"), ec.ECDSA(hashes.SHA256())))
            return f"{segments}.{agentauth._b64encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

        for name, make_proof, thumbprint in (("joserfc", joserfc_proof, theirs.thumbprint()),
                                             ("cryptography", cryptography_proof, jwk.import_key(crypto_jwk).thumbprint())):
            with self.subTest(proofs_by=name):
                status, answer = token_request({"grant_type": "authorization_code", "code": code(), "client_id": client_id,
                                                "code_verifier": verifier}, make_proof())
                self.assertEqual((status, answer["token_type"]), (200, "DPoP"), answer)
                token = answer["access_token"]
                self.assertEqual(json.loads(agentauth._b64decode(token.split(".")[1]))["cnf"], {"jkt": thumbprint})
                with self.assertRaises(agentauth.DPoPProofError):  # bound: never a bearer token
                    auth.verify(token)
                refresh = {"grant_type": "refresh_token", "refresh_token": answer["refresh_token"], "client_id": client_id}
                stolen = agentauth.dpop_proof(agentauth.P256Key.generate(), "POST", token_url, clock=self.clock)
                status, refused = token_request(refresh, stolen)  # another key than the refresh token's
                self.assertEqual((status, refused["error"]), (400, "invalid_grant"))
                status, refused = token_request(refresh, stolen)  # the same proof again: a replay
                self.assertEqual((status, refused["error"]), (400, "invalid_dpop_proof"))
                status, renewed = token_request(refresh, make_proof())
                self.assertEqual((status, renewed["token_type"]), (200, "DPoP"), renewed)
                self.assertEqual(json.loads(agentauth._b64decode(renewed["access_token"].split(".")[1]))["cnf"],
                                 {"jkt": thumbprint})

    def test_es256_signatures_interoperate_with_cryptography(self):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        private = ec.generate_private_key(ec.SECP256R1())
        numbers = private.public_key().public_numbers()
        public = agentauth.P256Key.from_public_point(numbers.x, numbers.y)
        token = self.bound_token(public.thumbprint())
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": {k: v for k, v in public.public_jwk().items()
                                                             if k in ("kty", "crv", "x", "y")}}
        segments = ".".join(agentauth._b64encode(json.dumps(part).encode()) for part in (header, self.proof_claims(token)))
        r, s = utils.decode_dss_signature(private.sign(segments.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        proof = f"{segments}.{agentauth._b64encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
        self.assertEqual(self.auth.verify(token, dpop_proof=proof, method="GET", url=self.URL).agent, "bot")
        ours = agentauth.P256Key.from_private_value(private.private_numbers().private_value)
        message = b"signed here, verified by OpenSSL"
        signature = ours.sign(message)
        private.public_key().verify(
            utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")),
            message, ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------------------
# Web frameworks
# ---------------------------------------------------------------------------


class NoTracebacks(logging.Handler):
    """Collect log records that carry an exception (a traceback): a refusal must make none.

    (Django still logs each 5xx answer's status line at ERROR, without a traceback.)
    """

    def __init__(self, test):
        super().__init__(logging.DEBUG)
        self.records = []
        # The root logger, and uvicorn's, which does not propagate; levels are
        # left alone (a traceback is logged at ERROR).
        for logger in (logging.getLogger(), logging.getLogger("uvicorn")):
            logger.addHandler(self)
            test.addCleanup(logger.removeHandler, self)
        test.addCleanup(lambda: test.assertEqual([r.getMessage() for r in self.records], []))

    def emit(self, record):
        if record.exc_info:
            self.records.append(record)


class FrameworkContract:
    """One protected app per framework, set up as the README shows (at most three lines).

    ``get(path, token)`` and ``post(path, token)`` return (status, headers, body).
    """

    def setUp(self):
        NoTracebacks(self)
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="mail-api")
        self.token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token
        self.make_app()

    def test_granted_route_runs_with_the_claims(self):
        status, _, body = self.get("/inbox", self.token)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"subject": "user_123", "agent": "bot"})

    def test_a_route_outside_the_grant_is_403_like_the_middleware(self):
        status, headers, body = self.post("/send", self.token)
        self.assertEqual(status, 403)
        self.assertEqual(headers["WWW-Authenticate"], 'Bearer realm="mail-api", error="insufficient_scope"')
        self.assertEqual(json.loads(body), {"error": "insufficient_scope",
                                            "error_description": "the access token does not grant this request"})
        self.assertEqual(headers["Cache-Control"], "no-store")

    def test_missing_forged_and_revoked_tokens_are_401(self):
        status, headers, _ = self.get("/inbox", None)
        self.assertEqual((status, headers["WWW-Authenticate"]), (401, 'Bearer realm="mail-api"'))
        forged = self.token[:-2] + ("AA" if not self.token.endswith("AA") else "BA")
        status, headers, _ = self.get("/inbox", forged)
        self.assertEqual((status, headers["WWW-Authenticate"]), (401, 'Bearer realm="mail-api", error="invalid_token"'))
        self.auth.revoke(agent="bot")
        self.assertEqual(self.get("/inbox", self.token)[0], 401)

    def test_a_store_down_inside_a_view_is_503(self):
        status, headers, body = self.get("/store-down", self.token)
        self.assertEqual(status, 503)
        self.assertEqual(headers["Retry-After"], "1")
        self.assertEqual(json.loads(body)["error"], "temporarily_unavailable")


def route_bodies(auth):
    """The views every framework test serves, as plain functions."""

    def inbox():
        claims = agentauth.current_claims()
        return {"subject": claims.sub, "agent": claims.agent}

    def send():
        return {"sent": True}

    def store_down():
        raise agentauth.StoreUnavailableError("the store is down")

    return auth.require("email:read")(inbox), auth.require("email:send")(send), store_down


@installed("flask")
class FlaskTests(FrameworkContract, unittest.TestCase):
    def make_app(self):
        from flask import Flask, jsonify

        auth = self.auth
        app = Flask(__name__)
        auth.protect(app)

        @app.get("/inbox")
        @auth.require("email:read")
        def inbox():
            claims = agentauth.current_claims()
            return jsonify(subject=claims.sub, agent=claims.agent)

        @app.post("/send")
        @auth.require("email:send")
        def send():
            return jsonify(sent=True)

        @app.get("/store-down")
        def store_down():
            raise agentauth.StoreUnavailableError("the store is down")

        self.client = app.test_client()

    def call(self, method, path, token):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = self.client.open(path, method=method, headers=headers)
        return response.status_code, response.headers, response.data

    def get(self, path, token):
        return self.call("GET", path, token)

    def post(self, path, token):
        return self.call("POST", path, token)


class AsgiClientMixin:
    def call(self, method, path, token):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = self.client.request(method, path, headers=headers)
        return response.status_code, response.headers, response.content

    def get(self, path, token):
        return self.call("GET", path, token)

    def post(self, path, token):
        return self.call("POST", path, token)


@installed("fastapi", "httpx")
class FastApiTests(AsgiClientMixin, FrameworkContract, unittest.TestCase):
    def make_app(self):
        from fastapi import FastAPI, Request
        from fastapi.testclient import TestClient

        auth = self.auth
        app = FastAPI()
        auth.protect(app)

        @app.get("/inbox")
        @auth.require("email:read")
        async def inbox(request: Request, limit: int = 2):
            claims = request.scope["state"]["agentauth.claims"]
            return {"subject": claims.sub, "agent": agentauth.current_claims().agent}

        @app.post("/send")
        @auth.require("email:send")
        def send():  # a sync route: FastAPI runs it in a thread
            return {"sent": True}

        @app.get("/store-down")
        async def store_down():
            raise agentauth.StoreUnavailableError("the store is down")

        self.client = TestClient(app)  # re-raises any exception that became a 500

    def test_query_parameters_and_wildcard_grants_work(self):
        wide = self.auth.issue(subject="u", agent="bot", scopes=["email:*"]).token
        self.assertEqual(self.post("/send", wide)[0], 200)


@installed("starlette", "httpx")
class StarletteTests(AsgiClientMixin, FrameworkContract, unittest.TestCase):
    def make_app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
        from starlette.testclient import TestClient

        inbox, send, store_down = route_bodies(self.auth)

        async def inbox_route(request):
            return JSONResponse(inbox())

        async def send_route(request):
            return JSONResponse(send())

        def store_down_route(request):
            return JSONResponse(store_down())

        app = Starlette(routes=[Route("/inbox", inbox_route), Route("/send", send_route, methods=["POST"]),
                                Route("/store-down", store_down_route)])
        self.auth.protect(app)
        self.client = TestClient(app)


@installed("django")
class DjangoTests(FrameworkContract, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import django
        from django.conf import settings

        # A URL module and a middleware path built here: settings name them by dotted path.
        module = types.ModuleType("agentauth_django_test")
        sys.modules[module.__name__] = module
        cls.module = module
        if not settings.configured:
            settings.configure(DEBUG=False, ALLOWED_HOSTS=["testserver"], ROOT_URLCONF=module.__name__,
                               SECRET_KEY=secrets.token_urlsafe(32), USE_TZ=True,
                               MIDDLEWARE=[f"{module.__name__}.agentauth_middleware"])
            django.setup()

    def make_app(self):
        from django.http import JsonResponse
        from django.test import Client
        from django.urls import path

        inbox, send, store_down = route_bodies(self.auth)
        self.module.agentauth_middleware = self.auth.django()
        self.module.urlpatterns = [
            path("inbox", lambda request: JsonResponse(inbox())),
            path("send", lambda request: JsonResponse(send())),
            path("store-down", lambda request: JsonResponse(store_down())),
        ]
        from django.urls import clear_url_caches

        clear_url_caches()
        self.client = Client()  # re-raises any exception a view left unanswered

    def call(self, method, path, token):
        from django.test.utils import override_settings

        headers = {} if token is None else {"HTTP_AUTHORIZATION": f"Bearer {token}"}
        with override_settings(MIDDLEWARE=[f"{self.module.__name__}.agentauth_middleware"]):  # this test's instance
            response = getattr(self.client, method.lower())(path, **headers)
        return response.status_code, response.headers, response.content

    def get(self, path, token):
        return self.call("GET", path, token)

    def post(self, path, token):
        return self.call("POST", path, token)


@installed("mcp", "uvicorn")
class McpBehindAsgiMiddlewareTests(unittest.TestCase):
    """An mcp 2.x server wrapped by auth.asgi alone: a refused tool is an error result, no traceback."""

    def test_a_refused_tool_is_an_error_result_and_logs_no_traceback(self):
        if mcp_major() < 2:
            self.skipTest("mcp 2.x only (CI's first virtualenv)")
        from mcp.server.mcpserver import MCPServer

        NoTracebacks(self)
        auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="mail-api")

        def make_app(base):
            server = MCPServer(name="mail", log_level="WARNING")

            @server.tool()
            @auth.require("email:read")
            def read_inbox() -> str:
                return f"inbox of {agentauth.current_claims().sub}"

            @server.tool()
            @auth.require("email:send")
            def send_email(to: str) -> str:
                return f"sent to {to}"

            return auth.asgi(server.streamable_http_app(host="127.0.0.1"))

        server = UvicornThread(make_app)
        self.addCleanup(server.stop)
        url = f"{server.base}/mcp"
        token = auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token
        status, headers, _ = mcp_initialize(url, {"Authorization": f"Bearer {token}"})
        self.assertEqual(status, 200)
        session = headers.get("mcp-session-id")
        mcp_rpc(url, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "send_email", "arguments": {"to": "x"}}}
        _, _, answer = mcp_rpc(url, token, call, session)
        self.assertIs(answer["result"]["isError"], True)
        self.assertNotIn("email:send", answer["result"]["content"][0]["text"])
        call["params"] = {"name": "read_inbox", "arguments": {}}
        _, _, answer = mcp_rpc(url, token, call, session)
        self.assertEqual(answer["result"]["content"][0]["text"], "inbox of user_123")
        self.assertEqual(http("POST", url, {"Content-Type": "application/json"}, b"{}")[0], 401)


# ---------------------------------------------------------------------------
# Docs: the blocks marked <!-- test: integration --> (see DocBlockTests in test_agentauth.py)
# ---------------------------------------------------------------------------

#: Run in a subprocess, in the block's temporary directory: import the block as
#: the module "doc_block" (so an `if __name__ == "__main__":` server does not
#: start), print what it printed, then exercise the app it defines, if any:
#: every GET route refuses a request without a token (401) and serves one with
#: a token granting "*" (200); an MCP server refuses an unauthenticated call.
DOC_BLOCK_DRIVER = r"""
import contextlib, importlib, io, sys
sys.path[:0] = [".", sys.argv[1]]
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    module = importlib.import_module("doc_block")
sys.stdout.write(printed.getvalue())
auth, app = getattr(module, "auth", None), getattr(module, "app", None)
checked = []


def check(get, path, token):
    status = get(path, None)
    assert status == 401, (path, status)
    status = get(path, token)
    assert status == 200, (path, status)
    checked.append(path)


if auth is not None:
    token = auth.issue(subject="user_123", agent="agent_research_bot", scopes=["*"]).token
    bearer = lambda t: {} if t is None else {"Authorization": f"Bearer {t}"}
    if app is not None and hasattr(app, "test_client"):  # Flask
        client = app.test_client()
        for rule in app.url_map.iter_rules():
            if "GET" in rule.methods and not rule.arguments and rule.endpoint != "static":
                check(lambda p, t: client.get(p, headers=bearer(t)).status_code, rule.rule, token)
    elif app is not None and hasattr(app, "routes"):  # FastAPI, Starlette
        from starlette.testclient import TestClient
        client = TestClient(app)
        for route in app.routes:
            path = getattr(route, "path", "")
            if "GET" in (getattr(route, "methods", None) or ()) and "{" not in path and not path.startswith(("/docs", "/redoc", "/openapi")):
                check(lambda p, t: client.get(p, headers=bearer(t)).status_code, path, token)
    elif hasattr(module, "urlpatterns"):  # Django
        import django
        from django.test import Client
        django.setup()
        client = Client()
        for pattern in module.urlpatterns:
            path = "/" + str(pattern.pattern)
            get = lambda p, t: client.get(p, HTTP_HOST="127.0.0.1", **({} if t is None else {"HTTP_AUTHORIZATION": f"Bearer {t}"})).status_code
            check(get, path, token)
    elif hasattr(module, "server"):  # an MCP server
        from starlette.testclient import TestClient
        from urllib.parse import urlsplit
        resource = urlsplit(auth.audience)
        mcp_app = module.server.streamable_http_app(host=resource.hostname)
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "doc", "version": "0"}}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        with TestClient(mcp_app, base_url=f"{resource.scheme}://{resource.netloc}") as client:
            get = lambda p, t: client.post(p, json=body, headers={**headers, **bearer(t)}).status_code
            check(get, resource.path, token)
    if any(hasattr(module, name) for name in ("app", "urlpatterns", "server")):
        assert checked, "the block defines an app, but no route this driver could call"
"""


@installed("flask", "fastapi", "httpx", "starlette", "django", "mcp", "uvicorn", "jwt", "redis")
class DocBlockIntegrationTests(unittest.TestCase):
    """Every ```python block marked <!-- test: integration --> runs, prints its ```text block, and its app is protected."""

    def test_every_integration_block(self):
        here = os.path.dirname(os.path.abspath(agentauth.__file__))
        blocks = [block for path in doc_files() for block in doc_blocks(path) if block.marker == "integration"]
        self.assertGreaterEqual(len(blocks), 5)
        for block in blocks:
            where = f"{os.path.relpath(block.path, here)}:{block.line}"
            with self.subTest(block=where), tempfile.TemporaryDirectory() as cwd:
                with open(os.path.join(cwd, "doc_block.py"), "w", encoding="utf-8") as file:
                    file.write(block.code)
                env = dict(os.environ, AGENTAUTH_SECRET=secrets.token_urlsafe(32))
                result = subprocess.run([sys.executable, "-c", DOC_BLOCK_DRIVER, here], cwd=cwd, env=env,
                                        capture_output=True, text=True, timeout=120)
                self.assertEqual(result.returncode, 0, f"{where}:\n{result.stderr}")
                if block.expected is not None:
                    assert_output_matches(self, result.stdout, block.expected, where)


# ---------------------------------------------------------------------------
# MCP: the official SDK and FastMCP, over streamable HTTP on 127.0.0.1
# ---------------------------------------------------------------------------


def mcp_initialize(url, headers):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).encode()
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **headers}
    return http("POST", url, headers, body)


def mcp_major():
    from importlib.metadata import version

    return int(version("mcp").split(".")[0])


def sdk_server(auth, url):
    """The official SDK's server for ``url``, verifying with auth.mcp(): MCPServer (mcp 2.x) or FastMCP (1.x)."""
    from mcp.server.auth.settings import AuthSettings

    settings = AuthSettings(issuer_url="https://auth.example.com", resource_server_url=url, validate_token_resource=True)
    if mcp_major() >= 2:
        from mcp.server.mcpserver import MCPServer

        return MCPServer(name="mail", log_level="WARNING", token_verifier=auth.mcp(), auth=settings)
    from mcp.server.fastmcp import FastMCP

    return FastMCP("mail", log_level="WARNING", token_verifier=auth.mcp(), auth=settings, host="127.0.0.1")


def sdk_http_app(server):
    """The server's streamable HTTP ASGI app, on loopback (the two SDK majors spell it differently)."""
    return server.streamable_http_app(host="127.0.0.1") if mcp_major() >= 2 else server.streamable_http_app()


def mcp_rpc(url, token, body, session_id=None):
    """One JSON-RPC message over streamable HTTP, as raw as a client can send it."""
    headers = {"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-06-18"}
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    status, response_headers, raw = http("POST", url, {"Accept": "application/json, text/event-stream",
                                                        "Content-Type": "application/json", **headers},
                                         json.dumps(body).encode())
    text = raw.decode()
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return status, response_headers, json.loads(data[-1] if data else text) if text.strip() else None


def mcp_dpop_rpc(url, token, key, body, session_id=None, *, proof=None, scheme="DPoP"):
    """One JSON-RPC message with ``Authorization: DPoP`` and a fresh proof (or ``proof``); (status, headers, answer)."""
    headers = {"Authorization": f"{scheme} {token}", "MCP-Protocol-Version": "2025-06-18",
               "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if key is not None or proof is not None:
        headers["DPoP"] = proof or agentauth.dpop_proof(key, "POST", url, access_token=token)
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    status, response_headers, raw = http("POST", url, headers, json.dumps(body).encode())
    text = raw.decode()
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return status, response_headers, json.loads(data[-1] if data else text) if text.strip() else None


@installed("mcp", "uvicorn")
class McpDPoPTests(unittest.TestCase):
    """An MCP server (the official SDK, token_verifier=auth.mcp()) behind auth.asgi(): DPoP-bound agent tokens."""

    @classmethod
    def setUpClass(cls):
        def make_app(base):
            cls.url = f"{base}/mcp"
            auth = cls.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience=cls.url)
            server = sdk_server(auth, cls.url)

            @server.tool()
            @auth.require("email:read")
            def read_inbox(limit: int = 2) -> str:
                claims = agentauth.current_claims()
                return f"{limit} messages of {claims.sub} for {claims.agent}, key {claims.raw['cnf']['jkt'][:8]}"

            inner = sdk_http_app(server)
            return auth.asgi(inner)  # checks DPoP, then hands the SDK a Bearer header for the verified token

        cls.server = UvicornThread(make_app)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.key = agentauth.P256Key.generate()
        self.token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"],
                                     dpop_jkt=self.key.thumbprint()).token

    def initialize(self):
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
        status, headers, _ = mcp_dpop_rpc(self.url, self.token, self.key, initialize)
        self.assertEqual(status, 200)
        session = headers["Mcp-Session-Id"]
        status, _, _ = mcp_dpop_rpc(self.url, self.token, self.key, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                                    session)
        self.assertLess(status, 300)
        return session

    def test_a_bound_token_with_fresh_proofs_calls_the_tool(self):
        session = self.initialize()
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "read_inbox", "arguments": {"limit": 3}}}
        for request_id in (2, 3):  # every request its own proof
            status, _, answer = mcp_dpop_rpc(self.url, self.token, self.key, dict(call, id=request_id), session)
            self.assertEqual(status, 200)
            self.assertFalse(answer["result"]["isError"])
            self.assertEqual(answer["result"]["content"][0]["text"],
                             f"3 messages of user_123 for bot, key {self.key.thumbprint()[:8]}")

    def test_the_stolen_token_is_refused_every_way(self):
        session = self.initialize()
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "read_inbox", "arguments": {}}}
        replayed = agentauth.dpop_proof(self.key, "POST", self.url, access_token=self.token)
        status, _, _ = mcp_dpop_rpc(self.url, self.token, None, call, session, proof=replayed)
        self.assertEqual(status, 200)
        thief = agentauth.P256Key.generate()
        for label, kwargs in (("bearer", dict(key=None, scheme="Bearer")), ("no proof", dict(key=None)),
                              ("thief's key", dict(key=thief)), ("replayed proof", dict(key=None, proof=replayed))):
            with self.subTest(attempt=label):
                status, headers, _ = mcp_dpop_rpc(self.url, self.token, body=call, session_id=session, **kwargs)
                self.assertEqual(status, 401)
                self.assertTrue(headers["WWW-Authenticate"].startswith("DPoP "), headers["WWW-Authenticate"])
                self.assertIn('error="invalid_dpop_proof"', headers["WWW-Authenticate"])


@installed("mcp", "uvicorn")
class McpSdkTests(unittest.TestCase):
    """The official SDK: MCPServer in mcp 2.x, FastMCP in mcp 1.x (CI runs both)."""

    @classmethod
    def setUpClass(cls):
        def make_app(base):
            cls.url = f"{base}/mcp"
            auth = cls.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience=cls.url)
            server = sdk_server(auth, cls.url)

            @server.tool()
            @auth.require("email:read")
            def read_inbox(limit: int = 2) -> str:
                claims = agentauth.current_claims()
                return f"{limit} messages of {claims.sub} for {claims.agent}"

            @server.tool()
            @auth.require("email:send")
            async def send_email(to: str) -> str:
                return f"sent to {to}"

            return sdk_http_app(server)

        cls.server = UvicornThread(make_app)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def call_tools(self, token, calls):
        """Call tools through the SDK's own client."""
        from mcp import ClientSession

        headers = {"Authorization": f"Bearer {token}"}

        async def session_calls(read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return [await session.call_tool(name, arguments) for name, arguments in calls]

        async def run():
            if mcp_major() >= 2:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(20, read=30)) as client:
                    async with streamable_http_client(self.url, http_client=client) as (read, write):
                        return await session_calls(read, write)
            from mcp.client.streamable_http import streamablehttp_client

            async with streamablehttp_client(self.url, headers=headers, timeout=20) as (read, write, _):
                return await session_calls(read, write)

        results = asyncio.run(run())
        for result in results:  # mcp 1.x names it isError
            result.is_error = getattr(result, "is_error", getattr(result, "isError", None))
        return results

    def test_each_call_in_a_session_is_judged_by_its_own_token(self):
        # mcp 1.x runs tools in the task of the request that opened the
        # session: require() must read the current message's token.
        broad = self.auth.issue(subject="user_7", agent="bot", scopes=["email:*"]).token
        narrow = self.auth.issue(subject="user_7", agent="bot", scopes=["email:read"]).token
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
        status, headers, _ = mcp_rpc(self.url, broad, initialize)
        self.assertEqual(status, 200)
        session = headers["Mcp-Session-Id"]
        mcp_rpc(self.url, broad, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "send_email", "arguments": {"to": "a"}}}
        _, _, answer = mcp_rpc(self.url, broad, call, session)
        self.assertFalse(answer["result"]["isError"])
        _, _, answer = mcp_rpc(self.url, narrow, dict(call, id=3), session)
        self.assertTrue(answer["result"]["isError"])
        self.assertIn("does not cover", answer["result"]["content"][0]["text"])

    def test_good_token_calls_the_tool_and_the_tool_sees_the_claims(self):
        token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token
        (result,) = self.call_tools(token, [("read_inbox", {"limit": 3})])
        self.assertFalse(result.is_error)
        self.assertEqual(result.content[0].text, "3 messages of user_123 for bot")

    def test_wrong_scope_is_a_tool_error_naming_no_scope(self):
        token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token
        (result,) = self.call_tools(token, [("send_email", {"to": "a@example.com"})])
        self.assertTrue(result.is_error)
        self.assertNotIn("email", result.content[0].text.replace("send_email", ""))
        self.assertIn("does not cover", result.content[0].text)

    def test_wildcard_grant_covers_both_tools(self):
        token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:*"]).token
        results = self.call_tools(token, [("read_inbox", {}), ("send_email", {"to": "a@example.com"})])
        self.assertEqual([r.is_error for r in results], [False, False])

    def test_missing_forged_revoked_and_foreign_tokens_get_401_with_metadata(self):
        token = self.auth.issue(subject="user_9", agent="bot", scopes=["email:read"]).token
        self.auth.revoke(token)
        other = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="https://another.example/mcp")
        foreign = other.issue(subject="u", agent="bot", scopes=["email:read"]).token
        for label, headers in (("missing", {}), ("forged", {"Authorization": "Bearer x.y.z"}),
                               ("revoked", {"Authorization": f"Bearer {token}"}),
                               ("foreign audience", {"Authorization": f"Bearer {foreign}"})):
            with self.subTest(label):
                status, response_headers, _ = mcp_initialize(self.url, headers)
                self.assertEqual(status, 401)
                challenge = response_headers["WWW-Authenticate"]
                self.assertIn('error="invalid_token"', challenge)
                self.assertIn("resource_metadata=", challenge)

# ---------------------------------------------------------------------------
# The authorization server and the official MCP SDK client
# ---------------------------------------------------------------------------


def load_example(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HeadlessUser:
    """The user's browser, headless: signed in with the toy login's cookie, it answers the consent page.

    ``untick`` scopes are unticked before Allow; ``decision`` is "allow" or "deny".
    Each authorization URL it was sent to, and each consent page it saw, is kept.
    """

    def __init__(self, base, cookie):
        self.base = base
        self.cookie = cookie
        self.untick = ()
        self.decision = "allow"
        self.urls = []
        self.pages = 0
        self.result = None

    async def redirect_handler(self, url):
        import html as html_module
        import re
        import urllib.parse

        import httpx2

        self.urls.append(url)
        headers = {"Cookie": self.cookie}
        async with httpx2.AsyncClient(follow_redirects=False, timeout=20) as browser:
            page = await browser.get(url, headers=headers)
            if page.status_code == 200:  # the consent page: untick, then answer
                self.pages += 1
                text = page.text
                fields = {k: html_module.unescape(v) for k, v in
                          re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', text)}
                scopes = re.findall(r'name="approved_scope" value="([^"]+)" checked', text)
                body = urllib.parse.urlencode(
                    dict(fields, decision=self.decision, approved_scope=[s for s in scopes if s not in self.untick]),
                    doseq=True)
                page = await browser.post(self.base + "/authorize", content=body, headers={
                    **headers, "Content-Type": "application/x-www-form-urlencoded"})
            assert page.status_code == 303, (page.status_code, page.text)
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.headers["location"]).query))
        self.result = query

    async def callback_handler(self):
        from mcp.shared.auth import AuthorizationCodeResult

        query, self.result = self.result, None
        if "code" not in query:
            raise RuntimeError(f"authorization refused: {query.get('error')}")
        return AuthorizationCodeResult(code=query["code"], state=query.get("state"), iss=query.get("iss"))


class MemoryTokenStorage:
    def __init__(self):
        self.tokens = None
        self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info):
        self.client_info = client_info


@installed("mcp", "uvicorn", "httpx2")
class McpOAuthTests(unittest.TestCase):
    """examples/mcp_oauth_server.py with the official SDK's OAuthClientProvider, driven headlessly."""

    REDIRECT = "http://127.0.0.1:53682/callback"  # the SDK never listens: the headless user hands over the code

    def start(self, **options):
        example = load_example("mcp_oauth_server")
        built = {}

        def make_app(base):
            built["app"], built["auth"], built["login"] = example.build(base, secret=SECRET, **options)
            return built["app"]

        server = UvicornThread(make_app)
        self.addCleanup(server.stop)
        self.base, self.auth, self.login = server.base, built["auth"], built["login"]
        self.url = self.base + "/mcp"
        self.user = HeadlessUser(self.base, self.login.cookie("alice").split(";")[0])
        self.storage = MemoryTokenStorage()

    def provider(self, client_metadata_url=None):
        from mcp.client.auth import OAuthClientProvider
        from mcp.shared.auth import OAuthClientMetadata

        metadata = OAuthClientMetadata(client_name="Test agent", redirect_uris=[self.REDIRECT],
                                       grant_types=["authorization_code", "refresh_token"],
                                       response_types=["code"], token_endpoint_auth_method="none")
        return OAuthClientProvider(server_url=self.url, client_metadata=metadata, storage=self.storage,
                                   redirect_handler=self.user.redirect_handler,
                                   callback_handler=self.user.callback_handler,
                                   client_metadata_url=client_metadata_url)

    def call(self, provider, *calls):
        """Open a session with the SDK's client and call tools; return the results."""
        import httpx2
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        async def run():
            async with httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(20, read=30)) as client:
                async with streamable_http_client(self.url, http_client=client) as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        return [await session.call_tool(name, arguments) for name, arguments in calls]

        return asyncio.run(asyncio.wait_for(run(), 60))

    def connect_and_step_up(self, client_metadata_url=None):
        provider = self.provider(client_metadata_url)
        # 401, discovery, registration (or the metadata document), consent with email:send unticked, code, token.
        self.user.untick = ("email:send",)
        (result,) = self.call(provider, ("read_inbox", {"limit": 1}))
        self.assertFalse(result.is_error, result)
        client_id = self.storage.client_info.client_id
        self.assertEqual(result.content[0].text, f"1 newest messages of alice, read by {client_id}")
        self.assertEqual(self.storage.tokens.scope, "email:read")
        self.assertEqual(self.user.pages, 1)
        authorize = urllib.parse.parse_qs(urllib.parse.urlsplit(self.user.urls[0]).query)
        self.assertEqual((authorize["code_challenge_method"], authorize["resource"]), (["S256"], [self.url]))
        claims = self.auth.verify(self.storage.tokens.access_token)
        self.assertEqual((claims.sub, claims.agent, claims.scopes), ("alice", client_id, ("email:read",)))

        # A tool outside the grant: refused with the scope challenge (403, scope="email:read email:send").
        status, headers, _ = mcp_rpc(self.url, self.storage.tokens.access_token, {
            "jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "send_email", "arguments": {"to": "b"}}})
        self.assertEqual(status, 403)
        self.assertIn('scope="email:read email:send"', headers["WWW-Authenticate"])

        # Step-up: the SDK client re-authorizes for the union; this time the user allows it all.
        self.user.untick = ()
        (result,) = self.call(provider, ("send_email", {"to": "bob@example.com"}))
        self.assertFalse(result.is_error, result)
        self.assertEqual(result.content[0].text, "sent to bob@example.com")
        self.assertEqual(self.user.pages, 2)
        self.assertEqual(set(self.storage.tokens.scope.split()), {"email:read", "email:send"})
        grant = self.auth.grants(subject="alice")[0]
        self.assertEqual((grant.agent, grant.scopes), (client_id, ("email:read", "email:send")))

        # The user sees the agent on the connected-agents page; after disconnect the next call is
        # refused and refreshing fails.
        status, _, page = http("GET", self.base + "/account/agents", {"Cookie": self.user.cookie})
        self.assertEqual(status, 200)
        self.assertIn(b"Test agent", page)
        self.assertTrue(self.auth.disconnect(subject="alice", agent=client_id))
        status, _, _ = mcp_rpc(self.url, self.storage.tokens.access_token, {
            "jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "read_inbox", "arguments": {}}})
        self.assertEqual(status, 401)
        form = urllib.parse.urlencode({"grant_type": "refresh_token", "client_id": client_id,
                                       "refresh_token": self.storage.tokens.refresh_token}).encode()
        status, _, body = http("POST", self.base + "/token", {"Content-Type": "application/x-www-form-urlencoded"}, form)
        self.assertEqual((status, json.loads(body)["error"]), (400, "invalid_grant"))
        return client_id

    def test_dynamic_registration(self):
        self.start()
        client_id = self.connect_and_step_up()
        self.assertFalse(client_id.startswith("http"))

    def test_client_id_metadata_document(self):
        self.start(allow_private_client_documents=True)
        document_url = self.serve_client_document()
        client_id = self.connect_and_step_up(client_metadata_url=document_url)
        self.assertEqual(client_id, document_url)

    def serve_client_document(self):
        """Serve this client's metadata document over https on loopback (a throwaway certificate)."""
        import http.server
        import ssl

        directory = tempfile.mkdtemp(prefix="agentauth-cimd-")
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        owner = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps(owner["document"]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=300")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        url = f"https://127.0.0.1:{httpd.server_address[1]}/oauth/client.json"
        owner["document"] = {"client_id": url, "client_name": "Test agent", "redirect_uris": [self.REDIRECT],
                             "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                             "token_endpoint_auth_method": "none"}
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(httpd.server_close)
        self.addCleanup(httpd.shutdown)
        # The authorization server's fetch trusts this certificate (and only it) during the test.
        previous = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = cert
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if previous is None
                        else os.environ.__setitem__("SSL_CERT_FILE", previous))
        return url

def conformance_missing():
    """Why the MCP conformance suite cannot run here, or None (.ci/run installs it with Node 22)."""
    directory = os.environ.get("AGENTAUTH_CONFORMANCE_DIR")
    if not directory or not os.path.exists(os.path.join(directory, "node_modules", ".bin", "node")):
        return ("needs the MCP conformance suite: npm install node@22 @modelcontextprotocol/conformance"
                " in a folder named by AGENTAUTH_CONFORMANCE_DIR")
    if importlib.util.find_spec("mcp") is None or importlib.util.find_spec("uvicorn") is None:
        return "needs mcp and uvicorn (pip install mcp uvicorn)"
    return None


@unittest.skipIf(conformance_missing(), conformance_missing() or "")
class McpConformanceTests(unittest.TestCase):
    """The MCP project's conformance suite, its authorization command, against examples/mcp_oauth_server.py."""

    def test_the_authorization_scenarios_pass(self):
        directory = os.environ["AGENTAUTH_CONFORMANCE_DIR"]
        example = load_example("mcp_oauth_server")
        built = {}

        def make_app(base):
            built["app"], built["auth"], built["login"] = example.build(base, secret=SECRET)
            return built["app"]

        server = UvicornThread(make_app)
        self.addCleanup(server.stop)
        base = server.base
        with socket.socket() as probe:  # a free port for the suite's callback server
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        callback = f"http://127.0.0.1:{port}/callback"
        registration = json.dumps({"redirect_uris": [callback], "client_name": "MCP conformance"}).encode()
        status, _, body = http("POST", base + "/register", {"Content-Type": "application/json"}, registration)
        self.assertEqual(status, 201)
        client_id = json.loads(body)["client_id"]
        output = tempfile.mkdtemp(prefix="agentauth-conformance-")
        self.addCleanup(shutil.rmtree, output, True)
        command = [os.path.join(directory, "node_modules", ".bin", "node"),
                   os.path.join(directory, "node_modules", "@modelcontextprotocol", "conformance", "dist", "index.js"),
                   "authorization", "--url", base, "--client-id", client_id, "--resource", base + "/mcp",
                   "--port", str(port), "--output-dir", output]
        suite = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(suite.stdout.close)
        self.addCleanup(lambda: suite.poll() is None and suite.kill())
        lines = []
        # The suite prints the authorization URL for a person to open: the
        # signed-in user (the toy login's cookie) answers the consent page.
        for line in suite.stdout:
            lines.append(line)
            if line.startswith(base + "/authorize?"):
                self.consent(line.strip(), built["login"].cookie("alice").split(";")[0])
                break
        lines.extend(suite.stdout)
        self.assertEqual(suite.wait(timeout=120), 0, "".join(lines))
        report = "".join(lines)
        print("\n" + report, flush=True)
        for scenario in ("authorization-server-metadata-endpoint", "authorization-code-grant"):
            self.assertIn(f"=== Running scenario: {scenario} ===", report)
        self.assertNotIn("FAILURE", report)

    def consent(self, url, cookie):
        import html as html_module

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with opener.open(urllib.request.Request(url, headers={"Cookie": cookie}), timeout=20) as page:
            text = page.read().decode()
        fields = {k: html_module.unescape(v) for k, v in
                  re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', text)}
        scopes = re.findall(r'name="approved_scope" value="([^"]+)" checked', text)
        self.assertEqual(scopes, ["email:read"])  # no scope in the request: the example's default scopes
        form = urllib.parse.urlencode(dict(fields, decision="allow", approved_scope=scopes), doseq=True).encode()
        answer = urllib.request.Request(url.split("?")[0], data=form, headers={
            "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
        try:
            opener.open(answer, timeout=20)
            self.fail("the consent answer did not redirect")
        except urllib.error.HTTPError as exc:
            self.assertEqual(exc.code, 303)
            location = exc.headers["Location"]
            exc.close()
        for attempt in range(50):  # the suite's callback server may still be starting to listen
            try:
                with urllib.request.urlopen(location, timeout=20) as back:
                    self.assertEqual(back.status, 200)
                return
            except urllib.error.URLError:
                if attempt == 49:
                    raise
                time.sleep(0.1)



@installed("fastmcp", "uvicorn")
class FastMcpTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from fastmcp import FastMCP

        def make_app(base):
            cls.url = f"{base}/mcp"
            auth = cls.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience=cls.url)
            server = FastMCP("mail", auth=auth.fastmcp(base_url=base), mask_error_details=True)

            @server.tool
            @auth.require("email:read")
            async def read_inbox() -> str:
                return f"inbox of {agentauth.current_claims().sub}"

            @server.tool
            @auth.require("email:send")
            def send_email(to: str) -> str:
                return "sent"

            return server.http_app(path="/mcp")

        cls.server = UvicornThread(make_app)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_tools_with_a_bearer_token(self):
        from fastmcp import Client
        from fastmcp.client.auth import BearerAuth

        token = self.auth.issue(subject="user_123", agent="bot", scopes=["email:read"]).token

        async def run():
            async with Client(self.url, auth=BearerAuth(token), timeout=20) as client:
                good = await client.call_tool("read_inbox", {})
                refused = await client.call_tool("send_email", {"to": "a@example.com"}, raise_on_error=False)
                return good, refused

        good, refused = asyncio.run(run())
        self.assertEqual(good.data, "inbox of user_123")
        self.assertTrue(refused.is_error)
        self.assertIn("does not cover", refused.content[0].text)

    def test_forged_and_revoked_tokens_get_401(self):
        # An agent of its own: the revocation must not touch the other test's tokens.
        token = self.auth.issue(subject="user_123", agent="disconnected-bot", scopes=["email:read"]).token
        self.auth.revoke(agent="disconnected-bot")
        for headers in ({"Authorization": "Bearer x.y.z"}, {"Authorization": f"Bearer {token}"}):
            status, _, _ = mcp_initialize(self.url, headers)
            self.assertEqual(status, 401)


# ---------------------------------------------------------------------------
# RedisStore against a real redis-server on a free loopback port
# ---------------------------------------------------------------------------


@installed("redis")
@unittest.skipUnless(shutil.which("redis-server"), "needs redis-server (apt-get install redis-server)")
class RedisServerTests(unittest.TestCase):
    def setUp(self):
        import redis

        port = free_port()
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", folder.name],
            stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(self.stop)
        for line in self.process.stdout:  # wait for the server's own word, not a sleep
            if "Ready to accept connections" in line:
                break
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.addCleanup(self.client.close)
        self.store = agentauth.RedisStore(self.client, prefix="test:")
        self.clock = Clock()
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", store=self.store, clock=self.clock)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process.stdout.close()

    def test_each_criteria_form_revokes_with_and_semantics(self):
        mine = self.auth.issue(subject="user_1", agent="bot", scopes=["s"]).token
        other_agent = self.auth.issue(subject="user_1", agent="other", scopes=["s"]).token
        self.auth.revoke(agent="bot", subject="user_1")
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(mine)
        self.assertEqual(self.auth.verify(other_agent).agent, "other")
        self.auth.revoke(self.auth.verify(other_agent).jti)
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(other_agent)

    def test_tokens_from_the_next_second_work_again(self):
        self.auth.revoke(agent="bot")
        same_second = self.auth.issue(subject="u", agent="bot", scopes=["s"]).token
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(same_second)
        self.clock.now += 1
        self.assertEqual(self.auth.verify(self.auth.issue(subject="u", agent="bot", scopes=["s"]).token).agent, "bot")

    def test_keys_expire_at_expires_at_and_merge_to_the_later_times(self):
        self.store.revoke({"agent": "bot"}, revoked_at=1000, expires_at=4_000_000_000)
        self.store.revoke({"agent": "bot"}, revoked_at=900, expires_at=3_000_000_000)
        self.assertEqual(self.client.get("test:agent:bot"), b"1000")
        self.assertEqual(self.client.expiretime("test:agent:bot"), 4_000_000_000)

    def test_revocation_is_seen_by_another_client(self):
        import redis

        token = self.auth.issue(subject="u", agent="bot", scopes=["s"]).token
        other_client = redis.Redis(connection_pool=self.client.connection_pool)
        other = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", clock=self.clock,
                                    store=agentauth.RedisStore(other_client, prefix="test:"))
        other.revoke(token)
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(token)

    def test_dpop_replay_cache_is_one_key_per_proof_with_its_expiry(self):
        self.assertIs(self.store.record_proof("p1", now=1000, expires_at=4_000_000_000), True)
        self.assertIs(self.store.record_proof("p1", now=1001, expires_at=4_000_000_001), False)
        self.assertEqual(self.client.expiretime("test:dpop:p1"), 4_000_000_000)
        self.assertIs(self.store.record_proof("gone", now=1000, expires_at=1001), True)  # already past: Redis drops it
        self.assertIs(self.store.record_proof("gone", now=1000, expires_at=4_000_000_000), True)
        key = agentauth.P256Key.generate()
        token = self.auth.issue(subject="u", agent="bot", scopes=["s"], dpop_jkt=key.thumbprint()).token
        proof = agentauth.dpop_proof(key, "GET", "https://api.example/x", access_token=token, clock=self.clock)
        self.assertEqual(self.auth.verify(token, dpop_proof=proof, method="GET", url="https://api.example/x").sub, "u")
        with self.assertRaises(agentauth.DPoPProofError):
            self.auth.verify(token, dpop_proof=proof, method="GET", url="https://api.example/x")

    def test_entries_and_the_revocations_command_list_a_redis_store(self):
        self.store.revoke({"agent": "bot", "subject": "user:1"}, revoked_at=1000, expires_at=4_000_000_000)
        self.store.revoke({"jti": "j1"}, revoked_at=2000, expires_at=4_000_000_000)
        self.client.set("test:unrelated", b"x")
        self.client.set("other:jti:j2", b"5")
        self.assertEqual(self.store.entries(), [
            agentauth.RevocationEntry("j1", None, None, 2000, 4_000_000_000),
            agentauth.RevocationEntry(None, "bot", "user:1", 1000, 4_000_000_000),
        ])
        port = self.client.connection_pool.connection_kwargs["port"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = agentauth.main(["revocations", "--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-prefix", "test:",
                                   "--json"])
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual([(e["jti"], e["agent"], e["subject"]) for e in json.loads(out.getvalue())],
                         [("j1", None, None), (None, "bot", "user:1")])

    def test_redis_down_fails_closed(self):
        token = self.auth.issue(subject="u", agent="bot", scopes=["s"]).token
        self.stop()
        with self.assertRaises(agentauth.StoreUnavailableError):
            self.auth.verify(token)
        with self.assertRaises(agentauth.StoreUnavailableError):
            self.auth.revoke(agent="bot")


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# PostgreSQL: PostgresStore against a real server
# ---------------------------------------------------------------------------

POSTGRES_URL = os.environ.get("AGENTAUTH_TEST_POSTGRES_URL", "")
# A command that takes "stop" or "start" (pg_ctl for the test cluster, run as its owner).
POSTGRES_CTL = os.environ.get("AGENTAUTH_TEST_POSTGRES_CTL", "")
NEEDS_POSTGRES = "needs a PostgreSQL server: set AGENTAUTH_TEST_POSTGRES_URL (.ci/run starts one)"
NEEDS_POSTGRES_CTL = "needs AGENTAUTH_TEST_POSTGRES_CTL, a command that stops and starts the test server (.ci/run sets it)"


def needs_postgres(cls):
    return installed("psycopg")(unittest.skipUnless(POSTGRES_URL, NEEDS_POSTGRES)(cls))


def psycopg_connect():
    import psycopg

    return psycopg.connect(POSTGRES_URL, connect_timeout=2)


def psycopg2_connect():
    import psycopg2

    return psycopg2.connect(POSTGRES_URL, connect_timeout=2)


def postgres_ctl(action):
    subprocess.run(shlex.split(POSTGRES_CTL) + [action], check=True, capture_output=True, timeout=60)


def wait_until(condition, timeout):
    """Poll ``condition`` until it is true; return the seconds it took (None: it never was)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.005)
    return None


class Monotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class PostgresFixture:
    connect = staticmethod(psycopg_connect)

    def new_schema(self):
        schema = "t_" + secrets.token_hex(6)
        self.addCleanup(self.drop_schema, schema)
        return schema

    def drop_schema(self, schema):
        with psycopg_connect() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    def open_store(self, schema, **kwargs):
        store = agentauth.PostgresStore(self.connect, schema=schema, **kwargs)
        self.addCleanup(store.close)
        return store

    def sql(self, query, params=()):
        with psycopg_connect() as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else None


@needs_postgres
class PostgresStoreContractTests(PostgresFixture, StoreContract, unittest.TestCase):
    def make_store(self):
        return self.open_store(self.new_schema())


@needs_postgres
@installed("psycopg2")
class PostgresStorePsycopg2ContractTests(PostgresStoreContractTests):
    connect = staticmethod(psycopg2_connect)


@needs_postgres
class PostgresGrantStoreContractTests(PostgresFixture, GrantStoreContract, unittest.TestCase):
    def make_store(self):
        return self.open_store(self.new_schema())


@needs_postgres
@installed("psycopg2")
class PostgresGrantStorePsycopg2ContractTests(PostgresGrantStoreContractTests):
    connect = staticmethod(psycopg2_connect)


@needs_postgres
class PostgresProofReplayTests(PostgresFixture, ProofReplayContract, unittest.TestCase):
    def make_store(self):
        self.schema = self.new_schema()
        return self.open_store(self.schema)

    def test_hosts_racing_with_one_proof_accept_it_once(self):
        stores = [self.store] + [self.open_store(self.schema) for _ in range(3)]
        barrier = threading.Barrier(4)
        answers, errors = [], []

        def record(store):
            barrier.wait()
            try:
                answers.append(store.record_proof("raced", now=1_800_000_000, expires_at=1_800_000_600))
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=record, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(answers), [False, False, False, True])

    def test_expired_proofs_are_purged_a_bounded_batch_per_call(self):
        table = f'"{self.schema}".agentauth_dpop_proofs'
        self.sql(f"INSERT INTO {table} (key, expires_at) SELECT 'old' || g, 10 FROM generate_series(1, 1500) g")
        self.store.record_proof("new-1", now=100, expires_at=700)
        self.assertEqual(self.sql(f"SELECT count(*) FROM {table}"), [(1 + 1500 - 1000,)])
        self.store.record_proof("new-2", now=100, expires_at=700)
        self.assertEqual(self.sql(f"SELECT count(*) FROM {table}"), [(2,)])


@needs_postgres
@installed("psycopg2")
class PostgresProofReplayPsycopg2Tests(PostgresProofReplayTests):
    connect = staticmethod(psycopg2_connect)


@needs_postgres
class PostgresRecordStoreTests(PostgresFixture, RecordStoreContract, unittest.TestCase):
    def setUp(self):
        self.schema = self.new_schema()
        self.store = self.open_store(self.schema)

    def test_put_purges_expired_records_a_bounded_batch_per_call(self):
        table = f'"{self.schema}".agentauth_records'
        self.sql(f"INSERT INTO {table} (kind, key, value, expires_at) SELECT 'code', 'old' || g, 'v', 10"
                 " FROM generate_series(1, 1500) g")
        self.store.put_record("code", "new-1", "v", expires_at=700, now=100)
        self.assertEqual(self.sql(f"SELECT count(*) FROM {table}"), [(1 + 1500 - 1000,)])
        self.store.put_record("code", "new-2", "v", expires_at=700, now=100)
        self.assertEqual(self.sql(f"SELECT count(*) FROM {table}"), [(2,)])

    def test_a_code_redeemed_from_two_processes_at_once_is_used_once(self):
        here = os.path.dirname(os.path.abspath(agentauth.__file__))
        for round_ in range(3):
            key = f"code-{round_}"
            self.store.put_record("code", key, "v", expires_at=1_800_000_600, now=1_800_000_000)
            children = [subprocess.Popen([sys.executable, "-c", REDEEMER, here, POSTGRES_URL, self.schema, key],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
            for child in children:
                self.addCleanup(child.stdout.close)
                self.assertEqual(child.stdout.readline().strip(), "ready")
            for child in children:  # both are connected and waiting: release them together
                child.stdin.write("go\n")
                child.stdin.flush()
            answers = []
            for child in children:
                answers.append(child.stdout.readline().strip())
                child.stdin.close()
                self.assertEqual(child.wait(30), 0)
            self.assertEqual(sorted(answers), ["first use", "used at 1800000001"])


@needs_postgres
@installed("psycopg2")
class PostgresRecordStorePsycopg2Tests(PostgresRecordStoreTests):
    connect = staticmethod(psycopg2_connect)


REDEEMER = """
import sys
sys.path.insert(0, sys.argv[1])
import psycopg, agentauth
store = agentauth.PostgresStore(lambda: psycopg.connect(sys.argv[2]), schema=sys.argv[3])
store.get_record("code", sys.argv[4], now=1_800_000_001)  # the write connection is open before the race
print("ready", flush=True)
sys.stdin.readline()
value, used_at = store.use_record("code", sys.argv[4], now=1_800_000_001)
print("first use" if used_at is None else f"used at {used_at}", flush=True)
store.close()
"""


@needs_postgres
class PostgresGrantTests(PostgresFixture, unittest.TestCase):
    def test_a_version_1_schema_is_migrated_in_place_without_losing_a_revocation(self):
        schema = self.new_schema()
        self.sql(f'CREATE SCHEMA "{schema}"')
        for statement in agentauth._postgres_migrations(schema)[0]:
            self.sql(statement)
        self.sql(f'INSERT INTO "{schema}".agentauth_schema (version) VALUES (1)')
        self.sql(
            f'INSERT INTO "{schema}".agentauth_revocations (key, seq, agent, revoked_at, expires_at)'
            f" VALUES ('agent:agent_a', nextval('\"{schema}\".agentauth_revocations_seq'), 'agent_a', 1800000000, 1800001000)"
        )
        store = self.open_store(schema)
        self.assertEqual(self.sql(f'SELECT version FROM "{schema}".agentauth_schema'), [(4,)])
        self.assertIs(store.is_revoked(claims_of("agent_a", 1_800_000_000)), True)
        grant = store.save_grant(new_grant(), replace=False, revoked_at=1_800_000_000, expires_at=1_800_001_000)
        self.assertEqual(self.open_store(schema).get_grant("user_a", "agent_a"), grant)

    def test_hosts_granting_at_once_keep_one_grant_with_every_scope(self):
        schema = self.new_schema()
        stores = [self.open_store(schema) for _ in range(4)]
        barrier = threading.Barrier(4)
        errors = []

        def grant(index):
            barrier.wait()
            try:
                stores[index].save_grant(new_grant(scopes=(f"scope:{index}",), grant_id=f"id-{index}"),
                                         replace=False, revoked_at=1_800_000_000, expires_at=1_800_001_000)
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=grant, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        (stored,) = stores[0].list_grants("user_a")
        self.assertEqual(sorted(stored.scopes), [f"scope:{i}" for i in range(4)])
        self.assertIn(stored.grant_id, {f"id-{i}" for i in range(4)})

    def test_a_narrowing_on_one_host_refuses_older_tokens_on_another_within_a_second(self):
        schema = self.new_schema()
        first, second = self.open_store(schema), self.open_store(schema)
        clock = Clock()
        one = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", store=first, clock=clock)
        two = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", store=second, clock=clock)
        one.grant(subject="user_1", agent="bot", scopes=["email:read", "email:send"])
        token = two.issue(subject="user_1", agent="bot", scopes=["email:read"]).token
        self.assertEqual(two.verify(token).agent, "bot")
        self.assertEqual(two.grants(subject="user_1")[0].scopes, ("email:read", "email:send"))
        one.grant(subject="user_1", agent="bot", scopes=["email:read"], replace=True)
        self.assertEqual(two.grants(subject="user_1")[0].scopes, ("email:read",))
        self.assertIsNotNone(wait_until(lambda: PostgresOutageTests.refused(two, token), 1.0))
        clock.now += 1
        fresh = one.issue(subject="user_1", agent="bot", scopes=["email:read"]).token
        self.assertEqual(two.verify(fresh).agent, "bot")
        self.assertIs(two.disconnect(subject="user_1", agent="bot"), True)
        self.assertIsNotNone(wait_until(lambda: PostgresOutageTests.refused(one, fresh), 1.0))
        self.assertEqual(one.grants(subject="user_1"), [])


REVOKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import psycopg, agentauth
store = agentauth.PostgresStore(lambda: psycopg.connect(sys.argv[2]), schema=sys.argv[3])
print("ready", flush=True)
for line in sys.stdin:
    agent = line.strip()
    started = time.monotonic()
    store.revoke({"agent": agent}, revoked_at=int(time.time()), expires_at=int(time.time()) + 600)
    print(started, flush=True)
store.close()
"""


def claims_of(agent, iat):
    return agent_claims(jti="j-" + agent, agent=agent, sub="user_1", iat=iat)


@needs_postgres
class PostgresStoreTests(PostgresFixture, unittest.TestCase):
    def test_tables_live_in_the_named_schema_with_their_version(self):
        schema = self.new_schema()
        self.open_store(schema)
        tables = self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (schema,))
        self.assertEqual([t for (t,) in tables], ["agentauth_dpop_proofs", "agentauth_grants", "agentauth_records",
                                                  "agentauth_revocations", "agentauth_schema"])
        self.assertEqual(self.sql(f'SELECT version FROM "{schema}".agentauth_schema'), [(4,)])

    def test_a_newer_schema_version_is_refused(self):
        schema = self.new_schema()
        self.open_store(schema).close()
        self.sql(f'UPDATE "{schema}".agentauth_schema SET version = version + 1')
        with self.assertRaises(agentauth.InvalidConfigError) as cm:
            agentauth.PostgresStore(psycopg_connect, schema=schema)
        self.assertIs(type(cm.exception), agentauth.InvalidConfigError)

    def test_hosts_starting_together_create_the_tables_once(self):
        schema = self.new_schema()
        barrier = threading.Barrier(4)
        errors, stores = [], []

        def start():
            barrier.wait()
            try:
                stores.append(agentauth.PostgresStore(psycopg_connect, schema=schema))
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for store in stores:
            self.addCleanup(store.close)
        self.assertEqual(errors, [])
        self.assertEqual(len(stores), 4)

    def test_a_database_gone_back_in_time_is_reloaded_not_trusted(self):
        # A restore or a failover to a lagging replica reuses sequence numbers
        # a running host has seen: it must notice and load every row again.
        schema = self.new_schema()
        host_a, host_b = self.open_store(schema), self.open_store(schema)
        for n in range(5):
            host_b.revoke({"agent": f"old-{n}"}, revoked_at=T0, expires_at=T0 + 10**9)
        self.assertIsNotNone(wait_until(lambda: host_a._last_seq == 5, 5))
        self.sql(f'DELETE FROM "{schema}".agentauth_revocations')
        self.sql(f"SELECT setval('\"{schema}\".agentauth_revocations_seq', 1, false)")
        host_b.revoke({"agent": "evil-bot"}, revoked_at=T0, expires_at=T0 + 10**9)  # seq 1 again
        claims = agent_claims(agent="evil-bot", sub="alice", iat=T0)
        self.assertIsNotNone(wait_until(lambda: host_a.is_revoked(claims), 5))
        self.assertIs(host_a.is_revoked(agent_claims(agent="old-1", sub="alice", iat=T0)), True)  # kept: fail closed

    def test_a_reconnect_reloads_every_row(self):
        schema = self.new_schema()
        host = self.open_store(schema)
        host.revoke({"agent": "first"}, revoked_at=T0, expires_at=T0 + 10**9)
        self.assertIsNotNone(wait_until(lambda: host._last_seq == 1, 5))
        # A row whose number this host has seen already, as after a failover,
        # written without a notification; then the listening connection drops.
        self.sql(f'UPDATE "{schema}".agentauth_revocations SET agent = %s, key = %s', ("second", "agent:second"))
        self.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE pid <> pg_backend_pid() AND datname = current_database() AND backend_type = 'client backend'")
        claims = agent_claims(agent="second", sub="alice", iat=T0)
        self.assertIsNotNone(wait_until(lambda: host.is_revoked(claims), 10))

    def test_a_revocation_on_one_host_is_refused_on_another_within_a_second(self):
        schema = self.new_schema()
        first, second = self.open_store(schema), self.open_store(schema)
        claims = claims_of("bot", 1_800_000_000)
        self.assertIs(second.is_revoked(claims), False)
        first.revoke({"agent": "bot"}, revoked_at=1_800_000_000, expires_at=1_800_000_600)
        self.assertIsNotNone(wait_until(lambda: second.is_revoked(claims), 1.0))
        # A store opened later loads it from the table.
        self.assertIs(self.open_store(schema).is_revoked(claims), True)

    def test_a_revocation_in_one_process_is_refused_in_another_within_a_second(self):
        schema = self.new_schema()
        store = self.open_store(schema)
        here = os.path.dirname(os.path.abspath(agentauth.__file__))
        child = subprocess.Popen([sys.executable, "-c", REVOKER, here, POSTGRES_URL, schema],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(child.wait, 30)
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.stdin.close)
        self.assertEqual(child.stdout.readline().strip(), "ready")
        now = int(time.time())
        latencies = []
        for i in range(20):
            claims = claims_of(f"bot{i}", now)
            self.assertIs(store.is_revoked(claims), False)
            child.stdin.write(f"bot{i}\n")
            child.stdin.flush()
            started = float(child.stdout.readline())  # the other process's monotonic clock: the same on one host
            self.assertIsNotNone(wait_until(lambda: store.is_revoked(claims), 1.0), f"bot{i} not refused within 1 s")
            latencies.append(time.monotonic() - started)
        self.assertLess(max(latencies), 1.0)
        self.assertLess(statistics.median(latencies), 0.1)

    def test_expired_rows_are_purged_a_bounded_batch_per_write(self):
        schema = self.new_schema()
        store = self.open_store(schema)
        self.sql(
            f'INSERT INTO "{schema}".agentauth_revocations (key, seq, jti, revoked_at, expires_at)'
            f" SELECT 'jti:old' || g, nextval('\"{schema}\".agentauth_revocations_seq'), 'old' || g, 0, 10"
            " FROM generate_series(1, 1500) g"
        )
        count = f'SELECT count(*) FROM "{schema}".agentauth_revocations'
        store.revoke({"jti": "new-1"}, revoked_at=100, expires_at=1000)
        self.assertEqual(self.sql(count), [(1 + 1500 - 1000,)])
        store.revoke({"jti": "new-2"}, revoked_at=100, expires_at=1000)
        self.assertEqual(self.sql(count), [(2,)])

    def test_bench_measures_postgres_and_drops_its_schema(self):
        here = os.path.dirname(os.path.abspath(agentauth.__file__))
        result = subprocess.run([sys.executable, "-m", "agentauth", "bench", "--seconds", "1", "--revocations", "500"],
                                cwd=here, env=dict(os.environ, AGENTAUTH_POSTGRES_URL=POSTGRES_URL),
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("verify + PostgresStore, first", result.stdout)
        self.assertIn("verify + PostgresStore, repeat", result.stdout)
        self.assertRegex(result.stdout, r"revoke-to-refused, PostgresStore, two processes, 50 revocations: median [0-9.]+ ms")
        self.assertEqual(self.sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'agentauth_bench_%%'"), [])

    @unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
    def test_a_forked_child_opens_connections_of_its_own_and_leaves_the_parents(self):
        store = self.open_store(self.new_schema())
        store.revoke({"agent": "before"}, revoked_at=1_800_000_000, expires_at=1_800_000_600)
        writer = store._writer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads running
            pid = os.fork()
        if pid == 0:  # the child: no test machinery, only an exit code
            code = 1
            try:
                store.revoke({"agent": "child"}, revoked_at=1_800_000_000, expires_at=1_800_000_600)
                if store.is_revoked(claims_of("before", 1_800_000_000)) and store.is_revoked(claims_of("child", 1_800_000_000)):
                    code = 0 if store._writer is not writer else 2
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertIsNotNone(wait_until(lambda: store.is_revoked(claims_of("child", 1_800_000_000)), 1.0))
        store.revoke({"agent": "parent"}, revoked_at=1_800_000_000, expires_at=1_800_000_600)
        self.assertIs(store._writer, writer)  # its session survived the child (no retry on a new one)

    @installed("psycopg2")
    def test_the_schema_may_be_shared_by_another_driver(self):
        schema = self.new_schema()
        first = self.open_store(schema)
        second = agentauth.PostgresStore(psycopg2_connect, schema=schema)
        self.addCleanup(second.close)
        second.revoke({"jti": "j1"}, revoked_at=1_800_000_000, expires_at=1_800_000_600)
        claims = claims_of("bot", 1_800_000_000)._replace(jti="j1")
        self.assertIsNotNone(wait_until(lambda: first.is_revoked(claims), 1.0))


@needs_postgres
@unittest.skipUnless(POSTGRES_CTL, NEEDS_POSTGRES_CTL)
class PostgresOutageTests(PostgresFixture, unittest.TestCase):
    """The server stopped mid-run: fail closed, recover alone, lose nothing."""

    def setUp(self):
        self.addCleanup(self.ensure_started)
        logs = self.assertLogs("agentauth", "WARNING")  # each store says once that it lost its connection
        logs.__enter__()
        self.addCleanup(logs.__exit__, None, None, None)

    def ensure_started(self):
        try:
            psycopg_connect().close()
        except Exception:
            postgres_ctl("start")

    def test_verify_fails_closed_after_max_staleness_and_recovers_by_itself(self):
        schema = self.new_schema()
        clock = Monotonic()
        store = self.open_store(schema, max_staleness_seconds=5, monotonic=clock)
        other = self.open_store(schema)
        auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="api", store=store, clock=Clock())
        before = auth.issue(subject="u", agent="before", scopes=["s"]).token
        after = auth.issue(subject="u", agent="after", scopes=["s"]).token
        live = auth.issue(subject="u", agent="live", scopes=["s"]).token
        other.revoke({"agent": "before"}, revoked_at=int(Clock().now), expires_at=int(Clock().now) + 600)
        self.assertIsNotNone(wait_until(lambda: self.refused(auth, before), 1.0))
        postgres_ctl("stop")
        clock.now += 5  # not caught up for exactly max_staleness_seconds: still answers
        self.assertEqual(auth.verify(live).agent, "live")
        with self.assertRaises(agentauth.RevokedError):
            auth.verify(before)
        clock.now += 0.01
        for token in (live, before, after):
            with self.assertRaises(agentauth.StoreUnavailableError) as cm:
                auth.verify(token)
            self.assertIs(type(cm.exception), agentauth.StoreUnavailableError)
        with self.assertRaises(agentauth.StoreUnavailableError):
            other.revoke({"agent": "after"}, revoked_at=int(Clock().now), expires_at=int(Clock().now) + 600)
        for write in (lambda: auth.grant(subject="u", agent="live", scopes=["s"]),
                      lambda: auth.disconnect(subject="u", agent="live"), lambda: auth.revoke(live)):
            with self.assertRaises(agentauth.StoreUnavailableError) as cm:
                write()
            self.assertIs(type(cm.exception), agentauth.StoreUnavailableError)
        postgres_ctl("start")
        # Written as soon as the server is back, maybe before this store's listener is.
        self.assertIsNotNone(wait_until(lambda: self.try_revoke(other, "after"), 10))
        self.assertIsNotNone(wait_until(lambda: self.verifies(auth, live), 10))
        with self.assertRaises(agentauth.RevokedError):
            auth.verify(before)
        # By notification or by the catch-up query of the reconnect, whichever came first.
        self.assertIsNotNone(wait_until(lambda: self.refused(auth, after), 1.0))
        self.assertEqual({e.agent for e in other.entries()}, {"before", "after"})  # the failed writes left nothing
        self.assertEqual(auth.grants(subject="u"), [])

    @staticmethod
    def refused(auth, token):
        try:
            auth.verify(token)
        except agentauth.RevokedError:
            return True
        return False

    @staticmethod
    def try_revoke(store, agent):
        try:
            store.revoke({"agent": agent}, revoked_at=int(Clock().now), expires_at=int(Clock().now) + 600)
        except agentauth.StoreUnavailableError:
            return False
        return True

    @staticmethod
    def verifies(auth, token):
        try:
            auth.verify(token)
        except agentauth.StoreUnavailableError:
            return False
        return True

    def test_verify_fails_closed_within_max_staleness_seconds_of_real_time(self):
        store = self.open_store(self.new_schema(), max_staleness_seconds=1)
        claims = claims_of("bot", 1_800_000_000)
        self.assertIs(store.is_revoked(claims), False)
        postgres_ctl("stop")
        stopped_at = time.monotonic()

        def refused():
            try:
                store.is_revoked(claims)
            except agentauth.StoreUnavailableError:
                return True
            return False

        self.assertIsNotNone(wait_until(refused, 2.0))
        self.assertLess(time.monotonic() - stopped_at, 1.0 + 0.1)
        postgres_ctl("start")
        self.assertIsNotNone(wait_until(lambda: not refused(), 10))
        self.assertIs(store.is_revoked(claims), False)


def python_blocks(path):
    """The ```python blocks of a Markdown file, each with the ```text block after it (or None)."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    pattern = re.compile(r"```python\n(.*?)```\n(?:\s*```text\n(.*?)```)?", re.S)
    return [(match.group(1), match.group(2)) for match in pattern.finditer(text)]


def start_redis_server(test):
    """Start a throwaway redis-server on a free port for ``test``; return its URL."""
    port = free_port()
    folder = tempfile.TemporaryDirectory()
    test.addCleanup(folder.cleanup)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", folder.name],
        stdout=subprocess.PIPE, text=True,
    )

    def stop():
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()

    test.addCleanup(stop)
    for line in process.stdout:  # wait for the server's own word, not a sleep
        if "Ready to accept connections" in line:
            break
    return f"redis://127.0.0.1:{port}/0"


@needs_postgres
@installed("redis")
@unittest.skipUnless(shutil.which("redis-server"), "needs redis-server (apt-get install redis-server)")
class PostgresDocsTests(PostgresFixture, unittest.TestCase):
    """docs/postgres.md: every python block runs as written and prints what the page shows."""

    def test_every_python_block_runs_and_prints_its_text_block(self):
        blocks = python_blocks(os.path.join(os.path.dirname(os.path.abspath(agentauth.__file__)), "docs", "postgres.md"))
        self.assertEqual(len(blocks), 2)
        self.addCleanup(self.drop_schema, "agentauth")  # the blocks use the default schema
        here = os.path.dirname(os.path.abspath(agentauth.__file__))
        env = dict(os.environ, DATABASE_URL=POSTGRES_URL, REDIS_URL=start_redis_server(self),
                   PYTHONPATH=os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        for index, (code, expected) in enumerate(blocks):
            with self.subTest(block=index), tempfile.TemporaryDirectory() as cwd:
                result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                                        timeout=60)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIsNotNone(expected)
                self.assertEqual(result.stdout, expected)


class AgentsPageMountTests(unittest.TestCase):
    """docs/agents-page.md's mounts: the page beside a Flask app and inside a FastAPI app."""

    def setUp(self):
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="integration-api", clock=Clock())
        self.auth.grant(subject="user_123", agent="agent_research_bot", scopes=["email:read"])
        self.token = self.auth.issue(subject="user_123", agent="agent_research_bot", scopes=["email:read"]).token

    def disconnect_through(self, client, page_path):
        """GET the page, POST its Disconnect form; return the POST's answer."""
        page = client.get(page_path)
        self.assertEqual(page.status_code, 200)
        action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
        self.assertEqual(action, page_path)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        return client.post(action, data={"csrf_token": token, "agent": "agent_research_bot"})

    @installed("flask")
    def test_beside_a_flask_app_with_werkzeugs_dispatcher(self):
        from flask import Flask
        from werkzeug.middleware.dispatcher import DispatcherMiddleware

        app = Flask(__name__)
        page = self.auth.agents_page_wsgi(authenticate=lambda request: request.cookies.get("session"))
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/account/agents": page})
        client = app.test_client()
        self.assertEqual(client.get("/account/agents").status_code, 401)
        client.set_cookie("session", "user_123")
        answer = self.disconnect_through(client, "/account/agents")
        self.assertEqual((answer.status_code, answer.headers["Location"]), (303, "/account/agents"))
        self.assertEqual(self.auth.grants(subject="user_123"), [])
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(self.token)

    @installed("fastapi", "httpx")
    def test_mounted_in_fastapi_with_a_coroutine_authenticate(self):
        from fastapi import FastAPI

        with warnings.catch_warnings():  # some starlette releases warn about their own test client's httpx
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient

        async def authenticate(request):
            return request.cookies.get("session")

        app = FastAPI()
        app.mount("/account/agents", self.auth.agents_page_asgi(authenticate=authenticate, login_url="/login"))
        client = TestClient(app)
        answer = client.get("/account/agents/", follow_redirects=False)
        self.assertEqual((answer.status_code, answer.headers["location"]), (303, "/login?next=%2Faccount%2Fagents%2F"))
        client.cookies.set("session", "user_123")
        answer = self.disconnect_through(client, "/account/agents/")
        self.assertEqual(answer.history[0].status_code, 303)  # followed back to the page
        self.assertEqual((answer.status_code, answer.url.path), (200, "/account/agents/"))
        self.assertIn("No agent is connected", answer.text)
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(self.token)


def chromium_missing():
    """Why the browser test cannot run here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install selenium)"
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        return "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    return None


class QuietWsgiHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


class ToySite:
    """A small WSGI site on a loopback port: a toy login (a session cookie) and the connected-agents page."""

    def __init__(self, auth, subject):
        self.sessions = {}
        self.subject = subject
        self.page = auth.agents_page_wsgi(
            authenticate=lambda request: self.sessions.get(request.cookies.get("session")),
            scope_descriptions={
                "email:read": "Read your email",
                "email:send": "Send email as you",
                "calendar:read": "See your calendar",
                "files:*": "Read and change all your files",
            },
            login_url="/login",
        )
        self.server = wsgiref.simple_server.make_server("127.0.0.1", 0, self.app, handler_class=QuietWsgiHandler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/login":  # signs everyone in as self.subject: the test's own login
            session = secrets.token_urlsafe(16)
            self.sessions[session] = self.subject
            target = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("next", ["/"])[0]
            if not target.startswith("/") or target.startswith("//"):
                target = "/"
            start_response("303 See Other", [
                ("Location", target), ("Set-Cookie", f"session={session}; Path=/; HttpOnly; SameSite=Lax"),
            ])
            return [b""]
        if path == "/account/agents":
            return self.page(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=20)


class ChromiumFixture:
    """Headless Chromium driven by selenium, one browser per test class; screenshots kept."""

    @classmethod
    def setUpClass(cls):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        cls.profile = tempfile.mkdtemp(prefix="agentauth-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        # Running as root in a container: no sandbox, no GPU, no /dev/shm; a
        # fresh profile, and nothing that calls home.
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={cls.profile}", "--window-size=800,600", "--hide-scrollbars"):
            options.add_argument(flag)
        cls.driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        cls.driver.set_page_load_timeout(30)
        cls.shots = os.environ.get("AGENTAUTH_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="agentauth-screenshots-")
        os.makedirs(cls.shots, exist_ok=True)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        shutil.rmtree(cls.profile, ignore_errors=True)

    def screenshot(self, name, *, scale=1, mobile=False):
        """Save the whole page, at its current width, as a PNG under the screenshot folder."""
        width, height = self.driver.execute_script(
            "return [window.innerWidth, document.documentElement.scrollHeight]")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})
        path = os.path.join(self.shots, name)
        self.assertTrue(self.driver.save_screenshot(path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        print(f"\nscreenshot: {path}", flush=True)
        return path


@unittest.skipIf(chromium_missing(), chromium_missing() or "")
class AgentsPageBrowserTests(ChromiumFixture, unittest.TestCase):
    """The connected-agents page in a real browser: headless Chromium driven by selenium."""

    def setUp(self):
        self.clock = Clock()
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=ISSUER, audience="integration-api", clock=self.clock)
        self.auth.grant(subject="user_123", agent="agent_research_bot", agent_name="Research bot",
                        scopes=["email:read", "calendar:read"])
        self.clock.now += 3600
        self.auth.grant(subject="user_123", agent="agent_files_sync", agent_name="Files sync",
                        scopes=["files:*"])
        self.clock.now += 3600
        self.auth.grant(subject="user_123", agent="agent_mailer", scopes=["email:send"])
        self.auth.grant(subject="user_456", agent="agent_someone_elses", scopes=["email:read"])
        self.token = self.auth.issue(subject="user_123", agent="agent_research_bot", scopes=["email:read"],
                                     ttl_seconds=3600).token
        self.clock.now += 600
        self.auth.verify(self.token)  # a last use to show
        self.site = ToySite(self.auth, "user_123")
        self.addCleanup(self.site.stop)
        self.driver.delete_all_cookies()
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 800, "height": 600, "deviceScaleFactor": 1, "mobile": False})
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "light"}]})

    def rows(self):
        from selenium.webdriver.common.by import By

        return [row.get_attribute("data-agent") for row in self.driver.find_elements(By.CSS_SELECTOR, "li.grant")]

    def sign_in_and_open(self):
        self.driver.get(self.site.base + "/account/agents")  # 303 to the toy login, which sets the cookie and comes back
        self.assertEqual(self.driver.current_url, self.site.base + "/account/agents")
        self.assertEqual(self.driver.title, "Connected agents")

    def test_sign_in_see_rows_disconnect_and_the_token_is_refused(self):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        self.sign_in_and_open()
        self.assertEqual(self.rows(), ["agent_research_bot", "agent_mailer", "agent_files_sync"])
        body = self.driver.find_element(By.TAG_NAME, "body").text
        self.assertIn("Read your email", body)
        self.assertNotIn("agent_someone_elses", body)
        # The inline style ran under the page's CSP (allowed by its hash).
        self.assertEqual(self.driver.execute_script("return getComputedStyle(document.querySelector('main')).maxWidth"),
                         "736px")
        self.assertEqual(self.driver.execute_script("return getComputedStyle(document.body).backgroundColor"),
                         "rgb(255, 255, 255)")
        self.screenshot("agents-page.png")
        row = self.driver.find_element(By.CSS_SELECTOR, 'li.grant[data-agent="agent_research_bot"]')
        row.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(self.driver, 20).until(expected_conditions.staleness_of(row))
        self.assertEqual(self.driver.current_url, self.site.base + "/account/agents")  # 303 back to the page
        self.assertEqual(self.rows(), ["agent_mailer", "agent_files_sync"])
        with self.assertRaises(agentauth.RevokedError):
            self.auth.verify(self.token)
        self.assertEqual([g.agent for g in self.auth.grants(subject="user_456")], ["agent_someone_elses"])

    def test_readable_at_375_px_wide_in_dark_mode(self):
        from selenium.webdriver.common.by import By

        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True})
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark"}]})
        self.sign_in_and_open()
        width = self.driver.execute_script("return window.innerWidth")
        self.assertEqual(width, 375)
        # Nothing wider than the screen: no sideways scrolling.
        self.assertLessEqual(self.driver.execute_script("return document.documentElement.scrollWidth"), width)
        for button in self.driver.find_elements(By.TAG_NAME, "button"):
            self.assertTrue(button.is_displayed())
            rect = button.rect
            self.assertGreaterEqual(rect["x"], 0)
            self.assertLessEqual(rect["x"] + rect["width"], width)
            self.assertGreaterEqual(rect["height"], 44)  # a finger-sized target
        self.assertEqual(
            self.driver.execute_script("return getComputedStyle(document.body).backgroundColor"), "rgb(18, 18, 18)"
        )
        self.assertEqual(
            self.driver.execute_script("return getComputedStyle(document.body).color"), "rgb(230, 230, 230)"
        )
        self.screenshot("agents-page-375-dark.png", scale=2, mobile=True)


class ConsentSite:
    """The authorization server on a loopback port, with the test's login and the agent's redirect URI."""

    SCOPES = {"email:read": "Read your email", "email:send": "Send email as you", "calendar:read": "See your calendar"}

    def __init__(self, subject):
        self.sessions = {}
        self.subject = subject
        self.server = wsgiref.simple_server.make_server("127.0.0.1", 0, self.app, handler_class=QuietWsgiHandler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.auth = agentauth.AgentAuth(secret=SECRET, issuer=self.base, audience=self.base + "/mcp")
        self.oauth = self.auth.authorization_server_wsgi(
            authenticate=lambda request: self.sessions.get(request.cookies.get("session")),
            scope_descriptions=self.SCOPES,
            login_url="/login",
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/login":  # signs everyone in as self.subject: the test's own login
            session = secrets.token_urlsafe(16)
            self.sessions[session] = self.subject
            target = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("next", ["/"])[0]
            if not target.startswith("/") or target.startswith("//"):
                target = "/"
            start_response("303 See Other", [
                ("Location", target), ("Set-Cookie", f"session={session}; Path=/; HttpOnly; SameSite=Lax"),
            ])
            return [b""]
        if path == "/callback":  # the agent's redirect URI
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"back at the agent"]
        return self.oauth(environ, start_response)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=20)


@unittest.skipIf(chromium_missing(), chromium_missing() or "")
class ConsentPageBrowserTests(ChromiumFixture, unittest.TestCase):
    """The authorization server's consent page in a real browser."""

    def setUp(self):
        self.site = ConsentSite("user_123")
        self.addCleanup(self.site.stop)
        self.driver.delete_all_cookies()
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 800, "height": 600, "deviceScaleFactor": 1, "mobile": False})
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "light"}]})

    def test_sign_in_untick_a_scope_allow_and_the_token_holds_only_the_ticked_ones(self):
        import base64
        import hashlib

        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        base = self.site.base
        registration = json.dumps({"redirect_uris": [base + "/callback"], "client_name": "Research bot"}).encode()
        status, _, body = http("POST", base + "/register", {"Content-Type": "application/json"}, registration)
        self.assertEqual(status, 201)
        client_id = json.loads(body)["client_id"]
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": client_id, "redirect_uri": base + "/callback", "state": "xyz",
            "scope": "email:read email:send calendar:read", "code_challenge": challenge,
            "code_challenge_method": "S256", "resource": base + "/mcp",
        })
        self.driver.get(f"{base}/authorize?{query}")  # 303 to the login, which signs in and comes back
        self.assertEqual(self.driver.title, "Allow this agent?")
        page = self.driver.find_element(By.TAG_NAME, "body").text
        for text in ("Research bot", client_id, "127.0.0.1", "Read your email", "Send email as you",
                     "See your calendar", "returns to localhost"):
            self.assertIn(text, page)
        boxes = self.driver.find_elements(By.CSS_SELECTOR, 'input[name="approved_scope"]')
        self.assertEqual([(b.get_attribute("value"), b.is_selected()) for b in boxes],
                         [("email:read", True), ("email:send", True), ("calendar:read", True)])
        boxes[1].click()  # untick "Send email as you"
        self.assertFalse(boxes[1].is_selected())
        self.screenshot("consent-page.png")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 800, "height": 600, "deviceScaleFactor": 1, "mobile": False})
        self.driver.find_element(By.CSS_SELECTOR, 'button[value="allow"]').click()
        WebDriverWait(self.driver, 20).until(lambda driver: "/callback?" in driver.current_url)
        landed = urllib.parse.urlsplit(self.driver.current_url)
        self.assertEqual(f"{landed.scheme}://{landed.netloc}{landed.path}", base + "/callback")
        params = dict(urllib.parse.parse_qsl(landed.query))
        self.assertEqual((params["state"], params["iss"]), ("xyz", base))
        form = urllib.parse.urlencode({"grant_type": "authorization_code", "code": params["code"],
                                       "client_id": client_id, "redirect_uri": base + "/callback",
                                       "code_verifier": verifier}).encode()
        status, _, body = http("POST", base + "/token", {"Content-Type": "application/x-www-form-urlencoded"}, form)
        self.assertEqual(status, 200, body)
        claims = self.site.auth.verify(json.loads(body)["access_token"])
        self.assertEqual((claims.sub, claims.agent, claims.scopes), ("user_123", client_id, ("email:read", "calendar:read")))
        self.assertEqual(self.site.auth.grants(subject="user_123")[0].scopes, ("email:read", "calendar:read"))

    def test_the_consent_page_cannot_be_framed(self):
        from selenium.webdriver.common.by import By

        base = self.site.base
        self.driver.get(base + "/login?next=/callback")  # signed in
        frame_page = ("data:text/html,<iframe id=f src='" + base
                      + "/authorize?client_id=x' width=400 height=300></iframe>")
        self.driver.get(frame_page)
        self.driver.switch_to.frame(self.driver.find_element(By.ID, "f"))
        # A page refused by frame-ancestors / X-Frame-Options never renders its content in the frame.
        self.assertNotIn("This authorization request", self.driver.find_element(By.TAG_NAME, "body").text)
        self.driver.switch_to.default_content()


if __name__ == "__main__":
    unittest.main()
