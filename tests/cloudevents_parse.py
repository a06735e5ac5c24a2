"""Parses Kafka messages with the CloudEvents Python SDK, an implementation
independent of the relay, for tests/cloudevents.rs.

Usage: python3 -I tests/cloudevents_parse.py PYCE_DIR < messages.json

PYCE_DIR holds the `cloudevents` package (pip install --target). stdin is
{"mode": "structured" | "binary", "messages": [{"key": HEX | null,
"headers": [[NAME, HEX], ...], "value": HEX}, ...]}; stdout is one JSON
object per message: {"attributes": {...}, "data": ...}, with `time` as
RFC 3339 UTC with six fractional digits. Any message the SDK rejects
(invalid attributes, bad JSON, missing specversion...) exits non-zero.
"""

import json
import sys
from datetime import timedelta

sys.path.insert(0, sys.argv[1])

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, from_structured  # noqa: E402
from cloudevents.core.formats.json import JSONFormat  # noqa: E402
from cloudevents.core.v1.event import CloudEvent  # noqa: E402


def convert(message, mode):
    headers = {}
    for name, value in message["headers"]:
        if name in headers:
            raise SystemExit(f"duplicate Kafka header {name!r}")
        headers[name] = bytes.fromhex(value)
    key = None if message["key"] is None else bytes.fromhex(message["key"])
    kafka = KafkaMessage(headers=headers, key=key, value=bytes.fromhex(message["value"]))
    parse = from_structured if mode == "structured" else from_binary
    event = parse(kafka, JSONFormat(), CloudEvent)
    attributes = dict(event.get_attributes())
    time = event.get_time()
    if time is not None:
        if time.utcoffset() != timedelta(0):
            raise SystemExit(f"time {time.isoformat()} is not UTC")
        attributes["time"] = time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"$bytes_hex": bytes(data).hex()}
    return {"attributes": attributes, "data": data}


def main():
    request = json.load(sys.stdin)
    out = [convert(m, request["mode"]) for m in request["messages"]]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
