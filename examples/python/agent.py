"""An agent in Python, with a client generated from proto/ (see client.py).

    PYTHONPATH=gen python3 examples/python/agent.py 127.0.0.1:50051

It registers its mailbox with a description of what it can do: its action's
documentation and the JSON Schemas of its arguments and result, which
`academy describe`, the Describe RPC and the MCP gateway (`academy mcp`)
show. Then it answers requests until its mailbox is terminated or it is
asked to shut down. It prints its agent id as one JSON line first.

Arguments come as JSON: an array of positional arguments or an object of
named ones. A request in another content type (Rust handles try MessagePack
first) is answered UnsupportedContentType, and the caller sends JSON again.
ACADEMY_TOKEN and ACADEMY_TLS_* work as in client.py.
"""

import json
import os
import sys

import grpc
from google.protobuf import json_format, struct_pb2

from academy.v1 import exchange_pb2 as ex
from academy.v1 import exchange_pb2_grpc
from academy.v1 import messages_pb2 as msg

from client import JSON, Bearer, channel_to


def schema(value):
    """A JSON Schema as a google.protobuf.Value."""
    return json_format.ParseDict(value, struct_pb2.Value())


DESCRIPTION = msg.AgentDescription(
    doc="Greets people, from Python.",
    actions=[
        msg.ActionDescription(
            name="greet",
            doc="Says hello to `name`.",
            params=["name"],
            input_schema=schema(
                {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                    "additionalProperties": False,
                }
            ),
            output_schema=schema({"type": "string"}),
            read_only=True,
        )
    ],
)


def greet(name):
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    return f"Hello, {name}!"


def error(code, kind, message):
    return msg.ErrorResponse(code=code.value[0], kind=kind, message=message)


def answer(request):
    """The body answering an action request."""
    call = request.action_request
    if call.args.content_type not in ("", JSON):
        return "error_response", error(
            grpc.StatusCode.INVALID_ARGUMENT, "UnsupportedContentType", f"send {JSON}"
        )
    if call.action != "greet":
        return "error_response", error(
            grpc.StatusCode.UNIMPLEMENTED, "UnknownAction", f"no action {call.action!r}; actions: ['greet']"
        )
    args = json.loads(call.args.data or b"[]")
    try:
        name = args.get("name") if isinstance(args, dict) else (args or [None])[0]
        result = greet(name)
    except ValueError as err:
        return "error_response", error(grpc.StatusCode.INVALID_ARGUMENT, "InvalidArguments", str(err))
    payload = msg.Payload(content_type=JSON, data=json.dumps(result).encode())
    return "action_response", msg.ActionResponse(action=call.action, result=payload)


def main():
    target = sys.argv[1]
    channel = channel_to(target)
    token = os.environ.get("ACADEMY_TOKEN")
    channel = grpc.intercept_channel(channel, Bearer(token)) if token else channel
    stub = exchange_pb2_grpc.ExchangeServiceStub(channel)
    registered = stub.RegisterAgent(ex.RegisterAgentRequest(behaviour="example.PyGreeter", description=DESCRIPTION))
    me = registered.agent_id
    print(json.dumps({"agent_id": me}), flush=True)
    stream = stub.Subscribe(ex.SubscribeRequest(mailbox_id=me))
    try:
        for frame in stream:
            stop = False
            for delivery in frame.deliveries:
                request = delivery.message
                kind = request.WhichOneof("body")
                header = msg.Header(
                    src=me, dest=request.header.src, tag=request.header.tag,
                    label=request.header.label, traceparent=request.header.traceparent,
                )
                if kind == "action_request":
                    field, body = answer(request)
                    stub.Send(ex.SendRequest(message=msg.Message(header=header, **{field: body})))
                elif kind == "ping_request":
                    stub.Send(ex.SendRequest(message=msg.Message(header=header, success_response=msg.SuccessResponse())))
                elif kind == "shutdown_request":
                    stop = True
            seqs = [d.seq for d in frame.deliveries]
            stub.Acknowledge(ex.AcknowledgeRequest(mailbox_id=me, seqs=seqs))
            if stop:
                stub.Terminate(ex.TerminateRequest(mailbox_id=me))
                return
    except grpc.RpcError as err:
        # Terminated by someone else: done.
        if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            raise


if __name__ == "__main__":
    main()
