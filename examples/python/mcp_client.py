"""Uses the agents of an exchange as MCP tools, through `academy mcp`, with
the Model Context Protocol's Python SDK (`python3 -m pip install mcp`).

    python3 examples/python/mcp_client.py stdio http://127.0.0.1:50051 [path/to/academy [changes]]
    python3 examples/python/mcp_client.py http http://127.0.0.1:8765/mcp

With `stdio` it starts `academy mcp --exchange URL` itself, as a desktop MCP
client would, passing on ACADEMY_TOKEN and ACADEMY_TLS_* (MCP clients give
the servers they start a bare environment); with `http` it connects to `academy mcp --http ADDR`. It lists
the tools, calls the quickstart counter's (`get`, `increment` by 5, and
`increment` with an argument of the wrong type, which fails), printing one
JSON line for each. With `stdio` it then waits (20 s at most each) for the
tools to change `changes` times (1 by default;
`notifications/tools/list_changed`, when an agent comes or goes) and prints
the tools after each.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client


def say(**line):
    print(json.dumps(line), flush=True)


async def use(session, changed, changes=1):
    await session.initialize()
    tools = (await session.list_tools()).tools
    say(tools=[{"name": t.name, "read_only": bool(t.annotations and t.annotations.read_only_hint),
                "params": sorted((t.input_schema.get("properties") or {}).keys())} for t in tools])
    counter = {t.name.split("_")[1]: t.name for t in tools if t.name.startswith("Counter_")}
    result = await session.call_tool(counter["get"], {})
    say(get=result.structured_content, error=result.is_error)
    result = await session.call_tool(counter["increment"], {"by": 5})
    say(increment=result.structured_content, error=result.is_error)
    result = await session.call_tool(counter["increment"], {"by": "five"})
    say(bad_increment=result.structured_content, error=result.is_error)
    if changed is None:
        return
    for _ in range(changes):
        say(waiting=True)
        await asyncio.wait_for(changed.wait(), 20)
        changed.clear()
        tools = (await session.list_tools()).tools
        say(changed=sorted(t.name for t in tools))


async def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "stdio":
        changed = asyncio.Event()

        async def on_message(message):
            if isinstance(message, types.ToolListChangedNotification):
                changed.set()

        academy = sys.argv[3] if len(sys.argv) > 3 else "academy"
        changes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        # MCP clients start servers with a bare environment: pass the
        # gateway's credentials (ACADEMY_TOKEN, ACADEMY_TLS_*) on.
        env = {k: v for k, v in os.environ.items() if k.startswith("ACADEMY_")}
        args = ["mcp", "--exchange", target, "--refresh-ms", "100"]
        server = StdioServerParameters(command=academy, args=args, env=env)
        async with stdio_client(server) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await use(session, changed, changes)
    else:
        async with streamable_http_client(target) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await use(session, None)


if __name__ == "__main__":
    asyncio.run(main())
