"""stomp.py (a stock STOMP 1.2 client from PyPI) against a pgrelay node over
TCP: receipts, queues with acks and NACK redelivery, header escaping, binary
bodies and DISCONNECT with a receipt. Prints one line per check; exits 1 on
the first failure.

    python3 scenarios.py HOST PORT API_KEY
"""

import queue
import sys
import time

import stomp

HOST, PORT, API_KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3]
WAIT = 10


class Collector(stomp.ConnectionListener):
    def __init__(self):
        self.messages = queue.Queue()
        self.receipts = queue.Queue()
        self.errors = queue.Queue()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame.headers["receipt-id"])

    def on_error(self, frame):
        self.errors.put(frame)


def connect(login, binary=False):
    conn = stomp.Connection12([(HOST, PORT)], heartbeats=(0, 0), auto_decode=not binary)
    listener = Collector()
    conn.set_listener("collector", listener)
    conn.connect(login, API_KEY, wait=True)
    return conn, listener


def check(name, condition, detail=""):
    if not condition:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok {name}", flush=True)


def receipt(listener, wanted):
    got = listener.receipts.get(timeout=WAIT)
    check(f"receipt {wanted}", got == wanted, got)


def message(listener):
    return listener.messages.get(timeout=WAIT)


def nothing_more(listener, name):
    try:
        frame = listener.messages.get(timeout=0.5)
    except queue.Empty:
        check(name, True)
        return
    check(name, False, frame)


# Receipts for SUBSCRIBE and SEND; a queue message reaches its consumer with
# its application headers, escaped on the wire and whole again here.
consumer, got = connect("py-consumer")
consumer.subscribe("/queue/py-jobs", id="a", ack="client-individual", headers={"receipt": "sub-a"})
receipt(got, "sub-a")
producer, sent = connect("py-producer")
odd = "a:b\nc\\d"
producer.send("/queue/py-jobs", "first", headers={"odd": odd, "receipt": "send-1"})
receipt(sent, "send-1")
first = message(got)
check("the body", first.body == "first", first.body)
check("the escaped header", first.headers.get("odd") == odd, first.headers)
check("the destination", first.headers["destination"] == "/queue/py-jobs", first.headers)
check("an ack id", "ack" in first.headers, first.headers)

# A NACK: the message goes to the other consumer, marked redelivered.
other, other_got = connect("py-other")
other.subscribe("/queue/py-jobs", id="b", ack="client-individual", headers={"receipt": "sub-b"})
receipt(other_got, "sub-b")
consumer.nack(first.headers["ack"], receipt="nack-1")
receipt(got, "nack-1")
again = message(other_got)
check("redelivered after NACK", again.headers.get("message-id") == first.headers["message-id"], again.headers)
check("marked redelivered", again.headers.get("redelivered") == "true", again.headers)
other.ack(again.headers["ack"], receipt="ack-1")
receipt(other_got, "ack-1")
nothing_more(got, "the NACKing consumer does not get it back")

# Acked: settled for good, even once its consumer leaves.
other.disconnect(receipt="bye-other")
nothing_more(got, "an acked message is not redelivered")

# A binary body with NUL bytes, by content-length, byte for byte.
binary, binary_got = connect("py-binary", binary=True)
binary.subscribe("/topic/py.bytes", id="t", headers={"receipt": "sub-t"})
receipt(binary_got, "sub-t")
body = bytes([0, 1, 2, 0, 255])
producer.send("/topic/py.bytes", body, content_type="application/octet-stream", headers={"receipt": "send-2"})
receipt(sent, "send-2")
frame = message(binary_got)
check("binary body", frame.body == body, frame.body)

# DISCONNECT with a receipt (stomp.py waits for it).
for conn in (consumer, producer, binary):
    conn.disconnect(receipt="bye")
check("disconnects", True)
check("no ERROR frame", got.errors.empty() and sent.errors.empty(), "")
