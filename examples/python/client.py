"""Calls a Rust agent from Python, with a client generated from proto/.

    python3 -m pip install grpcio grpcio-tools
    python3 -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen proto/academy/v1/*.proto
    PYTHONPATH=gen python3 examples/python/client.py 127.0.0.1:50051 example.Analyser [--session]

It registers a client mailbox, discovers an agent implementing the behaviour
named on the command line, calls its `analyse` action with JSON arguments,
reads the answer from its own mailbox, then shows the errors a caller meets:
an unknown action (an ErrorResponse from the agent) and an unknown mailbox (a
gRPC NOT_FOUND from the exchange). Each result is printed as one JSON line.
It uses the unary calls (Send, Subscribe, Acknowledge), or with --session the
one bidirectional stream that carries them all (docs/design.md, "One stream
per connection"): each request numbered, answers matched by number, and the
subscription's deliveries credited back as they are taken.
It then calls `analyse` with arguments too large for a message (over the
exchange's 4 MiB): by reference, as the Rust SDK does by itself
(docs/design.md, "Blobs"). The arguments go to the exchange's BlobService
in chunks of 1 MiB, the request carries their BlobRef, the client reads the
blob back to check it (GetBlob), and frees it once answered (DeleteBlob);
an answer kept as a blob is read the same way (and freed once read).
Each call carries a W3C trace context (`header.traceparent`), so a traced
exchange and agent put their spans in the caller's trace; the answer comes
back with it.
With ACADEMY_TOKEN set, every call carries it as a bearer token (for an
exchange started with --tokens-file). With ACADEMY_TLS_CA set (a PEM file), it
connects over TLS trusting that CA, showing the client certificate in
ACADEMY_TLS_CERT and ACADEMY_TLS_KEY if set (mutual TLS).
"""

import collections
import hashlib
import json
import os
import queue
import sys
import threading
import uuid

import grpc

from academy.v1 import blob_pb2
from academy.v1 import blob_pb2_grpc
from academy.v1 import exchange_pb2 as ex
from academy.v1 import exchange_pb2_grpc
from academy.v1 import messages_pb2 as msg

JSON = "application/json"


