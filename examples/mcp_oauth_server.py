"""An MCP server and its OAuth 2.1 authorization server in one process, with a toy login.

Any MCP client (the official SDK's, Claude, ChatGPT...) can connect: it reads
the server's RFC 9728 metadata, registers itself (or names itself by a client
ID metadata document), sends the user to the consent page, and trades the
code (PKCE) for an agentauth token.

Run (needs `pip install mcp uvicorn`):

    python examples/mcp_oauth_server.py

then point an MCP client at http://127.0.0.1:8766/mcp. The toy login at
/login signs anyone in under the name they type: replace it with yours. The
agents a user allowed are at http://127.0.0.1:8766/account/agents.
"""

import hashlib
import hmac
import html
import os
import secrets
import sys
from urllib.parse import parse_qs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's agentauth.py

import agentauth

HOST, PORT = "127.0.0.1", int(os.environ.get("PORT", "8766"))
SCOPES = {"email:read": "Read your email", "email:send": "Send email as you"}
OAUTH_PATHS = ("/.well-known/oauth-authorization-server", "/authorize", "/token", "/register", "/revoke",
               "/account/agents")
LOGIN_PAGE = """<!DOCTYPE html><title>Sign in</title>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>Your name <input name="user" autofocus></label> <button>Sign in</button></form>"""


class ToyLogin:
    """Signs anyone in under the name they type, in an HMAC-signed cookie. A stand-in for your login."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, user: str) -> str:
        return hmac.new(self._key, user.encode(), hashlib.sha256).hexdigest()

    def cookie(self, user: str) -> str:
        return f"user={user}.{self._sign(user)}; Path=/; HttpOnly; SameSite=Lax"

    def authenticate(self, request) -> "str | None":
        """What the authorization server calls: the signed-in user's subject, or None."""
        user, _, mac = request.cookies.get("user", "").rpartition(".")
        return user if user and hmac.compare_digest(mac, self._sign(user)) else None

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST":
            form = parse_qs(body.decode())
            user, target = form.get("user", [""])[0].strip(), form.get("next", ["/"])[0]
            # Never an open redirect: a path on this site only. Browsers read "/\\x" like "//x" (another
            # host), and a control character would end the Location header.
            if not target.startswith("/") or target.startswith(("//", "/\\")) or not target.isprintable() \
                    or not target.isascii() or " " in target:
                target = "/"
            if user.isidentifier():
                headers = [(b"location", target.encode()), (b"set-cookie", self.cookie(user).encode())]
                await send({"type": "http.response.start", "status": 303, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        query = parse_qs(scope.get("query_string", b"").decode())
        page = LOGIN_PAGE.format(next=html.escape(query.get("next", ["/"])[0], quote=True)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": page})


def build(base_url: str, *, secret: str, store=None, step_up: bool = True, allow_private_client_documents: bool = False):
    """Return (the ASGI app, its AgentAuth, its ToyLogin) for a server reachable at ``base_url``."""
    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer

    resource = base_url + "/mcp"
    auth = agentauth.AgentAuth(
        secret=secret,
        issuer=base_url,  # the authorization server's issuer: its tokens' iss
        audience=resource,  # the MCP server's URL: its tokens' aud (RFC 8707)
        store=store if store is not None else agentauth.MemoryStore(),
    )
    server = MCPServer(
        name="mail",
        log_level="WARNING",
        token_verifier=auth.mcp(),
        auth=AuthSettings(issuer_url=base_url, resource_server_url=resource, validate_token_resource=True),
    )

    @server.tool()
    @auth.require("email:read")
    def read_inbox(limit: int = 2) -> str:
        """List the newest messages."""
        claims = agentauth.current_claims()
        return f"{limit} newest messages of {claims.sub}, read by {claims.agent}"

    @server.tool()
    @auth.require("email:send")
    def send_email(to: str) -> str:
        """Send a message."""
        return f"sent to {to}"

    login = ToyLogin(hashlib.sha256(b"toy login\x00" + secret.encode()).digest())
    oauth = auth.authorization_server_asgi(
        authenticate=login.authenticate,
        login_url="/login",
        scope_descriptions=SCOPES,
        default_scopes=["email:read"],  # what a client that names no scope asks for
        allow_private_client_documents=allow_private_client_documents,
        agents_page_path="/account/agents",  # where the user sees and disconnects the agents they allowed
    )
    mcp = auth.asgi(
        server.streamable_http_app(host=HOST),
        resource_metadata=auth.protected_resource_metadata(resource=resource, authorization_servers=[auth.issuer]),
        step_up=step_up,  # a tool outside the grant: 403 with the scopes to ask for, and the client re-authorizes
    )

    async def app(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path in OAUTH_PATHS:
            await oauth(scope, receive, send)
        elif scope["type"] == "http" and path == "/login":
            await login(scope, receive, send)
        else:
            await mcp(scope, receive, send)

    return app, auth, login


if __name__ == "__main__":
    import uvicorn

    base = f"http://{HOST}:{PORT}"
    secret = os.environ.get("AGENTAUTH_SECRET") or secrets.token_urlsafe(32)
    store = agentauth.SqliteStore(os.environ.get("AGENTAUTH_DB", "agentauth-example.db"))
    app, _auth, _login = build(base, secret=secret, store=store)
    print(f"MCP server on {base}/mcp, authorization server on {base}", flush=True)
    uvicorn.run(app, host=HOST, port=PORT, log_level="warning")
