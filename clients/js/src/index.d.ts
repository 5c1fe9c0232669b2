/** A message as the application sees it. */
export interface Message {
  /** The message id: a decimal string, increasing within each stream. */
  id: string;
  /** `{user}`, `{topic}` or `{broadcast: true}`. */
  to: { user?: string; topic?: string; broadcast?: boolean };
  destination?: string;
  /** The JSON data (a STOMP text body: a string; a binary one: null, see bodyBase64). */
  data: unknown;
  /** RFC 3339. */
  createdAt: string;
  contentType?: string;
  bodyBase64?: string;
}

export type State = "connecting" | "open" | "reconnecting" | "closed";

/** An error from the server (an `error` frame, a refused subscription or publish) or the client. */
export interface RelayError extends Error {
  /** The server's code (`forbidden`, `unavailable`, `outcome_unknown`, …), or `unauthorized`, `closed`. */
  code?: string;
}

/** Where cursors are kept across reloads: `sessionStorage` (one tab's). */
export interface CursorStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface Options {
  /** `wss://…/v1/ws`; several: tried in turn on each reconnect. */
  url?: string;
  urls?: string[];
  /** A client JWT. */
  token?: string;
  /** Called on every (re)connect for a fresh token. */
  getToken?: () => string | Promise<string>;
  /** With auth `none` only: the user. */
  user?: string;
  /** A WebSocket implementation (Node: `ws`); default: the global one. */
  WebSocket?: unknown;
  /** Ack each message once its handlers have returned (default true). */
  autoAck?: boolean;
  /** Publishes kept while reconnecting (default 1000); past it, publish rejects. */
  maxQueued?: number;
  /** Reconnect delays: exponential from minDelay to maxDelay ms, with jitter (250, 15000). */
  minDelay?: number;
  maxDelay?: number;
  storage?: CursorStorage;
  /** The storage key (default `pgrelay.cursors:<user>@<first url>`). */
  storageKey?: string;
}

export interface Subscription {
  unsubscribe(): Promise<void>;
}

export interface Client {
  on(event: "message", fn: (m: Message) => unknown): () => void;
  on(event: "state", fn: (s: State) => void): () => void;
  on(event: "error", fn: (e: RelayError) => void): () => void;
  /** Subscribes (resuming from its cursor on every reconnect); rejects if refused. */
  subscribe(topic: string, handler?: (m: Message) => unknown): Promise<Subscription>;
  /** Resolves with the message id once stored; rejects with the server's error. */
  publish(topic: string, data: unknown): Promise<string>;
  /** Acks a message (when autoAck is false). */
  ack(id: string): void;
  /** The node and connection of the current socket (from its welcome). */
  readonly nodeId?: string;
  readonly connectionId?: string;
  /** A stream's cursor: "user", "topic:<name>" or "broadcast"; null before any. */
  lastId(stream: string): string | null;
  close(): Promise<void>;
}

export function connect(options: Options): Client;
