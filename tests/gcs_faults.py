"""An HTTP proxy in front of the local GCS emulator that injects storage faults: error answers,
connections dropped without an answer, and outages in which nothing listens on the port.

Every client (gcsfs, tensorstore, array_record's google-cloud-cpp) is pointed at the proxy, so
a fault reaches whichever library makes the request. Faults are chosen per request by what it
touches (its method and decoded URL, where GCS names the object), so a test can break one
checkpoint's array writes and nothing else.
"""

import dataclasses
import http.client
import http.server
import json
import socket
import sys
import threading
import urllib.parse
from typing import Callable

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "content-length", "host"}


@dataclasses.dataclass(frozen=True)
class Request:
  method: str
  url: str          # path and query, percent-decoded: object names read as paths
  user_agent: str


@dataclasses.dataclass
class Fault:
  matches: Callable[[Request], bool]
  how: str          # "error": an HTTP error answer; "drop": the connection closed unanswered;
                    # "outage": dropped, and nothing listens for `seconds`
  status: int
  times: int | None  # None: until removed
  seconds: float = 0.0
  hits: int = 0


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], OSError):
      return   # a client that hung up mid-answer, or a connection cut by an outage
    super().handle_error(request, client_address)


class FaultyGcsProxy:
  """Forwards to the emulator at `upstream` except where a fault applies. `requests` logs every
  request with what was done to it ("passed", "error 503", "dropped")."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlparse(upstream)
    self._upstream = (parsed.hostname, parsed.port)
    self._faults: list[Fault] = []
    self._lock = threading.Lock()
    self.requests: list[tuple[Request, str]] = []
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = None
    self._connections: set[socket.socket] = set()
    self._timers: list[threading.Timer] = []
    self._closed = False
    self.start()

  def fail(self, matches: Callable[[Request], bool], *, how: str = "error", status: int = 503,
           times: int | None = None, seconds: float = 0.0) -> Fault:
    """Answer matching requests with `status` (or drop them, or begin an outage of `seconds`),
    `times` times or until cleared."""
    fault = Fault(matches, how, status, times, seconds)
    with self._lock:
      self._faults.append(fault)
    return fault

  def clear(self) -> None:
    with self._lock:
      self._faults.clear()

  def start(self) -> None:
    """(Re)open the port: the end of an outage."""
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def setup(self):
        super().setup()
        with proxy._lock:
          proxy._connections.add(self.connection)

      def finish(self):
        with proxy._lock:
          proxy._connections.discard(self.connection)
        try:
          super().finish()
        except OSError:
          pass

      def log_message(self, *args):   # quiet
        del args

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
              return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _handle(self):
        body = self._body()
        request = Request(self.command, urllib.parse.unquote(self.path),
                          self.headers.get("User-Agent", ""))
        fault = proxy._fault_for(request)
        if fault is not None and fault.how == "outage":
          proxy._log(request, "outage")
          proxy.stop()
          proxy._restart_after(fault.seconds)
          return
        if fault is not None and fault.how == "drop":
          proxy._log(request, "dropped")
          self.close_connection = True
          try:
            self.connection.shutdown(socket.SHUT_RDWR)
          except OSError:
            pass
          return
        if fault is not None:
          proxy._log(request, f"error {fault.status}")
          payload = json.dumps({"error": {"code": fault.status, "message": "injected fault"}})
          self._answer(fault.status, [("Content-Type", "application/json")], payload.encode())
          return
        proxy._log(request, "passed")
        upstream = http.client.HTTPConnection(*proxy._upstream, timeout=60)
        try:
          headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
          upstream.request(self.command, self.path, body=body if body else None,
                           headers=headers)
          response = upstream.getresponse()
          data = response.read()
          self._answer(response.status,
                       [(k, v) for k, v in response.getheaders()
                        if k.lower() not in _HOP_BY_HOP], data)
        finally:
          upstream.close()

      def _answer(self, status, headers, data):
        self.send_response(status)
        for key, value in headers:
          self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)

      do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

    server = _Server(("127.0.0.1", self.port), Handler)
    # A short poll: stop() returns within 50 ms, so an outage lasts what was asked.
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                     daemon=True).start()
    self._server = server

  def _restart_after(self, seconds: float) -> None:
    timer = threading.Timer(seconds, self.start)
    with self._lock:
      if self._closed:
        return
      self._timers.append(timer)
    timer.start()

  def close(self) -> None:
    """For good: pending restarts are cancelled."""
    with self._lock:
      self._closed = True
      timers = list(self._timers)
    for timer in timers:
      timer.cancel()
    self.stop()

  def stop(self) -> None:
    """An outage: nothing listens on the port (connections are refused) and open ones are cut,
    until `start()`."""
    server, self._server = self._server, None
    if server is None:
      return
    server.shutdown()
    server.server_close()
    with self._lock:
      connections = list(self._connections)
    for connection in connections:
      try:
        connection.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def _fault_for(self, request: Request) -> Fault | None:
    with self._lock:
      for fault in self._faults:
        if fault.matches(request):
          fault.hits += 1
          if fault.times is not None and fault.hits >= fault.times:
            self._faults.remove(fault)
          return fault
    return None

  def _log(self, request: Request, outcome: str) -> None:
    with self._lock:
      self.requests.append((request, outcome))

  def outcomes(self, matches: Callable[[Request], bool]) -> list[str]:
    with self._lock:
      return [outcome for request, outcome in self.requests if matches(request)]
