"""Mint an agent token with agentauth and call the example MCP server's tools.

Run, with examples/mcp_server.py running and the same AGENTAUTH_SECRET:

    python examples/mcp_client.py
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's agentauth.py

import agentauth
import httpx2  # the mcp 2.x client's HTTP library
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

RESOURCE = f"http://127.0.0.1:{os.environ.get('PORT', '8765')}/mcp"

auth = agentauth.AgentAuth(secret=os.environ["AGENTAUTH_SECRET"], issuer="my-app", audience=RESOURCE)
# The user grants the agent read access only.
token = auth.issue(subject="user_123", agent="agent_mail_bot", scopes=["email:read"], ttl_seconds=300).token


async def main() -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10, read=30)) as http:
        async with streamable_http_client(RESOURCE, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                for name, arguments in (("read_inbox", {"limit": 2}), ("send_email", {"to": "a@example.com", "body": "hi"})):
                    result = await session.call_tool(name, arguments)
                    outcome = "refused" if result.is_error else "ok"
                    print(f"{name}: {outcome}: {result.content[0].text}")


asyncio.run(main())
