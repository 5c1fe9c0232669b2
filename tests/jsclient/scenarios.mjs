// The official JavaScript client (clients/js, @pgrelay/client) against real
// nodes, over the `ws` library. Run by tests/api/jsclient.rs as
//   node scenarios.mjs <scenario> '<config JSON>'
// with {"ws": [url…], "http": [url…], "pids": [pid…], "tokens": {…}}.
// Interactive scenarios print "ready <what>" and wait for a line on stdin
// (the test restarts something meanwhile). Prints "ok <scenario>" when the
// scenario holds; exits 1 with what went wrong otherwise.

import { connect } from "@pgrelay/client";
import WebSocket from "ws";
import { createInterface } from "node:readline";

const [scenario, configText] = process.argv.slice(2);
const config = JSON.parse(configText);
setTimeout(() => fail("timed out"), 90_000).unref();

function fail(message) {
  console.error(`FAIL ${scenario}: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Tells the test what is ready, and waits for it to act. */
async function ready(what) {
  console.log(`ready ${what}`);
  await lines.next();
}

async function post(node, body) {
  const response = await fetch(`${config.http[node]}/v1/messages`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(config.api_key && { authorization: `Bearer ${config.api_key}` }),
    },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  return response.status === 202 ? (await response.json()).id : null;
}

async function until(what, condition, ms = 30_000) {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) fail(`no ${what} within ${ms} ms`);
    await sleep(20);
  }
}

function client(options) {
  const c = connect({ urls: config.ws, WebSocket, minDelay: 50, maxDelay: 500, ...options });
  c.received = [];
  c.states = [];
  c.errors = [];
  c.on("message", (m) => c.received.push(m));
  c.on("state", (s) => c.states.push(s));
  c.on("error", (e) => c.errors.push(e));
  return c;
}

/** Every accepted id received once, in increasing order. */
function exactlyOnce(received, accepted, what) {
  const ids = received.map((m) => m.id);
  const dupes = ids.filter((id, i) => ids.indexOf(id) !== i);
  check(dupes.length === 0, `${what}: duplicates ${dupes.slice(0, 5)}`);
  const missing = accepted.filter((id) => !ids.includes(id));
  check(missing.length === 0, `${what}: ${missing.length} of ${accepted.length} missing (${missing.slice(0, 5)})`);
  for (let i = 1; i < ids.length; i++)
    check(BigInt(ids[i]) > BigInt(ids[i - 1]), `${what}: ${ids[i]} after ${ids[i - 1]}`);
}

/** Sends to `user` through `node` every few ms until `stop()`; returns the accepted ids. */
function sender(node, user) {
  const accepted = [];
  let running = true;
  const done = (async () => {
    for (let n = 0; running; n++) {
      const id = await post(node, { to: { user }, data: { n } }).catch(() => null);
      if (id) accepted.push(id);
      await sleep(5);
    }
  })();
  return { accepted, stop: async () => ((running = false), await done) };
}

const scenarios = {
  // Receives across nodes, publishes, subscribes, acks.
  async "across-nodes"() {
    const c = client({ urls: [config.ws[0]], user: "jo" });
    await until("open", () => c.states.includes("open"));
    const id = await post(1, { to: { user: "jo" }, data: { hello: 1 } });
    await until("the message", () => c.received.some((m) => m.id === id));
    const m = c.received.find((m) => m.id === id);
    check(m.data.hello === 1 && m.to.user === "jo" && m.createdAt, JSON.stringify(m));
    check(c.lastId("user") === id, `cursor ${c.lastId("user")}`);
    const got = [];
    await c.subscribe("room.a", (m) => got.push(m));
    const published = await c.publish("room.a", { text: "hi" });
    await until("the topic message", () => got.some((m) => m.id === published));
    check(c.lastId("topic:room.a") === published, "topic cursor");
    // Acked after the handler: its delivery row says so.
    for (let i = 0; ; i++) {
      const view = await (await fetch(`${config.http[1]}/v1/messages/${id}`)).json();
      if (view.state === "acked") break;
      check(i < 200, `message ${id} is ${view.state}, not acked`);
      await sleep(25);
    }
    const refused = await c.publish("bad topic", 1).then(() => "stored", (e) => e.code);
    check(refused === "bad_frame", `a refused publish rejects: ${refused}`);
    await c.close();
    check(c.states.at(-1) === "closed", c.states.join());
  },

  // Its node is killed: it resumes on the other, nothing lost or twice.
  async "node-killed"() {
    const c = client({ user: "kim" });
    await until("open", () => c.states.includes("open"));
    check(c.nodeId === config.nodes[0], `on ${c.nodeId}`);
    const s = sender(1, "kim");
    await until("some messages", () => c.received.length > 20);
    process.kill(config.pids[0], "SIGKILL");
    await until("the other node", () => c.nodeId === config.nodes[1]);
    await sleep(1500);
    await s.stop();
    await until("every message", () => s.accepted.every((id) => c.received.some((m) => m.id === id)), 40_000);
    exactlyOnce(c.received, s.accepted, "after the kill");
    console.log(`received ${c.received.length} of ${s.accepted.length} accepted; states ${c.states.join(" ")}`);
    check(c.states.includes("reconnecting"), c.states.join());
    await c.close();
  },

  // Both nodes restarted in turn (SIGTERM, then started again) while
  // messages keep coming; or PostgreSQL restarted.
  async "rolling-restart"() {
    const c = client({ user: "rio" });
    await until("open", () => c.states.includes("open"));
    const s = sender(0, "rio");
    const s2 = sender(1, "rio");
    await until("some messages", () => c.received.length > 10);
    await ready("for the restarts");
    await sleep(500);
    await s.stop();
    await s2.stop();
    const accepted = [...s.accepted, ...s2.accepted].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : 1));
    await until("every message", () => accepted.every((id) => c.received.some((m) => m.id === id)), 40_000);
    exactlyOnce(c.received, accepted, "through the restarts");
    console.log(`received ${c.received.length} of ${accepted.length} accepted; states ${c.states.join(" ")}`);
    await c.close();
  },

  // A topic subscription resumes after a reconnect, with what was published meanwhile.
  async "topic-resume"() {
    const c = client({ urls: [config.ws[0]], user: "tia" });
    const got = [];
    await c.subscribe("news.eu", (m) => got.push(m));
    const before = await post(1, { to: { topic: "news.eu" }, data: 0 });
    await until("the first", () => got.some((m) => m.id === before));
    c.ws.close(4001, "test: drop");
    const during = [];
    for (let n = 1; n <= 20; n++) during.push(await post(1, { to: { topic: "news.eu" }, data: n }));
    await until("reopened", () => c.states.filter((s) => s === "open").length >= 2);
    const after = await post(1, { to: { topic: "news.eu" }, data: 21 });
    await until("all", () => [...during, after].every((id) => got.some((m) => m.id === id)));
    exactlyOnce(got, [before, ...during, after], "topic");
    await c.close();
  },

  // A publish made while reconnecting is sent once the socket is back,
  // and resolves with its id; one in flight when the socket dropped rejects.
  async "publish-during-reconnect"() {
    const c = client({ urls: [config.ws[0]], user: "pat" });
    const got = [];
    await c.subscribe("chat.x", (m) => got.push(m));
    c.ws.close(4001, "test: drop");
    await until("reconnecting", () => c.states.includes("reconnecting"));
    const id = await c.publish("chat.x", { text: "queued" });
    check(/^\d+$/.test(id), `id ${id}`);
    await until("the queued publish", () => got.some((m) => m.id === id));
    const inFlight = c.publish("chat.x", { text: "in flight" });
    c.ws.terminate();
    const outcome = await inFlight.then((id) => ({ id }), (e) => ({ code: e.code }));
    // Either it was answered before the drop, or its outcome is unknown: never silent.
    check(outcome.id || outcome.code === "outcome_unknown", JSON.stringify(outcome));
    await c.close();
  },

  // An expired token is refused in-band (1008, not an HTTP 401 a browser
  // cannot read); getToken's fresh one is used; without getToken it stops.
  async "token-refresh"() {
    const stuck = client({ token: config.tokens.expired });
    await until("closed", () => stuck.states.includes("closed"));
    check(stuck.errors.some((e) => e.code === "unauthorized"), stuck.errors.map((e) => e.message).join());
    check(!stuck.states.includes("open"), stuck.states.join());
    let calls = 0;
    const c = client({ getToken: async () => (++calls === 1 ? config.tokens.expired : config.tokens.fresh) });
    await until("open", () => c.states.includes("open"));
    check(calls >= 2, `getToken called ${calls} times`);
    const id = await post(1, { to: { user: "tom" }, data: 1 });
    await until("the message", () => c.received.some((m) => m.id === id));
    await c.close();
  },
};

/** A scripted server, to check the client's rules exactly: `serve(socket)`
 * is called for each connection, with `socket.query` its parameters. */
function scripted(serve) {
  return class FakeSocket {
    constructor(url, protocol) {
      check(protocol === "pgrelay.v1", `subprotocol ${protocol}`);
      this.query = new URL(url).searchParams;
      this.sent = [];
      this.readyState = 0;
      setTimeout(() => ((this.readyState = 1), serve(this)), 1);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
      this.onsent?.(this.sent.at(-1));
    }
    deliver(frame) {
      if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(frame) });
    }
    close(code = 1000, reason = "") {
      if (this.readyState > 1) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason }), 1);
    }
  };
}

const message = (id, to = { user: "ann" }) => ({ op: "message", id: String(id), to, data: id, created_at: "2026-01-01T00:00:00Z" });
const welcome = (head, beat = 60_000) => ({ op: "welcome", connection_id: "c", node_id: "n", heartbeat_ms: beat, user_head: String(head) });

// Resume and dedupe, against a scripted server: the cursors a reconnect
// names, the copies it drops, the parked messages it still hands over.
scenarios["scripted-resume-and-dedupe"] = async () => {
  const sockets = [];
  const WebSocket = scripted((socket) => {
    sockets.push(socket);
    socket.onsent = (f) => f.op === "subscribe" && socket.deliver({ op: "subscribed", topic: f.topic, head: "100" });
    if (sockets.length === 1) {
      check(!socket.query.has("since"), "a first connection names no cursor");
      check(socket.query.get("refusal") === "close", "refusals asked in-band");
      socket.deliver(welcome(10));
      for (const id of [5, 11, 12]) socket.deliver(message(id)); // 5: parked, older than the head
    } else if (sockets.length === 2) {
      check(socket.query.get("since") === "12", `resumed with since=${socket.query.get("since")}`);
      socket.deliver(welcome(12));
      // A replay (12), a parked copy already handed over (5), a parked one
      // never seen (7), then new ones.
      for (const id of [5, 7, 12, 13]) socket.deliver(message(id));
    } else {
      socket.deliver(welcome(13, 100)); // heartbeats every 100 ms, never answered
    }
  });
  const c = client({ url: "ws://scripted/v1/ws", user: "ann", WebSocket, autoAck: false });
  const topic = [];
  await until("open", () => c.states.includes("open"));
  await c.subscribe("t", (m) => topic.push(m.id));
  check(c.lastId("topic:t") === "100", `topic cursor ${c.lastId("topic:t")}`);
  sockets[0].deliver(message(101, { topic: "t" }));
  await until("three user messages", () => c.received.filter((m) => m.to.user).length === 3);
  sockets[0].close(1006, "");
  await until("the second connection", () => sockets.length === 2 && c.states.filter((s) => s === "open").length === 2);
  const resubscribe = sockets[1].sent.find((f) => f.op === "subscribe");
  check(resubscribe?.since === "101", `resubscribed with ${JSON.stringify(resubscribe)}`);
  sockets[1].deliver(message(101, { topic: "t" }));
  sockets[1].deliver(message(102, { topic: "t" }));
  await until("the new ones", () => c.received.some((m) => m.id === "13") && topic.includes("102"));
  const user = c.received.filter((m) => m.to.user).map((m) => m.id);
  check(user.join() === "5,11,12,7,13", `user messages handed over: ${user}`);
  check(topic.join() === "101,102", `topic messages handed over: ${topic}`);
  check(c.lastId("user") === "13", `cursor ${c.lastId("user")}`);
  // A silent server: after two heartbeats without a frame, a new connection.
  sockets[1].close(1012, "node shutting down");
  await until("a third connection", () => sockets.length === 3);
  check(sockets[2].query.get("since") === "13", "resumed again");
  await until("a fourth, the third being silent", () => sockets.length === 4, 2_000);
  check(sockets[2].sent.some((f) => f.op === "ping"), "it pinged the silent server");
  await c.close();
};

// Which closes end the client, and which it retries.
scenarios["scripted-closes"] = async () => {
  const final = async (code, reason, options) => {
    let n = 0;
    const WebSocket = scripted((socket) => {
      n++;
      socket.deliver(welcome(0));
      setTimeout(() => socket.close(code, reason), 5);
    });
    const c = client({ url: "ws://scripted/v1/ws", WebSocket, ...options });
    await until(`closed after ${code} ${reason}`, () => c.states.includes("closed"));
    await sleep(200);
    check(n === 1, `${code} ${reason}: ${n} connections`);
    return c;
  };
  const refused = await final(1008, "unauthorized: invalid token: ExpiredSignature", { token: "x" });
  check(refused.errors.some((e) => e.code === "unauthorized"), "an unauthorized error");
  await final(1008, "disconnected through the API", { user: "ann" });
  let n = 0;
  const WebSocket = scripted((socket) => {
    n++;
    socket.deliver(welcome(0));
    if (n < 4) setTimeout(() => socket.close([1006, 1011, 1013][n - 1], ""), 5);
  });
  const c = client({ url: "ws://scripted/v1/ws", user: "ann", WebSocket });
  await until("four connections", () => n === 4 && c.states.at(-1) === "open");
  await c.close();
};

// A subscription outlives connections lost before it was confirmed, and
// temporary refusals; a close while a token is being fetched is final.
scenarios["scripted-subscriptions"] = async () => {
  const sockets = [];
  const WebSocket = scripted((socket) => {
    sockets.push(socket);
    const n = sockets.length;
    socket.onsent = (f) => {
      if (f.op !== "subscribe") return;
      if (n === 1) socket.close(1006, ""); // lost before the answer
      else if (n === 2 && !socket.refused) {
        socket.refused = true; // refused for now, then accepted
        socket.deliver({ op: "error", code: "subscribe_failed", message: "try again" });
      } else socket.deliver({ op: "subscribed", topic: f.topic, head: "7" });
    };
    socket.deliver(welcome(0));
  });
  const c = client({ url: "ws://scripted/v1/ws", user: "ann", WebSocket });
  const got = [];
  await c.subscribe("t", (m) => got.push(m.id));
  check(sockets.length === 2, `${sockets.length} connections`);
  check(sockets[1].sent.filter((f) => f.op === "subscribe").length === 2, "subscribed again after the refusal");
  sockets[1].deliver(message(8, { topic: "t" }));
  await until("the topic message", () => got.includes("8"));
  await c.close();
  const refusedAfterClose = await c.subscribe("u").then(() => "subscribed", (e) => e.code);
  check(refusedAfterClose === "closed", `subscribe after close: ${refusedAfterClose}`);

  let created = 0;
  let release;
  const Counting = class extends scripted((socket) => socket.deliver(welcome(0))) {
    constructor(...args) {
      super(...args);
      created++;
    }
  };
  const late = client({ url: "ws://scripted/v1/ws", WebSocket: Counting, getToken: () => new Promise((r) => (release = r)) });
  await until("getToken called", () => release);
  await late.close();
  release("token");
  await sleep(50);
  check(created === 0 && late.states.at(-1) === "closed", `after close: ${created} sockets, ${late.states}`);
};

// The same scenario; the test restarts PostgreSQL at "ready" instead.
scenarios["postgres-restart"] = scenarios["rolling-restart"];

if (!scenarios[scenario]) fail("no such scenario");
await scenarios[scenario]();
console.log(`ok ${scenario}`);
process.exit(0);