class _Call(
    collections.namedtuple("_Call", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
             grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self.header]
        return _Call(details.method, details.timeout, metadata, details.credentials,
                     details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class StreamBearer(Bearer, grpc.StreamUnaryClientInterceptor):
    """Bearer, for client-streaming calls (PutBlob) too."""

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def channel_to(target):
    """A plaintext channel, or TLS per ACADEMY_TLS_CA / _CERT / _KEY."""
    read = lambda var: open(os.environ[var], "rb").read() if os.environ.get(var) else None
    ca = read("ACADEMY_TLS_CA")
    if ca is None:
        return grpc.insecure_channel(target)
    tls = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=read("ACADEMY_TLS_KEY"),
        certificate_chain=read("ACADEMY_TLS_CERT"),
    )
    return grpc.secure_channel(target, tls)


class Session:
    """One Session stream: numbered requests, answers matched by number."""

    def __init__(self, stub):
        self.requests = queue.Queue()
        self.waiting = {}  # call -> queue of its answers
        self.lock = threading.Lock()
        self.next_call = 1
        self.stream = stub.Session(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for answer in self.stream:
                with self.lock:
                    waiter = self.waiting.get(answer.call)
                if waiter is not None:
                    waiter.put(answer)
        except grpc.RpcError as err:
            with self.lock:
                waiters = list(self.waiting.values())
            for waiter in waiters:
                waiter.put(err)

    def request(self, **op):
        """Sends one request; the queue its answers come to."""
        answers = queue.Queue()
        with self.lock:
            call, self.next_call = self.next_call, self.next_call + 1
            self.waiting[call] = answers
            self.requests.put(ex.SessionRequest(call=call, **op))
        return call, answers

    def call(self, **op):
        """One request and its one answer; a `failed` one raises."""
        call, answers = self.request(**op)
        answer = answers.get(timeout=10)
        with self.lock:
            del self.waiting[call]
        if isinstance(answer, Exception):
            raise answer
        if answer.WhichOneof("op") == "failed":
            raise SessionError(answer.failed)
        return answer

    def close(self):
        self.requests.put(None)  # ends the request stream: the session ends
        self.stream.cancel()


class SessionError(Exception):
    """A request refused on a session: the code, message and reason its unary call would answer."""

    def __init__(self, result):
        super().__init__(result.message)
        self.code = next((c for c in grpc.StatusCode if c.value[0] == result.code), grpc.StatusCode.UNKNOWN)
        self.reason = result.reason


class Client:
    """A client mailbox: requests go out with Send, answers come in on
    Subscribe; or both on one Session stream."""

    def __init__(self, target, session=False):
        self.channel = channel_to(target)
        token = os.environ.get("ACADEMY_TOKEN")
        channel = grpc.intercept_channel(self.channel, StreamBearer(token)) if token else self.channel
        self.stub = exchange_pb2_grpc.ExchangeServiceStub(channel)
        self.blobs = blob_pb2_grpc.BlobServiceStub(channel)
        self.id = self.stub.RegisterClient(ex.RegisterClientRequest(name="python")).client_id
        self.answers = queue.Queue()
        self.session = Session(self.stub) if session else None
        if self.session:
            threading.Thread(target=self._read_session, daemon=True).start()
        else:
            self.stream = self.stub.Subscribe(ex.SubscribeRequest(mailbox_id=self.id))
            threading.Thread(target=self._read, daemon=True).start()

    def _read_session(self):
        subscribe = ex.SubscribeRequest(mailbox_id=self.id)
        call, frames = self.session.request(subscribe=subscribe)
        uncredited = 0
        while True:
            frame = frames.get()
            if isinstance(frame, Exception):
                return self.answers.put(frame)
            kind = frame.WhichOneof("op")
            if kind == "failed":
                return self.answers.put(SessionError(frame.failed))
            if kind != "deliveries":
                continue  # `subscribed`
            for delivery in frame.deliveries.deliveries:
                self.answers.put(delivery.message)
            seqs = [d.seq for d in frame.deliveries.deliveries]
            self.session.call(acknowledge=ex.AcknowledgeRequest(mailbox_id=self.id, seqs=seqs))
            # Give the window back as deliveries are taken (here: each time).
            uncredited += frame.cost
            self.session.requests.put(ex.SessionRequest(call=call, credit=ex.Credit(bytes=uncredited)))
            uncredited = 0

    def _read(self):
        try:
            for frame in self.stream:
                for delivery in frame.deliveries:
                    self.answers.put(delivery.message)
                # Delivered messages stay queued until acknowledged.
                seqs = [d.seq for d in frame.deliveries]
                self.stub.Acknowledge(ex.AcknowledgeRequest(mailbox_id=self.id, seqs=seqs))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.answers.put(err)

    def put_blob(self, data, chunk=1 << 20):
        """Keeps `data` in the exchange's blob store; its BlobRef."""
        def requests():
            yield blob_pb2.PutBlobRequest(owner=self.id, size=len(data))
            for start in range(0, len(data), chunk):
                yield blob_pb2.PutBlobRequest(data=data[start:start + chunk])
        return self.blobs.PutBlob(requests()).blob

    def get_blob(self, blob):
        """The bytes of `blob`, checked against its size and SHA-256."""
        frames = self.blobs.GetBlob(blob_pb2.GetBlobRequest(key=blob.key))
        head = next(frames)
        data = b"".join(frame.data for frame in frames)
        if len(data) != head.size or hashlib.sha256(data).digest() != blob.sha256:
            raise RuntimeError(f"blob {blob.key} does not match its reference")
        return data

    def call(self, agent, action, *args, timeout=10, by_reference=False):
        tag = str(uuid.uuid4())
        # A new trace per call: version 00, a 16-byte trace id, an 8-byte
        # span id (this call's), sampled.
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        data = json.dumps(list(args)).encode()
        payload = msg.Payload(content_type=JSON, data=data)
        if by_reference:
            payload = msg.Payload(content_type=JSON, blob=self.put_blob(data))
            self.checked = self.get_blob(payload.blob) == data
        request = msg.Message(
            header=msg.Header(src=self.id, dest=agent, tag=tag, traceparent=traceparent),
            action_request=msg.ActionRequest(action=action, args=payload),
        )
        try:
            return self._call(request, tag, traceparent, timeout)
        finally:
            if by_reference:  # the caller frees its arguments once the call is over
                self.blobs.DeleteBlob(blob_pb2.DeleteBlobRequest(key=payload.blob.key))

    def _call(self, request, tag, traceparent, timeout):
        if self.session:
            sent = self.session.call(send=ex.SendBatchRequest(messages=[request])).sent.results[0]
            if sent.code != 0:
                raise SessionError(sent)
        else:
            self.stub.Send(ex.SendRequest(message=request))
        while True:
            answer = self.answers.get(timeout=timeout)
            if isinstance(answer, Exception):
                raise answer
            if answer.header.tag != tag:
                continue  # an answer to an earlier call that timed out
            body = answer.WhichOneof("body")
            in_trace = answer.header.traceparent == traceparent
            if body == "action_response":
                result = answer.action_response.result
                if result.HasField("blob"):  # an answer kept as a blob: read it, then free it
                    data = self.get_blob(result.blob)
                    self.blobs.DeleteBlob(blob_pb2.DeleteBlobRequest(key=result.blob.key))
                else:
                    data = result.data
                return {"result": json.loads(data), "in_trace": in_trace}
            if body == "error_response":
                error = answer.error_response
                return {"error": {"code": error.code, "kind": error.kind, "message": error.message}, "in_trace": in_trace}
            raise RuntimeError(f"unexpected answer {body}")

    def close(self):
        self.stub.Terminate(ex.TerminateRequest(mailbox_id=self.id))
        if self.session:
            self.session.close()
        else:
            self.stream.cancel()
        self.channel.close()


def main():
    target, behaviour = sys.argv[1], sys.argv[2]
    client = Client(target, session="--session" in sys.argv[3:])
    found = client.stub.Discover(ex.DiscoverRequest(behaviour=behaviour)).agents
    if not found:
        sys.exit(f"no agent implements {behaviour}")
    agent = found[0].agent_id
    print(json.dumps({"discovered": agent, "behaviour": found[0].behaviour}))
    print(json.dumps({"analyse": client.call(agent, "analyse", "to be or not to be")}))
    print(json.dumps({"unknown_action": client.call(agent, "no_such_action")}))
    text = " ".join(["to be or not to be"] * 300_000)  # 5.7 MB: more than a message holds
    answer = client.call(agent, "analyse", text, by_reference=True)
    print(json.dumps({"analyse_by_reference": answer, "read_back": client.checked}))
    missing = f"agent:{uuid.uuid4()}"
    try:
        client.call(missing, "analyse", "x")
    except grpc.RpcError as err:
        print(json.dumps({"unknown_mailbox": {"code": err.code().name, "message": err.details()}}))
    except SessionError as err:
        print(json.dumps({"unknown_mailbox": {"code": err.code.name, "message": str(err)}}))
    client.close()


if __name__ == "__main__":
    main()
