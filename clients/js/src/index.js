// @pgrelay/client: the pgrelay.v1 protocol with reconnect, resume, dedupe
// and acks done right. No dependencies; browsers and Node 20+ (pass `ws`).

const RETRY = [1001, 1006, 1011, 1012, 1013];
const SEEN = 10000; // ids remembered per stream, to drop duplicates at or below a cursor

/** Connects and keeps connecting until `close()`. */
export function connect(options) {
  return new Client(options);
}

class Client {
  constructor(o) {
    this.o = { autoAck: true, maxQueued: 1000, minDelay: 250, maxDelay: 15000, ...o };
    this.urls = [].concat(o.urls || o.url);
    this.WS = o.WebSocket || globalThis.WebSocket;
    if (!this.urls[0] || !this.WS) throw new Error("connect needs a url and a WebSocket");
    this.on_ = { message: new Set(), state: new Set(), error: new Set() };
    this.cursors = {}; // stream -> id (decimal string)
    this.seen = {}; // stream -> Set of recent ids
    this.subs = new Map(); // topic -> { handler, waiting }
    this.waiting = []; // answers expected on this socket, in order
    this.queued = []; // publishes waiting for a socket
    this.attempt = 0;
    this.n = 0; // which url next
    this.state = "";
    this.storageKey = o.storageKey || "pgrelay.cursors";
    try {
      Object.assign(this.cursors, JSON.parse(o.storage?.getItem(this.storageKey) || "{}"));
    } catch {}
    this.set("connecting");
    this.open();
  }

  on(event, fn) {
    this.on_[event].add(fn);
    return () => this.on_[event].delete(fn);
  }

  emit(event, value) {
    for (const fn of this.on_[event]) {
      try {
        fn(value);
      } catch (e) {
        if (event !== "error") this.emit("error", e);
      }
    }
  }

  set(state) {
    if (this.state !== state) this.emit("state", (this.state = state));
  }

  /** The last id taken from a stream: "user", "topic:<name>" or "broadcast". */
  lastId(stream) {
    return this.cursors[stream] ?? null;
  }

