// Real STOMP clients against pgrelay: @stomp/stompjs (as Spring front ends
// use it) over the `ws` WebSocket library. Run by tests/api/stompjs.rs as
//   node scenarios.mjs <scenario> '<config JSON>'
// where the config names the nodes: {"ws": [url, url], "http": [url, url]}.
// Exits 0 when the scenario holds; prints what went wrong otherwise.

import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

const [scenario, configText] = process.argv.slice(2);
const config = JSON.parse(configText);

const deadline = setTimeout(() => fail(`scenario ${scenario} timed out`), 30_000);

function fail(message) {
  console.error(`FAIL ${scenario}: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A stompjs client for `user` on node `node`, connected. */
function connect(node, user, options = {}) {
  return new Promise((resolve, reject) => {
    const client = new Client({
      webSocketFactory: () => new WebSocket(`${config.ws[node]}?user=${encodeURIComponent(user)}`, ["v12.stomp", "v11.stomp", "v10.stomp"]),
      connectHeaders: { login: user },
      reconnectDelay: 0,
      heartbeatIncoming: options.heartbeat ?? 0,
      heartbeatOutgoing: options.heartbeat ?? 0,
      onConnect: (frame) => resolve({ client, frame }),
      onStompError: (frame) => reject(new Error(`ERROR ${frame.headers.message}`)),
      onWebSocketError: () => reject(new Error("WebSocket error")),
    });
    client.activate();
  });
}

/** Resolves with the next message of a subscription. */
function queue() {
  const waiting = [];
  const ready = [];
  return {
    push: (message) => (waiting.length ? waiting.shift()(message) : ready.push(message)),
    next: () => (ready.length ? Promise.resolve(ready.shift()) : new Promise((resolve) => waiting.push(resolve))),
  };
}

async function post(node, body) {
  const response = await fetch(`${config.http[node]}/v1/messages`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  check(response.status === 202, `POST answered ${response.status}`);
  return (await response.json()).id;
}

async function state(node, id) {
  const response = await fetch(`${config.http[node]}/v1/messages/${id}`);
  return (await response.json()).state;
}

async function eventually(what, probe) {
  for (let i = 0; i < 200; i++) {
    if (await probe()) return;
    await sleep(25);
  }
  fail(`timed out waiting for ${what}`);
}

/** Subscribes and waits for the server's receipt, so the subscription is registered. */
function subscribe(client, destination, headers = {}) {
  const messages = queue();
  const receipt = `sub-${destination}-${Math.random()}`;
  const registered = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  const subscription = client.subscribe(destination, (message) => messages.push(message), { ...headers, receipt });
  return registered.then(() => ({ subscription, messages }));
}

const scenarios = {
  // A user queue across nodes: sent over HTTP on node 0, received on node 1.
  async "user-queue"() {
    const { client, frame } = await connect(1, "ada");
    check(frame.headers.version === "1.2", `version ${frame.headers.version}`);
    const { messages } = await subscribe(client, "/user/queue/updates");
    const id = await post(0, { to: { user: "ada" }, destination: "/queue/updates", data: { hello: "ada" } });
    const message = await messages.next();
    check(message.headers["message-id"] === id, `message-id ${message.headers["message-id"]} != ${id}`);
    check(message.headers.destination === "/user/queue/updates", `destination ${message.headers.destination}`);
    check(JSON.parse(message.body).hello === "ada", `body ${message.body}`);
    await client.deactivate();
  },

  // A topic across nodes, published by a client on one node, received on both.
  async topic() {
    const { client: a } = await connect(0, "bob");
    const { client: b } = await connect(1, "cy");
    const onA = await subscribe(a, "/topic/chat.room1");
    const onB = await subscribe(b, "/topic/chat.room1");
    a.publish({ destination: "/topic/chat.room1", body: "hello room", headers: { "content-type": "text/plain" } });
    for (const [name, sub] of [["a", onA], ["b", onB]]) {
      const message = await sub.messages.next();
      check(message.body === "hello room", `${name} got ${message.body}`);
      check(message.headers.destination === "/topic/chat.room1", `${name} destination ${message.headers.destination}`);
    }
    // A binary body round-trips byte for byte.
    const bytes = new Uint8Array([0, 1, 2, 255, 0, 10, 13, 0]);
    a.publish({ destination: "/topic/chat.room1", binaryBody: bytes, headers: { "content-type": "application/octet-stream" } });
    const binary = await onB.messages.next();
    check(Buffer.from(binary.binaryBody).equals(Buffer.from(bytes)), `binary body ${binary.binaryBody}`);
    await a.deactivate();
    await b.deactivate();
  },

  // Receipts for SUBSCRIBE (above), SEND and DISCONNECT.
  async receipts() {
    const { client } = await connect(0, "dot");
    const sent = new Promise((resolve) => client.watchForReceipt("send-1", resolve));
    client.publish({ destination: "/topic/receipts", body: "x", headers: { receipt: "send-1" } });
    const receipt = await sent;
    check(receipt.headers["receipt-id"] === "send-1", "SEND receipt");
    let closed = false;
    client.onWebSocketClose = () => (closed = true);
    await client.deactivate();
    check(closed, "closed after DISCONNECT");
  },

  // auto, client (cumulative) and client-individual acks.
  async "ack-modes"() {
    const { client } = await connect(1, "eve");
    const individual = await subscribe(client, "/topic/acks.individual", { ack: "client-individual" });
    const cumulative = await subscribe(client, "/topic/acks.cumulative", { ack: "client" });
    const auto = await subscribe(client, "/topic/acks.auto");

    const i1 = await post(0, { to: { topic: "acks.individual" }, data: 1 });
    const i2 = await post(0, { to: { topic: "acks.individual" }, data: 2 });
    await individual.messages.next();
    const second = await individual.messages.next();
    second.ack();
    await eventually("the individual ack", async () => (await state(0, i2)) === "acked");
    check((await state(0, i1)) === "delivered", "client-individual acked only the one message");

    const c1 = await post(0, { to: { topic: "acks.cumulative" }, data: 1 });
    const c2 = await post(0, { to: { topic: "acks.cumulative" }, data: 2 });
    await cumulative.messages.next();
    const last = await cumulative.messages.next();
    last.ack();
    await eventually("the cumulative ack", async () => (await state(0, c1)) === "acked" && (await state(0, c2)) === "acked");

    const a1 = await post(0, { to: { topic: "acks.auto" }, data: 1 });
    const message = await auto.messages.next();
    check(message.headers.ack === undefined, "auto: no ack header");
    check((await state(0, a1)) !== "acked", "auto: no ack recorded");
    await client.deactivate();
  },

  // Heart-beats keep an idle session alive for many intervals.
  async heartbeats() {
    const { client, frame } = await connect(0, "fin", { heartbeat: 200 });
    check(frame.headers["heart-beat"] === "200,200", `heart-beat ${frame.headers["heart-beat"]}`);
    let closed = false;
    client.onWebSocketClose = () => (closed = true);
    const { messages } = await subscribe(client, "/user/queue/later");
    await sleep(2000); // ten intervals with nothing to say
    check(!closed && client.connected, "the idle session stayed open");
    const id = await post(1, { to: { user: "fin" }, destination: "/queue/later", data: "still here" });
    check((await messages.next()).headers["message-id"] === id, "delivered after the idle time");
    await client.deactivate();
  },

  // A client that promised heart-beats and goes silent is dropped.
  async "silent-client"() {
    const ws = new WebSocket(`${config.ws[0]}?user=gil`, ["v12.stomp"]);
    await new Promise((resolve) => ws.on("open", resolve));
    const started = Date.now();
    ws.send("CONNECT\naccept-version:1.2\nhost:x\nheart-beat:200,0\n\n\0");
    const code = await new Promise((resolve) => ws.on("close", resolve));
    const after = Date.now() - started;
    check(after < 5000, `dropped only after ${after} ms`);
    console.log(`silent client closed with ${code} after ${after} ms`);
  },

  // A malformed frame gets an ERROR frame, then the connection closes.
  async malformed() {
    const ws = new WebSocket(`${config.ws[0]}?user=hal`, ["v12.stomp"]);
    await new Promise((resolve) => ws.on("open", resolve));
    const frames = [];
    ws.on("message", (data) => frames.push(data.toString()));
    ws.send("CONNECT\naccept-version:1.2\nhost:x\n\n\0");
    ws.send("SEND\ndestination:/topic/x\n\nno terminator");
    await new Promise((resolve) => ws.on("close", resolve));
    check(frames[0].startsWith("CONNECTED"), `first ${frames[0]}`);
    check(frames.some((f) => f.startsWith("ERROR")), `an ERROR frame in ${JSON.stringify(frames)}`);

    // And stompjs reports the ERROR for a destination it may not use.
    const { client } = await connect(0, "ivy");
    const error = new Promise((resolve) => (client.onStompError = resolve));
    client.subscribe("/user/someone-else/queue/x", () => fail("got another user's messages"));
    const frame = await error;
    check(frame.headers.message.length > 0, "ERROR has a message");
  },
};

if (!scenarios[scenario]) fail(`unknown scenario; known: ${Object.keys(scenarios).join(", ")}`);
await scenarios[scenario]();
clearTimeout(deadline);
console.log(`ok ${scenario}`);
process.exit(0);
