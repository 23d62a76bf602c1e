#!/usr/bin/env python3
"""A strict HTTP/1.1 app server for the request-smuggling tests.

    strict_app.py PORT LOG_FILE

Listens on 127.0.0.1:PORT (0 picks one) and prints the bound port as the first line of stdout.
Parses every connection with h11 (pure Python, strict, and independent of the httparse/hyper
code inside lameduck), so a request lameduck forwards is judged by a second parser. Each
request it parses is one JSON line in LOG_FILE (flushed per line):

    {"conn": 3, "seq": 1, "method": "POST", "target": "/a", "http_version": "1.1",
     "headers": [["Host", "x"], ...],      # names as received, values as h11 keeps them (latin-1)
     "cl_and_te": false,                   # both Content-Length and Transfer-Encoding present
     "content_length": ["5"], "transfer_encoding": [],
     "body_b64": "...", "body_len": 5, "trailers": [[..]]}

and it answers `200` with body `ok <conn>.<seq>` and headers `x-app-seq: <conn>.<seq>`,
`x-app-target: <target>` (so a client can tell whose response it got). A protocol error
records {"conn": .., "parse_error": "...", "truncated": bool} and closes the connection;
`truncated` means the peer closed in the middle of a message (an aborted request, not one
framed differently).

Special targets (response-direction tests): after reading the request the app writes a raw,
malformed response instead of the h11 one, then closes:
    /bad-response/cl-te     Content-Length and Transfer-Encoding: chunked
    /bad-response/two-cl    two different Content-Length values
    /bad-response/garbage   not an HTTP response at all
Also `/bad-response/*` requests are recorded like every other.

Stdlib + h11 only. Every socket read has a timeout (30 s); the process ends on SIGTERM/SIGINT
or when stdin closes (so a test that dies does not leave it behind).
"""

import base64
import json
import signal
import socket
import sys
import threading

import h11

READ_TIMEOUT = 30.0
MAX_CONNS = 512

BAD_RESPONSES = {
    "/bad-response/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
                           b"x-app-seq: bad\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "/bad-response/two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 10\r\n"
                            b"x-app-seq: bad\r\n\r\nhellohello",
    "/bad-response/garbage": b"\x00\x01garbage that is no HTTP response\r\n\r\n",
}


class Log:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()
        self.next_conn = 0

    def conn_id(self):
        with self.lock:
            self.next_conn += 1
            return self.next_conn

    def write(self, record):
        line = json.dumps(record, sort_keys=True)
        with self.lock:
            self.f.write(line + "\n")
            self.f.flush()


def latin1(b):
    return b.decode("latin-1")


def serve(sock, log, conn_id):
    sock.settimeout(READ_TIMEOUT)
    conn = h11.Connection(h11.SERVER)
    seq = 0
    closed = False
    try:
        while True:
            # One request.
            request = None
            body = bytearray()
            trailers = []
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    log.write({"conn": conn_id, "parse_error": str(e), "truncated": closed,
                               "seq_before": seq})
                    return
                if event is h11.NEED_DATA:
                    if request is not None and conn.they_are_waiting_for_100_continue:
                        sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                    try:
                        data = sock.recv(65536)
                    except (socket.timeout, OSError):
                        return
                    if not data:
                        closed = True
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    trailers = [[latin1(n), latin1(v)] for n, v in event.headers.raw_items()]
                    break
            seq += 1
            raw = [[latin1(n), latin1(v)] for n, v in request.headers.raw_items()]
            cl = [v for n, v in raw if n.lower() == "content-length"]
            te = [v for n, v in raw if n.lower() == "transfer-encoding"]
            target = latin1(request.target)
            log.write({
                "conn": conn_id,
                "seq": seq,
                "method": latin1(request.method),
                "target": target,
                "http_version": latin1(request.http_version),
                "headers": raw,
                "cl_and_te": bool(cl) and bool(te),
                "content_length": cl,
                "transfer_encoding": te,
                "body_b64": base64.b64encode(bytes(body)).decode("ascii"),
                "body_len": len(body),
                "trailers": trailers,
            })
            path = target.split("?", 1)[0]
            if path in BAD_RESPONSES:
                sock.sendall(BAD_RESPONSES[path])
                return
            tag = f"{conn_id}.{seq}"
            text = f"ok {tag}".encode()
            headers = [("content-type", "text/plain"), ("content-length", str(len(text))),
                       ("x-app-seq", tag), ("x-app-target", request.target)]
            try:
                out = conn.send(h11.Response(status_code=200, headers=headers))
                out += conn.send(h11.Data(data=text))
                out += conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError as e:
                log.write({"conn": conn_id, "parse_error": f"cannot answer: {e}", "truncated": False,
                           "seq_before": seq})
                return
            sock.sendall(out)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except OSError:
        return
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    log = Log(sys.argv[2] if len(sys.argv) > 2 else "/dev/null")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    print(listener.getsockname()[1], flush=True)

    def stop(*_):
        listener.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def watch_stdin():
        try:
            while sys.stdin.read(4096):
                pass
        except (OSError, ValueError):
            pass
        import os
        os._exit(0)

    if "--exit-on-stdin-eof" in sys.argv:
        threading.Thread(target=watch_stdin, daemon=True).start()

    slots = threading.BoundedSemaphore(MAX_CONNS)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        conn_id = log.conn_id()
        slots.acquire()

        def run(sock=sock, conn_id=conn_id):
            try:
                serve(sock, log, conn_id)
            finally:
                slots.release()

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    main()
