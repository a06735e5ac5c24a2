"""Parses Pub/Sub messages with the CloudEvents Python SDK, an implementation
independent of the relay, for tests/pubsub.rs.

Usage: python3 -I tests/cloudevents_pubsub_parse.py PYCE_DIR < messages.json

The SDK has no Pub/Sub binding, but the CloudEvents Pub/Sub protocol
binding maps attributes exactly like the HTTP binding maps headers:
binary mode puts each attribute in a `ce-<name>` attribute and
`datacontenttype` in `content-type`, the data is the message data;
structured mode has `content-type: application/cloudevents+json` and the
JSON event as data. The one difference is that HTTP header values are
percent-encoded and Pub/Sub attribute values are not, so values are
percent-encoded here exactly as the SDK's HTTP encoder would, which makes
its decoding the identity.

stdin is {"mode": "structured" | "binary", "messages": [{"attributes":
{NAME: VALUE, ...}, "data": HEX}, ...]}; stdout is one JSON object per
message: {"attributes": {...}, "data": ...}, with `time` as RFC 3339 UTC
with six fractional digits. Any message the SDK rejects exits non-zero.
"""

import json
import sys
from datetime import timedelta
from urllib.parse import quote

sys.path.insert(0, sys.argv[1])

from cloudevents.core.bindings.http import (  # noqa: E402
    _CE_SAFE_CHARS,
    HTTPMessage,
    from_binary,
    from_structured,
)
from cloudevents.core.formats.json import JSONFormat  # noqa: E402
from cloudevents.core.v1.event import CloudEvent  # noqa: E402


def convert(message, mode):
    headers = {}
    for name, value in message["attributes"].items():
        if name.startswith("ce-"):
            headers[name] = quote(value, safe=_CE_SAFE_CHARS)
        elif name == "content-type":
            headers[name] = value
        else:
            raise SystemExit(f"attribute {name!r} is neither ce-<name> nor content-type")
    body = bytes.fromhex(message["data"])
    parse = from_structured if mode == "structured" else from_binary
    event = parse(HTTPMessage(headers=headers, body=body), JSONFormat(), CloudEvent)
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
