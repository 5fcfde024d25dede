"""A CRI client on gRPC's C core (Python grpcio), for tests/cri_proxy.rs.

Usage: grpc_c_core_client.py SOCKET MODE METHOD...

MODE picks the :authority the channel sends:
  default   whatever this grpcio sends for a unix: target (localhost up to about 1.5x; newer
            releases send the socket path percent-encoded, leading slash dropped)
  c-core    that percent-encoded path, set explicitly, so any grpcio version sends it
  localhost what grpc-go clients (kubelet, crictl) send

Each METHOD (a full path such as /runtime.v1.RuntimeService/Version) is called twice on one
channel with an empty request, so the second call reuses the connection's HPACK table. Prints
one JSON object per call: {"method", "code", "details", "response_hex"}.
"""

import json
import sys
import urllib.parse

import grpc


def main():
    sock, mode, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    options = []
    if mode == "c-core":
        authority = urllib.parse.quote(sock.lstrip("/"), safe="")
        options.append(("grpc.default_authority", authority))
    elif mode == "localhost":
        options.append(("grpc.default_authority", "localhost"))
    elif mode != "default":
        raise SystemExit(f"unknown mode {mode}")
    with grpc.insecure_channel("unix:" + sock, options=options) as channel:
        for method in methods:
            call = channel.unary_unary(
                method,
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            for _ in range(2):
                out = {"method": method}
                try:
                    response = call(b"", timeout=10)
                    out.update(code="OK", details="", response_hex=response.hex())
                except grpc.RpcError as e:
                    out.update(code=e.code().name, details=e.details(), response_hex=None)
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
