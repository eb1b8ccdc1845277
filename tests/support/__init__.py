"""Helpers shared by the test suites that drive a real ``fishchat-iot up`` process:
``server`` starts and stops it, ``raw_client`` speaks the TCP frames by hand."""
