// Calls a Rust agent from Node.js, loading proto/ at run time (no generated
// code), with @grpc/grpc-js and its default limits (4 MiB received, no bound
// on what it sends):
//
//     npm install @grpc/grpc-js @grpc/proto-loader   # `make deps` puts them in .tools/
//     NODE_PATH=.tools/node_modules node examples/node/client.js 127.0.0.1:50051 example.Analyser
//
// It discovers an agent implementing the behaviour named on the command line
// and calls its `analyse` action with Invoke (JSON in, JSON out). Then it
// checks the exchange's bounds from a client that sets none: the largest
// message the exchange takes comes back through Subscribe inside grpc-js's
// default 4 MiB, one byte more is refused RESOURCE_EXHAUSTED without its
// bytes echoed, messages too large to travel together come in answers
// apart, and errors arrive as gRPC statuses (an unknown action, an unknown
// mailbox). The messages go from a client mailbox to itself. Each result is
// printed as one JSON line.

"use strict";

const crypto = require("crypto");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, behaviour] = process.argv.slice(2);
if (!target || !behaviour) {
  console.error("usage: client.js HOST:PORT BEHAVIOUR");
  process.exit(2);
}

const protos = path.join(__dirname, "..", "..", "proto");
const definition = loader.loadSync(path.join(protos, "academy/v1/exchange.proto"), {
  includeDirs: [protos],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const academy = grpc.loadPackageDefinition(definition).academy.v1;
const exchange = new academy.ExchangeService(target, grpc.credentials.createInsecure());

// Calls unary `method`, resolving to its answer or an error {code, details}.
function call(method, request) {
  return new Promise((resolve, reject) => {
    exchange[method](request, { deadline: Date.now() + 30000 }, (err, answer) =>
      err ? reject(err) : resolve(answer),
    );
  });
}

// The outcome of a call that must fail: its code's name and message.
async function refusal(method, request) {
  try {
    await call(method, request);
  } catch (err) {
    return { code: grpc.status[err.code], message: err.details };
  }
  throw new Error(`${method} was not refused`);
}

// The first `count` deliveries of `mailbox`, read with grpc-js's default
// limits, and how many answers of the stream carried them.
function deliveries(mailbox, count) {
  return new Promise((resolve, reject) => {
    const [taken, stream] = [[], exchange.Subscribe({ mailbox_id: mailbox })];
    let answers = 0;
    stream.on("data", (answer) => {
      answers += 1;
      taken.push(...answer.deliveries);
      if (taken.length >= count) {
        resolve({ taken, answers });
        stream.cancel();
      }
    });
    stream.on("error", (err) => {
      if (err.code !== grpc.status.CANCELLED) reject(err);
    });
  });
}

// A message from `mailbox` to itself whose arguments are `size` bytes.
function message(mailbox, size) {
  return {
    header: { src: mailbox, dest: mailbox, tag: crypto.randomUUID() },
    action_request: {
      action: "analyse",
      args: { content_type: "application/octet-stream", data: Buffer.alloc(size, "a") },
    },
  };
}

async function main() {
  const found = await call("Discover", { behaviour });
  const agent = found.agents[0];
  console.log(JSON.stringify({ discovered: agent.agent_id, behaviour: agent.behaviour }));

  const args = { kind: "listValue", listValue: { values: [{ kind: "stringValue", stringValue: "to be or not to be" }] } };
  const invoked = await call("Invoke", { agent_id: agent.agent_id, action: "analyse", args });
  console.log(JSON.stringify({ analyse: jsonOf(invoked.result) }));
  console.log(JSON.stringify({ unknown_action: await refusal("Invoke", { agent_id: agent.agent_id, action: "nope", args }) }));

  // The largest message the exchange takes comes back whole. Its size
  // follows from the refusal of a larger one, which names both sizes.
  const { client_id: mailbox } = await call("RegisterClient", {});
  const tooLarge = await refusal("Send", { message: message(mailbox, 4 << 20) });
  console.log(JSON.stringify({ too_large: { code: tooLarge.code, message_bytes: tooLarge.message.length } }));
  const [encoded, limit] = /of (\d+) bytes exceeds the limit of (\d+) bytes/.exec(tooLarge.message).slice(1).map(Number);
  const size = limit - (encoded - (4 << 20));
  await call("Send", { message: message(mailbox, size) });
  const [delivery] = (await deliveries(mailbox, 1)).taken;
  const received = delivery.message.action_request.args.data.length;
  await call("Acknowledge", { mailbox_id: mailbox, seqs: [delivery.seq] });
  const over = await refusal("Send", { message: message(mailbox, size + 1) });
  console.log(JSON.stringify({ largest: { sent: size, received, one_more: over.code } }));

  // Three messages of 2 MiB queued: no answer of the stream carries two.
  for (let i = 0; i < 3; i++) await call("Send", { message: message(mailbox, 2 << 20) });
  const { taken, answers } = await deliveries(mailbox, 3);
  await call("Acknowledge", { mailbox_id: mailbox, seqs: taken.map((d) => d.seq) });
  console.log(JSON.stringify({ batched: { received: taken.length, answers } }));

  const missing = "client:00000000-0000-7000-8000-000000000000";
  const toMissing = { ...message(mailbox, 1), header: { src: mailbox, dest: missing, tag: crypto.randomUUID() } };
  console.log(JSON.stringify({ unknown_mailbox: await refusal("Send", { message: toMissing }) }));
  exchange.close();
}

// A google.protobuf.Value, as proto-loader gives it (with `oneofs`), as JSON.
function jsonOf(value) {
  switch (value.kind) {
    case "nullValue":
      return null;
    case "numberValue":
      return value.numberValue;
    case "stringValue":
      return value.stringValue;
    case "boolValue":
      return value.boolValue;
    case "listValue":
      return value.listValue.values.map(jsonOf);
    case "structValue":
      return Object.fromEntries(Object.entries(value.structValue.fields).map(([k, v]) => [k, jsonOf(v)]));
    default:
      throw new Error(`not a Value: ${JSON.stringify(value)}`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
