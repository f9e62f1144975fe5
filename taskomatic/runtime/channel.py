"""Send and receive messages between the fetcher and its shards.

``multiprocess``'s ``Connection.send`` pickles with dill, whose pure-Python
pickler costs about 50 us per small message here; the messages are plain
frozen dataclasses, so the standard library's C pickler (about 3 us) does.
One message per batch of tasks, so a no-op task costs a few microseconds of
channel time, not three round trips through dill.
"""

from __future__ import annotations

import pickle

from multiprocess.connection import Connection


def send(channel: Connection, message: object) -> None:
    channel.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def recv(channel: Connection) -> object:
    return pickle.loads(channel.recv_bytes())
