"""serve: the openpi-style websocket policy server and its client (msgpack-numpy, no pickle)."""