  async open() {
    if (this.state === "closed") return;
    let token = this.o.token;
    try {
      if (this.o.getToken) token = await this.o.getToken();
    } catch (e) {
      this.emit("error", e);
      return this.retry();
    }
    const q = new URLSearchParams({ refusal: "close" });
    if (token) q.set("token", token);
    if (this.o.user) q.set("user", this.o.user);
    if (this.cursors.user) q.set("since", this.cursors.user);
    const url = this.urls[this.n++ % this.urls.length];
    const ws = (this.ws = new this.WS(url + (url.includes("?") ? "&" : "?") + q, "pgrelay.v1"));
    ws.onmessage = (e) => ws === this.ws && this.frame(JSON.parse(e.data));
    ws.onclose = (e) => ws === this.ws && this.closed(e.code, e.reason);
    ws.onerror = () => {};
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  frame(f) {
    this.heard = Date.now();
    switch (f.op) {
      case "welcome":
        return this.welcome(f);
      case "message":
        return this.message(f);
      case "pong": // a sign of life, answering nothing awaited
        return;
      case "error":
        // An ack's refusal answers nothing awaited; any other error answers
        // the oldest frame waiting.
        if (f.code !== "unknown_message" && this.waiting.length) {
          const w = this.waiting.shift();
          return w.reject(Object.assign(new Error(f.message), { code: f.code }));
        }
        return this.emit("error", Object.assign(new Error(f.message), { code: f.code }));
      default: {
        const w = this.waiting.shift();
        return w?.resolve(f);
      }
    }
  }

  welcome(f) {
    this.attempt = 0;
    this.nodeId = f.node_id;
    this.connectionId = f.connection_id;
    // The head is the cursor only for a first connection: a resume keeps its
    // own until the backfill it asked for has come.
    if (!this.cursors.user) this.advance("user", f.user_head);
    const beat = f.heartbeat_ms || 5000;
    clearInterval(this.timer);
    // The server's pings are invisible to a browser: ours are answered.
    this.timer = setInterval(() => {
      if (Date.now() - this.heard > 2 * beat) return this.ws.close(4000, "heartbeat missed");
      this.send({ op: "ping" });
    }, beat);
    for (const [topic, sub] of this.subs) this.resubscribe(topic, sub);
    this.set("open");
    const queued = this.queued.splice(0);
    for (const p of queued) this.sendPublish(p);
  }

  resubscribe(topic, sub) {
    const since = this.cursors["topic:" + topic];
    // Expected before it is sent: answers are matched in order.
    this.waiting.push({
      resolve: (f) => {
        if (!since) this.advance("topic:" + topic, f.head);
        sub.ok?.();
      },
      reject: (e) => {
        this.subs.delete(topic);
        (sub.fail || ((e) => this.emit("error", e)))(e);
      },
    });
    this.send({ op: "subscribe", topic, ...(since && { since }) });
  }

  /** Moves a stream's cursor forward to `id` (never back). */
  advance(stream, id) {
    if (id == null || (this.cursors[stream] && BigInt(id) <= BigInt(this.cursors[stream]))) return;
    this.cursors[stream] = id;
    try {
      this.o.storage?.setItem(this.storageKey, JSON.stringify(this.cursors));
    } catch {}
  }

  message(f) {
    const to = f.to || {};
    const stream = to.topic ? "topic:" + to.topic : to.broadcast ? "broadcast" : "user";
    const seen = (this.seen[stream] ||= new Set());
    const cursor = this.cursors[stream];
    // At or below the cursor: a copy of one already handed over (a resume
    // replays them), unless it is a parked one this client never had.
    if (seen.has(f.id) || (cursor && BigInt(f.id) <= BigInt(cursor) && stream !== "user")) return;
    seen.add(f.id);
    if (seen.size > SEEN) seen.delete(seen.values().next().value);
    this.advance(stream, f.id);
    const m = {
      id: f.id,
      to,
      destination: f.destination,
      data: f.data,
      createdAt: f.created_at,
      contentType: f.content_type,
      bodyBase64: f.body_base64,
    };
    const ws = this.ws;
    const done = [];
    for (const fn of this.on_.message) done.push(this.call(fn, m));
    if (to.topic) done.push(this.call(this.subs.get(to.topic)?.handler, m));
    if (this.o.autoAck)
      Promise.all(done).then(() => ws === this.ws && ws.readyState === 1 && this.ack(f.id));
  }

  async call(fn, m) {
    try {
      await fn?.(m);
    } catch (e) {
      this.emit("error", e);
    }
  }

  /** Records that the application has handled message `id`. */
  ack(id) {
    if (this.ws?.readyState === 1) this.send({ op: "ack", id: String(id) });
  }

  closed(code, reason) {
    clearInterval(this.timer);
    // Answers that will never come: a publish in flight may or may not be stored.
    for (const w of this.waiting.splice(0))
      w.reject(Object.assign(new Error("connection lost: " + (w.what || "outcome unknown")), { code: "outcome_unknown" }));
    if (this.state === "closed") return;
    const auth = code === 1008 && /^unauthorized/.test(reason);
    if (auth && !this.o.getToken) {
      this.emit("error", Object.assign(new Error(reason), { code: "unauthorized" }));
      return this.shut();
    }
    // 1008 is also "slow consumer" or "too many connections": try again,
    // unless an operator disconnected it or the user is not valid.
    const final = code === 1008 && /^(disconnected|missing_user|bad_user)/.test(reason);
    if (auth || RETRY.includes(code) || code >= 4000 || (code === 1008 && !final))
      return this.retry();
    this.emit("error", Object.assign(new Error(`closed ${code}: ${reason}`), { code: "closed" }));
    this.shut();
  }

  retry() {
    if (this.state === "closed") return;
    this.set("reconnecting");
    const cap = Math.min(this.o.maxDelay, this.o.minDelay * 2 ** this.attempt++);
    setTimeout(() => this.open(), cap / 2 + (Math.random() * cap) / 2);
  }

  /** Subscribes to a topic, resuming from its cursor; resolves once subscribed. */
  subscribe(topic, handler) {
    return new Promise((ok, fail) => {
      if (this.subs.has(topic)) return fail(new Error("already subscribed to " + topic));
      const sub = { handler, ok, fail };
      this.subs.set(topic, sub);
      if (this.state === "open") this.resubscribe(topic, sub);
    }).then(() => {
      const sub = this.subs.get(topic);
      sub.ok = sub.fail = null;
      return {
        unsubscribe: () => {
          this.subs.delete(topic);
          if (this.state !== "open") return Promise.resolve();
          return new Promise((resolve, reject) => {
            this.waiting.push({ resolve, reject });
            this.send({ op: "unsubscribe", topic });
          });
        },
      };
    });
  }

  /** Publishes to a topic; resolves with its id once stored. */
  publish(topic, data) {
    return new Promise((resolve, reject) => {
      const p = { topic, data, resolve: (f) => resolve(f.id), reject };
      if (this.state === "open") this.sendPublish(p);
      else if (this.state === "closed") reject(new Error("the client is closed"));
      else if (this.queued.length >= this.o.maxQueued) reject(new Error("too many publishes waiting"));
      else this.queued.push(p);
    });
  }

  sendPublish(p) {
    this.waiting.push({ ...p, what: "the publish may or may not have been stored" });
    this.send({ op: "publish", topic: p.topic, data: p.data });
  }

  shut() {
    this.set("closed");
    for (const p of this.queued.splice(0)) p.reject(new Error("the client is closed"));
  }

  /** Closes for good. */
  async close() {
    this.shut();
    clearInterval(this.timer);
    const ws = this.ws;
    if (!ws || ws.readyState > 1) return;
    await new Promise((done) => {
      ws.onclose = () => {
        this.closed(1000, "");
        done();
      };
      ws.close(1000);
    });
  }
}
