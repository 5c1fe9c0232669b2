// @pgrelay/client: the pgrelay.v1 protocol with reconnect, resume, dedupe
// and acks done right. No dependencies; browsers and Node 20+ (pass `ws`).

const RETRY = [1001, 1006, 1009, 1011, 1012, 1013];
const SEEN = 10000; // ids remembered per stream, to drop duplicates at or below a cursor
const FINAL_SUBSCRIBE = ["forbidden", "bad_frame"]; // other refusals are tried again

const fault = (message, code) => Object.assign(new Error(message), { code });

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
    this.subs = new Map(); // topic -> { handler, ok, fail }
    this.waiting = []; // answers expected on this socket, in order
    this.queued = []; // publishes waiting for a socket
    this.attempt = 0;
    this.n = 0; // which url next
    this.state = "";
    this.key = o.storageKey || `pgrelay.cursors:${o.user || ""}@${this.urls[0]}`;
    try {
      Object.assign(this.cursors, JSON.parse(o.storage?.getItem(this.key) || "{}"));
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
    let token = this.o.token;
    try {
      if (this.o.getToken) token = await this.o.getToken();
      if (this.state === "closed") return;
      const q = new URLSearchParams({ refusal: "close" });
      if (token) q.set("token", token);
      if (this.o.user) q.set("user", this.o.user);
      if (this.cursors.user) q.set("since", this.cursors.user);
      const url = this.urls[this.n++ % this.urls.length];
      const ws = (this.ws = new this.WS(url + (url.includes("?") ? "&" : "?") + q, "pgrelay.v1"));
      this.delivered = new Set(); // ids this socket may ack
      ws.onmessage = (e) => {
        if (ws !== this.ws) return;
        let frame;
        try {
          frame = JSON.parse(e.data);
        } catch {
          return this.emit("error", fault("the server sent a frame that is not JSON", "bad_frame"));
        }
        this.frame(frame);
      };
      ws.onclose = (e) => ws === this.ws && this.closed(e.code, e.reason);
      ws.onerror = () => {};
    } catch (e) {
      this.emit("error", e);
      this.retry();
    }
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
        if (f.code !== "unknown_message" && this.waiting.length)
          return this.waiting.shift().reject(fault(f.message, f.code));
        return this.emit("error", fault(f.message, f.code));
      default:
        return this.waiting.shift()?.resolve(f);
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
    // The server's pings are invisible to a browser: ours are answered. A
    // connection silent for two intervals gets one more ping and a moment
    // to answer it (a stalled timer is no proof of a dead socket).
    this.timer = setInterval(() => {
      if (Date.now() - this.heard > 2 * beat && !this.probe)
        this.probe = setTimeout(() => {
          this.probe = null;
          if (Date.now() - this.heard > 2 * beat) this.drop(4000, "heartbeat missed");
        }, Math.min(beat, 1000));
      this.send({ op: "ping" });
    }, beat);
    for (const [topic, sub] of this.subs) this.resubscribe(topic, sub);
    for (const p of this.queued.splice(0)) this.sendPublish(p);
    this.set("open");
  }

  /** Gives up on the socket now (a dead one may take long to close). */
  drop(code, reason) {
    const ws = this.ws;
    this.ws = null;
    try {
      ws?.close(code, reason);
    } catch {}
    this.closed(code, reason);
  }

  resubscribe(topic, sub) {
    const since = this.cursors["topic:" + topic];
    const ws = this.ws;
    // Expected before it is sent: answers are matched in order.
    this.waiting.push({
      resolve: (f) => {
        if (!since) this.advance("topic:" + topic, f.head);
        sub.ok?.();
      },
      reject: (e) => {
        // The connection was lost: it is subscribed again on the next one.
        if (e.code === "outcome_unknown" || this.subs.get(topic) !== sub) return;
        if (FINAL_SUBSCRIBE.includes(e.code)) {
          this.subs.delete(topic);
          return (sub.fail || ((e) => this.emit("error", e)))(e);
        }
        this.emit("error", e);
        setTimeout(() => ws === this.ws && this.state === "open" && this.resubscribe(topic, sub), 1000);
      },
    });
    this.send({ op: "subscribe", topic, ...(since && { since }) });
  }

  /** Moves a stream's cursor forward to `id` (never back). */
  advance(stream, id) {
    if (id == null || (this.cursors[stream] && BigInt(id) <= BigInt(this.cursors[stream]))) return;
    this.cursors[stream] = id;
    try {
      this.o.storage?.setItem(this.key, JSON.stringify(this.cursors));
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
    const delivered = this.delivered;
    delivered.add(f.id);
    if (delivered.size > SEEN) delivered.delete(delivered.values().next().value);
    const m = {
      id: f.id,
      to,
      destination: f.destination,
      data: f.data,
      createdAt: f.created_at,
      contentType: f.content_type,
      bodyBase64: f.body_base64,
    };
    const done = [];
    for (const fn of this.on_.message) done.push(this.call(fn, m));
    if (to.topic) done.push(this.call(this.subs.get(to.topic)?.handler, m));
    if (this.o.autoAck) Promise.all(done).then(() => delivered === this.delivered && this.ack(f.id));
  }

  async call(fn, m) {
    try {
      await fn?.(m);
    } catch (e) {
      this.emit("error", e);
    }
  }

  /** Records that the application has handled message `id` (on the
   * connection that delivered it; after a reconnect there is none). */
  ack(id) {
    id = String(id);
    if (this.ws?.readyState === 1 && this.delivered.delete(id)) this.send({ op: "ack", id });
  }

  closed(code, reason) {
    clearInterval(this.timer);
    clearTimeout(this.probe);
    this.probe = null;
    // Answers that will never come: a publish in flight may or may not be stored.
    for (const w of this.waiting.splice(0))
      w.reject(fault("connection lost: " + (w.what || "outcome unknown"), "outcome_unknown"));
    if (this.state === "closed") return;
    if (code === 1008 && /^unauthorized/.test(reason)) {
      this.emit("error", fault(reason, "unauthorized"));
      // A fixed token will not get better; getToken may give a fresh one.
      return this.o.getToken ? this.retry() : this.shut();
    }
    // 1008 is also "slow consumer" or "too many connections": try again,
    // unless an operator disconnected it or the user is not valid.
    const final = code === 1008 && /^(disconnected|missing_user|bad_user)/.test(reason);
    if (RETRY.includes(code) || code >= 4000 || (code === 1008 && !final)) return this.retry();
    this.emit("error", fault(`closed ${code}: ${reason}`, "closed"));
    this.shut();
  }

  retry() {
    if (this.state === "closed") return;
    this.set("reconnecting");
    const cap = Math.min(this.o.maxDelay, this.o.minDelay * 2 ** this.attempt++);
    this.later = setTimeout(() => this.open(), cap / 2 + (Math.random() * cap) / 2);
  }

  /** Subscribes to a topic, resuming from its cursor on every reconnect;
   * resolves once subscribed, rejects if refused. */
  subscribe(topic, handler) {
    return new Promise((ok, fail) => {
      if (this.state === "closed") return fail(fault("the client is closed", "closed"));
      if (this.subs.has(topic)) return fail(new Error("already subscribed to " + topic));
      const sub = { handler, ok, fail };
      this.subs.set(topic, sub);
      if (this.state === "open") this.resubscribe(topic, sub);
    }).then(() => {
      const sub = this.subs.get(topic);
      sub.ok = sub.fail = null;
      return {
        unsubscribe: () => {
          if (this.subs.get(topic) !== sub) return Promise.resolve();
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
      if (this.state === "closed") reject(fault("the client is closed", "closed"));
      else if (this.queued.length + this.waiting.length >= this.o.maxQueued)
        reject(fault("too many publishes waiting", "too_many"));
      else if (this.state === "open") this.sendPublish(p);
      else this.queued.push(p);
    });
  }

  sendPublish(p) {
    this.waiting.push({ ...p, what: "the publish may or may not have been stored" });
    this.send({ op: "publish", topic: p.topic, data: p.data });
  }

  shut() {
    this.set("closed");
    clearTimeout(this.later);
    for (const p of this.queued.splice(0)) p.reject(fault("the client is closed", "closed"));
    for (const sub of this.subs.values()) sub.fail?.(fault("the client is closed", "closed"));
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
