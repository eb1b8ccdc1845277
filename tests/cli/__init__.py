"""Tests of the ``fishchat-iot`` operator CLI: the real console script as a subprocess."""
