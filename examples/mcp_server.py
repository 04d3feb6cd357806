"""An MCP server whose two tools need different scopes, protected by agentauth.

Run (needs the mcp 2.x SDK: `pip install "mcp>=2,<3" uvicorn`; the secret is shared with the client):

    export AGENTAUTH_SECRET=$(python -m agentauth keygen)
    python examples/mcp_server.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's agentauth.py

import agentauth
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

HOST, PORT = "127.0.0.1", int(os.environ.get("PORT", "8765"))
RESOURCE = f"http://{HOST}:{PORT}/mcp"  # the token's audience is this server's URL

auth = agentauth.AgentAuth(secret=os.environ["AGENTAUTH_SECRET"], issuer="my-app", audience=RESOURCE)

server = MCPServer(
    name="mail",
    log_level="WARNING",
    token_verifier=auth.mcp(),
    auth=AuthSettings(
        issuer_url="https://auth.example.com",  # where clients would get tokens; here agentauth mints them
        resource_server_url=RESOURCE,
        validate_token_resource=True,  # refuse tokens minted for another server
    ),
)


@server.tool()
@auth.require("email:read")
def read_inbox(limit: int = 2) -> str:
    """List the newest messages."""
    claims = agentauth.current_claims()  # who is asking, and for whom
    return f"{limit} newest messages of {claims.sub}, read by {claims.agent}"


@server.tool()
@auth.require("email:send")
def send_email(to: str, body: str) -> str:
    """Send a message."""
    return f"sent to {to}"


if __name__ == "__main__":
    import uvicorn

    print(f"MCP server on {RESOURCE}", flush=True)
    uvicorn.run(server.streamable_http_app(host=HOST), host=HOST, port=PORT, log_level="warning")
