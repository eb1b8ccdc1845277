"""A plain amqtt 0.12 broker (anonymous, none of the gateway's plugins or workarounds)
for ``fishchat-iot bench`` and the MQTT control tests: ``python -m
firmware_sim.bench.plain_amqtt PORT`` prints ``ready`` once it listens and stops on
SIGTERM or SIGINT. Runs on uvloop when it is installed, as ``fishchat-iot up`` does."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from amqtt.broker import Broker


async def main(port: int) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
    else:
        uvloop.run(main(int(sys.argv[1])))
