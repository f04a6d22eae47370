"""Start the real app with uvicorn on a free loopback port, in a thread of the test process."""
from __future__ import annotations

import socket
import threading
import time


class RunningServer:
    def __init__(self, app):
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.app, self.port = app, sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def engine(self):
        return self.app.state.engine

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def slowed(model, seconds: float):
    """Make every forward of `model` take at least `seconds` longer (a stand-in for a big model)."""
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    return model
