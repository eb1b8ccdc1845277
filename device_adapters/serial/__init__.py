"""Serial devices (UART, USB-serial, RFC 2217, serial-over-TCP): COBS frames with a CRC
carrying the same command frames as the TCP protocol. ``docs/serial.md`` is the
reference; ``adapter.py`` bridges each port to its own msg_server session."""
